"""Dataset-statistics recalibration of BatchNorm layers (AdaBN): :func:`recalibrate`.

The running statistics of one layer, or of every BatchNorm layer of a model,
are replaced by the exact pooled statistics of a stream of batches: per-batch
Welford states merged with Chan's formula (:meth:`bnfast.Moments.merge`).
The layers of a model are found through :meth:`Module.modules`; for the
duration of the pass each of them is in the "collect moments" mode it defines
itself (``BatchNorm._collecting_moments``), left in a ``finally`` block.
Nothing is patched and no state changes unless the whole pass succeeds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, Callable

import numpy as np

from .._functional import Moments, moments
from .module import Module
from .normalization import BatchNorm

__all__ = ["recalibrate"]


def _pooled_update(layer: BatchNorm, acc: Moments, calls: int,
                   where: str) -> tuple[BatchNorm, np.ndarray, np.ndarray, int]:
    """The (layer, mean, unbiased var, count) to store, or ValueError naming ``where``."""
    count = np.asarray(acc.count)
    if calls == 0 or count.size == 0 or int(count.min()) == 0:
        raise ValueError(f"recalibrate: {where} received no batch")
    if int(count.min()) < 2:
        raise ValueError(
            f"recalibrate: {where} saw only 1 value per channel; the unbiased variance "
            "needs more than 1 value per channel"
        )
    mean = np.asarray(acc.mean, dtype=np.float64).astype(layer.dtype)
    var = np.asarray(acc.var(ddof=1), dtype=np.float64).astype(layer.dtype)
    return (layer, mean, var, calls)


def _tracking(bn: BatchNorm) -> bool:
    buffers = bn._buffers
    return bn.track_running_stats and all(
        buffers[k] is not None for k in ("running_mean", "running_var", "num_batches_tracked")
    )


def _gather_moments(layer_or_layers: Any, batches: Iterable[Any]) -> list[tuple[BatchNorm, Moments, int, str]]:
    """One pass: (layer, merged moments of its inputs, number of calls, its name) per BatchNorm layer."""
    if isinstance(layer_or_layers, BatchNorm):
        layer = layer_or_layers
        if not _tracking(layer):
            raise ValueError(f"recalibrate: {layer!r} has no running statistics (track_running_stats=False)")
        acc = Moments.zeros(layer.num_features)
        n = 0
        for x in batches:
            x = layer._check_input(x)
            acc = acc.merge(moments(x, axis=layer.axis))
            n += 1
        return [(layer, acc, n, f"{layer!r}")]
    else:
        run: Callable[[Any], Any]
        if isinstance(layer_or_layers, Module):
            roots: list[Module] = [layer_or_layers]
            run = layer_or_layers
        elif isinstance(layer_or_layers, (list, tuple)):
            chain = list(layer_or_layers)
            for i, f in enumerate(chain):
                if not callable(f):
                    raise TypeError(f"recalibrate: element {i} of the sequence is not callable: {f!r}")
            roots = [f for f in chain if isinstance(f, Module)]

            def run(x: Any) -> Any:
                for f in chain:
                    x = f(x)
                return x

        else:
            raise TypeError(
                "recalibrate expects a BatchNorm layer, a bnfast.nn.Module or a list or tuple of "
                f"callables (got {type(layer_or_layers).__name__}); its BatchNorm layers are found "
                "through Module.modules(), so make the model a Module (or pass its layers as a chain)"
            )
        seen: set[int] = set()
        bns: list[BatchNorm] = []
        for root in roots:
            for m in root.modules():
                if isinstance(m, BatchNorm) and id(m) not in seen and _tracking(m):
                    seen.add(id(m))
                    bns.append(m)
        if not bns:
            raise ValueError("recalibrate: no BatchNorm layer with track_running_stats=True found")
        with contextlib.ExitStack() as stack:
            sinks = [stack.enter_context(bn._collecting_moments()) for bn in bns]
            for x in batches:
                run(x)
        return [
            (bn, sink.moments, sink.calls, f"BatchNorm layer #{i} ({bn!r})")
            for i, (bn, sink) in enumerate(zip(bns, sinks))
        ]


def _pool_over_ranks(layer_or_layers: Any, batches: Iterable[Any],
                     comm: Any) -> list[tuple[BatchNorm, Moments, int, str]]:
    """:func:`_gather_moments` on every rank, pooled over the ranks of ``comm``.

    One collective for all layers: their states side by side in one
    :class:`Moments`, plus one slot per layer whose count is the number of
    calls; merged in rank order by :func:`bnfast.distributed._allreduce_moments`.
    A rank whose pass fails still joins it, and then every rank raises.
    """
    from ..distributed import _allreduce_moments

    error: BaseException | None = None
    gathered: list[tuple[BatchNorm, Moments, int, str]] = []
    try:
        gathered = _gather_moments(layer_or_layers, batches)
        states = [acc for _, acc, _, _ in gathered]
        calls = np.array([c for _, _, c, _ in gathered], np.int64)
        local = Moments(
            np.concatenate([m.count for m in states] + [calls]),
            np.concatenate([m.mean for m in states] + [np.zeros(len(calls))]),
            np.concatenate([m.m2 for m in states] + [np.zeros(len(calls))]),
        )
        width = len(local)
    except Exception as exc:
        error, local, width = exc, None, -1
    total = _allreduce_moments(comm, local, error, width)
    pooled, start = [], 0
    n_layers = len(gathered)
    for i, (layer, acc, _, where) in enumerate(gathered):
        stop = start + len(acc)
        part = Moments(total.count[start:stop], total.mean[start:stop], total.m2[start:stop])
        pooled.append((layer, part, int(total.count[width - n_layers + i]), where))
        start = stop
    return pooled


def recalibrate(layer_or_layers: Any, batches: Iterable[Any], comm: Any = None) -> Any:
    """Set running statistics to the exact pooled statistics of a stream of batches (AdaBN).

    For each BatchNorm layer the per-channel moments of every input it sees
    are merged with Chan's formula (:meth:`Moments.merge`), so the result
    equals the mean and *unbiased* variance of the concatenation of all its
    inputs (up to rounding) -- not an average of per-batch variances, which is
    what ``momentum=None`` gives.  ``running_mean`` and ``running_var`` are
    replaced (``momentum`` plays no part) and ``num_batches_tracked`` is set to
    the number of batches the layer saw, as if it had been reset and trained
    with ``momentum=None``.  Nothing is changed if an error occurs.

    Parameters
    ----------
    layer_or_layers : BatchNorm, Module, or list or tuple of callables
        * A single :class:`BatchNorm`: each batch is that layer's input.
        * A :class:`~bnfast.nn.Module` (for example ``bnfast.nn.Sequential``):
          called as ``model(x)``; its BatchNorm layers are those of
          ``model.modules()``.
        * A list or tuple of callables: run as a chain, ``x = f(x)`` for each
          element in order; the BatchNorm layers are those of the
          ``modules()`` of the elements that are Modules (plain functions
          are run but not searched).

        During the pass every BatchNorm layer found that tracks running
        statistics gathers the statistics of its *own* inputs and returns
        them normalized with the current *batch* statistics and its weight
        and bias, without touching any state -- the same outputs as training
        mode, which is what ``torch.optim.swa_utils.update_bn`` does.  The
        pass is single, so ``batches`` may be a one-shot generator.  Other
        layers run in whatever mode they are in (put dropout in eval mode
        first if desired); BatchNorm layers without running statistics, and
        layers reachable only through plain functions, behave as usual.
        A layer called several times per batch pools all of its inputs.
    batches : iterable of numpy.ndarray
        Input batches (of the layer's dtype, with its channel axis).
    comm : mpi4py.MPI.Comm, optional
        Pool the statistics over every rank of this MPI communicator (AdaBN
        on data spread over processes; every rank calls ``recalibrate`` with
        its own ``batches``, possibly none, and gets the same statistics,
        those of all ranks' data).  One collective for all layers, after
        the local pass.  None (the default): this process's data only.

    Returns
    -------
    object
        ``layer_or_layers``.

    Raises
    ------
    ValueError
        ``batches`` is empty, a BatchNorm layer received no input or only one
        value per channel, a single layer does not track running statistics,
        or a model contains no BatchNorm layer that tracks them; with
        ``comm``, on every rank when any rank failed or the ranks' models
        differ in their BatchNorm channels.
    TypeError
        ``layer_or_layers`` is neither a Module nor a list or tuple of
        callables, or an element of the sequence is not callable.

    Examples
    --------
    >>> import numpy as np, bnfast
    >>> from bnfast import nn
    >>> model = nn.Sequential(nn.Linear(3, 4, rng=0), nn.BatchNorm1d(4))
    >>> rng = np.random.default_rng(0)
    >>> data = [rng.standard_normal((16, 3)).astype(np.float32) for _ in range(5)]
    >>> _ = bnfast.recalibrate(model, data)
    >>> int(model[1].num_batches_tracked)
    5
    """
    if comm is None:
        gathered = _gather_moments(layer_or_layers, batches)
    else:
        gathered = _pool_over_ranks(layer_or_layers, batches, comm)
    updates = [_pooled_update(layer, acc, calls, where) for layer, acc, calls, where in gathered]
    for layer, mean, var, n in updates:  # cannot fail: shapes and dtypes are the layers' own
        rm, rv, nbt = (layer._buffers[k] for k in ("running_mean", "running_var", "num_batches_tracked"))
        assert rm is not None and rv is not None and nbt is not None  # checked by _tracking
        rm[...] = mean
        rv[...] = var
        nbt[...] = n
    return layer_or_layers
