"""`python -m bnfast bench`: bnfast against the memory limit, NumPy and PyTorch.

The header names the CPU, the SIMD variant in use, the detected cache sizes
and the streaming-store threshold.  Every case times, interleaved round by
round so that all see the same machine state:

* bnfast with ``out=`` (no allocation) -- the ``time`` and ``GB/s`` columns;
  ``no out=`` is bnfast allocating its result, the usual call;
* the memory-limit reference on the same arrays with the same thread count
  (``bnfast._kernels.traffic``, parallel and streaming like the kernels):
  ``out = x`` (one read, one write) for train/inference, ``out = x + g`` (two
  reads, one write) for backward -- ``x roof`` is bnfast's time over the
  reference's;
* bnfast allocating its outputs, against the NumPy baseline
  (`bnfast._baseline`) and PyTorch (``torch.nn.functional.batch_norm``,
  ``torch.ops.aten.native_batch_norm_backward``, with as many threads) when it
  is importable, which allocate too -- ``vs NumPy`` and ``vs torch`` are their
  times over bnfast's.  NHWC cases give PyTorch its channels-last memory
  format (``torch.channels_last``, ``channels_last_3d`` for 5-D), so both
  libraries read the same bytes.

Times are the best of the rounds (and of ``--passes`` runs over the list).  GB/s counts the minimum traffic: the
arrays read and written once each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

from . import _baseline, _cli, _kernels
from ._config import format_bytes
from ._functional import (
    batch_norm_backward,
    batch_norm_forward,
    batch_norm_inference,
    get_contention_backoff,
    get_num_threads,
    set_num_threads,
)

# The full suite (NCHW-order shapes; NHWC runs use the channels-last
# transpose): typical CNN activations, few channels, a batch of one, 2-D and
# 5-D input, and a small call where per-call overhead dominates.
SUITE = [
    (32, 64, 28, 28),
    (32, 64, 56, 56),
    (64, 64, 112, 112),
    (128, 256, 14, 14),
    (8, 3, 224, 224),
    (1, 64, 56, 56),
    (256, 1024),
    (4096, 64),
    (2, 32, 16, 28, 28),
    (8, 16),
]
QUICK = [(32, 64, 28, 28), (64, 64, 112, 112), (256, 1024), (8, 16)]
OPS = ("train", "inference", "backward")
DTYPES = ("float32", "float64")
LAYOUTS = ("NCHW", "NHWC")


def _torch():
    try:
        import torch  # noqa: PLC0415
    except Exception:  # not installed, or broken: the comparison is optional
        return None
    return torch


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo, else lscpu, else `platform.processor`.

    x86 family and model numbers are appended: virtual machines often report
    a bare "AMD EPYC".
    """
    try:
        fields: dict = {}
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first CPU is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip().lower(), value.strip())
        name = next((fields[k] for k in ("model name", "cpu model", "hardware") if fields.get(k)), None)
        if name:
            if fields.get("cpu family") and fields.get("model"):
                name += f" (family {fields['cpu family']}, model {fields['model']})"
            return name
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() == "model name" and value.strip():
                return value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info() -> dict:
    """CPU, SIMD variant, cache sizes and streaming threshold, for headers and JSON."""
    caches = _kernels.cache_sizes()
    return {
        "cpu": cpu_model(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "simd_in_use": _kernels.simd_in_use(), "simd_compiled": _kernels.simd_compiled(),
        "openmp": _kernels.openmp_enabled(),
        "cache_l1d": caches["l1d"], "cache_l2": caches["l2"], "cache_l3": caches["l3"],
        "stream_threshold": _kernels.stream_threshold(),
    }  # fmt: skip


def header_lines(torch=None) -> list[str]:
    """The benchmark header: machine, kernels, caches and library versions."""
    m = machine_info()
    return [
        f"CPU: {m['cpu']} ({m['machine']}, {m['cpus']} logical CPUs)",
        f"bnfast kernels: {m['simd_in_use']} in use (compiled {m['simd_compiled']}), OpenMP {m['openmp']}",
        f"caches: L1d {format_bytes(m['cache_l1d'])}, L2 {format_bytes(m['cache_l2'])}, "
        f"L3 {format_bytes(m['cache_l3'])}; streaming stores above {format_bytes(m['stream_threshold'])}",
        f"NumPy {np.__version__}, PyTorch {torch.__version__ if torch is not None else 'not importable'}",
    ]


def _layouts_of(shape, layouts):
    """(label, channels-last?) for a shape: 2-D input has one layout, NC."""
    if len(shape) == 2:
        return [("NC", False)]
    return [(name, name == "NHWC") for name in layouts]


def _make(shape, channels_last: bool, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    if channels_last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        g = np.ascontiguousarray(np.moveaxis(g, 1, -1))
    return x, g, (-1 if channels_last else 1)


def _torch_view(torch, a: np.ndarray, channels_last: bool):
    """``a`` as PyTorch sees it: NCHW-shaped, in channels-last memory format for NHWC data."""
    t = torch.from_numpy(a)
    if channels_last:  # an NCHW-shaped view of the same bytes, channels-last strides
        t = t.permute(0, a.ndim - 1, *range(1, a.ndim - 1))
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(a.ndim)
        assert fmt is None or t.is_contiguous(memory_format=fmt)
    return t


def _case_fns(op, x, g, axis, torch, channels_last):
    """{name: callable} for one case; the first is bnfast with out=."""
    C = x.shape[axis]
    dt = x.dtype if x.dtype.itemsize >= 4 else np.dtype(np.float32)  # half input: float32 per-channel arrays
    w = np.linspace(0.5, 1.5, C).astype(dt)
    b = np.linspace(-0.5, 0.5, C).astype(dt)
    rm, rv = np.zeros(C, dt), np.ones(C, dt)
    out = np.empty_like(x)
    _, mean, invstd = batch_norm_forward(x, w, b, axis=axis)
    var = (1.0 / invstd.astype(np.float64) ** 2 - 1e-5).clip(0).astype(dt)
    fns = {}
    if op == "train":
        fns["bnfast"] = lambda: batch_norm_forward(x, w, b, rm, rv, axis=axis, out=out)
        fns["roof"] = lambda: _kernels.traffic(out, x)
        fns["bnfast_alloc"] = lambda: batch_norm_forward(x, w, b, rm, rv, axis=axis)
        fns["numpy"] = lambda: _baseline.forward(x, w, b, axis=axis)
    elif op == "inference":
        fns["bnfast"] = lambda: batch_norm_inference(x, mean, var, w, b, axis=axis, out=out)
        fns["roof"] = lambda: _kernels.traffic(out, x)
        fns["bnfast_alloc"] = lambda: batch_norm_inference(x, mean, var, w, b, axis=axis)
        fns["numpy"] = lambda: _baseline.inference(x, mean, var, w, b, axis=axis)
    else:
        fns["bnfast"] = lambda: batch_norm_backward(g, x, mean, invstd, w, axis=axis, out=out)
        fns["roof"] = lambda: _kernels.traffic(out, x, g)
        fns["bnfast_alloc"] = lambda: batch_norm_backward(g, x, mean, invstd, w, axis=axis)
        fns["numpy"] = lambda: _baseline.backward(g, x, mean, invstd, w, axis=axis)
    if torch is not None:
        tx, tg = _torch_view(torch, x, channels_last), _torch_view(torch, g, channels_last)
        tw, tb = torch.from_numpy(w), torch.from_numpy(b)
        trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
        tmean, tinv, tvar = torch.from_numpy(mean), torch.from_numpy(invstd), torch.from_numpy(var)
        F = torch.nn.functional
        if op == "train":
            fns["torch"] = lambda: F.batch_norm(tx, trm, trv, tw, tb, True, 0.1, 1e-5)
        elif op == "inference":
            fns["torch"] = lambda: F.batch_norm(tx, tmean, tvar, tw, tb, False, 0.1, 1e-5)
        else:
            bwd = torch.ops.aten.native_batch_norm_backward
            fns["torch"] = lambda: bwd(tg, tx, tw, None, None, tmean, tinv, True, 1e-5, [True, True, True])
    return fns


def _time_interleaved(fns, min_rounds: int, budget: float, torch) -> dict:
    """Best time of each callable, rounds interleaved, until `budget` seconds."""
    grad = torch.no_grad() if torch is not None else None
    if grad is not None:
        grad.__enter__()
    try:
        best = {}
        for name, fn in fns.items():  # warm up (and measure one call)
            t = time.perf_counter()
            fn()
            best[name] = time.perf_counter() - t
        one_round = sum(best.values())
        rounds = max(min_rounds, min(200, int(budget / max(one_round, 1e-9))))
        # tiny calls: several calls per timing so the clock's resolution is no issue
        inner = {n: max(1, int(2e-4 / max(t, 1e-9))) for n, t in best.items()}
        for _ in range(rounds):
            for name, fn in fns.items():
                k = inner[name]
                t = time.perf_counter()
                for _ in range(k):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - t) / k)
    finally:
        if grad is not None:
            grad.__exit__(None, None, None)
    return best


