"""Fused batch norm + residual add + activation, and in-place activated batch norm."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnfast
from bnfast import _reference as ref

ACTS = ["identity", "relu", "leaky_relu", "elu"]
INVERTIBLE = ["identity", "leaky_relu", "elu"]
TOL = {np.float32: 2e-5, np.float64: 1e-12}


def _data(shape, dtype, axis, seed=0, residual=True):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    C = shape[axis]
    w = rng.uniform(0.5, 2.0, C).astype(dtype) * rng.choice([-1, 1], C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    z = rng.standard_normal(shape).astype(dtype) if residual else None
    g = rng.standard_normal(shape).astype(dtype)
    return x, w, b, z, g


def _close(a, b, dtype, scale=1.0):
    b = np.asarray(b, np.float64)
    tol = TOL[dtype] * scale * max(1.0, float(np.abs(b).max()) if b.size else 1.0)
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True])
def test_against_reference(dtype, axis, act, residual):
    shape = (4, 5, 6, 3) if axis == 1 else (4, 6, 3, 5)
    x, w, b, z, g = _data(shape, dtype, axis, residual=residual)
    rm, rv = np.zeros(5, dtype), np.ones(5, dtype)
    kw = dict(activation=act, negative_slope=0.2, residual=z, axis=axis)
    y, mean, invstd = bnfast.batch_norm_act_forward(x, w, b, rm, rv, **kw)
    ry, rmean, rinv, rrm, rrv = ref.batch_norm_act_forward(
        x, w, b, np.zeros(5), np.ones(5), activation_name=act, negative_slope=0.2, residual=z, axis=axis
    )
    assert y.dtype == dtype and y.shape == x.shape
    _close(y, ry, dtype)
    _close(mean, rmean, dtype)
    _close(rm, rrm, dtype)
    _close(rv, rrv, dtype)
    rgx, rgw, rgb, rgz = ref.batch_norm_act_backward(
        g, x, w, b, activation_name=act, negative_slope=0.2, residual=z, axis=axis
    )
    # from x (any activation), and from y alone where the activation is invertible
    ways = [dict(x=x)] + ([{}] if act in INVERTIBLE else [])
    for extra in ways:
        gx, gw, gb, gz = bnfast.batch_norm_act_backward(g, y, mean, invstd, w, b, **kw, **extra)
        _close(gx, rgx, dtype, 10)
        _close(gw, rgw, dtype, 10)
        _close(gb, rgb, dtype, 10)
        if residual:
            _close(gz, rgz, dtype)
        else:
            assert gz is None
    # inference
    yi = bnfast.batch_norm_act_inference(x, rm, rv, w, b, activation=act, negative_slope=0.2,
                                         residual=z, axis=axis)
    v = ref.batch_norm_inference(x, rm, rv, w, b, axis=axis) + (0 if z is None else z.astype(np.float64))
    _close(yi, ref.activation(v, act, 0.2), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("act", ACTS)
def test_against_torch(dtype, axis, act):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    shape = (3, 4, 5, 6)
    x, w, b, z, g = _data(shape, dtype, axis, seed=1)
    tx, tw, tb, tz = (torch.tensor(a, requires_grad=True) for a in (x, w, b, z))
    xc = tx if axis == 1 else tx.movedim(-1, 1)
    u = F.batch_norm(xc, None, None, tw, tb, training=True)
    u = (u if axis == 1 else u.movedim(1, -1)) + tz
    ty = {"identity": lambda v: v, "relu": F.relu, "leaky_relu": lambda v: F.leaky_relu(v, 0.05),
          "elu": F.elu}[act](u)
    ty.backward(torch.tensor(g))
    kw = dict(activation=act, negative_slope=0.05, residual=z, axis=axis)
    y, mean, invstd = bnfast.batch_norm_act_forward(x, w, b, **kw)
    _close(y, ty.detach().numpy(), dtype, 2)
    gx, gw, gb, gz = bnfast.batch_norm_act_backward(
        g, y, mean, invstd, w, b, **kw, **({"x": x} if act == "relu" else {})
    )
    _close(gx, tx.grad.numpy(), dtype, 10)
    _close(gw, tw.grad.numpy(), dtype, 10)
    _close(gb, tb.grad.numpy(), dtype, 10)
    _close(gz, tz.grad.numpy(), dtype, 2)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("axis", [1, -1])
def test_finite_differences(act, axis):
    shape = (3, 2, 4) if axis == 1 else (3, 4, 2)
    x, w, b, z, g = _data(shape, np.float64, axis, seed=2)
    kw = dict(activation=act, negative_slope=0.3, axis=axis)

    def loss(x, w, b, z):
        return float((g * bnfast.batch_norm_act_forward(x, w, b, residual=z, **kw)[0]).sum())

    y, mean, invstd = bnfast.batch_norm_act_forward(x, w, b, residual=z, **kw)
    grads = bnfast.batch_norm_act_backward(g, y, mean, invstd, w, b, residual=z, x=x, **kw)
    args = [x, w, b, z]
    h = 1e-6
    for which, grad in zip((0, 1, 2, 3), (grads[0], grads[1], grads[2], grads[3])):
        a = args[which]
        for idx in list(np.ndindex(a.shape))[:: max(1, a.size // 6)]:
            plus = [p.copy() for p in args]
            minus = [p.copy() for p in args]
            plus[which][idx] += h
            minus[which][idx] -= h
            fd = (loss(*plus) - loss(*minus)) / (2 * h)
            assert abs(fd - grad[idx]) <= 1e-6 * max(1.0, abs(fd)), (which, idx, fd, grad[idx])


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 4), c=st.integers(1, 5), s=st.integers(1, 7), axis=st.sampled_from([1, -1]),
    dtype=st.sampled_from([np.float32, np.float64]), act=st.sampled_from(ACTS),
    residual=st.booleans(), inplace=st.booleans(), seed=st.integers(0, 2**16),
)
def test_hypothesis(n, c, s, axis, dtype, act, residual, inplace, seed):
    shape = (n, c, s) if axis == 1 else (n, s, c)
    x, w, b, z, g = _data(shape, dtype, axis, seed=seed, residual=residual)
    x0 = x.copy()
    kw = dict(activation=act, negative_slope=0.1, residual=z, axis=axis)
    y, mean, invstd = bnfast.batch_norm_act_forward(x, w, b, out=x if inplace else None, **kw)
    assert (y is x) == inplace
    ry = ref.batch_norm_act_forward(x0, w, b, activation_name=act, negative_slope=0.1, residual=z,
                                    axis=axis)[0]
    _close(y, ry, dtype)
    rg = ref.batch_norm_act_backward(g, x0, w, b, activation_name=act, negative_slope=0.1,
                                     residual=z, axis=axis)
    extra = {"x": x0} if act == "relu" else {}
    got = bnfast.batch_norm_act_backward(g, y, mean, invstd, w, b, **kw, **extra)
    # the recovered xhat carries the forward's rounding times |bias + z| / |weight|
    for a, r in zip(got[:3], rg[:3]):
        _close(a, r, dtype, 200)


def test_in_place_matches_out_of_place_bitwise():
    x, w, b, z, g = _data((4, 3, 8, 8), np.float32, 1)
    y, m, v = bnfast.batch_norm_act_forward(x, w, b, activation="leaky_relu", residual=z)
    x2 = x.copy()
    y2, m2, v2 = bnfast.batch_norm_act_forward(x2, w, b, activation="leaky_relu", residual=z, out=x2)
    assert y2 is x2
    np.testing.assert_array_equal(y, y2)
    # out = the residual, element for element
    z2 = z.copy()
    y3, _, _ = bnfast.batch_norm_act_forward(x, w, b, activation="leaky_relu", residual=z2, out=z2)
    assert y3 is z2
    np.testing.assert_array_equal(y, y3)


def test_strided_operands_match_contiguous():
    x, w, b, z, g = _data((4, 6, 10), np.float64, 1)
    xs, zs = x[:, ::2, ::-1], np.asfortranarray(z)[:, ::2, ::-1]
    y, _, _ = bnfast.batch_norm_act_forward(xs, w[:3], b[:3], activation="elu", residual=zs)
    yc, _, _ = bnfast.batch_norm_act_forward(np.ascontiguousarray(xs), w[:3], b[:3], activation="elu",
                                             residual=np.ascontiguousarray(zs))
    np.testing.assert_array_equal(y, yc)


def test_identity_without_residual_is_batch_norm():
    x, w, b, _, g = _data((4, 3, 5, 5), np.float32, 1, residual=False)
    y, m, v = bnfast.batch_norm_act_forward(x, w, b, activation="identity")
    y0, m0, v0 = bnfast.batch_norm_forward(x, w, b)
    np.testing.assert_array_equal(y, y0)


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("act", ACTS)
def test_thread_count_bit_identical(axis, act):
    shape = (8, 16, 24, 24) if axis == 1 else (8, 24, 24, 16)
    x, w, b, z, g = _data(shape, np.float32, axis, seed=3)
    kw = dict(activation=act, residual=z, axis=axis)
    before = bnfast.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            bnfast.set_num_threads(n)
            y, m, v = bnfast.batch_norm_act_forward(x, w, b, **kw)
            yi = bnfast.batch_norm_act_inference(x, m, v * v, w, b, **kw)
            grads = bnfast.batch_norm_act_backward(g, y, m, v, w, b, x=x, **kw)
            results.append((y, m, v, yi) + grads)
    finally:
        bnfast.set_num_threads(before)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            np.testing.assert_array_equal(a, c)


# ------------------------------------------------------------------ bad input
def _state():
    x, w, b, z, g = _data((4, 3, 5), np.float32, 1)
    return x, w, b, z, g, np.zeros(3, np.float32), np.ones(3, np.float32)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(activation="gelu"), ValueError, "unknown activation"),
        (dict(activation="ReLU"), ValueError, "unknown activation"),
        (dict(activation=None), TypeError, "activation must be a string"),
        (dict(negative_slope=float("nan")), ValueError, "negative_slope must be finite"),
        (dict(negative_slope="0.1"), TypeError, "negative_slope must be a real"),
        (dict(residual=np.zeros((4, 3, 4), np.float32)), ValueError, "residual must have the shape"),
        (dict(residual=np.zeros((4, 3, 5), np.float64)), TypeError, "residual must have the dtype"),
        (dict(residual=np.zeros((4, 3, 5), np.int32)), TypeError, "residual must be float32"),
    ],
)
def test_bad_forward_input_leaves_state_untouched(kwargs, error, match):
    x, w, b, z, g, rm, rv = _state()
    out = np.full_like(x, 7.0)
    x0 = x.copy()
    with pytest.raises(error, match=match):
        bnfast.batch_norm_act_forward(x, w, b, rm, rv, out=out, **kwargs)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    np.testing.assert_array_equal(out, 7.0)
    np.testing.assert_array_equal(x, x0)
    with pytest.raises(error, match=match):
        bnfast.batch_norm_act_inference(x, rm, rv, w, b, out=out, **kwargs)
    np.testing.assert_array_equal(out, 7.0)


def test_running_stats_sharing_memory_with_residual():
    x, w, b, z, g, rm, rv = _state()
    with pytest.raises(ValueError, match="running_mean shares memory with residual"):
        bnfast.batch_norm_act_forward(x, w, b, z[0, 0, :3], rv, residual=z)


def test_relu_backward_needs_x():
    x, w, b, z, g, rm, rv = _state()
    y, m, v = bnfast.batch_norm_act_forward(x, w, b, activation="relu")
    with pytest.raises(ValueError, match="relu is not invertible.*pass x="):
        bnfast.batch_norm_act_backward(g, y, m, v, w, b, activation="relu")
    y, m, v = bnfast.batch_norm_act_forward(x, w, b, activation="leaky_relu", negative_slope=0.0)
    with pytest.raises(ValueError, match="negative_slope=0.0 is not invertible"):
        bnfast.batch_norm_act_backward(g, y, m, v, w, b, activation="leaky_relu", negative_slope=0.0)
    y, m, v = bnfast.batch_norm_act_forward(x, w, b, activation="leaky_relu", negative_slope=-0.5)
    with pytest.raises(ValueError, match="not invertible"):
        bnfast.batch_norm_act_backward(g, y, m, v, w, b, activation="leaky_relu", negative_slope=-0.5)


def test_zero_or_tiny_weight_refuses_recovery():
    x, w, b, z, g, rm, rv = _state()
    for bad in (0.0, 1e-7):
        w2 = w.copy()
        w2[1] = bad
        y, m, v = bnfast.batch_norm_act_forward(x, w2, b, activation="leaky_relu", residual=z)
        with pytest.raises(ValueError, match=r"channel\(s\) \[1\]"):
            bnfast.batch_norm_act_backward(g, y, m, v, w2, b, activation="leaky_relu", residual=z)
        # with x it works, and grad_weight is right for the zero-weight channel too
        gx, gw, gb, gz = bnfast.batch_norm_act_backward(g, y, m, v, w2, b, activation="leaky_relu",
                                                        residual=z, x=x)
        rgw = ref.batch_norm_act_backward(g, x, w2, b, activation_name="leaky_relu", residual=z)[1]
        _close(gw, rgw, np.float32, 10)
    # a small weight with no bias or residual is recovered accurately (scale invariance)
    x64, w64, _, _, g64 = _data((4, 3, 5), np.float64, 1, residual=False)
    w64[0] = 1e-12
    y, m, v = bnfast.batch_norm_act_forward(x64, w64, activation="elu")
    got = bnfast.batch_norm_act_backward(g64, y, m, v, w64, activation="elu")
    rgw = ref.batch_norm_act_backward(g64, x64, w64, activation_name="elu")[1]
    _close(got[1], rgw, np.float64, 1e3)


def test_elu_saturation_refuses_recovery():
    x = np.array([[-1e4], [1.0], [2.0], [3.0]], np.float32)  # BN(x) far below 0 for weight 30
    w = np.array([30.0], np.float32)
    y, m, v = bnfast.batch_norm_act_forward(x, w, activation="elu")
    assert y.min() == -1.0
    with pytest.raises(ValueError, match="elu saturated"):
        bnfast.batch_norm_act_backward(np.ones_like(y), y, m, v, w, activation="elu")


def test_bad_backward_input():
    x, w, b, z, g, rm, rv = _state()
    y, m, v = bnfast.batch_norm_act_forward(x, w, b, activation="elu", residual=z)
    with pytest.raises(ValueError, match="grad_out must have the shape of y"):
        bnfast.batch_norm_act_backward(g[:, :, :4], y, m, v, w, b, activation="elu")
    with pytest.raises(TypeError, match="x must have the dtype of y"):
        bnfast.batch_norm_act_backward(g, y, m, v, w, b, activation="elu", x=x.astype(np.float64))
    with pytest.raises(ValueError, match="residual must have the shape of y"):
        bnfast.batch_norm_act_backward(g, y, m, v, w, b, activation="elu", residual=z[:2])
    with pytest.raises(ValueError, match="unknown activation"):
        bnfast.batch_norm_act_backward(g, y, m, v, w, b, activation="swish")
    out = np.full_like(x, 3.0)
    with pytest.raises(ValueError, match="out must have shape"):
        bnfast.batch_norm_act_backward(g, y, m, v, w, b, activation="elu", out=out[:2])


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("act", ["leaky_relu", "elu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_in_kernel_recovery_threads_and_composition(axis, act, dtype):
    """Without a residual the backward kernel recovers xhat from y itself: bit-identical for any
    thread count, and equal within rounding to the composition (a zero residual takes that path)."""
    shape = (8, 16, 24, 24) if axis == 1 else (8, 24, 24, 16)
    x, w, b, _, g = _data(shape, dtype, axis, seed=4, residual=False)
    if act == "elu":  # keep float32's elu away from its saturation at -1 (refused, see above)
        w, b = w * 0.3, b * 0.3
    kw = dict(activation=act, negative_slope=0.1, axis=axis)
    y, m, v = bnfast.batch_norm_act_forward(x, w, b, **kw)
    before = bnfast.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            bnfast.set_num_threads(n)
            results.append(bnfast.batch_norm_act_backward(g, y, m, v, w, b, **kw))
    finally:
        bnfast.set_num_threads(before)
    for other in results[1:]:
        for a, c in zip(results[0][:3], other[:3]):
            np.testing.assert_array_equal(a, c)
    composed = bnfast.batch_norm_act_backward(g, y, m, v, w, b, residual=np.zeros_like(y), **kw)
    reference = ref.batch_norm_act_backward(g, x, w, b, activation_name=act, negative_slope=0.1, axis=axis)
    for got, comp, r in zip(results[0][:3], composed[:3], reference[:3]):
        _close(got, r, dtype, 50)
        _close(got, comp, dtype, 50)


def test_bench_fused_runs(tmp_path, capsys):
    """``python -m bnfast bench --fused`` at a tiny size: the speed rows, the memory rows, JSON written."""
    import json

    from bnfast import _bench

    out = tmp_path / "fused.json"
    assert _bench.main(["--fused", "--shapes", "2x4x8x8", "--threads", "1", "--no-torch", "--quick",
                        "--rounds", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fused forward act(BN(x)+z)" in text and "unfused inference (NumPy ops)" in text
    assert "leaky_unfused -> leaky_inplace" in text
    data = json.loads(out.read_text())
    assert data["speed"][0]["shape"] == [2, 4, 8, 8] and data["speed"][0]["threads"] == 1
    assert all(t > 0 for t in data["speed"][0]["seconds"].values())
    assert {r["kind"] for r in data["memory"]} == {"leaky_unfused", "leaky_inplace", "relu_unfused", "relu_fused"}
