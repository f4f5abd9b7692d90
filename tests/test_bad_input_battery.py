"""A broad battery of bad arguments for every public entry point.

Each case replaces one argument of a valid call by a bad value and requires a
TypeError or ValueError (or, for layer state, KeyError where PyTorch raises
it) whose message names the argument, with every array of the call
unchanged.  Complements test_errors.py (the documented cases, with exact
exception types) by breadth: every argument times every kind of bad value.
"""

from __future__ import annotations

import numpy as np
import pytest

import bnfast

C = 3
SHAPE = (4, C, 5)


def _arrays(dtype=np.float32):
    rng = np.random.default_rng(0)
    return dict(
        x=rng.standard_normal(SHAPE).astype(dtype),
        grad_out=rng.standard_normal(SHAPE).astype(dtype),
        weight=rng.uniform(0.5, 2, C).astype(dtype),
        bias=rng.standard_normal(C).astype(dtype),
        running_mean=rng.standard_normal(C).astype(dtype),
        running_var=rng.uniform(0.5, 2, C).astype(dtype),
        save_mean=rng.standard_normal(C).astype(dtype),
        save_invstd=rng.uniform(0.5, 2, C).astype(dtype),
        out=np.full(SHAPE, 7.0, dtype),
    )


# positional names of each op, then its keyword-only names
SIGNATURES = {
    "batch_norm_forward": (["x", "weight", "bias", "running_mean", "running_var"],
                           ["momentum", "eps", "axis", "out"]),
    "batch_norm_inference": (["x", "running_mean", "running_var", "weight", "bias"],
                             ["eps", "axis", "out"]),
    "batch_norm_backward": (["grad_out", "x", "save_mean", "save_invstd", "weight"],
                            ["training", "axis", "out"]),
    "batch_norm": (["x", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"],
                   ["axis", "out"]),
    "moments": (["x"], ["axis"]),
}
SCALARS = dict(momentum=0.1, eps=1e-5, axis=1, training=True)

FULL = ["x", "grad_out", "out"]
VECTORS = ["weight", "bias", "running_mean", "running_var", "save_mean", "save_invstd"]
REQUIRED_VECTORS = {"batch_norm_inference": ["running_mean", "running_var"],
                    "batch_norm_backward": ["save_mean", "save_invstd"],
                    "batch_norm": ["running_mean", "running_var"]}  # training=True allows None, eval not

BAD_ARRAYS = {
    "str": "abc",
    "object": object(),
    "dict": {"a": 1},
    "ragged": [[1.0, 2.0], [3.0]],
    "complex": lambda a: a.astype(np.complex64),
    "int": lambda a: a.astype(np.int32),
    "bool": lambda a: a > 0,
    "float16": lambda a: a.astype(np.float16),
    "object-array": lambda a: a.astype(object),
    "0-d": lambda a: np.float32(1.0),
    "wrong-length": lambda a: np.ones(a.shape[:-1] + (a.shape[-1] + 1,), a.dtype),
    "extra-dim": lambda a: a[..., None],
    "empty": lambda a: np.ones((0,), a.dtype),
    "strings-array": lambda a: a.astype(str),
}
BAD_SCALARS = {
    "momentum": [-0.5, 2.0, float("nan"), float("inf"), "0.1", None, True, [0.1], np.array([0.1, 0.2]), 1j],
    "eps": [-1e-3, float("nan"), float("inf"), "1e-5", True, [1e-5], np.array([1e-5, 1e-5]), 1j,
            None],
    "axis": [3, -4, 2**63, -(2**63) - 1, 2**100, 1.0, "1", True, None, [1], np.float64(1)],
    "training": ["yes", None, 1, 0.0, [True], np.array([True, False])],
}


def _cases():
    for op, (positional, keywords) in SIGNATURES.items():
        names = positional + keywords
        for name in names:
            if name in FULL + VECTORS:
                for kind in BAD_ARRAYS:
                    if kind in ("wrong-length", "extra-dim") and name not in VECTORS:
                        continue  # for x any rank >= 2 is valid
                    state = op == "batch_norm_forward" and name in ("running_mean", "running_var")
                    if kind == "float16" and name in VECTORS and not state:
                        continue  # read-only per-channel arguments of any float dtype are converted
                    if kind == "float16" and op == "moments":
                        continue  # a float16 input is valid (tests/test_half.py); elsewhere it mixes dtypes
                    yield pytest.param(op, name, kind, id=f"{op}-{name}-{kind}")
                if name in REQUIRED_VECTORS.get(op, []) and op != "batch_norm":
                    yield pytest.param(op, name, "None", id=f"{op}-{name}-None")
            elif name in BAD_SCALARS:
                if op == "batch_norm" and name == "momentum":
                    continue  # ignored in eval mode; covered with training=True below
                for i, _ in enumerate(BAD_SCALARS[name]):
                    yield pytest.param(op, name, i, id=f"{op}-{name}-{i}")
    for i, _ in enumerate(BAD_SCALARS["momentum"]):
        yield pytest.param("batch_norm_train", "momentum", i, id=f"batch_norm_train-momentum-{i}")


def _bad_value(name, kind, arrays):
    if name in BAD_SCALARS and isinstance(kind, int):
        return BAD_SCALARS[name][kind]
    if kind == "None":
        return None
    bad = BAD_ARRAYS[kind]
    return bad(arrays[name]) if callable(bad) else bad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op,name,kind", list(_cases()))
def test_bad_argument_raises_clearly_and_changes_nothing(op, name, kind, dtype):
    arrays = _arrays(dtype)
    train = op == "batch_norm_train"
    fn = getattr(bnfast, "batch_norm" if train else op)
    positional, keywords = SIGNATURES["batch_norm" if train else op]
    values = {n: arrays.get(n, SCALARS.get(n)) for n in positional + keywords}
    if op == "batch_norm":
        values["training"] = False
    if train:
        values["training"] = True
    values[name] = _bad_value(name, kind, arrays)
    snapshot = {k: v.copy() for k, v in arrays.items()}
    args = [values[n] for n in positional]
    kwargs = {n: values[n] for n in keywords}
    with pytest.raises((TypeError, ValueError)) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    alias = {"grad_out": "grad_out", "out": "out"}.get(name, name)
    if name not in ("x",) and kind not in ("str", "object", "dict", "ragged"):
        assert alias in message or "axis" in message or "channel" in message, message
    for k, before in snapshot.items():
        np.testing.assert_array_equal(arrays[k], before, err_msg=f"{k} changed by a failed call")


LAYER_BAD = [
    ("num_features", 0, ValueError), ("num_features", -1, ValueError), ("num_features", 2.5, ValueError),
    ("num_features", "3", ValueError), ("num_features", True, ValueError), ("axis", 1.0, TypeError),
    ("axis", "1", TypeError), ("dtype", np.int32, TypeError), ("dtype", "float16", TypeError),
    ("dtype", None, TypeError),
]


@pytest.mark.parametrize("name,value,exc", LAYER_BAD)
def test_layer_constructor_rejects(name, value, exc):
    kwargs = {"num_features": C, name: value}
    with pytest.raises(exc):
        bnfast.BatchNorm1d(**kwargs)


@pytest.mark.parametrize("attr,value", [("eps", -1.0), ("eps", "x"), ("eps", True), ("momentum", 2.0),
                                        ("momentum", "0.1"), ("momentum", True)])
def test_layer_with_bad_hyperparameters_fails_at_forward_and_keeps_state(attr, value):
    bn = bnfast.BatchNorm1d(C)
    x = _arrays()["x"]
    bn(x)
    before = {k: v.copy() for k, v in bn.state_dict().items()}
    setattr(bn, attr, value)
    with pytest.raises((TypeError, ValueError), match=attr):
        bn(x)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize("key,value,exc", [
    ("running_mean", np.ones(C + 1), ValueError), ("running_var", "abc", TypeError),
    ("weight", np.ones((C, 1)), ValueError), ("num_batches_tracked", np.float32(1.0), TypeError),
    ("num_batches_tracked", np.int64(-3), ValueError), ("bias", np.array(["a"] * C), TypeError),
])
def test_load_state_dict_rejects_and_keeps_state(key, value, exc):
    bn = bnfast.BatchNorm1d(C)
    bn(_arrays()["x"])
    sd = {k: v.copy() for k, v in bn.state_dict().items()}
    sd[key] = value
    before = {k: v.copy() for k, v in bn.state_dict().items()}
    with pytest.raises(exc):
        bn.load_state_dict(sd)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