def run(shapes=None, ops=OPS, dtypes=DTYPES, layouts=LAYOUTS, threads=(1, 2), *, min_rounds=3,
        budget=0.5, passes=1, use_torch=True, use_numpy=True, progress=None) -> list[dict]:
    """Measure every case; returns one dict per case (times in seconds).

    With ``passes`` > 1 the whole list of cases is measured that many times
    and each callable keeps its best time over all passes, so that a burst of
    load from other processes spoils a case only if it lasts a whole run.
    """
    torch = _torch() if use_torch else None
    shapes = SUITE if shapes is None else shapes
    before = get_num_threads()
    torch_before = torch.get_num_threads() if torch is not None else None
    cases = [
        (shape, layout, channels_last, dtype, op, n)
        for shape in shapes
        for layout, channels_last in _layouts_of(shape, layouts)
        for dtype in dtypes
        for op in ops
        for n in threads
    ]
    best_all: dict = {}
    rows = []
    try:
        for p in range(passes):
            data_key, data = None, None
            for case in cases:
                shape, layout, channels_last, dtype, op, n = case
                if data_key != (shape, channels_last, dtype):
                    data_key = (shape, channels_last, dtype)
                    data = _make(shape, channels_last, np.dtype(dtype))
                x, g, axis = data
                set_num_threads(n)
                if torch is not None:
                    torch.set_num_threads(n)
                fns = _case_fns(op, x, g, axis, torch, channels_last)
                if not use_numpy:
                    fns.pop("numpy")
                best = _time_interleaved(fns, min_rounds, budget, torch)
                merged = best_all.setdefault(case, best)
                for name, t in best.items():
                    merged[name] = min(merged[name], t)
                if p < passes - 1:
                    continue
                best = merged
                arrays = 3 if op == "backward" else 2
                row = {
                    "op": op, "shape": list(shape), "layout": layout, "dtype": dtype,
                    "threads": n, "time_s": best["bnfast"],
                    "gbps": arrays * x.nbytes / best["bnfast"] / 1e9,
                    "roof": "out = x + g" if op == "backward" else "out = x",
                    "torch_format": None if torch is None else
                    ("channels_last_3d" if len(shape) == 5 else "channels_last") if channels_last else "contiguous",
                    "roof_s": best["roof"], "ratio_roof": best["bnfast"] / best["roof"],
                    "alloc_s": best["bnfast_alloc"],
                    "numpy_s": best.get("numpy"), "torch_s": best.get("torch"),
                    "speedup_numpy": best["numpy"] / best["bnfast_alloc"] if "numpy" in best else None,
                    "speedup_torch": best["torch"] / best["bnfast_alloc"] if "torch" in best else None,
                }  # fmt: skip
                rows.append(row)
                if progress:
                    progress(row)
            if p < passes - 1:
                print(f"pass {p + 1}/{passes} done", file=sys.stderr, flush=True)
    finally:
        set_num_threads(before)
        if torch is not None:
            torch.set_num_threads(torch_before)
    return rows


