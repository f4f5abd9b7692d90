"""bnfast.nn.Module and Parameter: the one module contract, against torch.nn.Module where importable."""

from __future__ import annotations

import ast
import copy
import pathlib
import pickle
import types
from collections import OrderedDict

import numpy as np
import pytest

import bnfast
from bnfast import _functional, _kernels, nn
from bnfast.nn import IncompatibleKeys, Module, Parameter, StateDictError


def _torch():
    return pytest.importorskip("torch")


class Scale(Module):
    """y = s * x + t with a parameter, a persistent and a non-persistent buffer."""

    def __init__(self, n=3):
        super().__init__()
        self.s = Parameter(np.ones(n))
        self.register_buffer("t", np.zeros(n))
        self.register_buffer("scratch", np.zeros(n), persistent=False)
        self.plain = np.zeros(2)  # an ordinary attribute, not state

    def forward(self, x):
        self._x = x
        return x * self.s + self.t

    def backward(self, g):
        self.s.grad = (g * self._x).sum(axis=0)
        return g * self.s


def _cnn(rng=0):
    """Nested model: Conv2d, BatchNorm2d, ReLU, Sequential(Conv2d, BatchNorm2d), Flatten, Linear."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, rng=rng), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 4, 1, bias=False, rng=rng + 1), nn.BatchNorm2d(4, affine=False)),
        nn.Flatten(), nn.Linear(64, 5, rng=rng + 2),
    )


CNN_KEYS = [
    "0.weight", "0.bias",
    "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
    "3.0.weight",
    "3.1.running_mean", "3.1.running_var", "3.1.num_batches_tracked",
    "5.weight", "5.bias",
]


def _train_a_bit(model, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(2):
        y = model(rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
        model.backward(np.ones_like(y))
    return model


# ---------------------------------------------------------------- registration
def test_assignment_registers_and_getattr_finds():
    m = Scale()
    assert list(m._parameters) == ["s"] and list(m._buffers) == ["t", "scratch"]
    assert "s" not in vars(m) and "t" not in vars(m)  # they live in the registries
    assert isinstance(m.s, Parameter) and m.t is m._buffers["t"]
    assert "plain" in vars(m) and m.named_parameters() == [("s", m.s)]
    child = Scale()
    m.child = child
    assert m.child is child and m._modules["child"] is child
    m.register_module("other", Scale(2))
    m.add_module("none", None)
    assert [n for n, _ in m.named_children()] == ["child", "other"]
    assert {"s", "t", "child", "other"} <= set(dir(m))
    del m.child, m.t, m.s, m.plain
    assert list(m._modules) == ["other", "none"] and list(m._buffers) == ["scratch"]
    assert m._parameters == OrderedDict() and not hasattr(m, "plain")
    with pytest.raises(AttributeError, match="has no attribute 'child'"):
        m.child


def test_reassignment_and_in_place_copies():
    m = Scale()
    s, t = m.s, m.t
    m.s = np.array([1.0, 2.0, 3.0])  # an array into a registered parameter: copied in place
    m.t = [4, 5, 6]  # ints into a float buffer: same-kind cast
    assert m.s is s and m.t is t
    np.testing.assert_array_equal(s, [1, 2, 3])
    np.testing.assert_array_equal(t, [4, 5, 6])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        m.s = np.ones(4)
    with pytest.raises(TypeError, match="same-kind"):
        m.t = np.ones(3, complex)
    new = Parameter(np.zeros(3))
    m.s = new  # a Parameter replaces the object
    assert m.s is new and m.parameters() == [new]
    buf = np.ones(3)
    m.register_buffer("t", buf)  # registering again replaces the buffer object
    assert m.t is buf
    m.s = None  # an absent parameter: skipped by parameters() and state_dict()
    assert m.parameters() == [] and list(m.state_dict()) == ["t"]
    with pytest.raises(AttributeError, match="has no s"):
        m.s = np.ones(3)
    m.t = Parameter(np.ones(3))  # a Parameter turns a buffer name into a parameter, as in torch
    assert list(m._buffers) == ["scratch"] and list(m._parameters) == ["s", "t"]


@pytest.mark.parametrize("call,exc,match", [
    (lambda m: m.register_parameter("a.b", None), ValueError, "can't contain"),
    (lambda m: m.register_parameter("", None), ValueError, "empty"),
    (lambda m: m.register_buffer(1, None), TypeError, "string"),
    (lambda m: m.register_buffer("plain", np.ones(1)), ValueError, "already exists"),
    (lambda m: m.register_parameter("t", None), ValueError, "already exists"),
    (lambda m: m.register_buffer("forward", np.ones(1)), ValueError, "already exists"),
    (lambda m: m.register_buffer("b", [1.0]), TypeError, "numpy.ndarray"),
    (lambda m: m.register_buffer("b", Parameter(np.ones(1))), TypeError, "register_parameter"),
    (lambda m: m.register_parameter("p", [1.0]), TypeError, "Parameter"),
    (lambda m: m.add_module("c", object()), TypeError, "not a bnfast.nn.Module"),
])
def test_registration_errors(call, exc, match):
    m = Scale()
    with pytest.raises(exc, match=match):
        call(m)


def test_registration_before_init_and_module_slots():
    class Bad(Module):
        def __init__(self):
            self.w = Parameter(np.ones(1))

    with pytest.raises(AttributeError, match="before Module.__init__"):
        Bad()
    m = nn.Sequential(nn.ReLU())
    with pytest.raises(TypeError, match="child module '0'"):
        setattr(m, "0", np.ones(1))
    setattr(m, "0", None)
    assert m.children() == [] and len(m) == 1


def test_register_parameter_wraps_an_ndarray_sharing_memory():
    m = Module()
    a = np.arange(3.0)
    p = m.register_parameter("w", a)
    assert isinstance(p, Parameter) and m.w is p and np.shares_memory(p, a) and p.name == "w"


# ---------------------------------------------------------------- walking
def test_named_members_order_prefixes_and_recurse():
    model = _cnn()
    assert [n for n, _ in model.named_modules()] == ["", "0", "1", "2", "3", "3.0", "3.1", "4", "5"]
    assert [n for n, _ in model.named_children()] == ["0", "1", "2", "3", "4", "5"]
    assert [n for n, _ in model.named_parameters()] == [
        "0.weight", "0.bias", "1.weight", "1.bias", "3.0.weight", "5.weight", "5.bias"]
    assert [n for n, _ in model.named_buffers()] == [
        "1.running_mean", "1.running_var", "1.num_batches_tracked",
        "3.1.running_mean", "3.1.running_var", "3.1.num_batches_tracked"]
    assert [n for n, _ in model[3].named_parameters(prefix="block")] == ["block.0.weight"]
    assert [n for n, _ in model[3].named_modules(prefix="block")] == ["block", "block.0", "block.1"]
    assert model.named_parameters(recurse=False) == [] and model.buffers(recurse=False) == []
    assert [n for n, _ in model[1].named_parameters(recurse=False)] == ["weight", "bias"]
    assert model.modules()[0] is model and len(model.modules()) == 9
    assert all(isinstance(p, Parameter) for p in model.parameters())
    assert all(type(b) is np.ndarray for b in model.buffers())
    m = Scale()
    assert [n for n, _ in m.named_buffers()] == ["t", "scratch"]  # non-persistent included


def test_named_members_match_torch():
    torch = _torch()
    ours = _cnn()
    theirs = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Conv2d(8, 4, 1, bias=False), torch.nn.BatchNorm2d(4, affine=False)),
        torch.nn.Flatten(), torch.nn.Linear(64, 5),
    )
    for walker in ("named_modules", "named_children", "named_parameters", "named_buffers"):
        assert [n for n, _ in getattr(ours, walker)()] == [n for n, _ in getattr(theirs, walker)()], walker
    assert [n for n, _ in ours.named_parameters(prefix="m")] == [n for n, _ in theirs.named_parameters(prefix="m")]
    assert repr(ours) == repr(theirs)


def test_shared_modules_and_parameters_are_deduplicated():
    bn = nn.BatchNorm1d(4)
    fc = nn.Linear(4, 4, rng=0)
    model = nn.Sequential(fc, bn, nn.ReLU(), bn)
    assert [n for n, _ in model.named_modules()] == ["", "0", "1", "2"]
    assert [n for n, _ in model.named_modules(remove_duplicate=False)] == ["", "0", "1", "2", "3"]
    assert [n for n, _ in model.named_children()] == ["0", "1", "2"]
    assert len(model.parameters()) == 4 and len(model.buffers()) == 3
    # tied weights: one parameter, two registrations
    other = nn.Linear(4, 4, rng=1)
    other.weight = fc.weight
    tied = nn.Sequential(fc, other)
    assert [n for n, _ in tied.named_parameters()] == ["0.weight", "0.bias", "1.bias"]
    assert len(tied.named_parameters(remove_duplicate=False)) == 4
    # state_dict keeps every path (as PyTorch does)
    assert list(model.state_dict())[-3:] == ["3.running_mean", "3.running_var", "3.num_batches_tracked"]


def test_apply_order_and_train_eval_recursion():
    model = _cnn()
    seen = []
    assert model.apply(lambda m: seen.append(type(m).__name__)) is model
    assert seen == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "Sequential", "Flatten",
                    "Linear", "Sequential"]
    assert model.eval() is model and not any(m.training for m in model.modules())
    assert model.train() is model and all(m.training for m in model.modules())
    assert model[3].train(False) is model[3] and model.training and not model[3][1].training
    with pytest.raises(ValueError, match="boolean"):
        model.train("no")
    model.train(np.bool_(False))
    assert not model[1].training


def test_zero_grad():
    model = _train_a_bit(_cnn())
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    model.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads))
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_call_forward_and_abstract_methods():
    m = Scale()
    np.testing.assert_array_equal(m(np.ones((2, 3))), np.ones((2, 3)))
    assert type(m(np.ones(3))) is np.ndarray  # arithmetic with a Parameter gives a plain array
    with pytest.raises(NotImplementedError, match=r'Module \[Module\] is missing the required "forward"'):
        Module()(np.ones(1))
    with pytest.raises(NotImplementedError, match="backward"):
        Module().backward(np.ones(1))


def test_repr_nested_style():
    class Block(Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 3, rng=0)
            self.act = nn.ReLU()

        def extra_repr(self):
            return "width=3"

    model = nn.Sequential(Block(), nn.Dropout(0.25))
    assert repr(model) == (
        "Sequential(\n"
        "  (0): Block(\n"
        "    width=3\n"
        "    (fc): Linear(in_features=2, out_features=3, bias=True)\n"
        "    (act): ReLU()\n"
        "  )\n"
        "  (1): Dropout(p=0.25)\n"
        ")"
    )
    assert repr(Module()) == "Module()"


# ---------------------------------------------------------------- state_dict
def test_state_dict_order_copies_keep_vars_prefix_destination():
    model = _train_a_bit(_cnn())
    sd = model.state_dict()
    assert isinstance(sd, OrderedDict) and list(sd) == CNN_KEYS
    assert all(type(v) is np.ndarray for v in sd.values())
    assert not np.shares_memory(sd["0.weight"], model[0].weight)
    assert sd["1.num_batches_tracked"].dtype == np.int64 and int(sd["1.num_batches_tracked"]) == 2
    kv = model.state_dict(keep_vars=True)
    assert kv["0.weight"] is model[0].weight and kv["1.running_mean"] is model[1].running_mean
    assert list(model.state_dict(prefix="net.")) == ["net." + k for k in CNN_KEYS]
    dest = {"x": 1}
    assert model[1].state_dict(destination=dest, prefix="bn.") is dest
    assert list(dest) == ["x", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                          "bn.num_batches_tracked"]
    assert sd._metadata["1"] == {"version": 2} and sd._metadata["3.0"] == {"version": 1}
    m = Scale()
    assert list(m.state_dict()) == ["s", "t"]  # the non-persistent buffer is left out


def test_state_dict_keys_and_round_trip_match_torch():
    torch = _torch()
    ours = _train_a_bit(_cnn())
    theirs = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Conv2d(8, 4, 1, bias=False), torch.nn.BatchNorm2d(4, affine=False)),
        torch.nn.Flatten(), torch.nn.Linear(64, 5),
    )
    tsd = theirs.state_dict()
    sd = ours.state_dict()
    assert list(sd) == list(tsd) == CNN_KEYS
    assert all(sd[k].shape == tuple(tsd[k].shape) for k in sd)
    assert dict(sd._metadata) == dict(tsd._metadata)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    back = _cnn(rng=7)
    assert back.load_state_dict(theirs.state_dict()) == IncompatibleKeys([], [])
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])


def test_load_strict_and_non_strict_results():
    model = _cnn(rng=1)
    sd = _train_a_bit(_cnn()).state_dict()
    assert model.load_state_dict(sd) == IncompatibleKeys([], [])
    assert repr(model.load_state_dict(sd)) == "<All keys matched successfully>"
    bad = OrderedDict(sd)
    del bad["1.running_var"], bad["5.bias"]
    bad["1.extra"] = np.zeros(1)
    bad["9.weight"] = np.zeros(1)
    bad["3.0.bias"] = np.zeros(4)
    bad._metadata = sd._metadata
    with pytest.raises(StateDictError) as info:
        model.load_state_dict(bad)
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    assert str(info.value) == (
        "Error(s) in loading state_dict for Sequential:\n"
        '\tMissing key(s) in state_dict: "1.running_var", "5.bias".\n'
        '\tUnexpected key(s) in state_dict: "9.weight", "1.extra", "3.0.bias".'  # PyTorch's order
    )
    res = model.load_state_dict(bad, strict=False)
    assert res.missing_keys == ["1.running_var", "5.bias"]
    assert res.unexpected_keys == ["9.weight", "1.extra", "3.0.bias"]
    np.testing.assert_array_equal(model[1].running_mean, sd["1.running_mean"])
    with pytest.raises(TypeError, match="mapping"):
        model.load_state_dict([("0.weight", np.zeros(1))])


def test_load_results_match_torch():
    torch = _torch()
    theirs = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Conv2d(8, 4, 1, bias=False), torch.nn.BatchNorm2d(4, affine=False)),
        torch.nn.Flatten(), torch.nn.Linear(64, 5),
    )
    state = theirs.state_dict()
    for k in ("0.bias", "3.1.num_batches_tracked"):
        del state[k]
    state["3.extra"] = torch.zeros(1)
    state["head.weight"] = torch.zeros(1)
    ours = _cnn().load_state_dict(state, strict=False)
    want = theirs.load_state_dict(state, strict=False)
    assert ours.missing_keys == want.missing_keys and ours.unexpected_keys == want.unexpected_keys
    for model in (_cnn(), theirs):
        with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"0.bias\""):
            model.load_state_dict(state)


def test_torch_style_exception_handling():
    """Code written for PyTorch catches RuntimeError; bnfast's rule is ValueError: both work."""
    bn = nn.BatchNorm2d(3)
    for exc in (RuntimeError, ValueError):
        with pytest.raises(exc, match="size mismatch for weight"):
            bn.load_state_dict({**bn.state_dict(), "weight": np.ones(4)})


