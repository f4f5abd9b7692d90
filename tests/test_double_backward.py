"""bnfast.batch_norm_double_backward: against the float64 reference, second-order finite
differences, PyTorch's double backward, layouts, dtypes, out= and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnfast
from bnfast import _reference as ref

EPS = 1e-5
LAYOUTS = [
    pytest.param((4, 3, 5), 1, id="NCL"),
    pytest.param((3, 2, 3, 4), 1, id="NCHW"),
    pytest.param((3, 3, 4, 2), -1, id="NHWC"),
    pytest.param((7, 3), 1, id="NC"),
    pytest.param((2, 3, 4, 2), 2, id="axis2"),
]


def problem(shape, axis, seed, dtype=np.float64, training=True, weight=True, offset=0.3):
    """x, grad_out, the statistics, weight and the three grad_grad arrays of one case."""
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (rng.standard_normal(shape) * 1.5 + offset).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    G = rng.standard_normal(shape).astype(dtype)
    gw, gb = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    w = (rng.uniform(0.5, 2.0, c) * np.where(rng.random(c) < 0.5, -1, 1)).astype(dtype) if weight else None
    if training:
        _, mean, invstd = ref.batch_norm_forward(x, axis=axis, eps=EPS)[:3]
    else:
        mean = rng.standard_normal(c)
        invstd = 1.0 / np.sqrt(rng.uniform(0.5, 2.0, c) + EPS)
    return x, g, mean.astype(dtype), invstd.astype(dtype), w, G, gw, gb


def assert_close(actual, expected, dtype):
    tol = 1e-10 if dtype == np.float64 else 2e-4
    for a, e in zip(actual, expected):
        assert a.dtype == dtype
        scale = max(1.0, float(np.abs(e).max()))
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol * scale)


# ------------------------------------------------------------------ the reference


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_matches_reference(shape, axis, dtype, training):
    x, g, mean, invstd, w, G, gw, gb = problem(shape, axis, 1, dtype, training)
    got = bnfast.batch_norm_double_backward(G, gw, gb, g, x, mean, invstd, w, training=training, axis=axis)
    assert_close(got, ref.batch_norm_double_backward(G, gw, gb, g, x, mean, invstd, w,
                                                     training=training, axis=axis), dtype)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("which", ["G", "gw", "gb", "G+gw", "none"])
def test_any_grad_grad_may_be_none(which, training):
    x, g, mean, invstd, w, G, gw, gb = problem((4, 3, 6), 1, 2, training=training)
    args = (G if "G" in which else None, gw if "gw" in which else None, gb if which == "gb" else None)
    got = bnfast.batch_norm_double_backward(*args, g, x, mean, invstd, w, training=training)
    zeros = [np.zeros_like(a) if a is not None and b is None else a for a, b in zip((G, gw, gb), args)]
    expected = ref.batch_norm_double_backward(*zeros, g, x, mean, invstd, w, training=training)
    assert_close(got, expected, np.float64)
    if which == "none":
        assert all(not np.any(a) for a in got)


def test_large_mean_float32_centred():
    """float32 input with a mean far larger than the spread: within ~1e-7 of the float64 reference
    (the sums in float64 around the mean, the outputs in the centred form)."""
    x, g, mean, invstd, w, G, gw, gb = problem((16, 4, 64), 1, 3, np.float64, offset=1e4)
    x32 = x.astype(np.float32)
    _, mean, invstd = ref.batch_norm_forward(x32, axis=1, eps=EPS)[:3]
    expected = ref.batch_norm_double_backward(G, gw, gb, g, x32, mean.astype(np.float32),
                                              invstd.astype(np.float32), w)
    got = bnfast.batch_norm_double_backward(*(a.astype(np.float32) for a in (G, gw, gb, g)), x32,
                                            mean.astype(np.float32), invstd.astype(np.float32),
                                            w.astype(np.float32))
    for a, e in zip(got, expected):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6 * np.abs(e).max())


@settings(max_examples=20)
@given(
    ndim=st.integers(2, 4),
    data=st.data(),
    dtype=st.sampled_from([np.float32, np.float64]),
    training=st.booleans(),
    weight=st.booleans(),
    layout=st.sampled_from(["C", "F", "reversed"]),
)
def test_property_shapes_axes(ndim, data, dtype, training, weight, layout):
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axis = data.draw(st.integers(-ndim, ndim - 1))
    if training and np.prod(shape) // shape[axis] < 2:
        shape = (shape[0] + 1,) + shape[1:] if axis % ndim != 0 else shape[:1] + (shape[1] + 1,) + shape[2:]
    x, g, mean, invstd, w, G, gw, gb = problem(shape, axis, data.draw(st.integers(0, 99)), dtype,
                                                 training, weight)
    if layout == "F":
        x, G = np.asfortranarray(x), np.asfortranarray(G)
    elif layout == "reversed":
        x, g = x[::-1].copy()[::-1], g[::-1].copy()[::-1]  # negative strides
    got = bnfast.batch_norm_double_backward(G, gw, gb, g, x, mean, invstd, w, training=training, axis=axis)
    assert_close(got, ref.batch_norm_double_backward(G, gw, gb, g, x, mean, invstd, w,
                                                     training=training, axis=axis), dtype)


# --------------------------------------------------------- second-order differences


def _first_backward(x, g, w, training, axis, stats):
    """batch_norm_backward's three outputs as a function of (x, grad_out, weight), float64:
    in training mode the statistics are recomputed from x, as the forward would."""
    if training:
        _, mean, invstd = ref.batch_norm_forward(x, axis=axis, eps=EPS)[:3]
    else:
        mean, invstd = stats
    return ref.batch_norm_backward(g, x, mean, invstd, w, training=training, axis=axis)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,axis", LAYOUTS[:3])
def test_second_order_finite_differences(shape, axis, training):
    """Directional central differences of <G, grad_input> + <gw, grad_weight> + <gb, grad_bias>
    along random directions of x, grad_out and weight match the double backward (and the
    reference), in float64."""
    x, g, mean, invstd, w, G, gw, gb = problem(shape, axis, 4, training=training)
    if training:
        _, mean, invstd = ref.batch_norm_forward(x, axis=axis, eps=EPS)[:3]

    def loss(x_, g_, w_):
        gi, gwt, gbt = _first_backward(x_, g_, w_, training, axis, (mean, invstd))
        return float((G * gi).sum() + (gw * gwt).sum() + (gb * gbt).sum())

    got = bnfast.batch_norm_double_backward(G, gw, gb, g, x, mean, invstd, w, training=training, axis=axis)
    expected = ref.batch_norm_double_backward(G, gw, gb, g, x, mean, invstd, w, training=training,
                                              axis=axis)
    rng = np.random.default_rng(5)
    h = 1e-5
    for k, base in enumerate((x, g, w)):
        for _ in range(3):
            d = rng.standard_normal(base.shape)
            args_up = [x, g, w]
            args_dn = [x, g, w]
            args_up[k] = base + h * d
            args_dn[k] = base - h * d
            numeric = (loss(*args_up) - loss(*args_dn)) / (2 * h)
            for analytic in (got[k], expected[k]):
                assert abs(float((analytic * d).sum()) - numeric) <= 1e-6 * max(1.0, abs(numeric))


# ------------------------------------------------------------------------ PyTorch


def _torch_double_backward(torch, x, g, G, gw, gb, w, training, mean, var, axis):
    """PyTorch's double backward of F.batch_norm, channels moved to axis 1 for torch."""
    move = (lambda a: np.moveaxis(a, axis, 1)) if axis not in (1, 1 - x.ndim) else (lambda a: a)
    xt = torch.tensor(np.ascontiguousarray(move(x)), requires_grad=True)
    gt = torch.tensor(np.ascontiguousarray(move(g)), requires_grad=True)
    wt = torch.tensor(w, requires_grad=True) if w is not None else None
    y = torch.nn.functional.batch_norm(
        xt, None if training else torch.tensor(mean), None if training else torch.tensor(var),
        wt, None, training=training, eps=EPS,
    )
    inputs = (xt, wt) if wt is not None else (xt,)
    first = torch.autograd.grad(y, inputs, gt, create_graph=True)
    loss = (first[0] * torch.tensor(np.ascontiguousarray(move(G)))).sum()
    if wt is not None:
        loss = loss + (first[1] * torch.tensor(gw)).sum()
    wanted = (xt, gt) + ((wt,) if wt is not None else ())
    second = torch.autograd.grad(loss, wanted, allow_unused=True)
    back = (lambda a: np.moveaxis(a, 1, axis)) if axis not in (1, 1 - x.ndim) else (lambda a: a)
    out = [np.zeros(x.shape, x.dtype) if t is None else back(t.detach().numpy()) for t in second[:2]]
    if wt is not None:
        out.append(second[2].detach().numpy() if second[2] is not None else np.zeros_like(w))
    return out


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape,axis", [((4, 3, 5, 2), 1), ((4, 5, 2, 3), -1), ((6, 3), 1)])
def test_matches_torch(shape, axis, dtype, weight, training):
    torch = pytest.importorskip("torch")
    x, g, mean, invstd, w, G, gw, gb = problem(shape, axis, 6, dtype, training, weight)
    var = (1.0 / invstd.astype(np.float64) ** 2 - EPS).astype(dtype)
    expected = _torch_double_backward(torch, x, g, G, gw, None, w, training, mean, var, axis)
    if not training:  # torch normalizes with the running statistics: use its invstd
        invstd = (1.0 / np.sqrt(var.astype(np.float64) + EPS)).astype(dtype)
    got = bnfast.batch_norm_double_backward(G, gw if weight else None, None, g, x, mean, invstd, w,
                                            training=training, axis=axis)
    tol = 1e-9 if dtype == np.float64 else 1e-4
    for a, e in zip(got, expected):
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol * max(1.0, np.abs(e).max()))


