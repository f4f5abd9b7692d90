"""`python -m bnfast bench --half`: float16 and bfloat16 against float32 and PyTorch.

For each shape, layout, op and thread count, one interleaved timing round
runs bnfast on float32, float16 and bfloat16 copies of the same data (all
with ``out=``) and PyTorch's CPU batch norm on the half-precision tensors
(``torch.nn.functional.batch_norm`` forward, ``aten.native_batch_norm_backward``,
float32 weight, bias and statistics as in bnfast; NHWC in PyTorch's
channels-last memory format).  Reported per half type: its time, its time
over float32's (``/ f32``, both with ``out=``: the issue's target is <= 0.6
on a tensor far beyond the cache), and PyTorch's time over bnfast's when
both allocate their results (``vs torch``: >= 2).
Times are the best of the rounds.  bfloat16 needs ml_dtypes.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from ._bench import _layouts_of, _time_interleaved, _torch_view
from ._functional import batch_norm_backward, batch_norm_forward, batch_norm_inference, set_num_threads

SHAPES = [(64, 64, 112, 112)]
OPS = ("train", "inference", "backward")
HALF_HEADER = (
    f"{'op':<9} {'shape':<18} {'layout':<6} {'thr':>3} {'float32':>11} {'dtype':<8} {'time':>11} "
    f"{'/ f32':>6} {'torch':>11} {'vs torch':>8}"
)


def _half_dtypes():
    """(name, numpy dtype) of the half types available here."""
    out = [("float16", np.dtype(np.float16))]
    try:
        import ml_dtypes  # noqa: PLC0415
    except ImportError:
        return out
    return out + [("bfloat16", np.dtype(ml_dtypes.bfloat16))]


def _to_torch(torch, a: np.ndarray, channels_last: bool):
    if a.dtype.name == "bfloat16":  # torch.from_numpy knows no ml_dtypes type: the same bytes
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        # an NCHW-shaped view of channels-last bytes, as _torch_view makes
        return t.permute(0, t.ndim - 1, *range(1, t.ndim - 1)) if channels_last else t
    return _torch_view(torch, a, channels_last)


def _fns(op, data, axis, torch, channels_last):
    """{name: callable}: bnfast per dtype (``out=``), then PyTorch per half type."""
    x32 = data["float32"][0]
    C = x32.shape[axis]
    w = np.linspace(0.5, 1.5, C).astype(np.float32)
    b = np.linspace(-0.5, 0.5, C).astype(np.float32)
    _, mean, invstd = batch_norm_forward(x32, w, b, axis=axis)
    var = (1.0 / invstd.astype(np.float64) ** 2 - 1e-5).clip(0).astype(np.float32)
    fns = {}
    for name, (x, g) in data.items():
        out = np.empty_like(x)
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        if op == "train":
            fns[name] = lambda x=x, out=out, rm=rm, rv=rv: batch_norm_forward(x, w, b, rm, rv, axis=axis, out=out)
        elif op == "inference":
            fns[name] = lambda x=x, out=out: batch_norm_inference(x, mean, var, w, b, axis=axis, out=out)
        else:
            fns[name] = lambda x=x, g=g, out=out: batch_norm_backward(g, x, mean, invstd, w, axis=axis, out=out)
        if torch is not None and name != "float32":  # allocating its result, as PyTorch does
            if op == "train":
                fns[name + "_alloc"] = lambda x=x, rm=rm, rv=rv: batch_norm_forward(x, w, b, rm, rv, axis=axis)
            elif op == "inference":
                fns[name + "_alloc"] = lambda x=x: batch_norm_inference(x, mean, var, w, b, axis=axis)
            else:
                fns[name + "_alloc"] = lambda x=x, g=g: batch_norm_backward(g, x, mean, invstd, w, axis=axis)
    if torch is not None:
        F = torch.nn.functional
        tw, tb = torch.from_numpy(w), torch.from_numpy(b)
        tmean, tinv, tvar = torch.from_numpy(mean), torch.from_numpy(invstd), torch.from_numpy(var)
        for name, (x, g) in data.items():
            if name == "float32":
                continue
            tx, tg = _to_torch(torch, x, channels_last), _to_torch(torch, g, channels_last)
            trm, trv = torch.zeros(C), torch.ones(C)
            if op == "train":
                fns["torch_" + name] = lambda tx=tx, trm=trm, trv=trv: F.batch_norm(tx, trm, trv, tw, tb, True, 0.1, 1e-5)
            elif op == "inference":
                fns["torch_" + name] = lambda tx=tx: F.batch_norm(tx, tmean, tvar, tw, tb, False, 0.1, 1e-5)
            else:
                bwd = torch.ops.aten.native_batch_norm_backward
                fns["torch_" + name] = lambda tx=tx, tg=tg: bwd(tg, tx, tw, None, None, tmean, tinv, True, 1e-5,
                                                                 [True, True, True])
    return fns


def run_half(shapes=None, ops=OPS, layouts=("NCHW", "NHWC"), threads=(1, 2), *, min_rounds=3, budget=1.0,
             use_torch=True, progress=None) -> list[dict]:
    """Time the half-precision cases; one dict per (case, half type), times in seconds."""
    from ._bench import _torch  # noqa: PLC0415

    torch = _torch() if use_torch else None
    halves = _half_dtypes()
    rows = []
    for shape in shapes or SHAPES:
        for layout, channels_last in _layouts_of(shape, layouts):
            rng = np.random.default_rng(0)
            x = rng.standard_normal(shape, dtype=np.float32)
            g = rng.standard_normal(shape, dtype=np.float32)
            if channels_last:
                x, g = np.ascontiguousarray(np.moveaxis(x, 1, -1)), np.ascontiguousarray(np.moveaxis(g, 1, -1))
            axis = -1 if channels_last else 1
            data = {"float32": (x, g)}
            data.update({name: (x.astype(dt), g.astype(dt)) for name, dt in halves})
            for op in ops:
                for n in threads:
                    set_num_threads(n)
                    if torch is not None:
                        torch.set_num_threads(n)
                    best = _time_interleaved(_fns(op, data, axis, torch, channels_last), min_rounds, budget, torch)
                    for name, _ in halves:
                        t_torch, t_alloc = best.get("torch_" + name), best.get(name + "_alloc")
                        row = {
                            "op": op, "shape": list(shape), "layout": layout, "threads": n, "dtype": name,
                            "float32_s": best["float32"], "time_s": best[name],
                            "ratio_float32": best[name] / best["float32"],
                            "alloc_s": t_alloc, "torch_s": t_torch,
                            "speedup_torch": t_torch / t_alloc if t_torch and t_alloc else None,
                        }  # fmt: skip
                        rows.append(row)
                        if progress:
                            progress(row)
    set_num_threads(None)
    return rows


def _fmt(t: float | None) -> str:
    if t is None:
        return f"{'-':>11}"
    return f"{t * 1e6:8.1f} us" if t < 1e-3 else f"{t * 1e3:8.3f} ms"


def format_half_row(r: dict) -> str:
    """One row of the ``--half`` table."""
    shape = "(" + ",".join(str(s) for s in r["shape"]) + ")"
    vs = f"{r['speedup_torch']:7.2f}x" if r["speedup_torch"] else f"{'-':>8}"
    return (
        f"{r['op']:<9} {shape:<18} {r['layout']:<6} {r['threads']:>3} {_fmt(r['float32_s'])} {r['dtype']:<8} "
        f"{_fmt(r['time_s'])} {r['ratio_float32']:6.2f} {_fmt(r['torch_s'])} {vs}"
    )


def main_half(args: argparse.Namespace, threads: list[int], shapes, ops, layouts) -> int:
    """``--half``: the table, geometric means, JSON if asked."""
    import json  # noqa: PLC0415

    from ._bench import _torch, header_lines, machine_info  # noqa: PLC0415

    torch = None if args.no_torch else _torch()
    print("bnfast bench --half")
    for line in header_lines(torch):
        print("  " + line)
    print("/ f32: the half type's time over float32's on the same values (target <= 0.6 beyond the cache)")
    print("vs torch: PyTorch's time on the same half tensors (float32 parameters) over bnfast's, both allocating")
    print("          their results; >1: bnfast faster")
    print(HALF_HEADER)
    print("-" * len(HALF_HEADER))
    rows = run_half(
        shapes, ops, layouts, tuple(threads), min_rounds=args.rounds,
        budget=args.budget if args.budget is not None else 1.0, use_torch=not args.no_torch,
        progress=lambda r: print(format_half_row(r), flush=True),
    )  # fmt: skip
    for key, what in (("ratio_float32", "time / float32"), ("speedup_torch", "speedup over PyTorch")):
        vals = [r[key] for r in rows if r[key]]
        if vals:
            geo = math.exp(sum(math.log(v) for v in vals) / len(vals))
            print(f"geometric mean {what}: {geo:.2f} over {len(vals)} cases "
                  f"(min {min(vals):.2f}, max {max(vals):.2f})")
    if args.json:
        meta = dict(machine_info(), numpy=np.__version__, torch=torch.__version__ if torch is not None else None)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)
        print(f"raw figures written to {args.json}")
    return 0