def _fmt_time(t: float) -> str:
    if t < 1e-3:
        return f"{t * 1e6:8.2f} us"
    return f"{t * 1e3:8.3f} ms"


HEADER = (
    f"{'op':<9} {'shape':<20} {'layout':<6} {'dtype':<7} {'thr':>3} {'time':>11} {'GB/s':>6} "
    f"{'x roof':>7} {'no out=':>11} {'vs NumPy':>8} {'vs torch':>8}"
)


def format_row(r: dict) -> str:
    shape = "(" + ",".join(str(s) for s in r["shape"]) + ")"
    sn = f"{r['speedup_numpy']:7.1f}x" if r["speedup_numpy"] else f"{'-':>8}"
    st = f"{r['speedup_torch']:7.2f}x" if r["speedup_torch"] else f"{'-':>8}"
    return (
        f"{r['op']:<9} {shape:<20} {r['layout']:<6} {r['dtype']:<7} {r['threads']:>3} "
        f"{_fmt_time(r['time_s']):>11} {r['gbps']:6.1f} {r['ratio_roof']:6.2f}x {_fmt_time(r['alloc_s']):>11} "
        f"{sn} {st}"
    )


def summary(rows: list[dict]) -> list[str]:
    """Geometric means and the worst case against PyTorch, per thread count."""
    lines = []
    for n in sorted({r["threads"] for r in rows}):
        sel = [r for r in rows if r["threads"] == n]
        for key, name in (("speedup_numpy", "NumPy"), ("speedup_torch", "PyTorch")):
            vals = [r[key] for r in sel if r[key]]
            if vals:
                gm = math.exp(sum(math.log(v) for v in vals) / len(vals))
                worst = min(sel, key=lambda r: r[key] if r[key] else math.inf)
                lines.append(
                    f"{n} thread(s): geometric-mean speedup vs {name} {gm:.2f}x over {len(vals)} cases; "
                    f"slowest {worst[key]:.2f}x ({worst['op']} {tuple(worst['shape'])} {worst['layout']} "
                    f"{worst['dtype']})"
                )
    return lines