def _snapshot(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snap):
    now = model.state_dict()
    assert list(now) == list(snap)
    for k in snap:
        np.testing.assert_array_equal(now[k], snap[k])


@pytest.mark.parametrize("key,value,exc", [
    ("5.weight", np.zeros((5, 63)), StateDictError),  # the last entry, after good ones
    ("3.1.num_batches_tracked", np.array(-1), StateDictError),
    ("1.running_mean", np.array(["a"] * 8), TypeError),
    ("0.bias", np.zeros(8, complex), TypeError),
    ("1.num_batches_tracked", np.array(2.0), TypeError),
])
@pytest.mark.parametrize("strict", [True, False])
def test_failed_load_changes_nothing(key, value, exc, strict):
    model = _cnn(rng=3)
    refs = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    snap = _snapshot(model)
    sd = _train_a_bit(_cnn()).state_dict()
    sd[key] = value
    with pytest.raises(exc, match=key.replace(".", r"\.")):
        model.load_state_dict(sd, strict=strict)
    _assert_unchanged(model, snap)
    assert all(model.state_dict(keep_vars=True)[k] is v for k, v in refs.items())


def test_load_copies_in_place_and_casts():
    model = _cnn(rng=3)
    refs = list(model.state_dict(keep_vars=True).values())
    sd = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in _train_a_bit(_cnn()).state_dict().items()}
    model.load_state_dict(sd)
    assert all(a is b for a, b in zip(refs, model.state_dict(keep_vars=True).values()))
    assert model[0].weight.dtype == np.float32
    np.testing.assert_allclose(model[0].weight, sd["0.weight"], rtol=1e-7)


