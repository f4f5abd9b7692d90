#!/usr/bin/env python3
"""Time two builds of bnfast's kernels in one process, round by round.

Usage::

    python benchmarks/ab_inprocess.py OTHER [--threads 2] [--rounds 30] [--case SPEC ...]

OTHER is another build: a source tree built in place (its
``src/bnfast/_kernels*.so``) or the extension file itself, e.g. a git
worktree of the commit before a change.  This process imports bnfast as
usual ("this" build), loads OTHER's extension beside it, and times each case
with one build and then the other, alternating round by round; each side
keeps its best time.  On a shared or virtual machine two processes can run the
same code 15-30% apart (memory placement, frequency, neighbours), far more
than most kernel changes: within one process the two builds see the same
machine.  Cases that spill out of the cache can still swing between runs
(by up to 20% on a Zen 4 VM): repeat a run before trusting a ratio.

A case SPEC is ``OP:SHAPE[:LAYOUT[:DTYPE]]``:

* OP: ``train``, ``inference`` or ``backward`` (batch norm, with ``out=``), or
  a family member and direction, ``layer_norm/forward``, ``group_norm/backward``,
  ... (the members of ``python -m bnfast bench --family``);
* SHAPE: ``64x64x112x112`` (NCHW order; layer and RMS norm: the array's shape);
* LAYOUT: ``NCHW`` (default; ``rows`` for layer and RMS norm) or ``NHWC``;
* DTYPE: ``float32`` (default), ``float64``, ``float16`` or ``bfloat16``
  (with ml_dtypes).

Both builds are Python-level swaps of ``bnfast._kernels`` in bnfast's modules:
the Python layer is this tree's, only the extensions differ.  Output: one line
per case, the two best times and their ratio.
"""

from __future__ import annotations

import argparse
import glob
import importlib.machinery
import importlib.util
import os
import sys
import time

import numpy as np

import bnfast
from bnfast import _bench, _bench_family

DEFAULT_CASES = ["train:64x64x112x112", "inference:64x64x112x112", "backward:64x64x112x112",
                 "backward:32x64x28x28:NHWC", "layer_norm/forward:4096x768:rows"]


def load_other(path: str):
    """The extension module of another build: ``path`` is the .so or a source tree."""
    if os.path.isdir(path):
        found = glob.glob(os.path.join(path, "src", "bnfast", "_kernels*.so"))
        if not found:
            raise SystemExit(f"no built extension under {path}/src/bnfast (build it in place first)")
        path = found[0]
    loader = importlib.machinery.ExtensionFileLoader("bnfast._kernels", path)
    spec = importlib.util.spec_from_file_location("bnfast._kernels", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules["bnfast._kernels"] = bnfast._kernels  # this build stays the imported one
    if os.path.realpath(module.__file__) == os.path.realpath(bnfast._kernels.__file__):
        raise SystemExit("OTHER is this build's own extension")
    return module


def _users():
    """bnfast's modules that call the extension through their `_kernels` name."""
    this = bnfast._kernels
    return [m for name, m in list(sys.modules.items())
            if name.startswith("bnfast") and getattr(m, "_kernels", None) is this]


def _dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes  # noqa: F401, PLC0415  (registers the dtype)
    return np.dtype(name)


def case_fn(spec: str):
    """(label, callable) of a case SPEC (see the module's docstring)."""
    parts = spec.split(":")
    if not 2 <= len(parts) <= 4:
        raise SystemExit(f"bad case {spec!r}: OP:SHAPE[:LAYOUT[:DTYPE]]")
    op, shape = parts[0], tuple(int(s) for s in parts[1].split("x"))
    layout = parts[2] if len(parts) > 2 else ("rows" if op.startswith(("layer_norm", "rms_norm")) else "NCHW")
    dtype = _dtype(parts[3] if len(parts) > 3 else "float32")
    channels_last = layout == "NHWC"
    x, g, axis = _bench._make(shape, channels_last, dtype)
    if "/" in op:
        member, direction = op.split("/")
        fn = _bench_family._case_fns(member, direction, x, g, axis, None, channels_last)["bnfast"]
    else:
        fn = _bench._case_fns(op, x, g, axis, None, channels_last)["bnfast"]
    return f"{op} {parts[1]} {layout} {dtype.name}", fn


def compare(other, specs, threads: int, rounds: int, calls: int = 3):
    """[(label, this best, other best)] of every case, rounds interleaved."""
    this, users = bnfast._kernels, _users()
    builds = {"this": this, "other": other}
    for k in builds.values():
        k.set_num_threads(threads)

    def use(k):
        for m in users:
            m._kernels = k

    results = []
    try:
        for spec in specs:
            label, fn = case_fn(spec)
            best = {}
            for _ in range(rounds):
                for name, k in builds.items():
                    use(k)
                    fn()  # the first call after a swap warms that build's code
                    t = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    best[name] = min(best.get(name, float("inf")), (time.perf_counter() - t) / calls)
            results.append((label, best["this"], best["other"]))
    finally:
        use(this)
    return results


def main(argv=None) -> int:
    """Command line: see the module's docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("other", help="another build: a source tree built in place, or its _kernels .so")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--case", action="append", dest="cases", metavar="SPEC",
                   help="OP:SHAPE[:LAYOUT[:DTYPE]] (repeatable); default: " + " ".join(DEFAULT_CASES))
    args = p.parse_args(argv)
    other = load_other(args.other)
    print(f"this:  {bnfast._kernels.__file__}\nother: {other.__file__}")
    print(f"{args.threads} threads, best of {args.rounds} interleaved rounds; {_bench.header_lines()[0]}")
    for label, t_this, t_other in compare(other, args.cases or DEFAULT_CASES, args.threads, args.rounds):
        print(f"{label:44s} this {t_this * 1e6:10.1f} us  other {t_other * 1e6:10.1f} us  "
              f"this/other {t_this / t_other:6.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