def plot(rows: list[dict], path: str, torch_note: str | None = None, title: str | None = None) -> None:
    """Chart of the results, one quantity per panel (matplotlib required).

    Parameters
    ----------
    rows : list of dict
        Rows from `run`.
    path : str
        Image file to write.
    torch_note : str, optional
        Why there is no PyTorch comparison, shown in its panel when no row has one.
    title : str, optional
        Figure title, e.g. the CPU model.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

    labels = [
        f"{r['op'][:5]} {'x'.join(map(str, r['shape']))} {r['layout']} {r['dtype'][-2:]} t{r['threads']}"
        for r in rows
    ]
    ys = np.arange(len(rows))
    threads = sorted({r["threads"] for r in rows})
    palette = plt.get_cmap("tab10")
    colors = [palette(threads.index(r["threads"]) % 10) for r in rows]
    fig, (ax_t, ax_r) = plt.subplots(1, 2, sharey=True, figsize=(12, 0.2 * len(rows) + 2.2))

    speedups = [r["speedup_torch"] for r in rows]
    ax_t.set_title("speedup over PyTorch", fontsize=10)
    if any(speedups):
        ax_t.barh(ys, [v if v else np.nan for v in speedups], 0.8, color=colors)
        ax_t.set_xscale("log")
        ax_t.axvline(1.0, color="k", lw=0.8)
        ax_t.set_xlabel("PyTorch time / bnfast time (log scale; > 1: bnfast faster)")
        missing = sum(1 for v in speedups if not v)
        if missing:
            ax_t.text(0.99, 0.01, f"{missing} case(s) without a PyTorch time", transform=ax_t.transAxes,
                      ha="right", va="bottom", fontsize=7)
    else:
        ax_t.text(0.5, 0.5, "no PyTorch comparison:\n" + (torch_note or "PyTorch is not installed"),
                  transform=ax_t.transAxes, ha="center", va="center", fontsize=9)
        ax_t.set_xticks([])

    ax_r.set_title("fraction of the memory limit", fontsize=10)
    ax_r.barh(ys, [1 / r["ratio_roof"] for r in rows], 0.8, color=colors)
    ax_r.axvline(1.0, color="k", lw=0.8)
    ax_r.set_xlabel("reference (same traffic, same threads) time / bnfast time; 1: at the limit")

    ax_t.set_yticks(ys, labels, fontsize=6)
    ax_t.invert_yaxis()
    handles = [Patch(color=palette(i % 10), label=f"{n} thread{'s' if n > 1 else ''}") for i, n in enumerate(threads)]
    # the legend sits above both panels, clear of every bar
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), frameon=False, fontsize=8)
    fig.suptitle(title or "bnfast benchmark", x=0.01, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    fig.savefig(path, dpi=120)


def _parse_list(text: str, allowed=None, cast=str):
    items = [cast(s.strip()) for s in text.split(",") if s.strip()]
    if allowed is not None:
        bad = [s for s in items if s not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
    return items


def _parse_shapes(text: str):
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bnfast bench", description=__doc__, epilog=_cli.EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a small subset: float32, 4 shapes")
    parser.add_argument(
        "--family", action="store_true",
        help="time the normalization family (layer/RMS/group/instance norm, forward and backward, "
             "float32) against PyTorch instead of batch norm",
    )  # fmt: skip
    parser.add_argument(
        "--half", action="store_true",
        help="time float16 and bfloat16 against float32 on the same values and against PyTorch's half "
             "batch norm (64x64x112x112 or --shapes; NCHW and NHWC; bfloat16 needs ml_dtypes)",
    )  # fmt: skip
    parser.add_argument(
        "--fused", action="store_true",
        help="time the fused batch norm + residual + ReLU ops against NumPy-level and PyTorch sequences "
             "(32x64x56x56 or --shapes, NCHW float32) and measure a training step's memory, unfused "
             "against fused in place",
    )  # fmt: skip
    parser.add_argument(
        "--jax", action="store_true",
        help="time bnfast.contrib.jax.batch_norm against jax.numpy batch norm (jit, forward+backward, "
             "float32 32x64x56x56 or the first of --shapes; needs jax)",
    )  # fmt: skip
    parser.add_argument(
        "--variants", action="store_true",
        help="time Ghost BN, Batch Renorm, Momentum BN and cross-iteration BN (training forward and backward) "
             "against plain BatchNorm2d on 32x64x56x56 float32, or the first of --shapes",
    )  # fmt: skip
    parser.add_argument(
        "--contention", action="store_true",
        help="time batch norm (and PyTorch) quiet and beside another process with one and with two busy "
             "threads: median times and their ratio to quiet (32x64x56x56 and 32x64x28x28 NCHW float32, "
             "or --shapes with --ops)",
    )  # fmt: skip
    parser.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2 (default 1,2)")
    parser.add_argument("--ops", default=",".join(OPS), help="train,inference,backward")
    parser.add_argument("--dtypes", default=None, help="float32,float64 (quick: float32)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="NCHW,NHWC")
    parser.add_argument("--shapes", default=None, help="NCHW-order shapes like 32x64x28x28,8x16")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per case")
    parser.add_argument("--rounds", type=int, default=3, help="minimum interleaved rounds per case")
    parser.add_argument(
        "--passes", type=int, default=None,
        help="measure the whole list this many times, keeping the best (default 2; quick: 1)",
    )  # fmt: skip
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if importable")
    parser.add_argument("--no-numpy", action="store_true", help="skip the (slow) NumPy baseline")
    parser.add_argument("--json", metavar="FILE", help="write the raw figures as JSON")
    parser.add_argument(
        "--plot", metavar="FILE.png",
        help="chart: speedup over PyTorch and fraction of the memory limit, one panel each (needs matplotlib)",
    )  # fmt: skip
    return parser


def _write_json(path: str, meta: dict, rows: list[dict]) -> None:
    """The raw figures of a run (``--json``)."""
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(f"raw figures written to {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; the exit status is 0, or 2 for bad arguments or a missing matplotlib."""
    parser = _parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if args.jax:
        from ._bench_jax import main_jax  # noqa: PLC0415

        return main_jax(args)

    try:
        threads = _parse_list(args.threads, cast=int)
        ops = _parse_list(args.ops, OPS)
        dtypes = _parse_list(args.dtypes or ("float32" if args.quick else ",".join(DTYPES)), DTYPES)
        layouts = _parse_list(args.layouts, LAYOUTS)
        shapes = _parse_shapes(args.shapes) if args.shapes else (QUICK if args.quick else SUITE)
    except (argparse.ArgumentTypeError, ValueError) as err:
        parser.error(str(err))
    if any(n < 1 for n in threads):
        parser.error("--threads must be positive integers")
    if args.plot:
        try:
            import matplotlib  # noqa: F401, PLC0415
        except ImportError:
            print("--plot needs matplotlib: pip install matplotlib (or bnfast[plot])", file=sys.stderr)
            return 2
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 0.4)

    if args.family:
        return _main_family(args, threads)
    if args.contention:
        return _main_contention(args, threads, ops, shapes if args.shapes else None)
    if args.variants:
        return _main_variants(args, threads, layouts, shapes if args.shapes else None)
    if args.fused:
        from ._bench_fused import main_fused  # noqa: PLC0415

        return main_fused(args, threads, _parse_shapes(args.shapes) if args.shapes else None)
    if args.half:
        from ._bench_half import main_half  # noqa: PLC0415

        return main_half(args, threads, _parse_shapes(args.shapes) if args.shapes else None, ops, layouts)
    torch = None if args.no_torch else _torch()
    print("bnfast bench")
    for line in header_lines(torch):
        print("  " + line)
    print("x roof: bnfast (out=) time / the memory-limit reference with as many threads: out = x (train,")
    print("        inference) or out = x + g (backward), streaming stores above the same threshold")
    if torch is not None:
        print("vs torch: NHWC cases run PyTorch in channels_last memory format")
    print("vs NumPy / vs torch: their time / bnfast's (all allocating their outputs); >1 means bnfast is faster")
    print(HEADER)
    print("-" * len(HEADER))
    rows = run(
        shapes, ops, dtypes, layouts, threads, min_rounds=args.rounds, budget=budget,
        passes=args.passes if args.passes is not None else (1 if args.quick else 2),
        use_torch=not args.no_torch, use_numpy=not args.no_numpy,
        progress=lambda r: print(format_row(r), flush=True),
    )  # fmt: skip
    print()
    for line in summary(rows):
        print(line)
    if args.json:
        meta = dict(
            machine_info(), numpy=np.__version__, torch=torch.__version__ if torch is not None else None,
            processor=platform.processor(),
        )  # fmt: skip
        _write_json(args.json, meta, rows)
    if args.plot:
        note = "--no-torch was given" if args.no_torch else "PyTorch is not installed (pip install torch)"
        plot(rows, args.plot, torch_note=None if torch is not None else note, title=f"bnfast on {cpu_model()}")
        print(f"chart written to {args.plot}")
    return 0