def test_num_batches_tracked_from_old_checkpoints():
    src = _train_a_bit(_cnn()).state_dict()
    old = {k: v for k, v in src.items() if not k.endswith("num_batches_tracked")}
    model = _cnn(rng=4)
    # no version metadata (old PyTorch checkpoints, comprehensions, .npz): a missing counter is 0
    assert model.load_state_dict(old) == IncompatibleKeys([], [])
    assert int(model[1].num_batches_tracked) == 0 and int(model[3][1].num_batches_tracked) == 0
    versioned = OrderedDict(old)
    versioned._metadata = src._metadata  # version 2: the counter must be there
    with pytest.raises(StateDictError, match='"1.num_batches_tracked", "3.1.num_batches_tracked"'):
        model.load_state_dict(versioned)
    versioned._metadata = OrderedDict((k, {"version": 1}) for k in src._metadata)
    assert model.load_state_dict(versioned).missing_keys == []


def test_num_batches_tracked_from_torch_v1_metadata():
    torch = _torch()
    tbn = torch.nn.BatchNorm2d(3)
    state = tbn.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    bn = nn.BatchNorm2d(3)
    bn.num_batches_tracked = 5
    assert bn.load_state_dict(state) == IncompatibleKeys([], [])
    assert int(bn.num_batches_tracked) == 0
    tbn.load_state_dict(state)  # torch agrees
    assert int(tbn.num_batches_tracked) == 0


