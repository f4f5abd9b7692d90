"""Module hooks and bnfast.nn.utils weight_norm / spectral_norm: against PyTorch step for
step, finite differences in float64, state dicts, optimizers and fit, bad input."""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest

from bnfast import nn
from bnfast.nn.utils import remove_spectral_norm, remove_weight_norm, spectral_norm, weight_norm


class Scale(nn.Module):
    """y = s * x, a minimal layer for the hook tests."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(np.array([2.0]))

    def forward(self, x):
        self._x = x
        return x * self.s

    def backward(self, g):
        self.s.grad = np.array([(g * self._x).sum()])
        return g * self.s.data


class Shifted(Scale):
    """A subclass whose backward calls super().backward: the hooks run once."""

    def backward(self, g):
        return super().backward(g) + 0.0


# ------------------------------------------------------------------------ hooks


def test_forward_hooks_order_replace_remove():
    m, calls = Scale(), []
    h1 = m.register_forward_pre_hook(lambda mod, args: calls.append("pre1") or (args[0] + 1,))
    m.register_forward_pre_hook(lambda mod, args: calls.append("pre0"), prepend=True)
    h3 = m.register_forward_hook(lambda mod, args, out: calls.append(("post", args[0][0], out[0])) or out * 10)
    y = m(np.array([1.0]))
    assert calls == ["pre0", "pre1", ("post", 2.0, 4.0)] and y[0] == 40.0
    assert m.forward(np.array([1.0]))[0] == 2.0  # calling forward directly runs no hook (as in torch)
    h1.remove()
    h1.remove()  # twice: nothing happens
    with h3:
        pass  # the context manager removes on exit
    calls.clear()
    assert m(np.array([1.0]))[0] == 2.0 and calls == ["pre0"]
    with pytest.raises(TypeError, match="callable"):
        m.register_forward_hook(3)


@pytest.mark.parametrize("cls", [Scale, Shifted])
def test_backward_hooks_run_once_around_every_backward(cls):
    m, seen = cls(), []
    m.register_full_backward_pre_hook(lambda mod, go: seen.append(("pre", go[0][0])) or (go[0] * 2,))

    def post(mod, gi, go):
        seen.append(("post", gi[0][0], go[0][0], mod.s.grad[0]))  # .grad is stored already
        return gi[0] + 1

    handle = m.register_full_backward_hook(post)
    model = nn.Sequential(m)
    model(np.array([3.0]))
    gx = model.backward(np.array([1.0]))  # through Sequential: the child's hooks run
    assert seen == [("pre", 1.0), ("post", 4.0, 2.0, 6.0)]
    assert gx[0] == 5.0
    handle.remove()
    seen.clear()
    assert m.backward(np.array([1.0]))[0] == 4.0 and seen == [("pre", 1.0)]


def test_backward_hooks_with_keyword_gradient():
    fc, seen = nn.Linear(2, 2, rng=0, dtype=np.float64), []
    fc(np.ones((1, 2)))
    fc.register_full_backward_pre_hook(lambda mod, go: seen.append(go[0].shape))
    fc.backward(grad_out=np.ones((1, 2)))
    assert seen == [(1, 2)]


def test_hooks_survive_deepcopy_and_pickle_of_weight_norm():
    fc = weight_norm(nn.Linear(3, 2, rng=0, dtype=np.float64))
    for clone in (copy.deepcopy(fc), pickle.loads(pickle.dumps(fc))):
        x = np.ones((2, 3))
        np.testing.assert_allclose(clone(x), fc(x))
        clone.backward(np.ones((2, 2)))
        assert clone.weight_v.grad is not None and fc.weight_v.grad is None  # its own parameters
        remove_weight_norm(clone)
        assert [n for n, _ in clone.named_parameters()] == ["bias", "weight"]
        assert "weight_g" in fc._parameters  # the original untouched


# ------------------------------------------------------------- finite differences


def _numeric(loss, a, h=1e-6):
    out = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        orig = a[i]
        a[i] = orig + h
        up = loss()
        a[i] = orig - h
        down = loss()
        a[i] = orig
        out[i] = (up - down) / (2 * h)
    return out


def _layers():
    return [
        (lambda: nn.Linear(4, 3, rng=0, dtype=np.float64), (5, 4)),
        (lambda: nn.Conv2d(2, 3, 2, rng=0, dtype=np.float64), (2, 2, 4, 4)),
    ]


@pytest.mark.parametrize("dim", [0, 1, None])
@pytest.mark.parametrize("make,xshape", _layers())
def test_weight_norm_gradients_finite_differences(make, xshape, dim):
    layer = weight_norm(make(), dim=dim)
    rng = np.random.default_rng(1)
    layer.weight_g.data[...] = rng.uniform(0.5, 2.0, layer.weight_g.shape)
    x = rng.standard_normal(xshape)
    R = rng.standard_normal(layer(x).shape)
    layer.backward(R)

    def loss():
        return float((layer(x) * R).sum())

    for p in (layer.weight_g, layer.weight_v, layer.bias):
        analytic = p.grad.copy()
        np.testing.assert_allclose(analytic, _numeric(loss, p), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dim", [None, 1])
@pytest.mark.parametrize("make,xshape", _layers())
def test_spectral_norm_gradients_finite_differences_eval(make, xshape, dim):
    """In eval mode u and v are constants, so sigma = u.Wv is the whole dependence on W."""
    layer = spectral_norm(make(), rng=2, dim=dim)
    layer(np.zeros(xshape))  # one training step of power iteration
    layer.eval()
    rng = np.random.default_rng(3)
    x = rng.standard_normal(xshape)
    R = rng.standard_normal(layer(x).shape)
    layer.backward(R)
    analytic = layer.weight_orig.grad.copy()
    u, v = layer.weight_u.copy(), layer.weight_v.copy()
    np.testing.assert_allclose(analytic, _numeric(lambda: float((layer(x) * R).sum()), layer.weight_orig),
                               rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(layer.weight_u, u)  # eval: no power iteration
    np.testing.assert_array_equal(layer.weight_v, v)


def test_spectral_norm_normalizes_and_power_iteration_converges():
    fc = spectral_norm(nn.Linear(6, 5, rng=0, dtype=np.float64), n_power_iterations=3, rng=0)
    for _ in range(30):
        fc(np.ones((1, 6)))
    assert abs(np.linalg.svd(fc.weight, compute_uv=False)[0] - 1.0) < 1e-8
    sigma = np.linalg.svd(fc.weight_orig, compute_uv=False)[0]
    np.testing.assert_allclose(fc.weight_u @ fc.weight_orig @ fc.weight_v, sigma, rtol=1e-10)


# ---------------------------------------------------------------------- PyTorch


def _torch():
    torch = pytest.importorskip("torch")
    warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    return torch


def _pair(torch, kind, seed):
    torch.manual_seed(seed)
    if kind == "linear":
        return torch.nn.Linear(5, 4), nn.Linear(5, 4, rng=0), (3, 5)
    return torch.nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 3, 3, padding=1, rng=0), (2, 2, 5, 5)


def _compare_steps(torch, t, b, xshape, steps, buffers=(), lr=0.1, tol=2e-5):
    """Forward, backward and an SGD step in both; outputs, input and parameter gradients,
    buffers and the updated parameters agree at every step."""
    opt_t = torch.optim.SGD(t.parameters(), lr=lr, momentum=0.9)
    opt_b = nn.SGD(b.parameters(), lr=lr, momentum=0.9)
    names = [n for n, _ in t.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in b.named_parameters())
    rng = np.random.default_rng(0)
    for _ in range(steps):
        x = rng.standard_normal(xshape).astype(np.float32)
        xt = torch.tensor(x, requires_grad=True)
        yt, yb = t(xt), b(x)
        np.testing.assert_allclose(yb, yt.detach().numpy(), rtol=tol, atol=tol)
        for name in buffers:
            np.testing.assert_allclose(getattr(b, name), getattr(t, name).numpy(), rtol=tol, atol=tol)
        g = rng.standard_normal(yb.shape).astype(np.float32)
        opt_t.zero_grad()
        opt_b.zero_grad()
        yt.backward(torch.tensor(g))
        np.testing.assert_allclose(b.backward(g), xt.grad.numpy(), rtol=tol, atol=tol)
        for name, p in t.named_parameters():
            np.testing.assert_allclose(getattr(b, name).grad, p.grad.numpy(), rtol=tol, atol=tol)
        opt_t.step()
        opt_b.step()
        for name, p in t.named_parameters():
            np.testing.assert_allclose(getattr(b, name), p.detach().numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dim", [0, 1, -1, None, -2])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_weight_norm_matches_torch(kind, dim):
    torch = _torch()
    t, b = _pair(torch, kind, 0)[:2]
    xshape = _pair(torch, kind, 0)[2]
    torch.nn.utils.weight_norm(t, dim=dim)
    weight_norm(b, dim=dim)
    sd = t.state_dict()
    assert list(b.state_dict()) == list(sd) == ["bias", "weight_g", "weight_v"]
    assert b.weight_g.shape == tuple(sd["weight_g"].shape)
    b.load_state_dict(sd)
    _compare_steps(torch, t, b, xshape, steps=3)
    b.eval()
    t.eval()
    x = np.ones(xshape, np.float32)
    np.testing.assert_allclose(b(x), t(torch.tensor(x)).detach().numpy(), rtol=2e-5, atol=2e-5)
    torch.nn.utils.remove_weight_norm(t)
    remove_weight_norm(b)
    assert list(b.state_dict()) == list(t.state_dict())
    np.testing.assert_allclose(b.weight, t.weight.detach().numpy(), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("n_power_iterations,dim", [(1, None), (3, None), (2, 1)])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_spectral_norm_matches_torch(kind, n_power_iterations, dim):
    torch = _torch()
    t, b, xshape = _pair(torch, kind, 1)
    torch.nn.utils.spectral_norm(t, n_power_iterations=n_power_iterations, dim=dim)
    spectral_norm(b, n_power_iterations=n_power_iterations, dim=dim, rng=5)
    assert b.weight_u.shape == tuple(t.weight_u.shape) and b.weight_v.shape == tuple(t.weight_v.shape)
    sd = t.state_dict()
    assert list(b.state_dict()) == list(sd) == ["bias", "weight_orig", "weight_u", "weight_v"]
    b.load_state_dict(sd)
    # every training forward repeats torch's power iteration (buffers compared after each)
    _compare_steps(torch, t, b, xshape, steps=4, buffers=("weight_u", "weight_v"))
    t.eval()
    b.eval()
    u = b.weight_u.copy()
    x = np.ones(xshape, np.float32)
    np.testing.assert_allclose(b(x), t(torch.tensor(x)).detach().numpy(), rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(b.weight_u, u)
    torch.nn.utils.remove_spectral_norm(t)
    remove_spectral_norm(b)
    assert list(b.state_dict()) == list(t.state_dict())
    np.testing.assert_allclose(b.weight, t.weight.detach().numpy(), rtol=2e-5, atol=1e-6)


def test_spectral_norm_state_dict_metadata_like_torch():
    torch = _torch()
    t = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.utils.spectral_norm(torch.nn.Linear(3, 2)))
    b = nn.Sequential(nn.Linear(3, 3, rng=0), spectral_norm(nn.Linear(3, 2, rng=1), rng=0))
    meta_t, meta_b = t.state_dict()._metadata, b.state_dict()._metadata
    assert meta_b["1"] == meta_t["1"] == {"version": 1, "spectral_norm": {"weight.version": 1}}
    assert "spectral_norm" not in meta_b["0"]
    b.load_state_dict(t.state_dict())  # torch's metadata is accepted
    remove_spectral_norm(b[1])
    assert "spectral_norm" not in b.state_dict()._metadata["1"]


# ------------------------------------------------------------- training with fit


@pytest.mark.parametrize("norm", [weight_norm, spectral_norm])
def test_fit_trains_the_reparametrized_parameters(norm):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    model = nn.Sequential(norm(nn.Linear(4, 8, rng=0)), nn.ReLU(), nn.Linear(8, 2, rng=1))
    params = {n: p.copy() for n, p in model.named_parameters()}
    assert ("0.weight_g" in params) == (norm is weight_norm) and ("0.weight_orig" in params) != (norm is weight_norm)
    hist = nn.fit(model, nn.CrossEntropyLoss(), nn.SGD(model.parameters(), lr=0.3), X, y, epochs=15,
                  batch_size=16, progress=False, seed=0)
    assert hist["loss"][-1] < hist["loss"][0]
    for n, p in model.named_parameters():
        assert not np.array_equal(p, params[n]), n


def test_state_dict_round_trip_and_parameters():
    a = weight_norm(nn.Conv2d(2, 3, 3, rng=0), dim=None)
    assert a.weight_g.shape == ()
    assert [n for n, _ in a.named_parameters()] == ["bias", "weight_g", "weight_v"]
    assert all(p is not a.weight for p in a.parameters())  # the computed weight is not trained
    b = weight_norm(nn.Conv2d(2, 3, 3, rng=1), dim=None)
    b.load_state_dict(a.state_dict())
    x = np.ones((1, 2, 4, 4), np.float32)
    np.testing.assert_array_equal(a(x), b(x))


# -------------------------------------------------------------------- bad input


def test_bad_input_and_module_unchanged():
    fc = nn.Linear(3, 2, rng=0)
    before = (list(fc.state_dict()), fc.weight.copy())

    def unchanged():
        assert list(fc.state_dict()) == before[0]
        np.testing.assert_array_equal(fc.weight, before[1])
        assert not fc._forward_pre_hooks and not fc._backward_hooks

    cases = [
        (lambda: weight_norm(fc, "nothing"), ValueError, "no parameter 'nothing'"),
        (lambda: weight_norm(fc, dim=2), ValueError, "out of range"),
        (lambda: weight_norm(fc, dim=0.5), TypeError, "dim must be an integer"),
        (lambda: weight_norm(fc, name=3), TypeError, "name must be a string"),
        (lambda: weight_norm(np.ones(3)), TypeError, "bnfast.nn.Module"),
        (lambda: spectral_norm(fc, n_power_iterations=0), ValueError, "positive"),
        (lambda: spectral_norm(fc, n_power_iterations=1.0), TypeError, "integer"),
        (lambda: spectral_norm(fc, eps=-1.0), ValueError, "eps"),
        (lambda: spectral_norm(fc, dim=-3), ValueError, "out of range"),
        (lambda: remove_weight_norm(fc), ValueError, "weight_norm of 'weight' not found"),
        (lambda: remove_spectral_norm(fc), ValueError, "spectral_norm of 'weight' not found"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
        unchanged()
    weight_norm(fc)
    state = list(fc.state_dict())
    for again in (lambda: weight_norm(fc), lambda: spectral_norm(fc, name="weight")):
        with pytest.raises(ValueError, match="two weight_norm/spectral_norm"):
            again()
        assert list(fc.state_dict()) == state
    with pytest.raises(ValueError, match="spectral_norm of 'weight' not found"):
        remove_spectral_norm(fc)
    remove_weight_norm(fc)
    assert list(fc.state_dict()) == ["bias", "weight"]
