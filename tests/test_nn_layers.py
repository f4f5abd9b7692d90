"""bnfast.nn layers, losses, optimizers, schedulers and bnfast.testing.gradcheck (no torch needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bnfast import nn
from bnfast._parameter import Parameter
from bnfast.testing import gradcheck

F64 = np.float64


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def _nchw_to(x, axis):
    return x if axis == 1 else np.ascontiguousarray(x.transpose(0, 2, 3, 1))


# ---------------------------------------------------------------- gradcheck of every layer
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("kw", [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), bias=False),
])
def test_gradcheck_conv2d(axis, kw):
    conv = nn.Conv2d(3, 4, axis=axis, dtype=F64, rng=0, **kw)
    assert gradcheck(conv, _nchw_to(_x((2, 3, 5, 6)), axis))


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("shape,k", [((2, 3, 4, 6), 2), ((2, 2, 5, 7), 2), ((1, 2, 6, 6), (3, 2))])
def test_gradcheck_maxpool(axis, shape, k):
    assert gradcheck(nn.MaxPool2d(k, axis=axis), _nchw_to(_x(shape), axis))


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradcheck_batchnorm2d(axis, mode):
    bn = nn.BatchNorm2d(3, axis=axis, dtype=F64)
    bn.weight[:] = [0.5, 1.5, -1.0]
    bn.bias[:] = [0.1, -0.2, 0.3]
    if mode == "eval":
        bn(_nchw_to(_x((4, 3, 3, 3), seed=5) * 2 + 1, axis))  # non-trivial running stats
        bn.eval()
    assert gradcheck(bn, _nchw_to(_x((2, 3, 3, 4)), axis))


@pytest.mark.parametrize("axis", [1, -1])
def test_gradcheck_batchnorm1d(axis):
    bn = nn.BatchNorm1d(4, axis=axis, dtype=F64)
    x = _x((3, 4, 5)) if axis == 1 else _x((3, 5, 4))
    assert gradcheck(bn, x)
    assert gradcheck(nn.BatchNorm1d(4, dtype=F64), _x((6, 4)))


@pytest.mark.parametrize("axis", [1, -1])
def test_gradcheck_batchnorm3d_and_any_rank(axis):
    x5 = _x((2, 2, 2, 3, 2)) if axis == 1 else _x((2, 2, 3, 2, 2))
    assert gradcheck(nn.BatchNorm3d(2, axis=axis, dtype=F64), x5)
    assert gradcheck(nn.BatchNorm(3, axis=axis, dtype=F64), _x((4, 3, 2)) if axis == 1 else _x((4, 2, 3)))


@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 3)])
def test_gradcheck_linear(shape):
    assert gradcheck(nn.Linear(3, 4, dtype=F64, rng=0), _x(shape))
    assert gradcheck(nn.Linear(3, 2, bias=False, dtype=F64, rng=1), _x(shape))


@pytest.mark.parametrize("layer", [nn.ReLU(), nn.Flatten(), nn.Flatten(0, 1), nn.Dropout(0.3, rng=1),
                                   nn.Dropout(0.3, rng=1).eval()])
def test_gradcheck_parameterless(layer):
    assert gradcheck(layer, _x((2, 3, 4)))


@pytest.mark.parametrize("axis", [1, -1])
def test_gradcheck_cnn(axis):
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, axis=axis, dtype=F64, rng=0), nn.BatchNorm2d(3, axis=axis, dtype=F64),
        nn.ReLU(), nn.MaxPool2d(2, axis=axis), nn.Flatten(), nn.Linear(12, 3, dtype=F64, rng=1),
    )
    assert gradcheck(model, _nchw_to(_x((3, 2, 4, 4)), axis))


def test_gradcheck_mlp_with_dropout():
    model = nn.Sequential(nn.Linear(4, 6, dtype=F64, rng=0), nn.BatchNorm1d(6, dtype=F64), nn.ReLU(),
                          nn.Dropout(0.25, rng=3), nn.Linear(6, 2, dtype=F64, rng=1))
    assert gradcheck(model, _x((5, 4)))


# ---------------------------------------------------------------- gradcheck itself can fail
class _BrokenScale(nn.Module):
    """y = w * x, with a deliberately wrong weight gradient."""

    def __init__(self, bug="weight"):
        super().__init__()
        self.w = self.register_parameter("w", np.array([2.0]))
        self.bug = bug

    def forward(self, x):
        self._x = x
        return x * self.w.data

    def backward(self, g):
        self.w.grad = np.array([(g * self._x).sum()]) * (1.01 if self.bug == "weight" else 1.0)
        if self.bug == "nograd":
            self.w.grad = None
        return g * self.w.data * (1.5 if self.bug == "input" else 1.0)


@pytest.mark.parametrize("bug,where", [("weight", "parameter 0 (w)"), ("input", "input")])
def test_gradcheck_reports_worst_mismatch(bug, where):
    with pytest.raises(AssertionError, match=r"worst mismatch in the gradient of " + re_escape(where)):
        gradcheck(_BrokenScale(bug), _x((3, 2)))
    assert gradcheck(_BrokenScale("none"), _x((3, 2)))


def re_escape(s):
    import re

    return re.escape(s)


def test_gradcheck_unset_grad_and_float32():
    with pytest.raises(AssertionError, match="unset"):
        gradcheck(_BrokenScale("nograd"), _x((3, 2)))
    with pytest.raises(TypeError, match="float64"):
        gradcheck(nn.Linear(3, 2, rng=0), _x((2, 3)))


def test_gradcheck_leaves_layer_untouched():
    bn = nn.BatchNorm2d(2, dtype=F64)
    before = {k: v.copy() for k, v in bn.state_dict().items()}
    assert gradcheck(bn, _x((2, 2, 3, 3)))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    assert bn.grad_weight is None


# ---------------------------------------------------------------- layer behaviour
def test_linear_init_and_dtype():
    fc = nn.Linear(50, 40, rng=0)
    assert fc.weight.shape == (40, 50) and fc.bias.shape == (40,)
    assert fc.weight.dtype == np.float32
    bound = 1 / math.sqrt(50)
    assert np.abs(fc.weight).max() <= bound and np.abs(fc.bias).max() <= bound
    assert abs(fc.weight.std() - bound / math.sqrt(3)) < 0.1 * bound  # uniform(-b, b)
    np.testing.assert_array_equal(nn.Linear(50, 40, rng=0).weight, fc.weight)  # seeded
    assert fc(np.ones((2, 50), np.float32)).dtype == np.float32
    assert fc(np.ones((2, 50), np.float64)).dtype == np.float64  # keeps the input dtype
    g = fc.backward(np.ones((2, 40)))
    assert g.dtype == np.float64 and fc.grad_weight.dtype == np.float32


def test_conv_init_bounds():
    conv = nn.Conv2d(3, 8, (3, 2), rng=0)
    assert conv.weight.shape == (8, 3, 3, 2)
    assert np.abs(conv.weight).max() <= 1 / math.sqrt(18)


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=2, stride=2)])
def test_conv_channels_last_matches_channels_first(kw):
    x = _x((2, 3, 6, 6))
    a = nn.Conv2d(3, 5, dtype=F64, rng=0, **kw)
    b = nn.Conv2d(3, 5, axis=-1, dtype=F64, rng=0, **kw)
    np.testing.assert_array_equal(a.weight, b.weight)
    ya, yb = a(x), b(x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(ya.transpose(0, 2, 3, 1), yb, rtol=1e-12, atol=1e-12)
    g = _x(ya.shape, 1)
    ga, gb = a.backward(g), b.backward(g.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(ga.transpose(0, 2, 3, 1), gb, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.grad_weight, b.grad_weight, rtol=1e-12, atol=1e-12)


def test_conv_matches_direct_loop():
    x = _x((1, 2, 5, 5))
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, dtype=F64, rng=0)
    y = conv(x)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for o in range(3):
        for i in range(3):
            for j in range(3):
                ref = (xp[0, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3] * conv.weight[o]).sum() + conv.bias[o]
                assert y[0, o, i, j] == pytest.approx(ref, abs=1e-12)


def test_maxpool_values_ties_and_layout():
    x = np.zeros((1, 1, 2, 4))
    x[0, 0, 1, 3] = 5.0
    pool = nn.MaxPool2d(2)
    np.testing.assert_array_equal(pool(x), [[[[0.0, 5.0]]]])
    g = pool.backward(np.ones((1, 1, 1, 2)))
    expected = np.zeros_like(x)
    expected[0, 0, 0, 0] = 1.0  # tie: first maximum in row-major order, like torch
    expected[0, 0, 1, 3] = 1.0
    np.testing.assert_array_equal(g, expected)
    xl = _x((2, 5, 7, 3))
    np.testing.assert_array_equal(nn.MaxPool2d(2, axis=-1)(xl),
                                  nn.MaxPool2d(2)(xl.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1))


def test_relu_and_flatten():
    r = nn.ReLU()
    np.testing.assert_array_equal(r(np.array([-1.0, 0.0, 2.0])), [0.0, 0.0, 2.0])
    np.testing.assert_array_equal(r.backward(np.ones(3)), [0.0, 0.0, 1.0])
    f = nn.Flatten()
    assert f(np.zeros((2, 3, 4, 5))).shape == (2, 60)
    assert f.backward(np.zeros((2, 60))).shape == (2, 3, 4, 5)


def test_dropout():
    x = np.ones((200, 50), np.float32)
    d = nn.Dropout(0.2, rng=0)
    y = d(x)
    assert y.dtype == np.float32
    assert set(np.unique(y).tolist()) == {0.0, np.float32(1 / 0.8)}
    assert abs((y == 0).mean() - 0.2) < 0.02
    np.testing.assert_array_equal(d.backward(x), y)  # same mask on the gradient
    np.testing.assert_array_equal(nn.Dropout(0.2, rng=0)(x), y)  # seeded
    assert d.eval()(x) is x or np.array_equal(d(x), x)
    assert np.all(nn.Dropout(1.0)(x) == 0)
    np.testing.assert_array_equal(nn.Dropout(0.0)(x), x)
    with pytest.raises(ValueError, match="p must be in"):
        nn.Dropout(1.5)


def test_sequential_modes_parameters_state():
    model = nn.Sequential(nn.Linear(4, 6, rng=0), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(6, 2, rng=1))
    assert len(model) == 5 and isinstance(model[1], nn.BatchNorm1d)
    assert model.training and all(layer.training for layer in model)
    assert model.eval() is model
    assert not model.training and not any(layer.training for layer in model)
    assert model.train() is model and all(layer.training for layer in model)
    params = model.parameters()
    assert len(params) == 6 and all(isinstance(p, Parameter) for p in params)
    sd = model.state_dict()
    assert list(sd) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                        "1.num_batches_tracked", "4.weight", "4.bias"]
    other = nn.Sequential(nn.Linear(4, 6, rng=5), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(6, 2, rng=6))
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
    bad = dict(sd)
    bad["0.weight"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match="0.weight|weight"):
        other.load_state_dict(bad)
    with pytest.raises(nn.StateDictError, match='Missing key.*"4.bias"'):
        other.load_state_dict({k: v for k, v in sd.items() if k != "4.bias"})
    assert "Linear(in_features=4, out_features=6, bias=True)" in repr(model)


def test_sequential_rejects_non_layers():
    with pytest.raises(TypeError, match="layer contract"):
        nn.Sequential(lambda x: x)


# ---------------------------------------------------------------- clear errors
def test_layer_errors():
    with pytest.raises(ValueError, match=r"expected input of shape \(\*, 3\)"):
        nn.Linear(3, 2)(np.zeros((4, 5), np.float32))
    with pytest.raises(TypeError, match="floating-point"):
        nn.Linear(3, 2)(np.zeros((4, 3), np.int64))
    with pytest.raises(ValueError, match="4-D"):
        nn.Conv2d(1, 2, 3)(np.zeros((1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="has 3 channels"):
        nn.Conv2d(1, 2, 3)(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="has 8 channels"):
        nn.Conv2d(1, 2, 3, axis=-1)(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        nn.Conv2d(1, 2, 5)(np.zeros((1, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match="axis"):
        nn.Conv2d(1, 2, 3, axis=2)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        nn.MaxPool2d(4)(np.zeros((1, 1, 3, 3)))
    with pytest.raises(RuntimeError, match="before forward"):
        nn.Linear(3, 2).backward(np.zeros((1, 2)))
    fc = nn.Linear(3, 2)
    fc(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="grad_out has shape"):
        fc.backward(np.zeros((5, 2), np.float32))
    r = nn.ReLU()
    r(np.zeros(3))
    with pytest.raises(ValueError, match="grad_out has shape"):
        r.backward(np.zeros(4))


# ---------------------------------------------------------------- losses
def test_cross_entropy_value_grad_and_stability():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 4))
    y = np.array([0, 3, 1, 1, 2])
    ce = nn.CrossEntropyLoss()
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert ce(logits, y) == pytest.approx(-np.log(p[np.arange(5), y]).mean(), rel=1e-12)
    expected = p.copy()
    expected[np.arange(5), y] -= 1
    np.testing.assert_allclose(ce.backward(), expected / 5, rtol=1e-12, atol=1e-15)
    big = np.array([[1e4, 0.0, -1e4]], np.float32)
    assert ce(big, np.array([1])) == pytest.approx(1e4, rel=1e-6)
    assert np.all(np.isfinite(ce.backward())) and ce.backward().dtype == np.float32
    assert nn.CrossEntropyLoss("sum")(logits, y) == pytest.approx(ce(logits, y) * 5)


def test_mse():
    mse = nn.MSELoss()
    pred = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    tgt = np.array([[1.0, 0.0], [3.0, 5.0]])
    assert mse(pred, tgt) == pytest.approx((4 + 1) / 4)
    g = mse.backward()
    assert g.dtype == np.float32
    np.testing.assert_allclose(g, 2 * (pred - tgt) / 4)


@pytest.mark.parametrize("logits,target,exc,match", [
    (np.zeros((3, 4)), np.array([0, 1, 4]), ValueError, r"label 4 is out of range for 4 classes"),
    (np.zeros((3, 4)), np.array([0, -1, 2]), ValueError, r"label -1 is out of range"),
    (np.zeros((3, 4)), np.array([0.0, 1.0, 2.0]), TypeError, "integer class indices"),
    (np.zeros((3, 4)), np.array([True, False, True]), TypeError, "integer class indices"),
    (np.zeros((3, 4)), np.array(["a", "b", "c"]), TypeError, "integer class indices"),
    (np.zeros((3, 4)), np.array([0, 1]), ValueError, r"shape \(N,\)"),
    (np.zeros((3, 4)), np.zeros((3, 4), np.int64), ValueError, r"shape \(N,\)"),
    (np.zeros(4), np.array([0]), ValueError, "2-D"),
    (np.zeros((3, 4), np.int64), np.array([0, 1, 2]), TypeError, "floating point"),
])
def test_cross_entropy_errors(logits, target, exc, match):
    with pytest.raises(exc, match=match):
        nn.CrossEntropyLoss()(logits, target)


def test_loss_errors():
    with pytest.raises(ValueError, match="same shape"):
        nn.MSELoss()(np.zeros((3, 1)), np.zeros(3))
    with pytest.raises(RuntimeError, match="before computing"):
        nn.CrossEntropyLoss().backward()
    with pytest.raises(ValueError, match="reduction"):
        nn.MSELoss("none")


# ---------------------------------------------------------------- optimizers and schedules
def _param(values, grad):
    p = Parameter(np.array(values, dtype=np.float64))
    p.grad = np.array(grad, dtype=np.float64)
    return p


def test_sgd_momentum_nesterov_weight_decay_by_hand():
    p = _param([1.0, -2.0], [0.5, 0.25])
    data_ref = p.data
    opt = nn.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    w = np.array([1.0, -2.0])
    buf = None
    for _ in range(3):
        g = np.array([0.5, 0.25]) + 0.01 * w
        buf = g.copy() if buf is None else 0.9 * buf + g
        w = w - 0.1 * (g + 0.9 * buf)
        opt.step()
    np.testing.assert_allclose(p.data, w, rtol=1e-14)
    assert p.data is data_ref  # updated in place


def test_adam_by_hand_and_skips_missing_grads():
    p = _param([1.0], [2.0])
    q = Parameter(np.array([3.0]))
    opt = nn.Adam([p, q], lr=0.01, weight_decay=0.1)
    m = v = 0.0
    w = 1.0
    for t in range(1, 4):
        g = 2.0 + 0.1 * w
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w -= 0.01 / (1 - 0.9 ** t) * m / (math.sqrt(v) / math.sqrt(1 - 0.999 ** t) + 1e-8)
        opt.step()
    assert p.data[0] == pytest.approx(w, rel=1e-13)
    assert q.data[0] == 3.0


def test_optimizer_groups_zero_grad_and_errors():
    a, b = _param([1.0], [1.0]), _param([1.0], [1.0])
    opt = nn.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    opt.step()
    assert a.data[0] == pytest.approx(0.9) and b.data[0] == pytest.approx(0.5)
    opt.zero_grad()
    assert a.grad is None and b.grad is None
    with pytest.raises(ValueError, match="nesterov"):
        nn.SGD([a], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="learning rate"):
        nn.SGD([a], lr=-1)
    with pytest.raises(ValueError, match="empty"):
        nn.Adam([])
    with pytest.raises(TypeError, match="Parameter"):
        nn.SGD([np.zeros(3)], lr=0.1)
    model = nn.Linear(2, 2)
    assert len(nn.Adam(model).parameters()) == 2  # a model is accepted too


def test_clip_grad_norm():
    a, b = _param([0.0, 0.0], [3.0, 0.0]), _param([0.0], [4.0])
    assert nn.clip_grad_norm_([a, b], 10.0) == pytest.approx(5.0)
    np.testing.assert_allclose(a.grad, [3.0, 0.0])  # below the limit: unchanged
    assert nn.clip_grad_norm_([a, b], 1.0) == pytest.approx(5.0)
    total = math.sqrt((a.grad ** 2).sum() + (b.grad ** 2).sum())
    assert total == pytest.approx(1.0, rel=1e-5)
    c = _param([0.0, 0.0], [-3.0, 2.0])
    assert nn.clip_grad_norm_(c, 1.0, norm_type=float("inf")) == pytest.approx(3.0)


def test_schedulers():
    opt = nn.SGD([_param([0.0], [0.0])], lr=1.0)
    sched = nn.StepLR(opt, step_size=3, gamma=0.5)
    lrs = []
    for _ in range(7):
        lrs.append(opt.lr)
        sched.step()
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]
    opt = nn.SGD([_param([0.0], [0.0])], lr=0.2)
    sched = nn.CosineAnnealingLR(opt, T_max=4, eta_min=0.01)
    lrs = []
    for _ in range(5):
        lrs.append(opt.lr)
        sched.step()
    expected = [0.01 + 0.19 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(5)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    assert sched.get_last_lr() == [opt.lr]


def test_recalibrate_reaches_batch_norm_inside_sequential():
    import bnfast

    model = nn.Sequential(nn.Conv2d(1, 4, 3, rng=0), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(36, 2, rng=1))
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((8, 1, 5, 5)).astype(np.float32) for _ in range(3)]
    bnfast.recalibrate(model, batches)
    feats = np.concatenate([model[0](b) for b in batches]).astype(np.float64)
    np.testing.assert_allclose(model[1].running_mean, feats.mean(axis=(0, 2, 3)), atol=1e-6)
    np.testing.assert_allclose(model[1].running_var, feats.var(axis=(0, 2, 3), ddof=1), rtol=1e-5)
