"""bnfast BatchNorm layers against torch.nn.BatchNorm1d/2d/3d (skipped without torch).

Every comparison records its largest absolute difference in ``DIFFS``; at the
end of the module the table is printed (visible with ``pytest -s``) and
written as JSON to ``$BNFAST_TORCH_DIFFS`` (default: a file in the system
temporary directory) for the closing note.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bnfast  # noqa: E402

# comparison -> {"abs": max |ours - torch|, "rel": max of that / max |torch value| per array}
DIFFS: dict[str, dict[str, float]] = {}

TOL = {
    np.float32: dict(rtol=1e-4, atol=2e-5),
    np.float64: dict(rtol=1e-10, atol=1e-11),
}
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}
DTYPE_NAME = {np.float32: "float32", np.float64: "float64"}


def _np(t):
    return t.detach().cpu().numpy()


def compare(what, dtype, actual, expected):
    """Assert closeness and record the largest absolute difference."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == np.dtype(dtype), (what, actual.dtype)
    key = f"{what} [{DTYPE_NAME[dtype]}]"
    if actual.size:
        diff = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
        rel = diff / max(float(np.max(np.abs(expected.astype(np.float64)))), 1e-300)
        old = DIFFS.get(key, {"abs": 0.0, "rel": 0.0})
        DIFFS[key] = {"abs": max(old["abs"], diff), "rel": max(old["rel"], rel)}
    np.testing.assert_allclose(actual, expected, err_msg=what, **TOL[dtype])


@pytest.fixture(scope="module", autouse=True)
def _torch_single_thread():
    """Tiny tensors: torch's thread pool only fights other processes for the shared cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module", autouse=True)
def _report_diffs():
    yield
    if not DIFFS:
        return
    path = os.environ.get(
        "BNFAST_TORCH_DIFFS", os.path.join(tempfile.gettempdir(), "bnfast_layers_torch_diffs.json")
    )
    with open(path, "w") as f:
        json.dump(dict(sorted(DIFFS.items())), f, indent=1)
    print("\nlargest |bnfast - torch| per comparison (absolute, relative to max |torch|):")
    for k, v in sorted(DIFFS.items()):
        print(f"  {k:48s} {v['abs']:.3e}  {v['rel']:.3e}")
    print(f"(written to {path})")


CASES = [
    ("BatchNorm1d", (16, 5)),
    ("BatchNorm1d", (8, 5, 7)),
    ("BatchNorm2d", (4, 5, 6, 7)),
    ("BatchNorm3d", (2, 5, 3, 4, 5)),
]


def _to_layout(a, layout):
    """torch's channels-first array -> the array bnfast sees."""
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if layout == "last" else a


def _pair(cls_name, C, dtype, momentum, affine, track, layout, rng):
    tbn = getattr(torch.nn, cls_name)(
        C, momentum=momentum, affine=affine, track_running_stats=track, dtype=TORCH_DTYPE[dtype]
    )
    bn = getattr(bnfast, cls_name)(
        C, momentum=momentum, affine=affine, track_running_stats=track,
        axis=-1 if layout == "last" else 1, dtype=dtype,
    )
    if affine:  # start from non-trivial parameters, identical on both sides
        w = (1 + 0.5 * rng.standard_normal(C)).astype(dtype)
        b = (0.3 * rng.standard_normal(C)).astype(dtype)
        with torch.no_grad():
            tbn.weight.copy_(torch.from_numpy(w))
            tbn.bias.copy_(torch.from_numpy(b))
        bn.weight[...] = w
        bn.bias[...] = b
    return tbn, bn


def _step(tbn, bn, x, g, layout, dtype, phase, lr=0.05):
    """One forward/backward on both; compares outputs, gradients, buffers; SGD step."""
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = tbn(xt)
    yt.backward(torch.from_numpy(g))
    xm = _to_layout(x, layout)
    y = bn(xm)
    gx = bn.backward(_to_layout(g, layout))
    compare(f"output ({phase})", dtype, y, _to_layout(_np(yt), layout))
    compare(f"grad_input ({phase})", dtype, gx, _to_layout(_np(xt.grad), layout))
    if tbn.affine:
        compare(f"grad_weight ({phase})", dtype, bn.grad_weight, _np(tbn.weight.grad))
        compare(f"grad_bias ({phase})", dtype, bn.grad_bias, _np(tbn.bias.grad))
        with torch.no_grad():  # identical SGD step on both, so parameters keep evolving
            tbn.weight -= lr * tbn.weight.grad
            tbn.bias -= lr * tbn.bias.grad
        tbn.weight.grad = None
        tbn.bias.grad = None
        for p in bn.parameters():
            p.data -= (lr * p.grad).astype(p.data.dtype)
        compare("weight after SGD", dtype, bn.weight, _np(tbn.weight))
        compare("bias after SGD", dtype, bn.bias, _np(tbn.bias))
    else:
        assert bn.grad_weight is None and bn.grad_bias is None
    if tbn.track_running_stats:
        compare("running_mean", dtype, bn.running_mean, _np(tbn.running_mean))
        compare("running_var", dtype, bn.running_var, _np(tbn.running_var))
        assert bn.num_batches_tracked.shape == () and bn.num_batches_tracked.dtype == np.int64
        assert int(bn.num_batches_tracked) == int(tbn.num_batches_tracked)
    else:
        assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None