def test_load_from_state_dict_override_point():
    class Renamed(Scale):
        _version = 2

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
            if local_metadata.get("version", 1) < 2 and prefix + "scale" in state_dict:
                state_dict[prefix + "s"] = state_dict.pop(prefix + "scale")  # version 1 called it "scale"
            super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    model = nn.Sequential(Renamed())
    old = {"0.scale": np.full(3, 2.0), "0.t": np.ones(3)}
    assert model.load_state_dict(old) == IncompatibleKeys([], [])
    np.testing.assert_array_equal(model[0].s, 2.0)
    assert old == {"0.scale": old["0.scale"], "0.t": old["0.t"]}  # the caller's mapping is untouched
    assert model.state_dict()._metadata["0"] == {"version": 2}


def test_save_load_round_trip(tmp_path):
    src = _train_a_bit(_cnn())
    src.save(tmp_path / "model.npz")
    dst = _cnn(rng=9)
    assert dst.load(tmp_path / "model.npz") is dst
    _assert_unchanged(dst, _snapshot(src))
    with np.load(tmp_path / "model.npz") as f:
        assert list(f.files) == CNN_KEYS
    np.savez(tmp_path / "pickled.npz", **{"0.weight": np.array([object()] * 2)})
    with pytest.raises(ValueError):  # allow_pickle=False
        dst.load(tmp_path / "pickled.npz")
    _assert_unchanged(dst, _snapshot(src))
    with pytest.raises(StateDictError, match='Unexpected key.*"1.weight"'):
        nn.Sequential(nn.Linear(2, 2)).load(tmp_path / "model.npz")


