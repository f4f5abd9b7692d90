"""The normalization family's layers on the one Module base: against PyTorch's
layers (outputs, gradients, running statistics, state_dict both ways), the
float64 reference, the Module contract, and bad input leaving state untouched."""

from __future__ import annotations

import numpy as np
import pytest

import bnfast
from bnfast import _reference as R
from bnfast.nn import Module, Sequential, StateDictError

try:
    import torch
except ImportError:  # the PyTorch comparisons skip
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
rng = np.random.default_rng(7)


def _data(shape, dtype=np.float32, offset=0.0):
    return (offset + rng.standard_normal(shape)).astype(dtype)


# (bnfast layer, torch layer, input shape); both built with the same arguments
def _pairs():
    T = torch.nn
    return [
        (bnfast.LayerNorm(12), T.LayerNorm(12), (4, 5, 12)),
        (bnfast.LayerNorm((5, 12), bias=False), T.LayerNorm((5, 12), bias=False), (4, 5, 12)),
        (bnfast.LayerNorm(12, elementwise_affine=False), T.LayerNorm(12, elementwise_affine=False), (3, 12)),
        (bnfast.RMSNorm(12), T.RMSNorm(12), (4, 5, 12)),
        (bnfast.RMSNorm((5, 12), eps=1e-6), T.RMSNorm((5, 12), eps=1e-6), (4, 5, 12)),
        (bnfast.GroupNorm(3, 6), T.GroupNorm(3, 6), (4, 6, 5, 5)),
        (bnfast.GroupNorm(1, 6, affine=False), T.GroupNorm(1, 6, affine=False), (2, 6, 7)),
        (bnfast.GroupNorm(6, 6, bias=False), T.GroupNorm(6, 6, bias=False), (2, 6, 3, 2, 2)),
        (bnfast.InstanceNorm1d(6), T.InstanceNorm1d(6), (4, 6, 9)),
        (bnfast.InstanceNorm2d(6, affine=True), T.InstanceNorm2d(6, affine=True), (4, 6, 5, 5)),
        (bnfast.InstanceNorm2d(6, affine=True, track_running_stats=True),
         T.InstanceNorm2d(6, affine=True, track_running_stats=True), (4, 6, 5, 5)),
        (bnfast.InstanceNorm3d(6, track_running_stats=True, momentum=0.3),
         T.InstanceNorm3d(6, track_running_stats=True, momentum=0.3), (2, 6, 3, 4, 5)),
    ]


def _randomize(pair):
    """The same random parameters in both layers."""
    ours, theirs = pair
    for (name, p), (tname, tp) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert name == tname
        value = rng.standard_normal(p.shape).astype(p.dtype)
        p.data[...] = value
        with torch.no_grad():
            tp.copy_(torch.from_numpy(value))


@needs_torch
@pytest.mark.parametrize("index", range(12))
def test_layer_matches_torch_train_and_eval(index):
    ours, theirs, shape = _pairs()[index]
    _randomize((ours, theirs))
    theirs = theirs.double()  # the float64 comparison for bnfast's float32 layer
    for p, tp in zip(ours.parameters(), theirs.parameters()):
        np.testing.assert_array_equal(p, tp.detach().numpy().astype(np.float32))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    for step in range(2):  # twice: the running statistics move
        x = _data(shape, offset=3.0)
        g = _data(shape)
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        yt = theirs(xt)
        yt.backward(torch.tensor(g, dtype=torch.float64))
        y = ours(x)
        gx = ours.backward(g)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-4, atol=2e-4)
        for (name, p), tp in zip(ours.named_parameters(), theirs.parameters()):
            np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-4, atol=5e-4, err_msg=name)
            tp.grad = None
        for (name, b), (_, tb) in zip(ours.named_buffers(), theirs.named_buffers()):
            np.testing.assert_allclose(b, tb.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    ours.eval()
    theirs.eval()
    x = _data(shape, offset=1.0)
    with torch.no_grad():
        want = theirs(torch.tensor(x, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(ours(x), want, rtol=1e-5, atol=2e-5)


@needs_torch
@pytest.mark.parametrize("index", range(12))
def test_state_dict_round_trips_with_torch(index):
    ours, theirs, shape = _pairs()[index]
    _randomize((ours, theirs))
    for name, b in theirs.named_buffers():
        if b.dtype.is_floating_point:
            b.copy_(torch.from_numpy(rng.random(tuple(b.shape)).astype(np.float32)))
    # torch -> bnfast
    result = ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    assert result.missing_keys == [] and result.unexpected_keys == []
    for k, v in theirs.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[k], v.numpy())
    # bnfast -> torch, after bnfast's state moved on
    for p in ours.parameters():
        p.data[...] += 1
    theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()})
    for k, v in ours.state_dict().items():
        np.testing.assert_array_equal(theirs.state_dict()[k].numpy(), v)


