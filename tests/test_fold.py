"""fold_batch_norm: the folded Linear/Conv alone equals layer-then-BN (eval)."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import bnfast
from bnfast import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, fold_batch_norm

LETTERS = "klmn"


def conv_first(x, w, b=None, groups=1):
    """Valid, stride-1 N-d convolution (cross-correlation, like torch): x (N, Cin, *S), w (O, Cin/g, *K)."""
    d = x.ndim - 2
    k = w.shape[2:]
    win = sliding_window_view(x, k, axis=tuple(range(2, 2 + d)))  # N, Cin, *S', *K
    cin_g, o_g = x.shape[1] // groups, w.shape[0] // groups
    sp = "pqr"[:d]
    kk = LETTERS[:d]
    spec = f"ni{sp}{kk},oi{kk}->no{sp}"
    y = np.concatenate(
        [np.einsum(spec, win[:, g * cin_g:(g + 1) * cin_g], w[g * o_g:(g + 1) * o_g]) for g in range(groups)],
        axis=1,
    )
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * d)
    return y.astype(x.dtype)


def conv_last(x, w_last, b=None, groups=1):
    """Channels-last activations (N, *S, Cin) with a (*K, Cin/g, O) weight (TF's HWIO for 2-D)."""
    w_first = np.moveaxis(np.moveaxis(w_last, -1, 0), -1, 1)  # (O, Cin/g, *K)
    return np.moveaxis(conv_first(np.moveaxis(x, -1, 1), w_first, b, groups), 1, -1)


def trained_bn(cls, C, dtype, shape, axis=1, affine=True, seed=0, **kw):
    rng = np.random.default_rng(seed)
    bn = cls(C, dtype=dtype, axis=axis, affine=affine, **kw)
    if affine:
        bn.weight = 1 + 0.5 * rng.standard_normal(C)
        if bn.bias is not None:
            bn.bias = rng.standard_normal(C)
    for k in range(3):
        loc = rng.standard_normal(C) * 3
        s = [1] * len(shape)
        s[axis] = C
        bn((loc.reshape(s) + (1 + k) * rng.standard_normal(shape)).astype(dtype))
    return bn


TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


def check(folded, unfolded, dtype):
    assert folded.dtype == dtype and folded.shape == unfolded.shape
    scale = max(1.0, float(np.abs(unfolded).max()))
    np.testing.assert_allclose(folded, unfolded, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_linear(dtype, has_bias, affine):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((6, 5)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype) if has_bias else None
    bn = trained_bn(BatchNorm1d, 6, dtype, (16, 6), affine=affine)
    W_before, b_before = W.copy(), None if b is None else b.copy()
    state = bn.state_dict()
    bn.eval()
    W2, b2 = fold_batch_norm(W, b, bn)
    assert not bn.training  # fold does not change the mode...
    np.testing.assert_array_equal(W, W_before)  # ... nor its inputs
    if b is not None:
        np.testing.assert_array_equal(b, b_before)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    assert W2.shape == W.shape and b2.shape == (6,) and b2.dtype == dtype
    x = rng.standard_normal((7, 5)).astype(dtype)
    z = x @ W.T + (0 if b is None else b)
    check(x @ W2.T + b2, bn.eval()(z.astype(dtype)), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_channels_last_weight(dtype):
    """A Linear stored (in, out) for y = x @ W: output channels on the last axis."""
    rng = np.random.default_rng(2)
    W = rng.standard_normal((5, 6)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    bn = trained_bn(BatchNorm1d, 6, dtype, (16, 6)).eval()
    W2, b2 = fold_batch_norm(W, b, bn, axis=-1)
    x = rng.standard_normal((7, 5)).astype(dtype)
    check(x @ W2 + b2, bn((x @ W + b).astype(dtype)), dtype)


CONVS = [
    # (BN class, spatial input shape, kernel, Cin, Cout, groups)
    (BatchNorm1d, (9,), (3,), 4, 6, 1),
    (BatchNorm2d, (7, 6), (3, 2), 4, 6, 1),
    (BatchNorm2d, (7, 6), (3, 3), 4, 6, 2),
    (BatchNorm2d, (6, 6), (3, 3), 4, 8, 4),  # depthwise, channel multiplier 2
    (BatchNorm3d, (4, 5, 4), (2, 3, 2), 3, 5, 1),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("cls,spatial,kernel,cin,cout,groups", CONVS)
def test_conv_channels_first(cls, spatial, kernel, cin, cout, groups, has_bias, dtype):
    rng = np.random.default_rng(3)
    W = rng.standard_normal((cout, cin // groups) + kernel).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype) if has_bias else None
    x = rng.standard_normal((3, cin) + spatial).astype(dtype)
    z = conv_first(x, W, b, groups)
    bn = trained_bn(cls, cout, dtype, z.shape).eval()
    W2, b2 = fold_batch_norm(W, b, bn)
    check(conv_first(x, W2, b2, groups), bn(z), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,spatial,kernel,cin,cout,groups", CONVS)
def test_conv_channels_last(cls, spatial, kernel, cin, cout, groups, dtype):
    """NHWC activations, HWIO-style weights (*kernel, in/groups, out), BN with axis=-1."""
    rng = np.random.default_rng(4)
    W = rng.standard_normal(kernel + (cin // groups, cout)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    x = rng.standard_normal((3,) + spatial + (cin,)).astype(dtype)
    z = conv_last(x, W, b, groups)
    bn = trained_bn(cls, cout, dtype, z.shape, axis=-1).eval()
    W2, b2 = fold_batch_norm(W, b, bn, axis=-1)
    check(conv_last(x, W2, b2, groups), bn(z), dtype)


def test_channels_first_weight_with_channels_last_activations():
    """The BN's activation layout is irrelevant: an OIHW weight used on NHWC data folds with axis=0."""
    rng = np.random.default_rng(5)
    W = rng.standard_normal((6, 4, 3, 3))
    x = rng.standard_normal((2, 4, 7, 7))
    z_last = np.moveaxis(conv_first(x, W), 1, -1)
    bn = trained_bn(BatchNorm2d, 6, np.float64, z_last.shape, axis=-1).eval()
    W2, b2 = fold_batch_norm(W, None, bn, axis=0)
    check(np.moveaxis(conv_first(x, W2, b2), 1, -1), bn(z_last), np.float64)


def test_other_axis_matches_moved_weight():
    rng = np.random.default_rng(6)
    W = rng.standard_normal((4, 6, 3, 3)).astype(np.float32)  # e.g. ConvTranspose (in, out, kh, kw)
    bn = trained_bn(BatchNorm2d, 6, np.float32, (4, 6, 3, 3)).eval()
    W2, b2 = fold_batch_norm(W, None, bn, axis=1)
    W3, b3 = fold_batch_norm(np.moveaxis(W, 1, 0), None, bn, axis=0)
    np.testing.assert_array_equal(W2, np.moveaxis(W3, 0, 1))
    np.testing.assert_array_equal(b2, b3)


def test_identity_bn_is_a_no_op_and_bias_false_layer():
    W = np.arange(12.0).reshape(3, 4)
    bn = BatchNorm1d(3, eps=0.0, dtype=np.float64).eval()
    W2, b2 = fold_batch_norm(W, None, bn)
    np.testing.assert_array_equal(W2, W)
    np.testing.assert_array_equal(b2, 0)
    bn = BatchNorm1d(3, eps=0.0, bias=False, dtype=np.float64).eval()
    bn.weight = [1.0, 2.0, 3.0]
    bn.running_mean = [1.0, 1.0, 1.0]
    W2, b2 = fold_batch_norm(W, np.ones(3), bn)
    np.testing.assert_array_equal(W2, W * np.array([[1.0], [2.0], [3.0]]))
    np.testing.assert_array_equal(b2, 0)


def test_result_dtype_follows_weight():
    bn = trained_bn(BatchNorm1d, 3, np.float64, (8, 3)).eval()
    W2, b2 = fold_batch_norm(np.ones((3, 2), np.float32), np.ones(3, np.float64), bn)
    assert W2.dtype == np.float32 and b2.dtype == np.float32


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((np.ones((3, 2)), None, BatchNorm1d(3, track_running_stats=False)), {}, ValueError, "track_running_stats"),
        ((np.ones((4, 2)), None, BatchNorm1d(3).eval()), {}, ValueError, "num_features=3"),
        ((np.ones((3, 2)), np.ones(4), BatchNorm1d(3).eval()), {}, ValueError, r"bias must have shape \(3,\)"),
        ((np.ones((3, 2), int), None, BatchNorm1d(3).eval()), {}, TypeError, "floating"),
        ((np.ones((3, 2)), None, object()), {}, TypeError, "BatchNorm"),
        ((np.ones((3, 2)), None, BatchNorm1d(3).eval()), {"axis": 2}, ValueError, "out of range"),
        ((np.ones((2, 3)), None, BatchNorm1d(3).eval()), {"axis": 1.0}, TypeError, "axis"),
        ((np.ones((3, 2)), None, BatchNorm1d(3)), {}, ValueError, "training mode"),
    ],
)
def test_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fold_batch_norm(*args, **kwargs)


def test_exported():
    assert bnfast.fold_batch_norm is fold_batch_norm
    assert issubclass(BatchNorm3d, BatchNorm)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_reference_matches_torch(groups):
    """The NumPy conv used above is torch's conv (when torch is importable)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4, 6, 5))
    W = rng.standard_normal((6, 4 // groups, 3, 2))
    b = rng.standard_normal(6)
    expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(W), torch.from_numpy(b), groups=groups)
    np.testing.assert_allclose(conv_first(x, W, b, groups), expected.numpy(), rtol=1e-12, atol=1e-12)