# ---------------------------------------------------------------- Parameter
def test_parameter_is_an_ndarray_with_grad():
    a = np.arange(4.0)
    p = Parameter(a)
    assert isinstance(p, np.ndarray) and p.grad is None and p.name == ""
    assert np.shares_memory(p, a)  # shares memory with an ndarray, like torch.nn.Parameter
    plain = np.asarray(p)
    assert type(plain) is np.ndarray and np.shares_memory(plain, a)
    assert p.data is p.data and type(p.data) is np.ndarray and np.shares_memory(p.data, a)
    for result in (p + 1, p * p, -p, np.sqrt(p), p @ np.ones((4, 2)), p > 1, np.concatenate([p, p]),
                   p.sum(keepdims=True)):
        assert type(result) is np.ndarray, type(result)
    assert type(p.sum()) is np.float64 and type(p[0]) is np.float64
    p.grad = np.ones(4)
    view = p[1:]
    assert isinstance(view, Parameter) and view.grad is None  # the gradient stays with p
    assert p.copy().grad is None and p.astype(np.float32).grad is None
    q = p
    q -= 0.5 * p.grad  # in place: still the same Parameter
    assert q is p and p.grad is not None
    np.testing.assert_array_equal(a, [-0.5, 0.5, 1.5, 2.5])
    np.add(p, 1, out=p)
    np.testing.assert_array_equal(a, [0.5, 1.5, 2.5, 3.5])
    p.data = [0, 0, 0, 1]  # copies into the same memory
    np.testing.assert_array_equal(a, [0, 0, 0, 1])
    with pytest.raises(ValueError, match="shape"):
        p.data = np.zeros(3)
    assert {p: 1}[p] == 1 and len({p, Parameter(a)}) == 2  # hashable by identity
    with pytest.raises(TypeError, match="numeric"):
        Parameter(np.array(["x"]))
    assert not np.shares_memory(Parameter([1.0, 2.0]), a)