def _main_family(args: argparse.Namespace, threads: list[int]) -> int:
    """``--family``: the family's table, its geometric-mean speedup over PyTorch, JSON if asked."""
    from . import _bench_family as fam  # noqa: PLC0415

    torch = None if args.no_torch else _torch()
    print("bnfast bench --family")
    for line in header_lines(torch):
        print("  " + line)
    print("xroof: bnfast (out=) time / the memory-limit reference (out = x forward, out = x + g backward)")
    print("vs torch: PyTorch's time / bnfast's (torch.nn.functional forward, ATen backward); >1: bnfast faster")
    print(fam.FAMILY_HEADER)
    print("-" * len(fam.FAMILY_HEADER))
    rows = fam.run_family(
        tuple(threads), min_rounds=max(args.rounds, 5), budget=args.budget if args.budget is not None else 0.5,
        passes=args.passes if args.passes is not None else 2, use_torch=not args.no_torch,
        progress=lambda r: print(fam.format_family_row(r), flush=True),
    )  # fmt: skip
    speedups = [r["speedup_torch"] for r in rows if r["speedup_torch"]]
    if speedups:
        geo = math.exp(sum(math.log(v) for v in speedups) / len(speedups))
        print(f"\ngeometric-mean speedup over PyTorch: {geo:.2f}x over {len(speedups)} cases "
              f"(min {min(speedups):.2f}x, max {max(speedups):.2f}x)")
    if args.json:
        meta = dict(machine_info(), numpy=np.__version__, torch=torch.__version__ if torch is not None else None)
        _write_json(args.json, meta, rows)
    return 0


