"""Cost of a SyncBatchNorm training step against a local BatchNorm step, over MPI.

Run under mpiexec, one process per rank (each holds a slice of the given
per-rank shape)::

    OMP_NUM_THREADS=1 mpiexec -n 2 python benchmarks/mpi_syncbn.py              # (32,64,28,28) per rank
    OMP_NUM_THREADS=1 mpiexec -n 4 python benchmarks/mpi_syncbn.py --json out.json
    mpiexec -n 2 python benchmarks/mpi_syncbn.py --shape 4,8,6,6 --repeat 5    # a quick smoke run

A step is forward + backward of one layer on the rank's slice.  Each timed
step starts after a barrier and its time is the slowest rank's (what a
data-parallel step waits for); the table gives the median and the minimum
over ``--repeat`` steps for

* ``BatchNorm2d``: bnfast's layer on the local slice (no communication);
* ``SyncBatchNorm``: the same slice normalized with the global statistics;
* ``collectives only``: the three Allgather calls of a SyncBatchNorm step
  (header, statistics, gradient sums) on buffers of the same sizes;
* ``torch.nn.SyncBatchNorm`` (``--torch``, gloo backend, CPU tensors): PyTorch
  2.x refuses CPU input ("SyncBatchNorm expected input tensor to be on GPU
  ..."); the script reports what happens and, for reference, times
  ``torch.nn.BatchNorm2d`` on the local slice.

The overhead is ``SyncBatchNorm / BatchNorm2d - 1``.  Measure on a quiet
machine, with the rank count at most the cores (``OMP_NUM_THREADS`` times the
ranks), and pin ``--threads`` to what the kernels should use per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import numpy as np
from mpi4py import MPI

import bnfast


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())


def _timed(comm, step, repeat: int, warmup: int) -> list[float]:
    """Per-step seconds of the slowest rank, after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeat):
        comm.Barrier()
        t0 = time.perf_counter()
        step()
        times.append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    return times


def _torch_rows(comm, shape, dtype, repeat: int, warmup: int) -> tuple[list[tuple[str, list[float]]], str]:
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return [], "torch is not installed: skipped"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    port = None
    if comm.Get_rank() == 0 and "MASTER_PORT" not in os.environ:
        with socket.socket() as s:  # a free port on rank 0's host, for gloo's rendezvous
            s.bind(("", 0))
            port = str(s.getsockname()[1])
    port = comm.bcast(port or os.environ.get("MASTER_PORT"), root=0)
    os.environ["MASTER_PORT"] = port
    dist.init_process_group("gloo", rank=comm.Get_rank(), world_size=comm.Get_size())
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    x = torch.randn(shape, dtype=tdtype, requires_grad=True)
    g = torch.randn(shape, dtype=tdtype)
    note = ""
    rows = []
    sync = torch.nn.SyncBatchNorm(shape[1], dtype=tdtype)
    try:
        sync(x).backward(g)
    except Exception as exc:  # PyTorch 2.x: GPU/XPU/privateuse1 only
        note = f"torch.nn.SyncBatchNorm on CPU tensors (gloo): {type(exc).__name__}: {exc}"
    else:
        rows.append(("torch.nn.SyncBatchNorm (gloo)", _timed(comm, lambda: sync(x).backward(g), repeat, warmup)))
        note = "torch.nn.SyncBatchNorm ran on CPU tensors over gloo"
    local = torch.nn.BatchNorm2d(shape[1], dtype=tdtype) if len(shape) == 4 else torch.nn.BatchNorm1d(
        shape[1], dtype=tdtype)
    rows.append(("torch.nn.BatchNorm (local)", _timed(comm, lambda: local(x).backward(g), repeat, warmup)))
    dist.destroy_process_group()
    return rows, note


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=_shape, default=(32, 64, 28, 28), help="per-rank input shape (N,C,...)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--repeat", type=int, default=50, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="bnfast.set_num_threads per rank")
    p.add_argument("--torch", action="store_true", help="also try torch.nn.SyncBatchNorm on gloo")
    p.add_argument("--json", metavar="FILE", help="write the raw per-step times")
    args = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if args.threads is not None:
        bnfast.set_num_threads(args.threads)
    dtype = np.dtype(args.dtype)
    shape, C = args.shape, args.shape[1]
    rng = np.random.default_rng(rank)
    x = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    local = bnfast.BatchNorm(C, dtype=dtype)
    sync = bnfast.SyncBatchNorm(C, dtype=dtype, comm=comm)
    header, stats, sums = np.zeros(3, np.int64), np.zeros(3 * C), np.zeros(2 * C + 1)
    tables = [np.empty((size,) + a.shape, a.dtype) for a in (header, stats, sums)]

    def collectives() -> None:
        for a, t in zip((header, stats, sums), tables):
            comm.Allgather(a, t)

    def step(layer) -> None:
        layer(x)
        layer.backward(g)

    rows = [
        ("bnfast.BatchNorm (local)", _timed(comm, lambda: step(local), args.repeat, args.warmup)),
        ("bnfast.SyncBatchNorm", _timed(comm, lambda: step(sync), args.repeat, args.warmup)),
        ("collectives only (3 Allgather)", _timed(comm, collectives, args.repeat, args.warmup)),
    ]
    note = ""
    if args.torch:
        extra, note = _torch_rows(comm, shape, dtype, args.repeat, args.warmup)
        rows += extra
    if rank == 0:
        print(f"SyncBatchNorm step (forward + backward) at {size} ranks, {shape} {dtype} per rank, "
              f"{bnfast.get_num_threads()} kernel thread(s) per rank, {args.repeat} steps")
        print(f"{'case':<34} {'median ms':>10} {'min ms':>9}")
        for name, t in rows:
            print(f"{name:<34} {1e3 * np.median(t):>10.3f} {1e3 * np.min(t):>9.3f}")
        base, synced = np.median(rows[0][1]), np.median(rows[1][1])
        print(f"overhead of SyncBatchNorm over the local step: {100 * (synced / base - 1):+.1f}% (median)")
        if note:
            print(note)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ranks": size, "shape": list(shape), "dtype": str(dtype), "note": note,
                           "seconds": {name: t for name, t in rows}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
