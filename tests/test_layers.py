"""BatchNorm layers without torch: semantics, state, errors, against a float64 NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnfast
from bnfast import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, Parameter
from bnfast.nn import StateDictError


# ----------------------------------------------------------------- reference (float64)
def ref_stats(x, axis):
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    x64 = x.astype(np.float64)
    return x64.mean(axis=axes), x64.var(axis=axes), x64.size // x.shape[axis]


def bshape(x, axis):
    s = [1] * x.ndim
    s[axis] = x.shape[axis]
    return s


def ref_normalize(x, mean, var, w, b, eps, axis):
    C = x.shape[axis]
    w = np.ones(C) if w is None else w.astype(np.float64)
    b = np.zeros(C) if b is None else b.astype(np.float64)
    s = bshape(x, axis)
    return (x.astype(np.float64) - mean.reshape(s)) / np.sqrt(var.reshape(s) + eps) * w.reshape(s) + b.reshape(s)


def ref_backward(g, x, mean, var, w, eps, axis, training):
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    C = x.shape[axis]
    s = bshape(x, axis)
    w = np.ones(C) if w is None else w.astype(np.float64)
    g = g.astype(np.float64)
    invstd = 1 / np.sqrt(var + eps)
    xhat = (x.astype(np.float64) - mean.reshape(s)) * invstd.reshape(s)
    gb = g.sum(axis=axes)
    gw = (g * xhat).sum(axis=axes)
    if training:
        n = x.size // C
        gx = (w * invstd).reshape(s) * (g - gb.reshape(s) / n - xhat * gw.reshape(s) / n)
    else:
        gx = g * (w * invstd).reshape(s)
    return gx, gw, gb


TOL = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-11)}


def rand(shape, dtype=np.float32, seed=0, loc=2.0):
    return (loc + np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


# ----------------------------------------------------------------- construction & attributes
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_defaults(dtype):
    bn = BatchNorm2d(4, dtype=dtype)
    assert bn.training and bn.num_features == 4 and bn.eps == 1e-5 and bn.momentum == 0.1
    assert bn.affine and bn.track_running_stats and bn.axis == 1 and bn.dtype == np.dtype(dtype)
    for arr, val in [(bn.weight, 1), (bn.bias, 0), (bn.running_mean, 0), (bn.running_var, 1)]:
        assert arr.shape == (4,) and arr.dtype == dtype
        np.testing.assert_array_equal(arr, val)
    assert bn.num_batches_tracked.shape == () and bn.num_batches_tracked.dtype == np.int64
    assert int(bn.num_batches_tracked) == 0
    assert bn.grad_weight is None and bn.grad_bias is None
    ps = bn.parameters()
    assert [type(p) for p in ps] == [Parameter, Parameter]
    assert [p.name for p in ps] == ["weight", "bias"]
    assert ps[0] is bn.weight and ps[1] is bn.bias  # the attributes are the Parameters themselves
    assert np.shares_memory(ps[0].data, bn.weight) and type(ps[0].data) is np.ndarray


def test_affine_false_and_no_tracking():
    bn = BatchNorm1d(3, affine=False, track_running_stats=False)
    assert bn.weight is None and bn.bias is None and bn.parameters() == []
    assert bn.grad_weight is None and bn.grad_bias is None
    assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
    assert bn.state_dict() == {}
    with pytest.raises(AttributeError, match="affine=False"):
        bn.weight = np.ones(3)
    with pytest.raises(AttributeError, match="track_running_stats=False"):
        bn.running_mean = np.ones(3)


@pytest.mark.parametrize(
    "kwargs,exc",
    [
        (dict(num_features=0), ValueError),
        (dict(num_features=-2), ValueError),
        (dict(num_features=2.0), ValueError),
        (dict(num_features=True), ValueError),
        (dict(num_features=3, dtype=np.int32), TypeError),
        (dict(num_features=3, dtype=np.float16), TypeError),
        (dict(num_features=3, dtype="nonsense"), TypeError),
        (dict(num_features=3, dtype=None), TypeError),
        (dict(num_features=3, axis=1.0), TypeError),
    ],
)
def test_constructor_errors(kwargs, exc):
    with pytest.raises(exc):
        BatchNorm2d(**kwargs)


def test_repr():
    assert repr(BatchNorm2d(3)) == (
        "BatchNorm2d(3, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)"
    )
    assert repr(BatchNorm1d(8, eps=1e-3, momentum=None, affine=False, track_running_stats=False)) == (
        "BatchNorm1d(8, eps=0.001, momentum=None, affine=False, bias=False, track_running_stats=False)"
    )
    assert repr(BatchNorm(5, axis=-1, dtype=np.float64)) == (
        "BatchNorm(5, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True, "
        "axis=-1, dtype=float64)"
    )


def test_train_eval_return_self():
    bn = BatchNorm3d(2)
    assert bn.eval() is bn and bn.training is False
    assert bn.train() is bn and bn.training is True
    assert bn.train(False) is bn and bn.training is False
    with pytest.raises(ValueError, match="boolean"):
        bn.train("yes")


def test_setters_copy_in_place():
    bn = BatchNorm1d(3)
    w = bn.weight
    bn.weight = [1.0, 2.0, 3.0]
    assert bn.weight is w
    np.testing.assert_array_equal(w, [1, 2, 3])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        bn.bias = np.zeros(4)
    rv = bn.running_var
    bn.running_var = np.full(3, 2.0)
    assert bn.running_var is rv and rv.dtype == np.float32
    bn.num_batches_tracked = 7
    assert int(bn.num_batches_tracked) == 7 and bn.num_batches_tracked.dtype == np.int64


# ----------------------------------------------------------------- forward / backward semantics
LAYER_SHAPES = [
    (BatchNorm1d, (9, 4), 1),
    (BatchNorm1d, (5, 4, 6), 1),
    (BatchNorm1d, (5, 6, 4), -1),
    (BatchNorm2d, (3, 4, 5, 6), 1),
    (BatchNorm2d, (3, 5, 6, 4), -1),
    (BatchNorm3d, (2, 4, 3, 2, 5), 1),
    (BatchNorm3d, (2, 3, 2, 5, 4), -1),
    (BatchNorm, (3, 5, 4, 6), 2),
    (BatchNorm, (4, 3, 5, 2, 3, 4), -1),
    (BatchNorm, (7, 4), 0),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,shape,axis", LAYER_SHAPES)
def test_training_step_against_reference(cls, shape, axis, dtype):
    C = shape[axis]
    bn = cls(C, axis=axis, dtype=dtype, momentum=0.3)
    rng = np.random.default_rng(1)
    bn.weight[...] = rng.standard_normal(C)
    bn.bias[...] = rng.standard_normal(C)
    x = rand(shape, dtype, seed=2, loc=5.0)
    g = rand(shape, dtype, seed=3, loc=0.0)
    y = bn(x)
    mean, var, n = ref_stats(x, axis)
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_allclose(y, ref_normalize(x, mean, var, bn.weight, bn.bias, 1e-5, axis), **TOL[dtype])
    np.testing.assert_allclose(bn.running_mean, 0.3 * mean, **TOL[dtype])
    np.testing.assert_allclose(bn.running_var, 0.7 + 0.3 * var * n / (n - 1), **TOL[dtype])
    assert int(bn.num_batches_tracked) == 1
    gx = bn.backward(g)
    rgx, rgw, rgb = ref_backward(g, x, mean, var, bn.weight, 1e-5, axis, training=True)
    assert gx.dtype == dtype and gx.shape == shape
    np.testing.assert_allclose(gx, rgx, **TOL[dtype])
    np.testing.assert_allclose(bn.grad_weight, rgw, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-4)
    np.testing.assert_allclose(bn.grad_bias, rgb, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-4)
    assert bn.parameters()[0].grad is bn.grad_weight


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,shape,axis", LAYER_SHAPES[::3])
def test_eval_step_uses_running_stats_and_constant_stat_gradient(cls, shape, axis, dtype):
    C = shape[axis]
    bn = cls(C, axis=axis, dtype=dtype)
    bn.running_mean = np.linspace(-1, 1, C)
    bn.running_var = np.linspace(0.5, 2, C)
    bn.weight = np.linspace(0.5, 1.5, C)
    bn.bias = np.linspace(-0.2, 0.2, C)
    bn.eval()
    x = rand(shape, dtype, seed=4)
    g = rand(shape, dtype, seed=5, loc=0.0)
    before = bn.state_dict()
    y = bn(x)
    rm, rv = bn.running_mean.astype(np.float64), bn.running_var.astype(np.float64)
    np.testing.assert_allclose(y, ref_normalize(x, rm, rv, bn.weight, bn.bias, 1e-5, axis), **TOL[dtype])
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])  # eval changes nothing, nbt included
    gx = bn.backward(g)
    rgx, rgw, rgb = ref_backward(g, x, rm, rv, bn.weight, 1e-5, axis, training=False)
    np.testing.assert_allclose(gx, rgx, **TOL[dtype])
    # frozen-BN fine-tuning: gamma and beta still receive gradients
    np.testing.assert_allclose(bn.grad_weight, rgw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.grad_bias, rgb, rtol=1e-4, atol=1e-4)


def test_eval_backward_uses_statistics_of_the_forward():
    """Changing running stats between forward and backward does not change the gradient."""
    bn = BatchNorm2d(3).eval()
    x = rand((2, 3, 4, 4))
    g = rand((2, 3, 4, 4), seed=9, loc=0)
    bn(x)
    gx1 = bn.backward(g)
    bn.running_var = np.full(3, 100.0)
    gx2 = bn.backward(g)
    np.testing.assert_array_equal(gx1, gx2)


def test_forward_keeps_reference_not_copy():
    bn = BatchNorm2d(3)
    x = rand((2, 3, 4, 4))
    bn(x)
    assert bn._saved[0] is x
    bn.eval()(x)
    assert bn._saved[0] is x


def test_no_tracking_uses_batch_stats_in_eval_with_full_gradient():
    x = rand((6, 3, 5), np.float64, seed=6, loc=3.0)
    g = rand((6, 3, 5), np.float64, seed=7, loc=0)
    bn = BatchNorm1d(3, track_running_stats=False, dtype=np.float64).eval()
    y = bn(x)
    mean, var, _ = ref_stats(x, 1)
    np.testing.assert_allclose(y, ref_normalize(x, mean, var, None, None, 1e-5, 1), rtol=1e-10, atol=1e-12)
    gx = bn.backward(g)
    np.testing.assert_allclose(gx, ref_backward(g, x, mean, var, None, 1e-5, 1, True)[0], rtol=1e-9, atol=1e-12)
    assert bn.num_batches_tracked is None


def test_momentum_none_is_cumulative_average():
    rng = np.random.default_rng(8)
    bn = BatchNorm1d(3, momentum=None, dtype=np.float64)
    means, uvars = [], []
    for k in range(7):
        x = rng.normal(loc=k, scale=1 + k, size=(5 + k, 3))
        bn(x)
        m, v, n = ref_stats(x, 1)
        means.append(m)
        uvars.append(v * n / (n - 1))
        assert int(bn.num_batches_tracked) == k + 1
    np.testing.assert_allclose(bn.running_mean, np.mean(means, axis=0), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, np.mean(uvars, axis=0), rtol=1e-12)


def test_momentum_can_change_between_calls():
    bn = BatchNorm1d(2, momentum=1.0, dtype=np.float64)
    x = np.array([[1.0, 2.0], [3.0, 6.0]])
    bn(x)
    np.testing.assert_allclose(bn.running_mean, [2, 4])
    bn.momentum = 0.0
    bn(x + 10)
    np.testing.assert_allclose(bn.running_mean, [2, 4])
    assert int(bn.num_batches_tracked) == 2


def test_failed_training_forward_leaves_state_untouched():
    bn = BatchNorm1d(3)
    bn(rand((4, 3)))
    before = bn.state_dict()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(rand((1, 3)))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    # the layer still works, and backward refers to the last successful forward
    bn.backward(np.ones((4, 3), np.float32))


def test_bad_momentum_reported_by_functional_layer_untouched():
    bn = BatchNorm1d(3, momentum=1.5)
    with pytest.raises(ValueError, match="momentum"):
        bn(rand((4, 3)))
    assert int(bn.num_batches_tracked) == 0
    np.testing.assert_array_equal(bn.running_mean, 0)


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "cls,shape,msg",
    [
        (BatchNorm1d, (2, 3, 4, 5), "expected 2D or 3D input (got 4D input)"),
        (BatchNorm1d, (3,), "expected 2D or 3D input (got 1D input)"),
        (BatchNorm2d, (2, 3, 4), "expected 4D input (got 3D input)"),
        (BatchNorm2d, (2, 3, 4, 5, 6), "expected 4D input (got 5D input)"),
        (BatchNorm3d, (2, 3, 4, 5), "expected 5D input (got 4D input)"),
    ],
)
def test_rank_errors(cls, shape, msg):
    with pytest.raises(ValueError) as e:
        cls(3)(np.zeros(shape, np.float32))
    assert str(e.value) == msg


def test_any_rank_layer_rejects_1d_via_functional():
    with pytest.raises(ValueError):
        BatchNorm(3)(np.zeros(3, np.float32))


def test_dtype_mismatch_is_typeerror():
    with pytest.raises(TypeError, match="float32 parameters but the input is float64"):
        BatchNorm2d(3)(np.zeros((2, 3, 2, 2)))
    with pytest.raises(TypeError, match="float64 parameters but the input is float32"):
        BatchNorm2d(3, dtype=np.float64)(np.zeros((2, 3, 2, 2), np.float32))
    with pytest.raises(TypeError):
        BatchNorm2d(3)(np.zeros((2, 3, 2, 2), np.int32))


@pytest.mark.parametrize("affine,track", [(True, True), (False, False)])
def test_channel_count_mismatch(affine, track):
    bn = BatchNorm2d(3, affine=affine, track_running_stats=track)
    with pytest.raises(ValueError, match="expected 3 channels on axis 1"):
        bn(np.zeros((2, 4, 2, 2), np.float32))
    bn = BatchNorm2d(3, affine=affine, track_running_stats=track, axis=-1)
    with pytest.raises(ValueError, match="expected 3 channels on axis -1"):
        bn(np.zeros((2, 3, 2, 2), np.float32))


def test_backward_errors():
    bn = BatchNorm2d(3)
    with pytest.raises(RuntimeError, match="before forward"):
        bn.backward(np.zeros((2, 3, 2, 2), np.float32))
    bn(rand((2, 3, 2, 2)))
    with pytest.raises(ValueError, match=r"grad_out has shape \(2, 3, 2, 3\).*\(2, 3, 2, 2\)"):
        bn.backward(np.zeros((2, 3, 2, 3), np.float32))
    with pytest.raises(TypeError):
        bn.backward(np.zeros((2, 3, 2, 2), np.float64))


def test_bad_axis_reported():
    with pytest.raises(ValueError, match="axis"):
        BatchNorm(3, axis=4)(np.zeros((2, 3, 2, 2), np.float32))


# ----------------------------------------------------------------- parameters & optimizer use
def test_parameter_updates_in_place_affect_layer():
    bn = BatchNorm1d(2, dtype=np.float64)
    x = np.array([[0.0, 1.0], [2.0, 5.0]])
    bn(x)
    bn.backward(np.ones_like(x))
    for p in bn.parameters():
        p.data -= 0.5 * p.grad
    np.testing.assert_allclose(bn.bias, [-1.0, -1.0])
    y = bn(x)
    np.testing.assert_allclose(y.sum(axis=0), [-2.0, -2.0], atol=1e-12)
    bn.zero_grad()
    assert bn.grad_weight is None and bn.grad_bias is None


def test_bias_false():
    bn = BatchNorm2d(3, bias=False)
    assert bn.bias is None and [p.name for p in bn.parameters()] == ["weight"]
    assert list(bn.state_dict()) == ["weight", "running_mean", "running_var", "num_batches_tracked"]
    x = rand((2, 3, 4, 4))
    bn(x)
    bn.backward(np.ones_like(x))
    assert bn.grad_weight is not None and bn.grad_bias is None


# ----------------------------------------------------------------- state
def _trained(cls=BatchNorm2d, shape=(4, 3, 5, 5), dtype=np.float32, **kw):
    bn = cls(shape[1], dtype=dtype, **kw)
    if bn.affine:
        bn.weight = np.arange(1, shape[1] + 1)
        if bn.bias is not None:
            bn.bias = -np.arange(shape[1])
    for s in range(3):
        bn(rand(shape, dtype, seed=s, loc=s))
    return bn


def test_state_dict_keys_shapes_copies():
    bn = _trained()
    sd = bn.state_dict()
    assert list(sd) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert all(sd[k].shape == (3,) and sd[k].dtype == np.float32 for k in list(sd)[:4])
    assert sd["num_batches_tracked"].shape == () and sd["num_batches_tracked"].dtype == np.int64
    assert int(sd["num_batches_tracked"]) == 3
    sd["running_mean"][...] = 99
    assert not np.any(bn.running_mean == 99)
    assert list(bn.state_dict(prefix="layer1.")) == ["layer1." + k for k in sd]
    assert list(BatchNorm1d(2, affine=False).state_dict()) == ["running_mean", "running_var", "num_batches_tracked"]
    assert list(BatchNorm1d(2, track_running_stats=False).state_dict()) == ["weight", "bias"]


def test_load_state_dict_round_trip_and_in_place():
    src = _trained()
    dst = BatchNorm2d(3)
    arrays = [dst.weight, dst.bias, dst.running_mean, dst.running_var, dst.num_batches_tracked]
    res = dst.load_state_dict(src.state_dict())
    assert res.missing_keys == [] and res.unexpected_keys == []
    for k, v in src.state_dict().items():
        np.testing.assert_array_equal(dst.state_dict()[k], v)
    now = [dst.weight, dst.bias, dst.running_mean, dst.running_var, dst.num_batches_tracked]
    assert all(a is b for a, b in zip(arrays, now))  # loaded in place: references stay valid


def test_load_state_dict_casts_float64_to_layer_dtype():
    src = _trained(dtype=np.float64)
    dst = BatchNorm2d(3)
    dst.load_state_dict(src.state_dict())
    assert dst.running_var.dtype == np.float32
    np.testing.assert_allclose(dst.running_var, src.running_var, rtol=1e-6)


def _assert_unchanged(bn, before):
    after = bn.state_dict()
    assert list(after) == list(before)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


@pytest.mark.parametrize("drop", ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"])
def test_strict_missing_key_names_it_and_changes_nothing(drop):
    bn = BatchNorm2d(3)
    before = bn.state_dict()
    sd = _trained().state_dict()
    del sd[drop]
    with pytest.raises(StateDictError) as e:
        bn.load_state_dict(sd)
    assert f'"{drop}"' in str(e.value) and "Missing" in str(e.value)
    _assert_unchanged(bn, before)
    # non-strict: loads the rest, reports the missing key
    res = bn.load_state_dict(sd, strict=False)
    assert res.missing_keys == [drop] and res.unexpected_keys == []
    for k in sd:
        np.testing.assert_array_equal(bn.state_dict()[k], sd[k])
    np.testing.assert_array_equal(bn.state_dict()[drop], before[drop])


def test_strict_unexpected_key_names_it_and_changes_nothing():
    bn = BatchNorm2d(3, affine=False)
    before = bn.state_dict()
    sd = _trained().state_dict()  # has weight and bias
    sd["extra"] = np.zeros(1)
    with pytest.raises(StateDictError) as e:
        bn.load_state_dict(sd)
    for k in ("weight", "bias", "extra"):
        assert f'"{k}"' in str(e.value)
    assert "Unexpected" in str(e.value)
    _assert_unchanged(bn, before)
    res = bn.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == ["weight", "bias", "extra"] and res.missing_keys == []
    np.testing.assert_array_equal(bn.running_mean, sd["running_mean"])


@pytest.mark.parametrize("key,bad", [
    ("weight", np.ones(4)),
    ("running_var", np.ones((3, 1))),
    ("num_batches_tracked", np.array([3])),
])
@pytest.mark.parametrize("strict", [True, False])
def test_wrong_shape_names_key_and_changes_nothing(key, bad, strict):
    bn = BatchNorm2d(3)
    before = bn.state_dict()
    sd = _trained().state_dict()
    sd[key] = bad
    with pytest.raises(ValueError, match=f"size mismatch for {key}"):
        bn.load_state_dict(sd, strict=strict)
    _assert_unchanged(bn, before)


@pytest.mark.parametrize("key,bad", [
    ("num_batches_tracked", np.array(3.0)),
    ("running_mean", np.array(["a", "b", "c"])),
    ("bias", np.ones(3, complex)),
])
def test_wrong_dtype_in_state_dict(key, bad):
    bn = BatchNorm2d(3)
    before = bn.state_dict()
    sd = _trained().state_dict()
    sd[key] = bad
    with pytest.raises(TypeError, match=key):
        bn.load_state_dict(sd)
    _assert_unchanged(bn, before)


def test_load_state_dict_rejects_non_mapping():
    with pytest.raises(TypeError):
        BatchNorm2d(3).load_state_dict([("weight", np.ones(3))])


@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_save_load_npz(tmp_path, affine, track):
    src = _trained(affine=affine, track_running_stats=track)
    src.save(tmp_path / "bn.npz")
    dst = BatchNorm2d(3, affine=affine, track_running_stats=track).load(tmp_path / "bn.npz")
    assert isinstance(dst, BatchNorm2d)
    _assert_unchanged(dst, src.state_dict())
    src.save(str(tmp_path / "noext"))  # numpy appends .npz
    BatchNorm2d(3, affine=affine, track_running_stats=track).load(str(tmp_path / "noext.npz"))
    with np.load(tmp_path / "bn.npz") as f:
        assert list(f.files) == list(src.state_dict())


def test_npz_load_strict_failure_leaves_layer(tmp_path):
    _trained(affine=False).save(tmp_path / "bn.npz")
    bn = BatchNorm2d(3)
    before = bn.state_dict()
    with pytest.raises(StateDictError, match="weight"):
        bn.load(tmp_path / "bn.npz")
    _assert_unchanged(bn, before)
    bn.load(tmp_path / "bn.npz", strict=False)
    assert int(bn.num_batches_tracked) == 3


def test_reset_running_stats_and_parameters():
    bn = _trained()
    bn.backward(np.ones((4, 3, 5, 5), np.float32))
    w = bn.weight
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert int(bn.num_batches_tracked) == 0
    np.testing.assert_array_equal(bn.weight, [1, 2, 3])  # parameters kept
    bn.reset_parameters()
    assert bn.weight is w
    np.testing.assert_array_equal(bn.weight, 1)
    np.testing.assert_array_equal(bn.bias, 0)
    assert bn.grad_weight is None
    BatchNorm1d(2, affine=False, track_running_stats=False).reset_parameters()  # no-op, no error


# ----------------------------------------------------------------- property-based
@settings(max_examples=40, deadline=None)
@given(
    ndim=st.integers(2, 5),
    data=st.data(),
    dtype=st.sampled_from([np.float32, np.float64]),
    training=st.booleans(),
    affine=st.booleans(),
)
def test_random_shapes_and_axes(ndim, data, dtype, training, affine):
    shape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axis = data.draw(st.integers(-ndim, ndim - 1))
    if training and np.prod(shape) // shape[axis] < 2:
        shape = (shape[0] + 1,) + shape[1:] if axis % ndim != 0 else shape[:1] + (shape[1] + 1,) + shape[2:]
    C = shape[axis]
    bn = BatchNorm(C, axis=axis, dtype=dtype, affine=affine).train(training)
    bn.running_mean = np.linspace(-1, 1, C)
    bn.running_var = np.linspace(0.5, 1.5, C)
    x = rand(shape, dtype, seed=ndim, loc=1.0)
    g = rand(shape, dtype, seed=ndim + 1, loc=0.0)
    if training:
        mean, var, _ = ref_stats(x, axis)
    else:
        mean, var = bn.running_mean.astype(np.float64), bn.running_var.astype(np.float64)
    y = bn(x)
    np.testing.assert_allclose(y, ref_normalize(x, mean, var, bn.weight, bn.bias, 1e-5, axis), **TOL[dtype])
    gx = bn.backward(g)
    rgx = ref_backward(g, x, mean, var, bn.weight, 1e-5, axis, training)[0]
    scale = 1e-3 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(gx, rgx, rtol=scale, atol=scale * max(1.0, float(np.abs(rgx).max())))


# ----------------------------------------------------------------- memory layouts & special values
@pytest.mark.parametrize("training", [True, False])
def test_strided_and_mixed_layout_inputs_match_contiguous(training):
    rng = np.random.default_rng(21)
    big = (3 + rng.standard_normal((4, 6, 8, 10))).astype(np.float32)
    gbig = rng.standard_normal((4, 6, 8, 10)).astype(np.float32)

    def run(x, g, axis=1):
        bn = BatchNorm(x.shape[axis], axis=axis).train(training)
        bn.running_mean = np.full(x.shape[axis], 0.5)
        bn.running_var = np.full(x.shape[axis], 2.0)
        y = bn(x)
        gx = bn.backward(g)
        return [y, gx, bn.running_mean, bn.running_var, bn.grad_weight, bn.grad_bias]

    view, gview = big[:, ::2, ::-1, 1::3], gbig[:, ::2, ::-1, 1::3]
    ref = run(np.ascontiguousarray(view), np.ascontiguousarray(gview))
    chl = np.ascontiguousarray(np.moveaxis(big, 1, -1))  # NHWC memory seen as NCHW, axis=1
    variants = [
        (view, gview),
        (np.asfortranarray(view), np.ascontiguousarray(gview)),  # x and grad_out in different orders
    ]
    for x, g in variants:
        for a, b in zip(run(x, g), ref):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    ref2 = run(big, gbig)
    for a, b in zip(run(np.moveaxis(chl, -1, 1), gbig), ref2):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("axis", [1, -1])
def test_nan_stays_in_its_channel(axis):
    x = rand((4, 5, 3, 3), seed=22) if axis == 1 else rand((4, 3, 3, 5), seed=22)
    idx = (0, 2, 0, 0) if axis == 1 else (0, 0, 0, 2)
    x[idx] = np.nan
    bn = BatchNorm2d(5, axis=axis)
    y = bn(x)
    gx = bn.backward(np.ones_like(x))
    red = tuple(i for i in range(4) if i != axis % 4)
    expect = np.arange(5) == 2
    np.testing.assert_array_equal(np.isnan(y).any(axis=red), expect)
    np.testing.assert_array_equal(np.isnan(gx).any(axis=red), expect)
    np.testing.assert_array_equal(np.isnan(bn.running_mean), expect)
    np.testing.assert_array_equal(np.isnan(bn.running_var), expect)


@pytest.mark.parametrize("axis", [1, -1])
def test_constant_channel_gives_exactly_bias(axis):
    x = rand((4, 3, 5, 5), seed=23)
    x[:, 1] = 7.25
    if axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    bn = BatchNorm2d(3, axis=axis)
    bn.bias = [0.0, 0.375, 0.0]
    y = bn(x)
    assert np.all(np.take(y, 1, axis=axis) == np.float32(0.375))


@pytest.mark.parametrize("offset", [1e4, 1e5])
@pytest.mark.parametrize("axis", [1, -1])
def test_large_offset_float32_running_var(offset, axis):
    x = (offset + np.random.default_rng(24).standard_normal((16, 4, 8, 8))).astype(np.float32)
    v = x.astype(np.float64).var(axis=(0, 2, 3), ddof=1)
    if axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    bn = BatchNorm2d(4, momentum=1.0, axis=axis)
    bn(x)
    np.testing.assert_allclose(bn.running_var, v, rtol=1e-5)


def test_empty_batch_eval_ok_training_error():
    bn = BatchNorm2d(3).eval()
    assert bn(np.zeros((0, 3, 2, 2), np.float32)).shape == (0, 3, 2, 2)
    assert bn.backward(np.zeros((0, 3, 2, 2), np.float32)).shape == (0, 3, 2, 2)
    bn.train()
    with pytest.raises(ValueError):
        bn(np.zeros((0, 3, 2, 2), np.float32))
    assert int(bn.num_batches_tracked) == 0


def test_exports():
    for name in ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "recalibrate", "fold_batch_norm"]:
        assert name in bnfast.__all__ and hasattr(bnfast, name)
    assert bnfast.BatchNorm2d is BatchNorm2d and issubclass(BatchNorm2d, BatchNorm)