def test_parameter_deepcopy_and_pickle_keep_grad():
    p = Parameter(np.arange(3.0), "w")
    p.grad = np.array([0.5, 1.0, 1.5])
    p.no_decay = True
    for q in (copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert type(q) is Parameter and q.name == "w" and q.no_decay is True
        np.testing.assert_array_equal(q, p)
        np.testing.assert_array_equal(q.grad, p.grad)
        assert not np.shares_memory(q, p) and q.grad is not p.grad
        assert type(q.data) is np.ndarray and np.shares_memory(q.data, q)
    pair = copy.deepcopy([p, p])
    assert pair[0] is pair[1]  # memo respected


def test_module_deepcopy_and_pickle():
    model = _train_a_bit(_cnn())
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(other[1].weight) is Parameter and other[1].weight is not model[1].weight
        np.testing.assert_array_equal(other[1].weight.grad, model[1].weight.grad)
        _assert_unchanged(other, _snapshot(model))
        x = np.ones((2, 3, 4, 4), np.float32)
        np.testing.assert_array_equal(other.eval()(x), model.eval()(x))
        model.train()


def test_optimizer_updates_in_place():
    model = nn.Sequential(nn.Linear(3, 4, rng=0), nn.BatchNorm1d(4))
    weight, data = model[1].weight, model[1].weight.data
    before = np.array(weight)
    opt = nn.SGD(model.parameters(), lr=0.1, momentum=0.9)
    y = model(np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32))
    model.backward(y)
    assert model[1].grad_weight is model[1].weight.grad is not None
    opt.step()
    assert model[1].weight is weight and weight.data is data and type(weight) is Parameter
    np.testing.assert_allclose(weight, before - 0.1 * weight.grad, rtol=1e-6)
    for cls in (nn.SGD, nn.Adam):
        cls(model.parameters(), lr=0.1).step()
    assert model.parameters()[0] is model[0].weight


# ---------------------------------------------------------------- fast path and layers
@pytest.fixture
def fast_path_calls(monkeypatch):
    calls = []
    proxy = types.SimpleNamespace(**{n: getattr(_kernels, n) for n in dir(_kernels) if not n.startswith("__")})
    for name in ("try_forward_train", "try_inference", "try_backward"):
        def wrapped(*args, _f=getattr(_kernels, name), _name=name, **kwargs):
            result = _f(*args, **kwargs)
            calls.append((_name, result is not None))
            return result
        setattr(proxy, name, wrapped)
    monkeypatch.setattr(_functional, "_kernels", proxy)
    return calls


@pytest.mark.parametrize("axis", [1, -1])
def test_layers_take_the_compiled_fast_path(fast_path_calls, axis):
    bn = nn.BatchNorm2d(4, axis=axis)
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 3) if axis == 1 else (2, 3, 3, 4)).astype(np.float32)
    bn(x)
    bn.backward(np.ones_like(x))
    bn.eval()(x)
    bn.backward(np.ones_like(x))
    assert fast_path_calls == [("try_forward_train", True), ("try_backward", True),
                               ("try_inference", True), ("try_backward", True)]


def test_functional_api_accepts_parameters():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    w, b = Parameter(rng.standard_normal(3).astype(np.float32)), Parameter(np.zeros(3, np.float32))
    got = bnfast.batch_norm_forward(x, w, b)
    want = bnfast.batch_norm_forward(x, np.asarray(w), np.asarray(b))
    for g, e in zip(got, want):
        assert type(g) is np.ndarray
        np.testing.assert_array_equal(g, e)


