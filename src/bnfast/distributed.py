"""Collectives over MPI for data-parallel batch normalization and training.

Every process (rank) of an MPI communicator holds a slice of the batch; the
per-channel Welford states of the slices (:class:`bnfast.Moments`) are
gathered and merged with Chan's formula (:meth:`Moments.merge`) in rank order,
so every rank computes the statistics of the whole batch and gets bit-identical
results.  :class:`bnfast.SyncBatchNorm`, :func:`bnfast.recalibrate` and
:func:`bnfast.nn.fit` build on these helpers.

Nothing here imports :mod:`mpi4py` at import time: ``import bnfast`` works
without it, and only the default communicator (``comm=None``, meaning
``MPI.COMM_WORLD``) needs it (``pip install "bnfast[mpi]"`` installs mpi4py and
the MPICH wheel, which brings ``mpiexec``).  Any object with mpi4py's
``Get_rank``, ``Get_size``, ``Allgather``, ``Reduce`` and ``Bcast`` methods
works as ``comm``.

No-hang rule: every rank takes part in the same collectives in the same order
whatever its local input.  A rank whose input is bad still joins the exchange,
carrying an error flag; then every rank raises (the bad rank its own error,
the others a ValueError naming it), and no state changes anywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._moments import Moments

__all__ = ["allreduce_moments", "get_comm"]

_INSTALL_HINT = (
    'bnfast.distributed needs mpi4py and an MPI library: pip install "bnfast[mpi]" '
    "(installs mpi4py and the mpich wheel, which provides mpiexec)"
)

# Header exchanged before a variable-size collective: [error flag, channels, dtype code].
_HEADER = 3
_DTYPE_CODES: dict[np.dtype, int] = {np.dtype(np.float32): 1, np.dtype(np.float64): 2}


def get_comm(comm: Any = None) -> Any:
    """The communicator to use: ``comm`` itself, or ``MPI.COMM_WORLD`` when it is None.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm or None
        An intracommunicator; None selects ``mpi4py.MPI.COMM_WORLD``.

    Returns
    -------
    mpi4py.MPI.Comm
        The communicator.

    Raises
    ------
    ImportError
        ``comm`` is None and mpi4py is not installed (the message says what to
        install).
    """
    if comm is not None:
        return comm
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return MPI.COMM_WORLD


def _dtype_code(dtype: Any) -> int:
    return _DTYPE_CODES.get(np.dtype(dtype), 0) if dtype is not None else 0


def _agree(comm: Any, error: BaseException | None, channels: int, dtype: Any = None) -> None:
    """One small collective: raise on every rank unless every rank is ready and consistent.

    Each rank contributes (whether its local step failed, its channel count,
    its dtype).  If a rank failed, it re-raises its own ``error`` and every
    other rank raises a ValueError naming the failed ranks; channel counts
    (or dtypes, when given) that differ across ranks raise ValueError on every
    rank.  All ranks therefore leave this call the same way.
    """
    size = comm.Get_size()
    mine = np.array([error is not None, channels if error is None else -1, _dtype_code(dtype)], np.int64)
    table = np.empty((size, _HEADER), np.int64)
    comm.Allgather(mine, table)
    failed = np.flatnonzero(table[:, 0]).tolist()
    if error is not None:
        raise error
    if failed:
        raise ValueError(
            f"rank(s) {failed} of {size} rejected their input (see the error there); "
            "nothing was changed on any rank"
        )
    if np.any(table[:, 1] != table[0, 1]):
        raise ValueError(
            f"inconsistent channel counts across ranks: {table[:, 1].tolist()} (rank order); "
            "nothing was changed on any rank"
        )
    if dtype is not None and np.any(table[:, 2] != table[0, 2]):
        names = {v: k.name for k, v in _DTYPE_CODES.items()}
        raise ValueError(
            f"inconsistent dtypes across ranks: {[names.get(int(c), '?') for c in table[:, 2]]} "
            "(rank order); nothing was changed on any rank"
        )


def _gather(comm: Any, buf: np.ndarray) -> np.ndarray:
    """``Allgather`` of a float64 vector: an array (ranks, len(buf)) in rank order."""
    table = np.empty((comm.Get_size(), buf.shape[0]), np.float64)
    comm.Allgather(np.ascontiguousarray(buf, np.float64), table)
    return table


def _allreduce_moments(comm: Any, local: Moments | None, error: BaseException | None,
                       channels: int, dtype: Any = None) -> Moments:
    """Global state from every rank's ``local`` state: a header, then one Allgather.

    ``local`` is packed as [count (int64 bits), mean, m2] in one float64
    buffer; the gathered states merge with :meth:`Moments.merge` in rank
    order, the same computation on every rank.
    """
    _agree(comm, error, channels, dtype)
    assert local is not None
    C = len(local)
    buf = np.empty(3 * C, np.float64)
    buf[:C] = local.count.view(np.float64)  # the int64 bits, exact for any count
    buf[C:2 * C] = local.mean
    buf[2 * C:] = local.m2
    table = _gather(comm, buf)
    total = None
    for row in table:
        state = Moments(np.ascontiguousarray(row[:C]).view(np.int64), row[C:2 * C], row[2 * C:])
        total = state if total is None else total.merge(state)
    assert total is not None
    return total


def allreduce_moments(moments: Moments, comm: Any = None) -> Moments:
    """Merge the per-channel Welford states of every rank into the state of the whole data.

    Every rank passes the :class:`~bnfast.Moments` of its own data; every
    rank gets the same (bit-identical) state of the union: the states are
    gathered in one collective (count, mean and m2 packed in one buffer,
    after a small header that checks the ranks agree) and merged with
    Chan's formula (:meth:`Moments.merge`) in rank order.  A rank may hold no
    data (a state of zero counts).

    Parameters
    ----------
    moments : Moments
        This rank's state, e.g. ``bnfast.moments(x_local)``.
    comm : mpi4py.MPI.Comm, optional
        Communicator; default ``mpi4py.MPI.COMM_WORLD``.  Must be called by
        every rank of ``comm``.

    Returns
    -------
    Moments
        The state of all ranks' data; ``var(ddof=1)`` is the unbiased
        variance of the concatenation.

    Raises
    ------
    TypeError
        On a rank that did not pass a Moments (the other ranks raise
        ValueError).
    ValueError
        On every rank, when the ranks' channel counts differ or a rank
        passed something else than a Moments.
    ImportError
        ``comm`` is None and mpi4py is not installed.

    Examples
    --------
    Under ``mpiexec -n 2 python script.py``, each rank with its own slice:

    >>> import numpy as np, bnfast
    >>> from bnfast.distributed import allreduce_moments
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 5))
    >>> total = allreduce_moments(bnfast.moments(x))    # doctest: +SKIP
    >>> total.var(ddof=1)                               # of every rank's x  # doctest: +SKIP
    """
    comm = get_comm(comm)
    error: BaseException | None = None
    if not isinstance(moments, Moments):
        error = TypeError(f"allreduce_moments expects a bnfast.Moments, got {type(moments).__name__}")
        channels = -1
    else:
        channels = len(moments)
    return _allreduce_moments(comm, moments if error is None else None, error, channels)


def _sum_flagged(comm: Any, values: np.ndarray, error: BaseException | None) -> np.ndarray:
    """Sum a float64 vector over ranks in rank order (one Allgather), with an error flag.

    The buffer carries one extra slot: whether this rank failed.  A failed
    rank still sends a buffer of the agreed length (``values`` of zeros);
    then every rank raises (the failed one its own error).  The sum is the
    same computation on every rank, so the result is bit-identical.
    """
    buf = np.empty(values.shape[0] + 1, np.float64)
    buf[0] = 1.0 if error is not None else 0.0
    buf[1:] = values
    table = _gather(comm, buf)
    if error is not None:
        raise error
    failed = np.flatnonzero(table[:, 0]).tolist()
    if failed:
        raise ValueError(
            f"rank(s) {failed} of {comm.Get_size()} failed in this collective step (see the error "
            "there); nothing was changed on any rank"
        )
    total = table[0, 1:].copy()
    for row in table[1:]:
        total += row[1:]
    return total


def _sum_identical(comm: Any, values: np.ndarray) -> np.ndarray:
    """Sum a (large) float64 vector over ranks: Reduce to rank 0, then Bcast.

    Two collectives whose traffic scales like an Allreduce; the broadcast
    makes the result bit-identical on every rank whatever the reduction
    order of the MPI library.
    """
    values = np.ascontiguousarray(values, np.float64)
    total = np.empty_like(values)
    comm.Reduce(values, total, root=0)
    comm.Bcast(total, root=0)
    return total