def _batch(rng, shape, dtype, step):
    C = shape[1]
    loc = np.reshape(3.0 * np.sin(np.arange(C) + step), (1, C) + (1,) * (len(shape) - 2))
    scale = np.reshape(0.5 + np.arange(C) * 0.4, (1, C) + (1,) * (len(shape) - 2))
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize("cls_name,shape", CASES, ids=[f"{c}{len(s)}D" for c, s in CASES])
def test_matches_torch_train_eval_train(cls_name, shape, momentum, affine, track, layout, dtype):
    rng = np.random.default_rng(zlib.crc32(repr((cls_name, shape, momentum, affine, track, layout)).encode()))
    tbn, bn = _pair(cls_name, shape[1], dtype, momentum, affine, track, layout, rng)
    for step in range(20):
        x = _batch(rng, shape, dtype, step)
        g = rng.standard_normal(shape).astype(dtype)
        _step(tbn, bn, x, g, layout, dtype, "train")
    tbn.eval()
    assert bn.eval() is bn and not bn.training
    for step in range(3):  # eval: running stats, constant-statistics gradients
        x = _batch(rng, shape, dtype, 100 + step)
        g = rng.standard_normal(shape).astype(dtype)
        _step(tbn, bn, x, g, layout, dtype, "eval")
    tbn.train()
    assert bn.train() is bn and bn.training
    for step in range(3):
        x = _batch(rng, shape, dtype, 200 + step)
        g = rng.standard_normal(shape).astype(dtype)
        _step(tbn, bn, x, g, layout, dtype, "train")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("axis", [2, 3, -2, -3])
def test_any_axis_batchnorm_matches_torch(axis, dtype):
    """BatchNorm(C, axis=k) on a 4-D array equals BatchNorm2d on the array with C moved to axis 1."""
    rng = np.random.default_rng(7)
    shape = (3, 4, 5, 6)  # torch layout N, C, H, W
    tbn, _ = _pair("BatchNorm2d", 4, dtype, 0.1, True, True, "first", rng)
    bn = bnfast.BatchNorm(4, axis=axis, dtype=dtype)
    bn.weight[...] = _np(tbn.weight)
    bn.bias[...] = _np(tbn.bias)
    for phase in ["train"] * 5 + ["eval"] * 2:
        if phase == "eval":
            tbn.eval()
            bn.eval()
        x = _batch(rng, shape, dtype, 0)
        g = rng.standard_normal(shape).astype(dtype)
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        yt = tbn(xt)
        yt.backward(torch.from_numpy(g))
        y = bn(np.moveaxis(x, 1, axis))
        gx = bn.backward(np.moveaxis(g, 1, axis))
        compare(f"any-axis output ({phase})", dtype, y, np.moveaxis(_np(yt), 1, axis))
        compare(f"any-axis grad_input ({phase})", dtype, gx, np.moveaxis(_np(xt.grad), 1, axis))
        compare(f"any-axis grad_weight ({phase})", dtype, bn.grad_weight, _np(tbn.weight.grad))
        tbn.weight.grad = tbn.bias.grad = None
        compare("any-axis running_var", dtype, bn.running_var, _np(tbn.running_var))


def _trained_torch(cls_name, C, dtype, affine, track, rng, shape):
    tbn = getattr(torch.nn, cls_name)(C, affine=affine, track_running_stats=track, dtype=TORCH_DTYPE[dtype])
    if affine:
        with torch.no_grad():
            tbn.weight.copy_(torch.from_numpy(rng.standard_normal(C)))
            tbn.bias.copy_(torch.from_numpy(rng.standard_normal(C)))
    for step in range(4):
        tbn(torch.from_numpy(_batch(rng, shape, dtype, step)))
    return tbn.eval()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("cls_name,shape", CASES[1:], ids=[c for c, _ in CASES[1:]])
