"""Timings of the normalization family against PyTorch and the memory limit.

One case is one member, shape, layout and direction (forward or backward),
float32 unless asked otherwise.  As in `bnfast._bench`, the callables of a
case run interleaved round by round with the same thread count and each
keeps its best time: bnfast with ``out=``, the memory-limit reference on the
same arrays (``out = x`` for forward, ``out = x + g`` for backward), and
PyTorch's kernels (``torch.nn.functional`` forward, the ATen backward that
autograd would call) when torch is importable.  NHWC cases hand PyTorch the
same bytes in its channels-last memory format.
"""

from __future__ import annotations

import numpy as np

from . import _kernels
from ._bench import _fmt_time, _make, _time_interleaved, _torch, _torch_view
from ._functional import get_num_threads, set_num_threads
from ._normalization import (
    group_norm_backward,
    group_norm_forward,
    instance_norm_backward,
    instance_norm_forward,
    layer_norm_backward,
    layer_norm_forward,
    rms_norm_backward,
    rms_norm_forward,
)

# (member, NCHW-order shape, layouts): the cases of the normalization-family issue
FAMILY_SUITE = [
    ("layer_norm", (4096, 768), ("rows",)),
    ("layer_norm", (64, 197, 768), ("rows",)),
    ("rms_norm", (4096, 4096), ("rows",)),
    ("group_norm", (32, 256, 28, 28), ("NCHW", "NHWC")),
    ("instance_norm", (8, 64, 128, 128), ("NCHW", "NHWC")),
]
GROUPS = 32


def _case_fns(member: str, direction: str, x: np.ndarray, g: np.ndarray, axis: int, torch, channels_last: bool):
    """{name: callable} of one case; the first is bnfast with out=."""
    dt = x.dtype
    out = np.empty_like(x)
    fns = {}
    if member in ("layer_norm", "rms_norm"):
        d = x.shape[-1]
        w = np.linspace(0.5, 1.5, d).astype(dt)
        b = np.linspace(-0.5, 0.5, d).astype(dt)
        if member == "layer_norm":
            _, mean, invstd = layer_norm_forward(x, d, w, b)
            fwd = lambda: layer_norm_forward(x, d, w, b, out=out)  # noqa: E731
            bwd = lambda: layer_norm_backward(g, x, d, mean, invstd, w, out=out)  # noqa: E731
        else:
            _, invstd = rms_norm_forward(x, d, w, 1e-6)
            fwd = lambda: rms_norm_forward(x, d, w, 1e-6, out=out)  # noqa: E731
            bwd = lambda: rms_norm_backward(g, x, d, invstd, w, out=out)  # noqa: E731
    else:
        c = x.shape[axis]
        w = np.linspace(0.5, 1.5, c).astype(dt)
        b = np.linspace(-0.5, 0.5, c).astype(dt)
        if member == "group_norm":
            _, mean, invstd = group_norm_forward(x, GROUPS, w, b, axis=axis)
            fwd = lambda: group_norm_forward(x, GROUPS, w, b, axis=axis, out=out)  # noqa: E731
            bwd = lambda: group_norm_backward(g, x, GROUPS, mean, invstd, w, axis=axis, out=out)  # noqa: E731
        else:
            _, mean, invstd = instance_norm_forward(x, w, b, axis=axis)
            fwd = lambda: instance_norm_forward(x, w, b, axis=axis, out=out)  # noqa: E731
            bwd = lambda: instance_norm_backward(g, x, mean, invstd, w, axis=axis, out=out)  # noqa: E731
    if direction == "forward":
        fns["bnfast"], fns["roof"] = fwd, lambda: _kernels.traffic(out, x)
    else:
        fns["bnfast"], fns["roof"] = bwd, lambda: _kernels.traffic(out, x, g)
    if torch is not None:
        fns["torch"] = _torch_fn(torch, member, direction, x, g, w, b, channels_last)
    return fns