def test_matches_torch_grad_bias_term():
    """grad_grad_bias: torch's gradient of <gb, grad_bias> w.r.t. grad_out is gb broadcast."""
    torch = pytest.importorskip("torch")
    x, g, mean, invstd, w, G, gw, gb = problem((4, 3, 5), 1, 7)
    xt = torch.tensor(x, requires_grad=True)
    bt = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    gt = torch.tensor(g, requires_grad=True)
    y = torch.nn.functional.batch_norm(xt, None, None, torch.tensor(w), bt, training=True, eps=EPS)
    (grad_bias,) = torch.autograd.grad(y, (bt,), gt, create_graph=True)
    (ggo,) = torch.autograd.grad((grad_bias * torch.tensor(gb)).sum(), (gt,))
    got = bnfast.batch_norm_double_backward(None, None, gb, g, x, mean, invstd, w)
    np.testing.assert_allclose(got[1], ggo.numpy(), rtol=1e-12, atol=1e-12)
    assert not np.any(got[0]) and not np.any(got[2])


# ----------------------------------------------------------------- out=, threads


def test_out_including_inputs():
    x, g, mean, invstd, w, G, gw, gb = problem((4, 3, 5), 1, 8)
    expected = bnfast.batch_norm_double_backward(G, gw, gb, g, x, mean, invstd, w)
    a, b = np.empty_like(x), np.empty_like(x)
    got = bnfast.batch_norm_double_backward(G, gw, gb, g, x, mean, invstd, w, out=(a, b))
    assert got[0] is a and got[1] is b
    np.testing.assert_array_equal(a, expected[0])
    np.testing.assert_array_equal(b, expected[1])
    # out= may be the inputs themselves (grad_x into grad_out, grad_grad_out into x)
    g2, x2 = g.copy(), x.copy()
    got = bnfast.batch_norm_double_backward(G, gw, gb, g2, x2, mean, invstd, w, out=(g2, x2))
    assert got[0] is g2 and got[1] is x2
    np.testing.assert_array_equal(g2, expected[0])
    np.testing.assert_array_equal(x2, expected[1])
    # one entry may be None; a channels-last out for channels-first data works too
    c = np.empty((4, 5, 3)).transpose(0, 2, 1)
    got = bnfast.batch_norm_double_backward(G, gw, gb, g, x, mean, invstd, w, out=(None, c))
    assert got[1] is c
    np.testing.assert_array_equal(c, expected[1])