def test_state_dict_torch_to_bnfast(cls_name, shape, affine, track, dtype):
    rng = np.random.default_rng(11)
    tbn = _trained_torch(cls_name, shape[1], dtype, affine, track, rng, shape)
    bn = getattr(bnfast, cls_name)(shape[1], affine=affine, track_running_stats=track, dtype=dtype)
    result = bn.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    assert result.missing_keys == [] and result.unexpected_keys == []
    sd = bn.state_dict()
    tsd = tbn.state_dict()
    assert list(sd) == list(tsd)
    for k in tsd:
        assert sd[k].shape == tuple(tsd[k].shape), k
        np.testing.assert_array_equal(sd[k], tsd[k].numpy())
    bn.eval()
    x = _batch(rng, shape, dtype, 9)
    compare("eval output after torch->bnfast load", dtype, bn(x), _np(tbn(torch.from_numpy(x))))
    # torch tensors themselves are accepted too (numpy.asarray converts them)
    bn2 = getattr(bnfast, cls_name)(shape[1], affine=affine, track_running_stats=track, dtype=dtype)
    bn2.load_state_dict(tbn.state_dict())
    for k, v in bn2.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("via_npz", [False, True], ids=["dict", "npz"])
def test_state_dict_bnfast_to_torch(affine, track, via_npz, dtype, tmp_path):
    rng = np.random.default_rng(12)
    shape = (4, 3, 5, 5)
    bn = bnfast.BatchNorm2d(3, affine=affine, track_running_stats=track, dtype=dtype)
    if affine:
        bn.weight[...] = rng.standard_normal(3)
        bn.bias[...] = rng.standard_normal(3)
    for step in range(5):
        bn(_batch(rng, shape, dtype, step))
    if via_npz:
        bn.save(tmp_path / "bn.npz")
        with np.load(tmp_path / "bn.npz") as f:
            state = {k: torch.from_numpy(f[k]) for k in f.files}
    else:
        state = {k: torch.from_numpy(v) for k, v in bn.state_dict().items()}
    tbn = torch.nn.BatchNorm2d(3, affine=affine, track_running_stats=track, dtype=TORCH_DTYPE[dtype])
    tbn.load_state_dict(state, strict=True)
    if track:
        assert int(tbn.num_batches_tracked) == 5
    bn.eval()
    tbn.eval()
    x = _batch(rng, shape, dtype, 9)
    compare("eval output after bnfast->torch load", dtype, bn(x), _np(tbn(torch.from_numpy(x))))
    # and the round trip back is exact
    bn2 = bnfast.BatchNorm2d(3, affine=affine, track_running_stats=track, dtype=dtype)
    bn2.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(bn2.state_dict()[k], v)


def test_rank_error_messages_match_torch():
    for cls_name, bad in [("BatchNorm1d", (2, 3, 4, 5)), ("BatchNorm2d", (2, 3, 4)), ("BatchNorm3d", (2, 3, 4, 5))]:
        x = np.zeros(bad, np.float32)
        with pytest.raises(ValueError) as theirs:
            getattr(torch.nn, cls_name)(3)(torch.from_numpy(x))
        with pytest.raises(ValueError) as ours:
            getattr(bnfast, cls_name)(3)(x)
        assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("cls_name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_repr_matches_torch(cls_name):
    for kwargs in [{}, dict(eps=1e-3, momentum=None, affine=False, track_running_stats=False), dict(bias=False)]:
        assert repr(getattr(bnfast, cls_name)(7, **kwargs)) == repr(getattr(torch.nn, cls_name)(7, **kwargs))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_bias_false_matches_torch(layout, dtype):
    """PyTorch 2.13's keyword-only bias=False: weight only, no bias in the state dict."""
    rng = np.random.default_rng(5)
    shape = (4, 3, 5, 6)
    tbn = torch.nn.BatchNorm2d(3, bias=False, dtype=TORCH_DTYPE[dtype])
    bn = bnfast.BatchNorm2d(3, bias=False, axis=-1 if layout == "last" else 1, dtype=dtype)
    assert bn.bias is None and bn.grad_bias is None and len(bn.parameters()) == 1
    assert list(bn.state_dict()) == list(tbn.state_dict())
    for phase in ["train"] * 4 + ["eval"] * 2:
        if phase == "eval":
            tbn.eval()
            bn.eval()
        x = _batch(rng, shape, dtype, 3)
        g = rng.standard_normal(shape).astype(dtype)
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        yt = tbn(xt)
        yt.backward(torch.from_numpy(g))
        y = bn(_to_layout(x, layout))
        gx = bn.backward(_to_layout(g, layout))
        compare(f"bias=False output ({phase})", dtype, y, _to_layout(_np(yt), layout))
        compare(f"bias=False grad_input ({phase})", dtype, gx, _to_layout(_np(xt.grad), layout))
        compare(f"bias=False grad_weight ({phase})", dtype, bn.grad_weight, _np(tbn.weight.grad))
        tbn.weight.grad = None
    bn.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