@pytest.mark.parametrize("axis", [1, -1])
def test_group_and_instance_layers_against_reference_both_layouts(axis):
    x = _data((3, 8, 4, 5), np.float64, offset=2.0)
    if axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    gn = bnfast.GroupNorm(4, 8, axis=axis, dtype=np.float64)
    gn.weight.data[...] = rng.standard_normal(8)
    want, _, _ = R.group_norm_forward(x, 4, np.asarray(gn.weight), np.asarray(gn.bias), axis=axis)
    np.testing.assert_allclose(gn(x), want, rtol=1e-12, atol=1e-12)
    inorm = bnfast.InstanceNorm2d(8, axis=axis, dtype=np.float64)
    want, *_ = R.instance_norm_forward(x, axis=axis)
    np.testing.assert_allclose(inorm(x), want, rtol=1e-12, atol=1e-12)


def test_instance_norm_takes_an_unbatched_input():
    m = bnfast.InstanceNorm2d(3, affine=True)
    x = _data((3, 4, 5))
    y = m(x)
    assert y.shape == x.shape
    g = _data(x.shape)
    gx = m.backward(g)
    assert gx.shape == x.shape
    np.testing.assert_array_equal(y, m(x[None])[0])
    np.testing.assert_array_equal(gx, m.backward(g[None])[0])
    with pytest.raises(ValueError, match="4-D"):
        m(_data((2, 3, 4)).reshape(2, 3, 4, 1, 1))


def test_filter_response_norm_layer_against_reference_and_eps_gradient():
    frn = bnfast.FilterResponseNorm2d(4, learnable_eps=True, eps=1e-2, dtype=np.float64)
    for p in (frn.weight, frn.bias, frn.tau):
        p.data[...] = rng.standard_normal(4) * 0.5
    x = _data((2, 4, 3, 3), np.float64)
    y = frn(x)
    want, _ = R.filter_response_norm_forward(x, frn.weight, frn.bias, frn.tau, 1e-2)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    g = _data(x.shape, np.float64)
    gx = frn.backward(g)
    dx, dw, db, dt = R.filter_response_norm_backward(g, x, frn.weight, frn.bias, frn.tau, 1e-2)
    for got, ref in ((gx, dx), (frn.weight.grad, dw), (frn.bias.grad, db), (frn.tau.grad, dt)):
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
    # d loss / d eps by central differences of sum(g * y)
    h = 1e-6

    def loss(e):
        return float((g * R.filter_response_norm_forward(x, frn.weight, frn.bias, frn.tau, e)[0]).sum())

    numeric = (loss(1e-2 + h) - loss(1e-2 - h)) / (2 * h)
    np.testing.assert_allclose(frn.eps.grad[0], numeric, rtol=1e-5)


