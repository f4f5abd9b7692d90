"""``python -m bnfast bench --variants``: the small-batch variants against plain BatchNorm.

Each case is one layer in training mode on one shape and layout: its
``forward`` and its ``backward``, timed interleaved round by round with plain
:class:`~bnfast.nn.BatchNorm2d` on the same arrays and thread count (best of
the rounds, as in `bnfast._bench`).  ``x BN`` is the variant's time over
BatchNorm's; the issue's bar is 1.3.  Cross-iteration BN follows a 1x1
``Conv2d`` (its window full); its forward includes the Taylor term's
``d nu / d W`` product, whose cost is that of the convolution's weight
gradient (it grows with the convolution's fan-in) -- the layer is timed
without the convolution itself.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ._bench import _fmt_time, _make, _time_interleaved
from ._functional import get_num_threads, set_num_threads

DEFAULT_SHAPE = (32, 64, 56, 56)
VARIANTS = ("Ghost BN (v=8)", "Batch Renorm", "Momentum BN", "Cross-iter BN")
VARIANTS_HEADER = f"{'variant':<16} {'layout':<6} {'thr':>3}  {'forward':>9} {'x BN':>5}  {'backward':>9} {'x BN':>5}"


def _layer(name: str, channels: int, axis: int, dtype: Any, x: np.ndarray) -> Any:
    import bnfast
    from . import nn

    if name == "BatchNorm":
        return nn.BatchNorm2d(channels, axis=axis, dtype=dtype)
    if name.startswith("Ghost"):
        return nn.BatchNorm2d(channels, axis=axis, dtype=dtype,
                              virtual_batch_size=8 if x.shape[0] % 8 == 0 else x.shape[0])
    if name == "Batch Renorm":
        return bnfast.BatchRenorm2d(channels, axis=axis, dtype=dtype)
    if name == "Momentum BN":
        layer = bnfast.MomentumBatchNorm2d(channels, total_steps=10, ideal_batch_size=64, axis=axis, dtype=dtype)
        layer.num_batches_tracked[...] = 5  # mid-schedule: 0 < lambda < 1
        return layer
    conv = nn.Conv2d(channels, channels, 1, bias=False, axis=axis, dtype=dtype, rng=0)
    layer = bnfast.CrossIterationBatchNorm2d(channels, window_size=4, burn_in=0, axis=axis, dtype=dtype)
    h = conv(x)
    layer._bind_preceding(conv)
    for _ in range(4):  # fill the window
        layer(h)
    layer.__dict__["_bench_input"] = h
    return layer


def run_variants(shape: tuple[int, ...] = DEFAULT_SHAPE, dtype: str = "float32", layouts=("NCHW", "NHWC"),
                 threads=(1, 2), *, min_rounds: int = 5, budget: float = 0.5,
                 progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Time every variant against BatchNorm2d; one dict per (variant, layout, threads), times in seconds.

    Parameters
    ----------
    shape : tuple of int
        NCHW-order shape.
    dtype : str
    layouts : sequence of {"NCHW", "NHWC"}
    threads : sequence of int
    min_rounds : int
    budget : float
        Seconds of timing per direction and case.
    progress : callable, optional
        Called with each row as it is measured.

    Returns
    -------
    list of dict
    """
    before = get_num_threads()
    rows = []
    try:
        for layout in layouts:
            x, g, axis = _make(shape, layout == "NHWC", np.dtype(dtype))
            channels = x.shape[axis]
            layers = {name: _layer(name, channels, axis, np.dtype(dtype), x) for name in ("BatchNorm",) + VARIANTS}
            inputs = {name: layer.__dict__.get("_bench_input", x) for name, layer in layers.items()}
            for n in threads:
                set_num_threads(n)
                fwd = {name: (lambda layer=layer, xi=inputs[name]: layer(xi)) for name, layer in layers.items()}
                t_fwd = _time_interleaved(fwd, min_rounds, budget, None)
                for layer, xi in zip(layers.values(), inputs.values()):
                    layer(xi)
                bwd = {name: (lambda layer=layer: layer.backward(g)) for name, layer in layers.items()}
                t_bwd = _time_interleaved(bwd, min_rounds, budget, None)
                for name in VARIANTS:
                    row = dict(variant=name, layout=layout, threads=n, shape=list(shape), dtype=dtype,
                               forward=t_fwd[name], backward=t_bwd[name], bn_forward=t_fwd["BatchNorm"],
                               bn_backward=t_bwd["BatchNorm"], forward_ratio=t_fwd[name] / t_fwd["BatchNorm"],
                               backward_ratio=t_bwd[name] / t_bwd["BatchNorm"])
                    rows.append(row)
                    if progress is not None:
                        progress(row)
    finally:
        set_num_threads(before if before else None)
    return rows


def format_variant_row(r: dict) -> str:
    """One line of the table.

    Parameters
    ----------
    r : dict
        A row of :func:`run_variants`.

    Returns
    -------
    str
    """
    return (f"{r['variant']:<16} {r['layout']:<6} {r['threads']:>3}  {_fmt_time(r['forward']):>9} "
            f"{r['forward_ratio']:>5.2f}  {_fmt_time(r['backward']):>9} {r['backward_ratio']:>5.2f}")
