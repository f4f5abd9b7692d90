"""`python -m bnfast`: configuration, a self-check against the reference, a timing table."""

from __future__ import annotations

import argparse
import textwrap
import time
from collections.abc import Sequence

import numpy as np

from . import _baseline, _cli, _reference
from ._config import show_config
from ._functional import batch_norm_backward, batch_norm_forward, batch_norm_inference

LAYOUTS = {"NCHW": 1, "NHWC": -1}


def _to_layout(x_nchw: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1)) if layout == "NHWC" else x_nchw


def self_check(seed: int = 0) -> list[tuple[str, float, float]]:
    """Largest errors of every op against the float64 reference.

    Returns
    -------
    list of (case, max abs error, tolerance)
    """
    rng = np.random.default_rng(seed)
    rows = []
    for layout, axis in LAYOUTS.items():
        for dtype, tol in ((np.float32, 1e-4), (np.float64, 1e-10)):
            x = _to_layout((rng.standard_normal((4, 8, 9, 7)) * 3 + 5).astype(dtype), layout)
            g = rng.standard_normal(x.shape).astype(dtype)
            w, b = rng.standard_normal(8).astype(dtype), rng.standard_normal(8).astype(dtype)
            y, mean, invstd = batch_norm_forward(x, w, b, axis=axis)
            ry, rmean, rinvstd, _, _ = _reference.batch_norm_forward(x, w, b, axis=axis)
            gi, gw, gb = batch_norm_backward(g, x, mean, invstd, w, axis=axis)
            rgi, rgw, rgb = _reference.batch_norm_backward(g, x, mean, invstd, w, axis=axis)
            yi = batch_norm_inference(x, rmean, 1 / rinvstd**2 - 1e-5, w, b, axis=axis)
            errors = {
                "forward": np.abs(y - ry).max(),
                "inference": np.abs(yi - ry).max(),
                "backward": max(np.abs(gi - rgi).max(), np.abs(gw - rgw).max() / 100, np.abs(gb - rgb).max() / 100),
            }
            for op, err in errors.items():
                rows.append((f"{op:<9} {layout} {np.dtype(dtype).name}", float(err), tol))
    return rows


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def timing_table(shape=(32, 64, 56, 56), repeats: int = 5, seed: int = 0) -> list[dict]:
    """bnfast against plain NumPy, float32, each pair timed interleaved.

    Returns
    -------
    list of dict with keys op, layout, bnfast_ms, numpy_ms, speedup
    """
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape, dtype=np.float32)
    C = shape[1]
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    rows = []
    for layout, axis in LAYOUTS.items():
        x = _to_layout(base, layout)
        g = _to_layout(base[::-1].copy(), layout)
        out = np.empty_like(x)
        _, mean, invstd = batch_norm_forward(x, w, b, axis=axis)
        var = 1 / invstd.astype(np.float64) ** 2
        ops = {
            "train": (
                lambda: batch_norm_forward(x, w, b, axis=axis, out=out),
                lambda: _baseline.forward(x, w, b, axis=axis),
            ),
            "inference": (
                lambda: batch_norm_inference(x, mean, var, w, b, axis=axis, out=out),
                lambda: _baseline.inference(x, mean, var.astype(np.float32), w, b, axis=axis),
            ),
            "backward": (
                lambda: batch_norm_backward(g, x, mean, invstd, w, axis=axis, out=out),
                lambda: _baseline.backward(g, x, mean, invstd, w, axis=axis),
            ),
        }
        for op, (ours, numpy_fn) in ops.items():
            ours(), numpy_fn()
            t_ours, t_numpy = float("inf"), float("inf")
            for _ in range(repeats):  # interleaved: both see the same machine state
                t_ours = min(t_ours, _best_of(ours, 1))
                t_numpy = min(t_numpy, _best_of(numpy_fn, 1))
            rows.append(
                {"op": op, "layout": layout, "bnfast_ms": t_ours * 1e3, "numpy_ms": t_numpy * 1e3,
                 "speedup": t_numpy / t_ours}
            )  # fmt: skip
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bnfast check",
        description=textwrap.fill(
            "Print bnfast's configuration, check every op against the float64 NumPy reference "
            "(both layouts, float32 and float64) and time it against plain NumPy.", 79),
        epilog=_cli.EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--shape", default=(32, 64, 56, 56), type=_cli.shape,
                        help="NCHW shape of the timing table, comma-separated (default 32,64,56,56)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed calls per op and library; the table shows the best (default 5)")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing table (check only)")
    return parser  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Print configuration, self-check and timing table; exit 1 if the check fails."""
    parser = _parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    print("bnfast configuration")
    show_config()
    print("\nself-check against the float64 NumPy reference (max abs error)")
    ok = True
    for case, err, tol in self_check():
        status = "ok" if err <= tol else "FAIL"
        ok &= err <= tol
        print(f"  {case:<26} {err:10.2e}  (tol {tol:.0e})  {status}")
    if not args.no_timing:
        shape = args.shape
        from ._functional import get_num_threads

        print(f"\ntiming, float32 {shape} (NCHW order), {get_num_threads()} threads, best of {args.repeats}")
        print(f"  {'op':<10} {'layout':<6} {'bnfast ms':>10} {'NumPy ms':>10} {'speedup':>8}")
        for r in timing_table(shape, args.repeats):
            print(f"  {r['op']:<10} {r['layout']:<6} {r['bnfast_ms']:10.2f} {r['numpy_ms']:10.2f} {r['speedup']:7.1f}x")
    print("\nself-check:", "passed" if ok else "FAILED")
    return 0 if ok else 1