def _torch_fn(torch, member, direction, x, g, w, b, channels_last):
    F, aten = torch.nn.functional, torch.ops.aten
    if member in ("layer_norm", "rms_norm"):
        tx, tg = torch.from_numpy(x), torch.from_numpy(g)
    else:
        tx, tg = _torch_view(torch, x, channels_last), _torch_view(torch, g, channels_last)
    tw, tb = torch.from_numpy(w), torch.from_numpy(b)
    d = x.shape[-1]
    if member == "layer_norm":
        if direction == "forward":
            return lambda: F.layer_norm(tx, (d,), tw, tb, 1e-5)
        _, mean, rstd = aten.native_layer_norm(tx, [d], tw, tb, 1e-5)
        return lambda: aten.native_layer_norm_backward(tg, tx, [d], mean, rstd, tw, tb, [True, True, True])
    if member == "rms_norm":
        if direction == "forward":
            return lambda: F.rms_norm(tx, (d,), tw, 1e-6)
        # no fused CPU backward in PyTorch: autograd through its forward
        xr, wr = tx.clone().requires_grad_(), tw.clone().requires_grad_()
        y = F.rms_norm(xr, (d,), wr, 1e-6)
        return lambda: torch.autograd.grad(y, (xr, wr), tg, retain_graph=True)
    n, c = tx.shape[0], tx.shape[1]
    hw = tx.numel() // (n * c)
    if member == "group_norm":
        if direction == "forward":
            return lambda: F.group_norm(tx, GROUPS, tw, tb, 1e-5)
        _, mean, rstd = aten.native_group_norm(tx, tw, tb, n, c, hw, GROUPS, 1e-5)
        return lambda: aten.native_group_norm_backward(tg, tx, mean, rstd, tw, n, c, hw, GROUPS,
                                                       [True, True, True])
    if direction == "forward":
        return lambda: F.instance_norm(tx, None, None, tw, tb, True, 0.1, 1e-5)
    # what autograd runs for instance_norm: batch norm over the (1, N*C, ...) view
    shape = (1, n * c) + tuple(tx.shape[2:])
    fmt = torch.channels_last if channels_last and tx.ndim == 4 else torch.contiguous_format
    vx = tx.reshape(shape).contiguous(memory_format=fmt)
    vg = tg.reshape(shape).contiguous(memory_format=fmt)
    vw = tw.repeat(n)
    _, save_mean, save_invstd = aten.native_batch_norm(vx, vw, tb.repeat(n), None, None, True, 0.1, 1e-5)
    return lambda: aten.native_batch_norm_backward(vg, vx, vw, None, None, save_mean, save_invstd, True,
                                                   1e-5, [True, True, True])


def run_family(threads=(2,), dtype: str = "float32", *, min_rounds: int = 5, budget: float = 0.5,
               passes: int = 1, use_torch: bool = True, progress=None) -> list[dict]:
    """Measure every case of `FAMILY_SUITE`; one dict per case (times in seconds)."""
    torch = _torch() if use_torch else None
    before = get_num_threads()
    torch_before = torch.get_num_threads() if torch is not None else None
    cases = [
        (member, shape, layout, direction, n)
        for member, shape, layouts in FAMILY_SUITE
        for layout in layouts
        for direction in ("forward", "backward")
        for n in threads
    ]
    best_all: dict = {}
    rows = []
    try:
        for p in range(passes):
            for case in cases:
                member, shape, layout, direction, n = case
                channels_last = layout == "NHWC"
                if layout == "rows":
                    rng = np.random.default_rng(0)
                    x = rng.standard_normal(shape).astype(dtype)
                    g = rng.standard_normal(shape).astype(dtype)
                    axis = -1
                else:
                    x, g, axis = _make(shape, channels_last, np.dtype(dtype))
                set_num_threads(n)
                if torch is not None:
                    torch.set_num_threads(n)
                best = _time_interleaved(_case_fns(member, direction, x, g, axis, torch, channels_last),
                                         min_rounds, budget, torch)
                merged = best_all.setdefault(case, best)
                for name, t in best.items():
                    merged[name] = min(merged[name], t)
                if p < passes - 1:
                    continue
                row = {
                    "member": member, "shape": list(shape), "layout": layout, "direction": direction,
                    "dtype": dtype, "threads": n, "time_s": merged["bnfast"], "roof_s": merged["roof"],
                    "ratio_roof": merged["bnfast"] / merged["roof"], "torch_s": merged.get("torch"),
                    "speedup_torch": merged["torch"] / merged["bnfast"] if "torch" in merged else None,
                }  # fmt: skip
                rows.append(row)
                if progress:
                    progress(row)
    finally:
        set_num_threads(before)
        if torch is not None:
            torch.set_num_threads(torch_before)
    return rows


def format_family_row(r: dict) -> str:
    """One line of the family table."""
    shape = "x".join(map(str, r["shape"]))
    torch = "" if r["torch_s"] is None else f"{_fmt_time(r['torch_s']):>10}  {r['speedup_torch']:5.2f}x"
    return (f"{r['member']:<14}{shape:<18}{r['layout']:<6}{r['direction']:<9}{r['threads']:>2}  "
            f"{_fmt_time(r['time_s']):>10}  {r['ratio_roof']:5.2f}  {torch}")


FAMILY_HEADER = (f"{'member':<14}{'shape':<18}{'layout':<6}{'dir':<9}{'T':>2}  {'bnfast':>10}  "
                 f"{'xroof':>5}  {'torch':>10}  {'vs torch':>7}")
