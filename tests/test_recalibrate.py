"""recalibrate: exact pooled statistics of a stream of batches (AdaBN)."""

from __future__ import annotations

import numpy as np
import pytest

import bnfast
from bnfast import BatchNorm, BatchNorm1d, BatchNorm2d, nn, recalibrate


def pooled(xs, axis):
    """float64 mean and unbiased variance of the concatenation (two-pass)."""
    rows = np.concatenate([np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]) for x in xs]).astype(np.float64)
    return rows.mean(axis=0), rows.var(axis=0, ddof=1)


def batches(shape_fn, n, dtype, seed=0, spread=True):
    """Batches of different sizes whose means and spreads differ a lot."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        shape = shape_fn(k)
        loc = (100.0 * k) if spread else 0.0
        out.append((loc + (1 + k) * rng.standard_normal(shape)).astype(dtype))
    return out


def ref_batch_normalize(x, w, b, eps, axis):
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    s = [1] * x.ndim
    s[axis] = x.shape[axis]
    x64 = x.astype(np.float64)
    m, v = x64.mean(axis=axes), x64.var(axis=axes)
    return ((x64 - m.reshape(s)) / np.sqrt(v.reshape(s) + eps) * w.reshape(s) + b.reshape(s)).astype(x.dtype)


RTOL = {np.float32: 1e-6, np.float64: 1e-12}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_single_layer_equals_concatenated_statistics(layout, dtype):
    axis = 1 if layout == "first" else -1
    shape_fn = (lambda k: (2 + k, 3, 4, 5)) if layout == "first" else (lambda k: (2 + k, 4, 5, 3))
    xs = batches(shape_fn, 6, dtype)
    bn = BatchNorm2d(3, axis=axis, dtype=dtype, momentum=0.1)
    bn(xs[0])  # some prior state, to be replaced
    out = recalibrate(bn, iter(xs))  # a one-shot iterator is enough
    assert out is bn
    mean, var = pooled(xs, axis)
    assert bn.running_mean.dtype == dtype and bn.running_var.dtype == dtype
    np.testing.assert_allclose(bn.running_mean, mean, rtol=RTOL[dtype])
    np.testing.assert_allclose(bn.running_var, var, rtol=RTOL[dtype])
    assert int(bn.num_batches_tracked) == 6 and bn.num_batches_tracked.dtype == np.int64
    assert bn.training  # mode untouched


def test_not_an_average_of_batch_variances():
    """momentum=None averages per-batch variances; recalibrate pools the whole stream."""
    xs = batches(lambda k: (10, 2), 4, np.float64)
    exact = BatchNorm1d(2, dtype=np.float64)
    recalibrate(exact, xs)
    cma = BatchNorm1d(2, momentum=None, dtype=np.float64)
    for x in xs:
        cma(x)
    mean, var = pooled(xs, 1)
    np.testing.assert_allclose(exact.running_var, var, rtol=1e-12)
    assert np.all(np.abs(cma.running_var - var) > 0.5 * var)  # means differ by 100s: huge gap
    np.testing.assert_allclose(cma.running_mean, mean, rtol=1e-12)  # equal sizes: means agree


def test_large_offset_float32_is_accurate():
    rng = np.random.default_rng(3)
    xs = [(1e5 + rng.standard_normal((64, 4, 8))).astype(np.float32) for _ in range(5)]
    bn = BatchNorm1d(4)
    recalibrate(bn, xs)
    mean, var = pooled(xs, 1)
    np.testing.assert_allclose(bn.running_var, var, rtol=1e-5)
    np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-7)


def test_any_rank_axis():
    xs = batches(lambda k: (2, 3 + k, 5, 2, 3), 4, np.float64)
    bn = BatchNorm(2, axis=3, dtype=np.float64)
    recalibrate(bn, xs)
    mean, var = pooled(xs, 3)
    np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, var, rtol=1e-12)


# ----------------------------------------------------------------- models
class Scale:
    """A minimal non-BN layer: y = a * x + c."""

    def __init__(self, a, c):
        self.a, self.c = a, c
        self.training = True

    def __call__(self, x):
        return (self.a * x + self.c).astype(x.dtype)


def relu(x):
    return np.maximum(x, 0)


def _expected_chain(xs, bn1, bn2, scale, eps=1e-5):
    """Inputs each BN sees when every BN normalizes with its batch statistics."""
    in1, in2 = [], []
    for x in xs:
        in1.append(x)
        y = ref_batch_normalize(x, bn1.weight, bn1.bias, eps, bn1.axis)
        z = scale(relu(y))
        in2.append(z)
    return in1, in2


def _two_bn_model(dtype=np.float64, axis=1):
    bn1 = BatchNorm1d(3, dtype=dtype, axis=axis)
    bn2 = BatchNorm1d(3, dtype=dtype, axis=axis, momentum=None)
    bn1.weight = [1.0, 2.0, 0.5]
    bn1.bias = [0.1, -0.3, 1.0]
    bn2.weight = [0.7, 1.1, 1.3]
    return bn1, bn2, Scale(3.0, 2.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
def test_list_of_callables(dtype, axis):
    bn1, bn2, scale = _two_bn_model(dtype, axis)
    bn1.eval()  # modes are restored afterwards
    chain = [bn1, relu, scale, bn2]
    xs = batches(lambda k: (5 + k, 3, 4) if axis == 1 else (5 + k, 4, 3), 5, dtype, spread=False)
    # make bn1's batch statistics vary a lot between batches
    xs = [x + np.asarray(10.0 * k, dtype) for k, x in enumerate(xs)]
    assert recalibrate(chain, xs) is chain
    in1, in2 = _expected_chain(xs, bn1, bn2, scale)
    for bn, ins in [(bn1, in1), (bn2, in2)]:
        mean, var = pooled(ins, bn.axis)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10)
        np.testing.assert_allclose(bn.running_mean, mean, **tol)
        np.testing.assert_allclose(bn.running_var, var, **tol)
        assert int(bn.num_batches_tracked) == 5
    assert bn1.training is False and bn2.training is True
    assert "forward" not in vars(bn1) and "forward" not in vars(bn2)
    # after recalibration, the eval-mode model normalizes bn1's stream with its pooled stats
    bn1.eval()
    mean, var = pooled(in1, bn1.axis)
    y = bn1(xs[2])
    s = [1] * xs[2].ndim
    s[axis] = 3
    expected = (xs[2] - mean.reshape(s)) / np.sqrt(var.reshape(s) + 1e-5) * bn1.weight.reshape(s) + bn1.bias.reshape(s)
    np.testing.assert_allclose(y, expected, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-4)


def test_module_model_found_through_modules():
    bn1, bn2, scale = _two_bn_model()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = bn1  # registered children
            self.scale = scale  # a plain callable: an ordinary attribute
            self.head = nn.Sequential(bn2)  # nested

        def forward(self, x):
            return self.head(self.scale(relu(self.stem(x))))

    xs = batches(lambda k: (4 + k, 3), 4, np.float64)
    model = Model()
    assert recalibrate(model, xs) is model
    in1, in2 = _expected_chain(xs, bn1, bn2, scale)
    np.testing.assert_allclose(bn1.running_var, pooled(in1, 1)[1], rtol=1e-10)
    np.testing.assert_allclose(bn2.running_var, pooled(in2, 1)[1], rtol=1e-10)
    assert "forward" not in vars(bn1) and "forward" not in vars(bn2)

    # a plain function is not searched (no object-graph walking): TypeError pointing to Module
    bn1b, bn2b, scaleb = _two_bn_model()
    snaps = _snapshot(bn1b, bn2b)
    with pytest.raises(TypeError, match="Module"):
        recalibrate(lambda x: bn2b(scaleb(relu(bn1b(x)))), xs)
    _assert_same([bn1b, bn2b], snaps)
    recalibrate([bn1b, relu, scaleb, bn2b], xs)  # the same network as a chain
    np.testing.assert_allclose(bn1b.running_mean, bn1.running_mean, rtol=1e-12)
    np.testing.assert_allclose(bn2b.running_var, bn2.running_var, rtol=1e-12)


def test_bnfast_nn_sequential():
    nn = pytest.importorskip("bnfast.nn")
    if not hasattr(nn, "Sequential"):
        pytest.skip("bnfast.nn.Sequential not available")
    bn1, bn2, scale = _two_bn_model()
    model = nn.Sequential(bn1, nn.ReLU(), bn2)
    model.eval()
    xs = batches(lambda k: (4 + k, 3), 4, np.float64)
    recalibrate(model, xs)
    in2 = [relu(ref_batch_normalize(x, bn1.weight, bn1.bias, 1e-5, 1)) for x in xs]
    np.testing.assert_allclose(bn1.running_var, pooled(xs, 1)[1], rtol=1e-10)
    np.testing.assert_allclose(bn2.running_var, pooled(in2, 1)[1], rtol=1e-10)
    np.testing.assert_allclose(bn2.running_mean, pooled(in2, 1)[0], rtol=1e-10)
    assert not model.training and not bn1.training and not bn2.training


def test_shared_layer_pools_all_its_inputs():
    bn = BatchNorm1d(2, dtype=np.float64)
    xs = batches(lambda k: (3 + k, 2), 3, np.float64)
    recalibrate([bn, lambda y: y * 2 + 7, bn], xs)
    ins = []
    for x in xs:
        ins.append(x)
        ins.append(ref_batch_normalize(x, bn.weight, bn.bias, 1e-5, 1) * 2 + 7)
    np.testing.assert_allclose(bn.running_var, pooled(ins, 1)[1], rtol=1e-10)
    assert int(bn.num_batches_tracked) == 6  # forward calls


def test_layers_without_tracking_are_left_alone():
    free = BatchNorm1d(3, track_running_stats=False, dtype=np.float64)
    bn = BatchNorm1d(3, dtype=np.float64)
    xs = batches(lambda k: (4, 3), 3, np.float64)
    recalibrate([free, bn], xs)
    assert free.running_mean is None
    in2 = [ref_batch_normalize(x, free.weight, free.bias, 1e-5, 1) for x in xs]
    np.testing.assert_allclose(bn.running_var, pooled(in2, 1)[1], rtol=1e-9)


# ----------------------------------------------------------------- errors leave everything unchanged
def _snapshot(*bns):
    return [bn.state_dict() for bn in bns]


def _assert_same(bns, snaps):
    for bn, snap in zip(bns, snaps):
        for k, v in bn.state_dict().items():
            np.testing.assert_array_equal(v, snap[k])


def test_empty_stream_raises():
    bn = BatchNorm1d(2)
    snap = _snapshot(bn)
    with pytest.raises(ValueError, match="no batch"):
        recalibrate(bn, [])
    _assert_same([bn], snap)
    with pytest.raises(ValueError, match="no batch"):
        recalibrate([bn], [])


def test_one_value_per_channel_raises():
    bn = BatchNorm1d(2)
    with pytest.raises(ValueError, match="1 value per channel"):
        recalibrate(bn, [np.ones((1, 2), np.float32)])
    assert int(bn.num_batches_tracked) == 0


def test_single_layer_without_running_stats_raises():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        recalibrate(BatchNorm1d(2, track_running_stats=False), [np.ones((3, 2), np.float32)])


def test_model_without_batchnorm_raises():
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate([relu], [np.ones((3, 2))])
    with pytest.raises(TypeError):
        recalibrate(42, [np.ones((3, 2))])


def test_layer_never_called_raises_and_nothing_changes():
    bn1, bn2, _ = _two_bn_model()
    snaps = _snapshot(bn1, bn2)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = bn1, bn2

        def forward(self, x):
            return self.a(x)  # bn2 unused

    with pytest.raises(ValueError, match="received no batch"):
        recalibrate(Model(), batches(lambda k: (4, 3), 2, np.float64))
    _assert_same([bn1, bn2], snaps)
    assert "forward" not in vars(bn1)


def test_error_mid_stream_restores_layers():
    bn1, bn2, _ = _two_bn_model()
    bn2.eval()
    snaps = _snapshot(bn1, bn2)

    def gen():
        yield np.ones((4, 3)) + np.arange(4)[:, None]
        yield np.ones((4, 3), np.float32)  # wrong dtype: TypeError inside bn1

    with pytest.raises(TypeError):
        recalibrate([bn1, bn2], gen())
    _assert_same([bn1, bn2], snaps)
    assert "forward" not in vars(bn1) and "forward" not in vars(bn2)
    assert bn1.training and not bn2.training
    bn1(np.ones((4, 3)) + np.arange(4)[:, None])  # normal forward works again
    assert int(bn1.num_batches_tracked) == 1


def test_single_layer_wrong_input_raises_unchanged():
    bn = BatchNorm2d(3)
    snap = _snapshot(bn)
    with pytest.raises(ValueError, match="expected 4D input"):
        recalibrate(bn, [np.ones((2, 3, 4, 4), np.float32), np.ones((2, 3, 4), np.float32)])
    _assert_same([bn], snap)


def test_uses_public_moments_merge_consistently():
    """Cross-check: the layer's statistics equal bnfast.moments merged by hand."""
    xs = batches(lambda k: (3 + k, 4, 6), 4, np.float32)
    acc = bnfast.Moments.zeros(4)
    for x in xs:
        acc = acc.merge(bnfast.moments(x, axis=1))
    bn = BatchNorm1d(4)
    recalibrate(bn, xs)
    np.testing.assert_array_equal(bn.running_mean, acc.mean.astype(np.float32))
    np.testing.assert_array_equal(bn.running_var, acc.var(ddof=1).astype(np.float32))