def test_layers_compose_in_the_module_system():
    model = Sequential(bnfast.nn.Linear(6, 8, rng=0), bnfast.LayerNorm(8), bnfast.nn.ReLU(),
                       bnfast.nn.Linear(8, 3, rng=1), bnfast.RMSNorm(3))
    names = [n for n, _ in model.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias", "4.weight"]
    x = _data((5, 6))
    y = model(x)
    gx = model.backward(np.ones_like(y))
    assert gx.shape == x.shape and all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert [type(m).__name__ for m in model.modules()][1:] == ["Linear", "LayerNorm", "ReLU", "Linear", "RMSNorm"]
    state = model.state_dict()
    other = Sequential(bnfast.nn.Linear(6, 8, rng=5), bnfast.LayerNorm(8), bnfast.nn.ReLU(),
                       bnfast.nn.Linear(8, 3, rng=6), bnfast.RMSNorm(3))
    other.load_state_dict(state)
    np.testing.assert_array_equal(other(x), model(x))
    conv = Sequential(bnfast.nn.Conv2d(3, 8, 3, rng=0), bnfast.GroupNorm(2, 8), bnfast.InstanceNorm2d(8, affine=True))
    out = conv(_data((2, 3, 6, 6)))
    assert conv.backward(np.ones_like(out)).shape == (2, 3, 6, 6)
    assert isinstance(conv[1], Module)


BAD = [
    (lambda: bnfast.GroupNorm(4, 6), "divisible"),
    (lambda: bnfast.GroupNorm(0, 6), "positive"),
    (lambda: bnfast.LayerNorm(()), "normalized_shape"),
    (lambda: bnfast.LayerNorm((3, 0)), "normalized_shape"),
    (lambda: bnfast.InstanceNorm2d(3, dtype=np.int32), "dtype"),
]


@pytest.mark.parametrize("build, match", BAD)
def test_bad_constructor_arguments(build, match):
    with pytest.raises((TypeError, ValueError), match=match):
        build()


def _layers():
    return [
        (bnfast.LayerNorm(4), (3, 4), (3, 5)),
        (bnfast.RMSNorm(4), (3, 4), (3, 5)),
        (bnfast.GroupNorm(2, 4), (2, 4, 3), (2, 6, 3)),
        (bnfast.InstanceNorm1d(4, affine=True, track_running_stats=True), (2, 4, 3), (2, 5, 3)),
        (bnfast.FilterResponseNorm2d(4), (2, 4, 3, 3), (2, 5, 3, 3)),
    ]


@pytest.mark.parametrize("index", range(5))
def test_bad_input_raises_and_leaves_the_layer_untouched(index):
    layer, good, wrong_channels = _layers()[index]
    layer(_data(good))  # one good call, then keep its state
    before = {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}
    saved = layer._saved
    for bad, error in (
        (_data(wrong_channels), ValueError),
        (_data(good, np.float64), TypeError),
        (np.ones(good, np.int64), TypeError),
    ):
        with pytest.raises(error):
            layer(bad)
        for k, v in layer.state_dict().items():
            np.testing.assert_array_equal(v, before[k])
        assert layer._saved is saved
    with pytest.raises(ValueError):
        layer.backward(_data(wrong_channels))
    fresh = type(layer).__new__(type(layer))
    Module.__init__(fresh)
    fresh.__dict__["_saved"] = None
    with pytest.raises(RuntimeError, match="before forward"):
        type(layer).backward(fresh, _data(good))


def test_strict_load_of_a_mismatched_state_dict_changes_nothing():
    gn = bnfast.GroupNorm(2, 4)
    gn.weight.data[...] = 3.0
    with pytest.raises(StateDictError):
        gn.load_state_dict({"weight": np.ones(5, np.float32), "bias": np.zeros(4, np.float32)})
    np.testing.assert_array_equal(gn.weight, 3.0)
    with pytest.raises(StateDictError, match="Missing"):
        gn.load_state_dict({"weight": np.ones(4, np.float32)})
    np.testing.assert_array_equal(gn.weight, 3.0)


def test_instance_norm_eval_uses_running_statistics_and_treats_them_as_constants():
    m = bnfast.InstanceNorm2d(3, track_running_stats=True, affine=True, dtype=np.float64)
    for _ in range(3):
        m(_data((4, 3, 5, 5), np.float64, offset=2.0))
    m.eval()
    x = _data((2, 3, 5, 5), np.float64)
    rm, rv = np.asarray(m.running_mean), np.asarray(m.running_var)
    want = R.batch_norm_inference(x, rm, rv, np.asarray(m.weight), np.asarray(m.bias))
    np.testing.assert_allclose(m(x), want, rtol=1e-12, atol=1e-12)
    g = _data(x.shape, np.float64)
    inv = 1.0 / np.sqrt(rv + m.eps)
    np.testing.assert_allclose(m.backward(g), g * (np.asarray(m.weight) * inv)[None, :, None, None], rtol=1e-12)
    assert int(m.num_batches_tracked) == 0  # as PyTorch: instance norm never counts batches
