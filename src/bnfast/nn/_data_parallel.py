"""Data parallelism for :func:`bnfast.nn.fit`: what differs from one process, in one object.

:class:`_Single` is one process (every method the identity); :class:`_Ranks`
spreads each global batch over the ranks of an MPI communicator, sums the
gradients and metrics over them and lets rank 0 alone report.  ``fit`` runs
the same loop with either.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np


def _checksum(a: np.ndarray) -> int:
    """CRC-32 of an array's bytes (the ranks must all hold the same data set)."""
    return zlib.crc32(np.ascontiguousarray(a).data)


class _Single:
    """One process: the global batch is the local batch."""

    rank, size = 0, 1

    def seed(self, seed: Any) -> Any:
        return seed

    def share(self, idx: np.ndarray) -> np.ndarray:
        return idx

    def sum_grads(self, params: list[Any]) -> None:
        pass

    def sum(self, values: list[float]) -> list[float]:
        return values


class _Ranks:
    """The ranks of ``comm``: model replicas kept identical, batches split among them."""

    def __init__(self, comm: Any, model: Any, optimizer: Any, X: np.ndarray, y: np.ndarray,
                 agreed: tuple[Any, ...]) -> None:
        from ..distributed import _sum_flagged, _sum_identical

        self.comm = comm
        self.rank, self.size = int(comm.Get_rank()), int(comm.Get_size())
        self._sum_identical, self._sum_flagged = _sum_identical, _sum_flagged
        params = [p for g in optimizer.param_groups for p in g["params"]]
        # the ranks must agree on everything that sets the number of collective steps
        mine = agreed + (len(params), sum(int(np.size(p)) for p in params), _checksum(X), _checksum(y))
        table = comm.allgather(mine)
        if any(t != table[0] for t in table):
            raise ValueError(
                "fit: the ranks disagree on (samples, epochs, batch_size, drop_last, shuffle, validation "
                f"samples, parameters, parameter elements, CRC-32 of X, of y): {table} (rank order); call fit "
                "with the same arguments, data and model on every rank"
            )
        self._broadcast_state(model, params)

    def _broadcast_state(self, model: Any, params: list[Any]) -> None:
        """Rank 0's parameters and floating-point buffers, copied into every rank's (one Bcast)."""
        arrays = list(params)
        if hasattr(model, "buffers"):
            arrays += [b for b in model.buffers() if b is not None and b.dtype.kind == "f"]
        flat = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays]) if arrays else np.zeros(0)
        self.comm.Bcast(flat, root=0)
        start = 0
        for a in arrays:
            a[...] = flat[start:start + a.size].reshape(a.shape)
            start += a.size

    def seed(self, seed: Any) -> Any:
        """Rank 0's seed for every rank: an int (a Generator on rank 0 draws one; None: fresh entropy)."""
        if self.rank == 0:
            if seed is None or isinstance(seed, np.random.Generator):
                seed = int(np.random.default_rng(seed).integers(2**63, size=1)[0])
        return self.comm.bcast(seed, root=0)

    def share(self, idx: np.ndarray) -> np.ndarray:
        """This rank's part of a global batch: contiguous, sizes differing by at most 1."""
        m = len(idx)
        return idx[m * self.rank // self.size:m * (self.rank + 1) // self.size]

    def sum_grads(self, params: list[Any]) -> None:
        """Replace every ``p.grad`` by its sum over the ranks (one flat buffer, bit-identical everywhere).

        A parameter without a gradient on every rank keeps ``grad = None``
        (the optimizer skips it, as on one process); one flag per parameter
        rides in the same buffer.
        """
        if not params:
            return
        flat = np.concatenate(
            [np.array([p.grad is not None for p in params], np.float64)]
            + [(np.zeros(p.size) if p.grad is None else np.asarray(p.grad, np.float64).ravel()) for p in params]
        )
        total = self._sum_identical(self.comm, flat)
        start = len(params)
        for i, p in enumerate(params):
            if total[i] > 0:
                p.grad = total[start:start + p.size].reshape(p.shape).astype(p.dtype)
            start += p.size

    def sum(self, values: list[float]) -> list[float]:
        """Sum a few scalars over the ranks (rank order)."""
        return self._sum_flagged(self.comm, np.asarray(values, np.float64), None).tolist()