def test_batchnorm_attributes_are_registered_state():
    bn = nn.BatchNorm2d(3)
    assert [n for n, _ in bn.named_parameters()] == ["weight", "bias"]
    assert [n for n, _ in bn.named_buffers()] == ["running_mean", "running_var", "num_batches_tracked"]
    assert bn.weight is bn._parameters["weight"] and bn.running_var is bn._buffers["running_var"]
    x = np.ones((2, 3, 2, 2), np.float32)
    bn.backward(np.ones_like(bn(x)))
    assert bn.grad_weight is bn.weight.grad and bn.grad_bias is bn.bias.grad
    free = nn.BatchNorm1d(2, affine=False, track_running_stats=False)
    assert free.weight is None and free.running_mean is None and free.state_dict() == {}
    assert list(free._parameters) == ["weight", "bias"]  # declared as None, as in torch


def test_sequential_names_slices_and_contract():
    a, b, c = nn.ReLU(), nn.Flatten(), nn.Linear(2, 2, rng=0)
    seq = nn.Sequential(OrderedDict([("act", a), ("flat", b), ("fc", c)]))
    assert [n for n, _ in seq.named_children()] == ["act", "flat", "fc"] and seq[-1] is c
    part = seq[1:]
    assert isinstance(part, nn.Sequential) and list(part) == [b, c] and list(part.state_dict()) == ["fc.weight", "fc.bias"]
    assert nn.Sequential([a, b])[1] is b
    with pytest.raises(IndexError):
        seq[3]
    with pytest.raises(TypeError, match="layer contract"):
        nn.Sequential(a, lambda x: x)


# ---------------------------------------------------------------- recalibrate walks modules()
def test_recalibrate_patches_nothing_and_restores_on_failure():
    model = nn.Sequential(nn.Linear(3, 4, rng=0), nn.BatchNorm1d(4), nn.ReLU(),
                          nn.Sequential(nn.Linear(4, 2, rng=1), nn.BatchNorm1d(2)))
    bns = [model[1], model[3][1]]
    attrs = [set(vars(bn)) for bn in bns]
    snap = _snapshot(model)
    rng = np.random.default_rng(0)
    good = [rng.standard_normal((8, 3)).astype(np.float32) for _ in range(2)]

    def stream():
        yield from good
        raise RuntimeError("data loader failed")

    with pytest.raises(RuntimeError, match="data loader"):
        bnfast.recalibrate(model, stream())
    _assert_unchanged(model, snap)
    assert [set(vars(bn)) for bn in bns] == attrs  # no instance attribute added or left behind
    assert all(bn._moment_sink is None for bn in bns)
    bnfast.recalibrate([model], good)  # a list of roots works the same way
    assert [int(bn.num_batches_tracked) for bn in bns] == [2, 2]
    assert [set(vars(bn)) for bn in bns] == attrs


# ---------------------------------------------------------------- public names and import direction
def test_public_names():
    assert bnfast.Module is nn.Module is Module
    assert bnfast.Parameter is nn.Parameter is Parameter
    assert nn.BatchNorm2d is bnfast.BatchNorm2d and bnfast.nn.IncompatibleKeys is IncompatibleKeys
    assert bnfast.recalibrate is nn.recalibrate
    assert issubclass(bnfast.BatchNorm, Module) and issubclass(nn.Linear, Module)
    assert issubclass(StateDictError, ValueError) and issubclass(StateDictError, RuntimeError)
    for name in ("Module", "Parameter", "IncompatibleKeys", "StateDictError"):
        assert name in nn.__all__
    with pytest.raises(ImportError):
        __import__("bnfast.layers")


def test_nn_imports_only_downward():
    """bnfast.nn uses the functional API and the kernels' wrappers, never bnfast's top level or fold.

    ``bnfast.distributed`` (the MPI collectives over Moments) is a room below nn: it imports
    nothing of bnfast but ``_moments``.
    """
    allowed = {"_functional", "_fused", "_normalization", "_variants", "_parameter", "_moments", "distributed"}
    dist = pathlib.Path(nn.__file__).parent.parent / "distributed.py"
    for node in ast.walk(ast.parse(dist.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            assert node.level == 1 and node.module == "_moments", ("distributed.py", node.module)
    root = pathlib.Path(nn.__file__).parent
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                assert node.level == 2 and node.module in allowed, (path.name, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("bnfast") for a in node.names), path.name
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not node.module.startswith("bnfast"), (path.name, node.module)
