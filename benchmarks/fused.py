"""Fused batch norm + residual add + activation: memory of a training step and speed.

Memory (tracemalloc, NumPy's allocations): one training step (forward, MSE
loss, backward, SGD step) of Conv-BN-act x 4, measured as the bytes the
forward leaves alive for backward ("retained") and the step's peak above the
memory held before it ("peak"), for

* Conv-BN-LeakyReLU unfused (three layers) vs fused in place
  (``BatchNorm2d(..., activation="leaky_relu", inplace=True)``, InPlace-ABN),
* Conv-BN-ReLU unfused vs fused (``Sequential`` fuses BN + ReLU; not in
  place: ReLU is not invertible).

Speed: ``act(BN(x) + z)`` as one fused call vs batch norm, add and ReLU as
three NumPy-level operations, and vs PyTorch's unfused sequence (if torch is
installed), forward (training) and inference; best of interleaved rounds.

The functions live in ``bnfast._bench_fused`` (``python -m bnfast bench
--fused`` runs them with pinned thread counts).  Run::

    python benchmarks/fused.py --memory
    python benchmarks/fused.py --speed [--shape 32,64,56,56] [--repeat 20]

(timings need a quiet machine; ``--shape 2,4,8,8 --repeat 2`` checks the
script runs.)
"""

from __future__ import annotations

import argparse

from bnfast._bench_fused import memory_report, speed_report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory", action="store_true", help="peak memory of a training step (tracemalloc)")
    p.add_argument("--speed", action="store_true", help="fused vs unfused timings")
    p.add_argument("--shape", default=None, help="N,C,H,W (default 16,32,32,32 memory; 32,64,56,56 speed)")
    p.add_argument("--repeat", type=int, default=20, help="rounds")
    args = p.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(",")) if args.shape else None
    if args.memory or not args.speed:
        memory_report(shape or (16, 32, 32, 32))
    if args.speed:
        from bnfast._bench import _torch

        speed_report(shape or (32, 64, 56, 56), args.repeat, _torch())


if __name__ == "__main__":
    main()