def test_bit_identical_for_any_thread_count():
    x, g, mean, invstd, w, G, gw, gb = problem((8, 16, 33), 1, 9, np.float32)
    results = []
    for n in (1, 2, 3):
        bnfast.set_num_threads(n)
        results.append(bnfast.batch_norm_double_backward(G, gw, gb, g, x, mean, invstd, w))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


# -------------------------------------------------------------------- bad input


def _bad_cases():
    x, g, mean, invstd, w, G, gw, gb = problem((4, 3, 5), 1, 10)
    base = dict(grad_grad_input=G, grad_grad_weight=gw, grad_grad_bias=gb, grad_out=g, x=x,
                save_mean=mean, save_invstd=invstd, weight=w)
    ro = np.empty_like(x)
    ro.flags.writeable = False
    shared = np.empty_like(x)
    return base, [
        (dict(x=x.astype(np.int64)), TypeError, "float32 or float64"),
        (dict(grad_out=g.astype(np.float32)), TypeError, "dtype of x"),
        (dict(grad_grad_input=G.astype(np.float32)), TypeError, "dtype of x"),
        (dict(grad_grad_input=G[:2]), ValueError, "shape of x"),
        (dict(grad_out=g[:, :2]), ValueError, "shape of x"),
        (dict(grad_grad_weight=gw[:2]), ValueError, r"grad_grad_weight must have shape \(3,\)"),
        (dict(grad_grad_bias=np.zeros(4)), ValueError, "grad_grad_bias must have shape"),
        (dict(weight=np.ones(2)), ValueError, "weight must have shape"),
        (dict(save_mean=None), ValueError, "required"),
        (dict(save_invstd=np.array(["a", "b", "c"])), TypeError, "floating-point"),
        (dict(axis=3), ValueError, "out of range"),
        (dict(axis=1.0), TypeError, "axis must be an integer"),
        (dict(training=1), TypeError, "training must be True or False"),
        (dict(x=x[:, :, :1][:1]), ValueError, "shape of x"),
        (dict(out=np.empty_like(x)), TypeError, "tuple of two"),
        (dict(out=(np.empty_like(x),)), TypeError, "tuple of two"),
        (dict(out=(ro, None)), ValueError, "read-only"),
        (dict(out=(None, np.empty((4, 3, 4)))), ValueError, "shape"),
        (dict(out=(None, np.empty_like(x, np.float32))), ValueError, "dtype"),
        (dict(out=(shared, shared)), ValueError, "share memory"),
    ]


def test_bad_input_errors_and_nothing_written():
    base, cases = _bad_cases()
    for change, exc, match in cases:
        kwargs = {**base, **change}
        outs = kwargs.get("out")
        before = [None if o is None else o.copy() for o in outs] if isinstance(outs, tuple) else None
        with pytest.raises(exc, match=match):
            bnfast.batch_norm_double_backward(**kwargs)
        if before is not None:
            for o, b in zip(outs, before):
                if o is not None:
                    np.testing.assert_array_equal(o, b)


def test_empty_batch_training_is_an_error_eval_is_not():
    x = np.zeros((0, 3, 4))
    with pytest.raises(ValueError, match="empty batch"):
        bnfast.batch_norm_double_backward(x, None, None, x, x, np.zeros(3), np.ones(3))
    gx, ggo, gw = bnfast.batch_norm_double_backward(x, None, None, x, x, np.zeros(3), np.ones(3),
                                                    training=False)
    assert gx.shape == ggo.shape == x.shape and gw.shape == (3,) and not gw.any()
