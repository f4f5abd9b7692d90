"""bnfast.nn against PyTorch: layers, losses, optimizers, schedules and whole training steps (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bnfast import nn  # noqa: E402

TOL = 1e-6  # the bound; the observed differences are ~1e-15


def _t(a, requires_grad=False):
    return torch.tensor(np.ascontiguousarray(a), dtype=torch.float64, requires_grad=requires_grad)


def _maxdiff(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


# ---------------------------------------------------------------- single layers
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("kw", [dict(kernel_size=3), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=(2, 3), stride=(2, 1), padding=(0, 2), bias=False)])
def test_conv2d_matches_torch(axis, kw):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6))
    conv = nn.Conv2d(3, 4, axis=axis, dtype=np.float64, rng=1, **kw)
    ref = torch.nn.Conv2d(3, 4, **kw).double()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in conv.state_dict().items()})
    xt = _t(x, True)
    yt = ref(xt)
    g = rng.standard_normal(yt.shape)
    yt.backward(_t(g))
    if axis == 1:
        y, gx = conv(x), conv.backward(g)
    else:
        y = conv(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        gx = conv.backward(g.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert _maxdiff(y, yt) < 1e-12
    assert _maxdiff(gx, xt.grad) < 1e-12
    assert _maxdiff(conv.grad_weight, ref.weight.grad) < 1e-12
    if conv.bias is not None:
        assert _maxdiff(conv.grad_bias, ref.bias.grad) < 1e-12


def test_linear_matches_torch_and_default_init_distribution():
    rng = np.random.default_rng(0)
    fc = nn.Linear(6, 3, dtype=np.float64, rng=0)
    ref = torch.nn.Linear(6, 3).double()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in fc.state_dict().items()})
    x = rng.standard_normal((4, 2, 6))
    xt = _t(x, True)
    yt = ref(xt)
    g = rng.standard_normal(yt.shape)
    yt.backward(_t(g))
    assert _maxdiff(fc(x), yt) < 1e-12
    assert _maxdiff(fc.backward(g), xt.grad) < 1e-12
    assert _maxdiff(fc.grad_weight, ref.weight.grad) < 1e-12
    assert _maxdiff(fc.grad_bias, ref.bias.grad) < 1e-12
    # same distribution as torch's default init (kaiming_uniform_(a=sqrt(5)) weight, uniform bias):
    # uniform on +-1/sqrt(fan_in), fan_in = in_channels * kh * kw
    torch.manual_seed(0)
    for theirs, ours in ((torch.nn.Conv2d(30, 40, 3), nn.Conv2d(30, 40, 3, rng=0)),
                         (torch.nn.Linear(300, 400), nn.Linear(300, 400, rng=0))):
        bound = 1 / math.sqrt(270 if isinstance(ours, nn.Conv2d) else 300)
        for a, b in ((ours.weight, theirs.weight), (ours.bias, theirs.bias)):
            b = b.detach().numpy()
            for arr in (a, b):
                assert bound * (1 - 5 / arr.size) < np.abs(arr).max() <= bound
                assert abs(arr.std() - bound / math.sqrt(3)) < 0.1 * bound


@pytest.mark.parametrize("axis", [1, -1])
def test_maxpool_relu_ties_match_torch(axis):
    rng = np.random.default_rng(0)
    x = np.round(rng.standard_normal((2, 3, 7, 5)), 0)  # many exact ties, zeros after ReLU
    xt = _t(x, True)
    yt = torch.nn.functional.max_pool2d(torch.relu(xt), 2)
    g = rng.standard_normal(yt.shape)
    yt.backward(_t(g))
    relu, pool = nn.ReLU(), nn.MaxPool2d(2, axis=axis)
    if axis == 1:
        y = pool(relu(x))
        gx = relu.backward(pool.backward(g))
    else:
        y = pool(relu(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
        gx = relu.backward(pool.backward(g.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    assert _maxdiff(y, yt) == 0.0
    assert _maxdiff(gx, xt.grad) == 0.0


def test_losses_match_torch():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 5)) * 3
    y = rng.integers(0, 5, 6)
    for reduction in ("mean", "sum"):
        lt = _t(logits, True)
        ref = torch.nn.CrossEntropyLoss(reduction=reduction)(lt, torch.from_numpy(y))
        ref.backward()
        ce = nn.CrossEntropyLoss(reduction)
        assert ce(logits, y) == pytest.approx(ref.item(), rel=1e-13)
        assert _maxdiff(ce.backward(), lt.grad) < 1e-14
        pred, tgt = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
        pt = _t(pred, True)
        ref = torch.nn.MSELoss(reduction=reduction)(pt, _t(tgt))
        ref.backward()
        mse = nn.MSELoss(reduction)
        assert mse(pred, tgt) == pytest.approx(ref.item(), rel=1e-13)
        assert _maxdiff(mse.backward(), pt.grad) < 1e-14


# ---------------------------------------------------------------- optimizers and schedules
OPTIMIZERS = {
    "sgd": (nn.SGD, torch.optim.SGD, dict(lr=0.1)),
    "sgd-momentum": (nn.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "sgd-dampening-wd": (nn.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.8, dampening=0.3, weight_decay=0.01)),
    "sgd-nesterov-wd": (nn.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adam": (nn.Adam, torch.optim.Adam, dict(lr=0.01)),
    "adam-wd": (nn.Adam, torch.optim.Adam, dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_steps_match_torch(name):
    ours_cls, torch_cls, kw = OPTIMIZERS[name]
    rng = np.random.default_rng(0)
    init = [rng.standard_normal((3, 4)), rng.standard_normal(5)]
    params = [nn.Parameter(a.copy()) for a in init]
    tparams = [_t(a, True) for a in init]
    opt, topt = ours_cls(params, **kw), torch_cls(tparams, **kw)
    for step in range(6):
        for p, tp in zip(params, tparams):
            g = rng.standard_normal(p.data.shape)
            p.grad = g.copy()
            tp.grad = _t(g)
        if step == 3:  # a parameter without gradient is skipped by both
            params[1].grad = None
            tparams[1].grad = None
        opt.step()
        topt.step()
        for p, tp in zip(params, tparams):
            assert _maxdiff(p.data, tp) < 1e-13


def test_clip_grad_norm_matches_torch():
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((3, 3)), rng.standard_normal(4)]
    for max_norm, norm_type in ((0.5, 2.0), (100.0, 2.0), (0.3, float("inf")), (1.0, 1.0)):
        params = [nn.Parameter(np.zeros_like(g)) for g in grads]
        tparams = [_t(np.zeros_like(g), True) for g in grads]
        for p, tp, g in zip(params, tparams, grads):
            p.grad = g.copy()
            tp.grad = _t(g)
        total = nn.clip_grad_norm_(params, max_norm, norm_type=norm_type)
        ttotal = torch.nn.utils.clip_grad_norm_(tparams, max_norm, norm_type=norm_type)
        assert total == pytest.approx(ttotal.item(), rel=1e-12)
        for p, tp in zip(params, tparams):
            assert _maxdiff(p.grad, tp.grad) < 1e-14


@pytest.mark.parametrize("kind", ["step", "cosine"])
def test_schedulers_match_torch(kind):
    p = nn.Parameter(np.zeros(1))
    opt = nn.SGD([p], lr=0.3, momentum=0.9)
    topt = torch.optim.SGD([_t(np.zeros(1), True)], lr=0.3, momentum=0.9)
    if kind == "step":
        s, ts = nn.StepLR(opt, step_size=3, gamma=0.3), torch.optim.lr_scheduler.StepLR(topt, 3, gamma=0.3)
    else:
        s = nn.CosineAnnealingLR(opt, T_max=7, eta_min=0.01)
        ts = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=7, eta_min=0.01)
    for _ in range(10):
        assert opt.lr == pytest.approx(topt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        topt.step()
        s.step()
        ts.step()
        assert s.get_last_lr() == pytest.approx(ts.get_last_lr(), rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------- whole training steps
def _mlp():
    ours = nn.Sequential(nn.Linear(5, 8, dtype=np.float64, rng=0), nn.BatchNorm1d(8, dtype=np.float64), nn.ReLU(),
                         nn.Linear(8, 3, dtype=np.float64, rng=1))
    ref = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 3)).double()
    return ours, ref, (5,), lambda x: x, lambda g: g, {}


def _cnn(axis):
    ours = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, axis=axis, dtype=np.float64, rng=0), nn.BatchNorm2d(4, axis=axis, dtype=np.float64),
        nn.ReLU(), nn.MaxPool2d(2, axis=axis), nn.Flatten(), nn.Linear(4 * 3 * 3, 3, dtype=np.float64, rng=1),
    )
    ref = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(36, 3)).double()
    if axis == 1:
        return ours, ref, (2, 6, 7), lambda x: x, lambda g: g, {}

    # channels-last flattens (H, W, C): permute the Linear's input columns to torch's (C, H, W) order
    def fc_to_torch(w):
        return w.reshape(3, 3, 3, 4).transpose(0, 3, 1, 2).reshape(3, 36)

    return (ours, ref, (2, 6, 7), lambda x: x.transpose(0, 2, 3, 1), lambda g: g.transpose(0, 3, 1, 2),
            {"5.weight": fc_to_torch})


NETS = {"mlp": _mlp, "cnn-nchw": lambda: _cnn(1), "cnn-nhwc": lambda: _cnn(-1)}


def training_steps_maxdiff(net, opt_name, steps=3):
    """Run ``steps`` training steps in bnfast and torch; return the largest difference seen."""
    ours, ref, in_shape, to_ours, grad_to_torch, convert = NETS[net]()
    state = {k: torch.from_numpy(np.ascontiguousarray(convert.get(k, lambda v: v)(v)))
             for k, v in ours.state_dict().items()}
    ref.load_state_dict(state)
    ours_cls, torch_cls, kw = OPTIMIZERS[opt_name]
    opt, topt = ours_cls(ours.parameters(), **kw), torch_cls(ref.parameters(), **kw)
    loss, tloss = nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(42)
    worst = 0.0
    tparams = dict(ref.named_parameters())
    for _ in range(steps):
        x = rng.standard_normal((6,) + in_shape)
        y = rng.integers(0, 3, 6)
        out = ours(to_ours(x))
        value = loss(out, y)
        opt.zero_grad()
        gx = ours.backward(loss.backward())
        xt = _t(x, True)
        tout = ref(xt)
        tvalue = tloss(tout, torch.from_numpy(y))
        topt.zero_grad()
        tvalue.backward()
        worst = max(worst, abs(value - tvalue.item()), _maxdiff(out, tout), _maxdiff(grad_to_torch(gx), xt.grad))
        names = ours.named_parameters()
        assert [n for n, _ in names] == list(tparams)
        for name, p in names:  # gradients, by torch's names
            worst = max(worst, _maxdiff(convert.get(name, lambda a: a)(p.grad), tparams[name].grad))
        opt.step()
        topt.step()
        tstate = ref.state_dict()
        for name, v in ours.state_dict().items():
            worst = max(worst, _maxdiff(convert.get(name, lambda a: a)(v), tstate[name]))
    # eval mode agrees as well (running statistics)
    x = rng.standard_normal((4,) + in_shape)
    worst = max(worst, _maxdiff(ours.eval()(to_ours(x)), ref.eval()(_t(x))))
    return worst


@pytest.mark.parametrize("opt_name", ["sgd-momentum", "sgd-nesterov-wd", "adam", "adam-wd"])
@pytest.mark.parametrize("net", list(NETS))
def test_training_steps_match_torch(net, opt_name):
    worst = training_steps_maxdiff(net, opt_name)
    assert worst < TOL, f"{net} / {opt_name}: max difference {worst:.3g}"
    assert math.isfinite(worst)
