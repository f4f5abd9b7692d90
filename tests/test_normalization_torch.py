"""The normalization family against PyTorch (skipped when torch is missing).

Outputs, saved statistics (``torch.native_layer_norm`` / ``native_group_norm``)
and autograd gradients (float64 and float32 tensors) of ``F.layer_norm``,
``F.rms_norm``, ``F.group_norm`` and ``F.instance_norm`` (with running
statistics, updated as PyTorch updates them, and with
``use_input_stats=False``) against bnfast on the same data; channels-last
tensors (``torch.channels_last`` / ``channels_last_3d``) against bnfast's
``axis=-1`` on the NHWC array, compared after transposing back.  Filter
response norm, which PyTorch has no operator for, against its formula
written with torch ops.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import bnfast  # noqa: E402

from _normalization_cases import assert_close, scale_of  # noqa: E402

DTYPES = (np.float32, np.float64)


def _t(a, grad=False):
    if a is None:
        return None
    t = torch.from_numpy(np.array(a, copy=True))
    return t.requires_grad_(grad)


def _np(t):
    return None if t is None else t.detach().numpy()


def _rng(seed):
    return np.random.default_rng(seed)


def _grad_scale(g, w, inv):
    """grad_input is invstd times differences of terms of size |weight * grad_out|."""
    wmax = 1.0 if w is None else max(1.0, float(np.max(np.abs(w))))
    return max(1.0, float(np.max(inv)) * wmax * scale_of(g))


def _y_scale(x, w, inv, y):
    """y's errors: float32 rounding of x - mean (torch's), amplified by invstd * |weight|."""
    wmax = 1.0 if w is None else max(1.0, float(np.max(np.abs(w))))
    return max(scale_of(y), wmax * float(np.max(np.abs(x))) * float(np.max(inv)))


def _to_channels_last(x):
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def _from_channels_last(y):
    return np.moveaxis(y, -1, 1)


def _memory_format(ndim):
    return {4: torch.channels_last, 5: torch.channels_last_3d}[ndim]


def _autograd(fn, inputs, g):
    """Forward ``fn(*tensors)``, backward ``g``; returns (y, grads of the inputs that need them)."""
    y = fn(*inputs)
    y.backward(_t(g).to(y.dtype))
    return _np(y), [None if t is None or not t.requires_grad else _np(t.grad) for t in inputs]


# ---------------------------------------------------------------- layer norm

LAYER = [
    ((4, 10), (10,)),
    ((3, 4, 5), (5,)),
    ((3, 4, 5), (4, 5)),
    ((2, 3, 4, 5), (3, 4, 5)),
    ((2, 3, 4, 5, 2), (5, 2)),
    ((64, 96), (96,)),
]


@pytest.mark.parametrize("shape,normalized", LAYER, ids=[f"{s}-{n}" for s, n in LAYER])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("affine", ["none", "weight", "both"])
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_layer_norm(shape, normalized, dtype, affine, eps):
    rng = _rng(0)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(-2, 2, normalized).astype(dtype) if affine != "none" else None
    b = rng.standard_normal(normalized).astype(dtype) if affine == "both" else None

    y, mean, inv = bnfast.layer_norm_forward(x, normalized, w, b, eps)
    gi, gw, gb = bnfast.layer_norm_backward(g, x, normalized, mean, inv, w)

    xt, wt, bt = _t(x, True), _t(w, True), _t(b, True)
    yt, (gxt, gwt, gbt) = _autograd(lambda a, c, d: F.layer_norm(a, normalized, c, d, eps), [xt, wt, bt], g)
    _, mt, rt = torch.native_layer_norm(_t(x), list(normalized), _t(w), _t(b), eps)

    assert_close(y, yt, dtype, scale=_y_scale(x, w, inv, yt), err_msg="y")
    assert mean.shape == tuple(mt.shape) and inv.shape == tuple(rt.shape)
    assert_close(mean, _np(mt), dtype, err_msg="mean")
    assert_close(inv, _np(rt), dtype, err_msg="invstd")
    same = bnfast.layer_norm(x, normalized, w, b, eps)
    np.testing.assert_array_equal(same, y)
    assert_close(gi, gxt, dtype, scale=_grad_scale(g, w, inv), factor=10, err_msg="grad_input")
    if w is not None:
        assert_close(gw, gwt, dtype, factor=10, err_msg="grad_weight")
    if b is not None:
        assert_close(gb, gbt, dtype, factor=10, err_msg="grad_bias")


# ------------------------------------------------------------------ RMS norm

RMS = [((4, 10), (10,)), ((3, 4, 5), (4, 5)), ((2, 3, 4, 5), (5,)), ((2, 3, 2, 3, 4), (3, 4)),
       ((32, 64), (64,))]


@pytest.mark.parametrize("shape,normalized", RMS, ids=[f"{s}-{n}" for s, n in RMS])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [None, 1e-6, 0.1])
def test_rms_norm(shape, normalized, dtype, weighted, eps):
    rng = _rng(1)
    x = (rng.standard_normal(shape) + 0.5).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(-2, 2, normalized).astype(dtype) if weighted else None

    y, inv = bnfast.rms_norm_forward(x, normalized, w, eps)
    gi, gw = bnfast.rms_norm_backward(g, x, normalized, inv, w)
    xt, wt = _t(x, True), _t(w, True)
    yt, (gxt, gwt) = _autograd(lambda a, c: F.rms_norm(a, list(normalized), c, eps), [xt, wt], g)

    assert_close(y, yt, dtype, scale=_y_scale(x, w, inv, yt), err_msg="y")
    np.testing.assert_array_equal(bnfast.rms_norm(x, normalized, w, eps), y)
    assert_close(gi, gxt, dtype, scale=_grad_scale(g, w, inv), factor=10, err_msg="grad_input")
    if w is not None:
        assert_close(gw, gwt, dtype, factor=10, err_msg="grad_weight")


# ---------------------------------------------------------------- group norm

GROUP = [
    ((6, 8), 2),
    ((6, 8), 8),
    ((5, 6), 1),
    ((3, 6, 5), 3),
    ((2, 8, 3, 4), 4),
    ((2, 8, 3, 4), 1),
    ((2, 8, 3, 4), 8),
    ((4, 32, 8, 8), 8),
    ((2, 4, 2, 3, 2), 2),
]


def _with_layouts(cases, shape_of=lambda c: c):
    """Each case channels-first, and channels-last where torch has a memory
    format for it (4-D and 5-D tensors)."""
    out = []
    for case in cases:
        shape = shape_of(case)
        for layout in ("channels_first", "channels_last") if len(shape) >= 4 else ("channels_first",):
            out.append(pytest.param(case, layout, id=f"{case}-{layout}"))
    return out


@pytest.mark.parametrize("case,layout", _with_layouts(GROUP, lambda c: c[0]))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("affine", ["none", "both"])
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_group_norm(case, layout, dtype, affine, eps):
    shape, groups = case
    rng = _rng(2)
    x = (rng.standard_normal(shape) * 2 - 1).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    w = rng.uniform(-2, 2, c).astype(dtype) if affine == "both" else None
    b = rng.standard_normal(c).astype(dtype) if affine == "both" else None

    if layout == "channels_first":
        y, mean, inv = bnfast.group_norm_forward(x, groups, w, b, eps)
        gi, gw, gb = bnfast.group_norm_backward(g, x, groups, mean, inv, w)
    else:
        xl, glast = _to_channels_last(x), _to_channels_last(g)
        y, mean, inv = bnfast.group_norm_forward(xl, groups, w, b, eps, axis=-1)
        gi, gw, gb = bnfast.group_norm_backward(glast, xl, groups, mean, inv, w, axis=-1)
        y, gi = _from_channels_last(y), _from_channels_last(gi)

    xt = _t(x)
    if layout == "channels_last":
        xt = xt.contiguous(memory_format=_memory_format(len(shape)))
        assert xt.is_contiguous(memory_format=_memory_format(len(shape)))
    xt.requires_grad_(True)
    wt, bt = _t(w, True), _t(b, True)
    yt, (gxt, gwt, gbt) = _autograd(lambda a, s, d: F.group_norm(a, groups, s, d, eps), [xt, wt, bt], g)
    n, hw = shape[0], int(np.prod(shape[2:], dtype=np.int64))
    _, mt, rt = torch.native_group_norm(_t(x), _t(w), _t(b), n, c, hw, groups, eps)

    assert_close(y, yt, dtype, scale=_y_scale(x, w, inv, yt), err_msg="y")
    assert mean.shape == inv.shape == (n, groups)
    assert_close(mean, _np(mt), dtype, err_msg="mean")
    assert_close(inv, _np(rt), dtype, err_msg="invstd")
    assert_close(gi, gxt, dtype, scale=_grad_scale(g, w, inv), factor=10, err_msg="grad_input")
    if w is not None:
        assert_close(gw, gwt, dtype, factor=10, err_msg="grad_weight")
        assert_close(gb, gbt, dtype, factor=10, err_msg="grad_bias")


# ------------------------------------------------------------- instance norm

INSTANCE = [(4, 3, 7), (2, 3, 4, 5), (2, 16, 6, 6), (2, 3, 2, 3, 4)]


@pytest.mark.parametrize("shape,layout", _with_layouts(INSTANCE))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("running", [False, True])
@pytest.mark.parametrize("momentum,eps", [(0.1, 1e-5), (0.7, 1e-2), (1.0, 1e-5)])
def test_instance_norm_training(shape, layout, dtype, affine, running, momentum, eps):
    rng = _rng(3)
    x = (rng.standard_normal(shape) * 1.5 + 2).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    w = rng.uniform(-2, 2, c).astype(dtype) if affine else None
    b = rng.standard_normal(c).astype(dtype) if affine else None
    rm0 = rng.standard_normal(c).astype(dtype) if running else None
    rv0 = rng.uniform(0.5, 2, c).astype(dtype) if running else None
    rm = None if rm0 is None else rm0.copy()
    rv = None if rv0 is None else rv0.copy()

    if layout == "channels_first":
        y, mean, inv = bnfast.instance_norm_forward(x, w, b, rm, rv, momentum=momentum, eps=eps)
        gi, gw, gb = bnfast.instance_norm_backward(g, x, mean, inv, w)
    else:
        xl = _to_channels_last(x)
        y, mean, inv = bnfast.instance_norm_forward(xl, w, b, rm, rv, momentum=momentum, eps=eps, axis=-1)
        gi, gw, gb = bnfast.instance_norm_backward(_to_channels_last(g), xl, mean, inv, w, axis=-1)
        y, gi = _from_channels_last(y), _from_channels_last(gi)

    xt = _t(x)
    if layout == "channels_last":
        xt = xt.contiguous(memory_format=_memory_format(len(shape)))
    xt.requires_grad_(True)
    wt, bt = _t(w, True), _t(b, True)
    rmt, rvt = _t(rm0), _t(rv0)
    yt, (gxt, gwt, gbt) = _autograd(
        lambda a, s, d: F.instance_norm(a, rmt, rvt, s, d, True, momentum, eps), [xt, wt, bt], g)

    assert_close(y, yt, dtype, scale=_y_scale(x, w, inv, yt), err_msg="y")
    assert mean.shape == inv.shape == (shape[0], c)
    axes = tuple(range(2, len(shape)))
    assert_close(mean, x.astype(np.float64).mean(axis=axes), dtype, err_msg="mean")
    if running:
        assert rm.dtype == rv.dtype == np.dtype(dtype)
        assert_close(rm, _np(rmt), dtype, err_msg="running_mean")
        assert_close(rv, _np(rvt), dtype, err_msg="running_var")
        # the one-call function: the same output and the same update
        rm2, rv2 = rm0.copy(), rv0.copy()
        y2 = bnfast.instance_norm(x, rm2, rv2, w, b, True, momentum, eps)
        assert_close(y2, yt, dtype, err_msg="instance_norm y")
        assert_close(rm2, _np(rmt), dtype, err_msg="instance_norm running_mean")
        assert_close(rv2, _np(rvt), dtype, err_msg="instance_norm running_var")
    assert_close(gi, gxt, dtype, scale=_grad_scale(g, w, inv), factor=10, err_msg="grad_input")
    if w is not None:
        assert_close(gw, gwt, dtype, factor=10, err_msg="grad_weight")
        assert_close(gb, gbt, dtype, factor=10, err_msg="grad_bias")


@pytest.mark.parametrize("shape,layout", _with_layouts(INSTANCE))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_with_running_stats(shape, layout, dtype, affine):
    """use_input_stats=False: normalized with the running statistics, which stay as they are."""
    rng = _rng(4)
    eps = 1e-3
    x = (rng.standard_normal(shape) + 1).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    w = rng.uniform(-2, 2, c).astype(dtype) if affine else None
    b = rng.standard_normal(c).astype(dtype) if affine else None
    rm0 = rng.standard_normal(c).astype(dtype)
    rv0 = rng.uniform(0.5, 2, c).astype(dtype)
    rm, rv = rm0.copy(), rv0.copy()
    if layout == "channels_first":
        y = bnfast.instance_norm(x, rm, rv, w, b, use_input_stats=False, eps=eps)
    else:
        y = _from_channels_last(bnfast.instance_norm(_to_channels_last(x), rm, rv, w, b,
                                                     use_input_stats=False, eps=eps, axis=-1))
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)

    xt = _t(x)
    if layout == "channels_last":
        xt = xt.contiguous(memory_format=_memory_format(len(shape)))
    xt.requires_grad_(True)
    wt, bt = _t(w, True), _t(b, True)
    rmt, rvt = _t(rm0), _t(rv0)
    yt, (gxt, gwt, gbt) = _autograd(
        lambda a, s, d: F.instance_norm(a, rmt, rvt, s, d, False, 0.1, eps), [xt, wt, bt], g)
    inv = (1.0 / np.sqrt(rv0.astype(np.float64) + eps)).astype(dtype)
    assert_close(y, yt, dtype, scale=_y_scale(x, w, inv, yt), err_msg="y")
    np.testing.assert_array_equal(_np(rmt), rm0)  # torch leaves them too
    # its gradient: batch norm's with the running statistics as constants
    gi, gw, gb = bnfast.batch_norm_backward(g, x, rm0, inv, w, training=False)
    assert_close(gi, gxt, dtype, factor=10, err_msg="grad_input")
    if w is not None:
        assert_close(gw, gwt, dtype, factor=10, err_msg="grad_weight")
        assert_close(gb, gbt, dtype, factor=10, err_msg="grad_bias")


# ------------------------------------------------ filter response norm (composed)


def _torch_frn(x, w, b, tau, eps):
    axes = tuple(range(2, x.ndim))
    nu2 = x.pow(2).mean(dim=axes, keepdim=True)
    view = (1, -1) + (1,) * (x.ndim - 2)
    y = x * torch.rsqrt(nu2 + abs(eps)) * w.view(view) + b.view(view)
    return torch.maximum(y, tau.view(view)) if tau is not None else y


@pytest.mark.parametrize("shape", [(3, 4, 6), (2, 3, 4, 5), (2, 3, 2, 3, 2)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("with_tau", [False, True])
def test_filter_response_norm_against_its_formula_in_torch(shape, dtype, with_tau):
    rng = _rng(5)
    eps = 1e-6
    x = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    w = rng.uniform(-2, 2, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    tau = rng.uniform(-0.5, 0.5, c).astype(dtype) if with_tau else None
    y, inv = bnfast.filter_response_norm_forward(x, w, b, tau, eps)
    gi, gw, gb, gtau = bnfast.filter_response_norm_backward(g, x, y, inv, w, tau)
    ts = [_t(x, True), _t(w, True), _t(b, True), _t(tau, True)]
    yt, (gxt, gwt, gbt, gtt) = _autograd(lambda a, s, d, t: _torch_frn(a, s, d, t, eps), ts, g)
    assert_close(y, yt, dtype, scale=_y_scale(x, w, inv, yt), err_msg="y")
    # away from ties at the threshold the gradients agree
    z = _np(_torch_frn(_t(x), _t(w), _t(b), None, eps))
    if with_tau:
        assert np.min(np.abs(z - tau.reshape((1, -1) + (1,) * (len(shape) - 2)))) > 1e-4
    assert_close(gi, gxt, dtype, scale=_grad_scale(g, w, inv), factor=10, err_msg="grad_input")
    assert_close(gw, gwt, dtype, factor=10, err_msg="grad_weight")
    assert_close(gb, gbt, dtype, factor=10, err_msg="grad_bias")
    if with_tau:
        assert_close(gtau, gtt, dtype, factor=10, err_msg="grad_tau")
    else:
        np.testing.assert_array_equal(gtau, 0)