def _main_contention(args: argparse.Namespace, threads: list[int], ops: list[str], shapes) -> int:
    """``--contention``: each case's median time quiet and under load, JSON if asked."""
    from . import _bench_contention as con  # noqa: PLC0415

    cases = [(op, tuple(s)) for s in shapes for op in ops] if shapes else con.DEFAULT_CASES
    torch = None if args.no_torch else _torch()
    print("bnfast bench --contention: NCHW float32, median of interleaved rounds per load")
    for line in header_lines(torch):
        print("  " + line)
    print("x quiet: the median time beside the busy process / the median time with nothing else running")
    print("contention back-off: " + ("on" if get_contention_backoff() else "off")
          + " (set_contention_backoff, BNFAST_CONTENTION_BACKOFF)")
    print(con.HEADER)
    print("-" * len(con.HEADER))
    rows = con.run_contention(
        cases, tuple(threads), rounds=max(args.rounds, 30), use_torch=not args.no_torch,
        progress=lambda r: print(con.format_contention_row(r), flush=True),
    )  # fmt: skip
    if args.json:
        _write_json(args.json, dict(machine_info(), numpy=np.__version__), rows)
    return 0


def _main_variants(args: argparse.Namespace, threads: list[int], layouts: list[str], shapes) -> int:
    """``--variants``: each variant's forward and backward over plain BatchNorm2d's, JSON if asked."""
    from . import _bench_variants as var  # noqa: PLC0415

    shape = tuple(shapes[0]) if shapes else var.DEFAULT_SHAPE
    dtype = (args.dtypes or "float32").split(",")[0]
    print(f"bnfast bench --variants: {'x'.join(map(str, shape))} {dtype}, training mode")
    for line in header_lines(None):
        print("  " + line)
    print("x BN: the variant's time / BatchNorm2d's on the same arrays and threads (bar: 1.3)")
    print(var.VARIANTS_HEADER)
    print("-" * len(var.VARIANTS_HEADER))
    rows = var.run_variants(
        shape, dtype, tuple(layouts), tuple(threads), min_rounds=max(args.rounds, 5),
        budget=args.budget if args.budget is not None else 0.5,
        progress=lambda r: print(var.format_variant_row(r), flush=True),
    )  # fmt: skip
    if args.json:
        _write_json(args.json, dict(machine_info(), numpy=np.__version__), rows)
    return 0
