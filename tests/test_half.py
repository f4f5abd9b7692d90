"""float16 and bfloat16 input to the batch-norm ops and layers.

The half types are instantiations of the same kernels as float32: elements
are converted on load and store, the arithmetic is float32's and the
statistics are float32's (float64 sums of the same values), so

* the statistics, the running-statistics update and grad_weight/grad_bias of
  a half input are bit for bit those of the float32 input of the same values;
* every output element is the float32 path's result rounded once to the half
  type, within 1 ulp of the float64 reference rounded to the half type;
* conversions are exact (load) and correctly rounded (store) for every one
  of the 65536 bit patterns, in every SIMD variant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnfast
from bnfast import _kernels, _reference

try:
    import ml_dtypes
except ImportError:  # the optional dependency: bfloat16 cases skip
    ml_dtypes = None

BF16 = np.dtype(ml_dtypes.bfloat16) if ml_dtypes is not None else None
HALF = [
    pytest.param(np.dtype(np.float16), id="float16"),
    pytest.param(BF16, id="bfloat16",
                 marks=pytest.mark.skipif(BF16 is None, reason="ml_dtypes is not installed")),
]
HALF_TYPES = [np.dtype(np.float16)] + ([BF16] if BF16 is not None else [])


@pytest.fixture
def each_isa():
    """Runs the test body once per SIMD variant (a generator of names), restoring the one in use."""
    before = _kernels.simd_in_use()
    names = {"AVX2+FMA": "avx2", "AVX-512": "avx512"}

    def variants():
        for name in _kernels.simd_available():
            _kernels.select_isa(name)
            yield name

    try:
        yield variants
    finally:
        _kernels.select_isa(names.get(before, "baseline"))


def _bits(a):
    return np.asarray(a).view(np.uint16)


def _same(a, b):
    """Bit-identical, except that any NaN equals any NaN."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    na, nb = np.isnan(_f64(a)), np.isnan(_f64(b))
    return bool(np.array_equal(na, nb) and np.array_equal(np.where(na, 0, _raw(a)), np.where(nb, 0, _raw(b))))


def _unsigned_zeros(a):
    bits = _raw(a).copy()
    bits[(bits & 0x7FFF) == 0] = 0
    return bits.view(a.dtype)


def _f64(a):
    with np.errstate(invalid="ignore"):  # ml_dtypes warns on casting NaN
        return np.asarray(a).astype(np.float64)


def _raw(a):
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.itemsize])


def _data(shape, axis, dtype, offset=0.0, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = (rng.standard_normal(shape) * scale + offset).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2.0, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    return x, g, w, b


# ------------------------------------------------------------------ conversions


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape,axis", [((256, 256), 1), ((16, 16, 256), 1), ((64, 1024), -1)])
def test_every_bit_pattern_round_trips(dtype, shape, axis, each_isa):
    """Inference with mean 0, variance 1, eps 0 is the identity: every value
    (subnormals, infinities) comes back exactly, NaN stays NaN."""
    x = np.arange(65536, dtype=np.uint16).view(dtype).reshape(shape)
    C = shape[axis]
    for _ in each_isa():
        y = bnfast.batch_norm_inference(x, np.zeros(C, np.float32), np.ones(C, np.float32), eps=0.0, axis=axis)
        assert y.dtype == dtype
        xf, yf = _f64(x), _f64(y)
        nan = np.isnan(xf)
        assert np.array_equal(np.isnan(yf), nan)
        assert np.array_equal(yf[~nan], xf[~nan])  # -0 may come back as +0: equal values


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("scale", [1 / 3, 3.7, 1.37 * 2.0**-12, 2.0**-20, 1000.1, 6e4, 1 + 2.0**-11, 1 + 2.0**-8])
def test_every_value_rounds_to_nearest_even(dtype, scale, each_isa):
    """y = x * scale in float32, rounded once: NumPy's / ml_dtypes' cast of
    the float32 product (ties to even, subnormals, overflow to infinity)."""
    x = np.arange(65536, dtype=np.uint16).view(dtype).reshape(256, 256)
    x = x[np.isfinite(x.astype(np.float32)).all(axis=1)]
    C = x.shape[1]
    w = np.full(C, scale, np.float32)
    with np.errstate(over="ignore"):
        expected = _unsigned_zeros((x.astype(np.float32) * w).astype(dtype))
    zero, one = np.zeros(C, np.float32), np.ones(C, np.float32)
    for _ in each_isa():
        # (the sign of a zero depends on whether x * w + 0 is fused: not compared)
        y = bnfast.batch_norm_inference(x, zero, one, w, eps=0.0, axis=1)  # channels-last
        assert _same(_unsigned_zeros(y), expected)
        yt = bnfast.batch_norm_inference(np.ascontiguousarray(x.T), zero, one, w, eps=0.0, axis=0)  # planar
        assert _same(_unsigned_zeros(yt), np.ascontiguousarray(expected.T))


# ------------------------------------------------------------ against float32


def _ops(x, g, w, b, axis, rm, rv):
    y, mean, invstd = bnfast.batch_norm_forward(x, w, b, rm, rv, axis=axis)
    yi = bnfast.batch_norm_inference(x, rm, rv, w, b, axis=axis)
    gi, gw, gb = bnfast.batch_norm_backward(g, x, mean, invstd, w, axis=axis)
    ge, gwe, gbe = bnfast.batch_norm_backward(g, x, rm, invstd, w, training=False, axis=axis)
    m = bnfast.moments(x, axis=axis)
    return dict(y=y, mean=mean, invstd=invstd, rm=rm, rv=rv, yi=yi, gi=gi, gw=gw, gb=gb, ge=ge, gwe=gwe,
                gbe=gbe, count=m.count, mmean=m.mean, m2=m.m2)


def _run_both(shape, axis, dtype, offset=0.0, scale=1.0, seed=0):
    x, g, w, b = _data(shape, axis, dtype, offset, scale, seed)
    C = shape[axis]
    half = _ops(x, g, w, b, axis, np.full(C, 0.5, np.float32), np.full(C, 2.0, np.float32))
    f32 = _ops(x.astype(np.float32), g.astype(np.float32), w, b, axis, np.full(C, 0.5, np.float32),
               np.full(C, 2.0, np.float32))
    return x, g, w, b, half, f32


FULL = ("y", "yi", "gi", "ge")  # the full-size outputs; the rest is per channel


def _check_against_float32(half, f32, dtype):
    for name, value in half.items():
        if name in FULL:
            assert value.dtype == dtype, name
            assert _same(value, f32[name].astype(dtype)), name  # the float32 result, rounded once
        else:
            assert value.dtype == f32[name].dtype, name  # float32 per channel, float64/int64 moments
            assert _same(value, f32[name]), name  # the same statistics, bit for bit


layouts = st.sampled_from([
    ((2, 3, 5, 7), 1), ((2, 5, 7, 3), -1), ((40, 9), 1), ((3, 17, 70), 1), ((6, 40, 3), -1),
    ((2, 3, 2, 5, 4), 1), ((130, 3), 1), ((4, 70, 33), 1),
])


@pytest.mark.parametrize("dtype", HALF)
@settings(max_examples=15)
@given(layout=layouts, offset=st.sampled_from([0.0, 10.0, -300.0, 1000.0]),
       scale=st.sampled_from([1.0, 1e-2, 30.0]), seed=st.integers(0, 2**16))
def test_half_is_float32_rounded_once(dtype, layout, offset, scale, seed):
    shape, axis = layout
    *_, half, f32 = _run_both(shape, axis, dtype, offset, scale, seed)
    _check_against_float32(half, f32, dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_every_variant_is_float32_rounded_once(dtype, each_isa):
    """Sizes past the parallel threshold and streaming stores included."""
    cases = [((4, 8, 9, 7), 1), ((4, 9, 7, 8), -1), ((33, 20), 1), ((2, 3, 300, 70), 1),
             ((24, 64, 14, 14), 1), ((24, 14, 14, 64), -1), ((5, 37, 3), -1)]
    try:
        for stream in (None, 0):
            _kernels.set_stream_threshold(stream)
            for _ in each_isa():
                for shape, axis in cases:
                    *_, half, f32 = _run_both(shape, axis, dtype, offset=5.0, scale=3.0)
                    _check_against_float32(half, f32, dtype)
    finally:
        _kernels.set_stream_threshold(None)


# ------------------------------------------------------------ against float64


def _reference_ops(x, g, w, b, axis, half):
    C = x.shape[axis]
    ry, rmean, rinv, rrm, rrv = _reference.batch_norm_forward(
        x, w, b, np.full(C, 0.5), np.full(C, 2.0), axis=axis)
    ryi = _reference.batch_norm_inference(x, half["rm"], half["rv"], w, b, axis=axis)
    rgi, rgw, rgb = _reference.batch_norm_backward(g, x, half["mean"], half["invstd"], w, axis=axis)
    return ry, rmean, rinv, rrm, rrv, ryi, rgi


def _within_bound(y, ref, terms):
    """The documented bound: within 1 ulp of the correctly rounded reference,
    plus float32's rounding of the terms y is summed from (``terms`` >= |x_hat
    * weight| + |bias|): only an output much smaller than its terms (x_hat *
    weight close to -bias) can be 2 ulps off."""
    ulps = _reference.half_ulps(y, ref)
    err = np.abs(_f64(y) - ref)
    bits, min_exp = {"float16": (11, -24), "bfloat16": (8, -133)}[y.dtype.name]
    spacing = np.ldexp(1.0, np.maximum(np.frexp(ref)[1] - bits, min_exp))
    return bool(np.all((ulps <= 1) | (err <= spacing + 2.0**-22 * terms)))


@pytest.mark.parametrize("dtype", HALF)
@settings(max_examples=15)
@given(layout=layouts, offset=st.sampled_from([0.0, 10.0, -300.0, 1000.0]),
       scale=st.sampled_from([1.0, 1e-2, 30.0]), seed=st.integers(0, 2**16))
def test_within_one_ulp_of_the_float64_reference(dtype, layout, offset, scale, seed):
    shape, axis = layout
    x, g, w, b, half, _ = _run_both(shape, axis, dtype, offset, scale, seed)
    ry, rmean, rinv, rrm, rrv, ryi, rgi = _reference_ops(x, g, w, b, axis, half)
    C = x.shape[axis]
    shape_c = [1] * x.ndim
    shape_c[axis] = C
    b64 = np.abs(b.astype(np.float64)).reshape(shape_c)
    assert _within_bound(half["y"], ry, np.abs(ry) + 2 * b64)
    assert _within_bound(half["yi"], ryi, np.abs(ryi) + 2 * b64)
    # the statistics: float32's own accuracy (within 1 float32 ulp of float64)
    for value, ref in ((half["mean"], rmean), (half["invstd"], rinv), (half["rm"], rrm), (half["rv"], rrv)):
        tol = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64) + 1e-30
        assert np.all(np.abs(value - ref) <= tol)
    # backward: each term of grad_in within 1 ulp; a sum of terms that cancel
    # is judged on the terms' scale (the float32 path's error, rounded once)
    scale_g = np.abs(rgi).max()
    err = np.abs(half["gi"].astype(np.float64) - rgi)
    ulps = _reference.half_ulps(half["gi"], rgi)
    assert np.all((ulps <= 1) | (err <= 1e-5 * scale_g)), ulps.max()


@pytest.mark.parametrize("dtype", HALF)
def test_offsets_keep_statistics_exact(dtype):
    """Large offsets: the mean and variance of the half values are as exact
    as for float32 input (1 float32 ulp of the float64 values)."""
    rng = np.random.default_rng(3)
    offset = 1e3 if dtype == np.float16 else 1e6
    x = (offset + rng.standard_normal((64, 8, 40)) * 4).astype(dtype)
    y, mean, invstd = bnfast.batch_norm_forward(x)
    _, rmean, rinv, _, _ = _reference.batch_norm_forward(x)
    assert np.all(np.abs(mean - rmean) <= np.spacing(np.float32(offset)))
    assert np.allclose(invstd, rinv, rtol=2.0**-23, atol=0)
    ry, *_ = _reference.batch_norm_forward(x)
    assert _within_bound(y, ry, np.abs(ry))


# --------------------------------------------------------------- threads, ISAs


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape,axis", [((16, 32, 24, 24), 1), ((16, 24, 24, 32), -1), ((2048, 130), 1)])
def test_bit_identical_for_any_thread_count(dtype, shape, axis):
    x, g, w, b = _data(shape, axis, dtype, offset=3.0)
    C = shape[axis]
    results = []
    for n in (1, 2, 3):
        bnfast.set_num_threads(n)
        results.append(_ops(x, g, w, b, axis, np.zeros(C, np.float32), np.ones(C, np.float32)))
    for other in results[1:]:
        for name in results[0]:
            assert _same(results[0][name], other[name]), name


_VARIANT = textwrap.dedent(
    r"""
    import hashlib, json, sys
    import numpy as np, ml_dtypes, bnfast
    from bnfast import _kernels, _reference
    digest, worst, grads = hashlib.sha256(), 0.0, {}
    rng = np.random.default_rng(0)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        for shape, axis in (((4, 8, 9, 7), 1), ((4, 9, 7, 8), -1), ((33, 20), 1), ((2, 3, 300, 70), 1),
                            ((24, 14, 14, 64), -1)):
            x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
            g = rng.standard_normal(shape).astype(dtype)
            C = shape[axis]
            w = rng.standard_normal(C).astype(np.float32)
            b = rng.standard_normal(C).astype(np.float32)
            rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
            y, mean, invstd = bnfast.batch_norm_forward(x, w, b, rm, rv, axis=axis)
            yi = bnfast.batch_norm_inference(x, rm, rv, w, b, axis=axis)
            # the ops after the forward from the reference's statistics: the
            # forward's own may differ in the last bit between the variants
            moments = bnfast.moments(x, axis=axis)
            m0 = moments.mean.astype(np.float32)
            s0 = (1.0 / np.sqrt(moments.m2 / moments.count + 1e-5)).astype(np.float32)
            out = [bnfast.batch_norm_inference(x, m0, 1.0 / s0**2, w, b, axis=axis)]
            out += [moments.m2]
            for a in out:
                digest.update(np.ascontiguousarray(a).tobytes())
            key = f"{np.dtype(dtype).name}{shape}"
            for training in (True, False):
                gi, gw, gb = bnfast.batch_norm_backward(g, x, m0, s0, w, training=training, axis=axis)
                for name, a in (("gi", gi.astype(np.float64).ravel()), ("gw", gw), ("gb", gb)):
                    grads[f"{key}{training} {name}"] = a
            ry, *_ = _reference.batch_norm_forward(x, w, b, axis=axis)
            ryi = _reference.batch_norm_inference(x, rm, rv, w, b, axis=axis)
            worst = max(worst, _reference.half_ulps(y, ry).max(), _reference.half_ulps(yi, ryi).max())
    np.savez(sys.argv[1], **grads)
    print(json.dumps({"in_use": _kernels.simd_in_use(), "digest": digest.hexdigest(), "ulps": worst}))
    """
)


@pytest.mark.skipif(BF16 is None, reason="ml_dtypes is not installed")
def test_forced_variants(tmp_path):
    """Every variant forced with BNFAST_FORCE_ISA, as a user would: within an
    ulp of the reference; from the same statistics the FMA variants (AVX2,
    AVX-512: the same double lanes, the same fused expressions) give the same
    bytes in inference and moments.  (The float blocks of the training
    forward's statistics and of the backward's gradient sums (both modes)
    have each variant's vector width: those sums may differ in their last
    bits, within their documented bound, and grad_input by an ulp; the SSE2
    baseline has no FMA: its float32 rounding, and so now and then a half
    result, differs.)"""
    results, grads = {}, []
    for isa in _kernels.simd_available():
        env = dict(os.environ, BNFAST_FORCE_ISA=isa)
        path = tmp_path / f"{isa}.npz"
        proc = subprocess.run([sys.executable, "-c", _VARIANT, str(path)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        results[isa] = json.loads(proc.stdout.strip().splitlines()[-1])
        with np.load(path) as saved:
            grads.append({key: saved[key] for key in saved.files})
    assert len({r["in_use"] for r in results.values()}) == len(results)
    assert all(r["ulps"] <= 1 for r in results.values()), [r["ulps"] for r in results.values()]
    fused = {r["digest"] for isa, r in results.items() if isa in ("avx2", "avx512")}
    assert len(fused) <= 1, {isa: r["digest"] for isa, r in results.items()}
    first, *others = grads
    for other in others:
        for key in (k[: -len(" gi")] for k in first if k.endswith(" gi")):
            gi, gw, gb = (first[f"{key} {name}"] for name in ("gi", "gw", "gb"))
            ogi, ogw, ogb = (other[f"{key} {name}"] for name in ("gi", "gw", "gb"))
            dtype = np.float16 if key.startswith("float16") else BF16
            ulps = _reference.half_ulps(ogi.astype(dtype), gi)
            assert ulps.max() <= 1, key
            # the sums' bound, (BN_FLUSH + 2) u of their terms' magnitudes, for
            # either side; g ~ N(0, 1), |xhat| < 10 here
            n = len(gi) / len(gw)
            assert np.allclose(ogb, gb, rtol=0, atol=2 * 10 * 2.0**-24 * n), key
            assert np.allclose(ogw, gw, rtol=0, atol=2 * 10 * 2.0**-24 * n * 10), key


# ------------------------------------------------------------------- PyTorch


def _torch_dtype(torch, dtype):
    return torch.float16 if dtype == np.float16 else torch.bfloat16


def _to_torch(torch, a):
    a = np.ascontiguousarray(a)
    if a.dtype == np.float16 or a.dtype.kind == "f":
        return torch.from_numpy(a)
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)


def _from_torch(t, dtype):
    t = t.detach().contiguous()
    if dtype == np.float16:
        return t.numpy()
    return t.view(__import__("torch").int16).numpy().view(dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape,axis", [((8, 6, 9, 7), 1), ((64, 12), 1), ((4, 5, 33), 1)])
def test_against_pytorch(dtype, shape, axis):
    torch = pytest.importorskip("torch")
    x, g, w, b = _data(shape, axis, dtype, offset=2.0, scale=3.0)
    C = shape[axis]
    rm, rv = np.full(C, 0.5, np.float32), np.full(C, 2.0, np.float32)
    y, mean, invstd = bnfast.batch_norm_forward(x, w, b, rm, rv, axis=axis)
    gi, gw, gb = bnfast.batch_norm_backward(g, x, mean, invstd, w, axis=axis)
    yi = bnfast.batch_norm_inference(x, rm, rv, w, b, axis=axis)

    tx = _to_torch(torch, x).requires_grad_(True)
    tw, tb = torch.from_numpy(w.copy()).requires_grad_(True), torch.from_numpy(b.copy()).requires_grad_(True)
    trm, trv = torch.full((C,), 0.5), torch.full((C,), 2.0)
    ty = torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, True, 0.1, 1e-5)
    ty.backward(_to_torch(torch, g))
    tyi = torch.nn.functional.batch_norm(tx.detach(), trm, trv, tw.detach(), tb.detach(), False, 0.1, 1e-5)
    assert ty.dtype == _torch_dtype(torch, dtype) and tx.grad.dtype == ty.dtype and tw.grad.dtype == torch.float32

    ry, *_ = _reference.batch_norm_forward(x, w, b, axis=axis)
    ryi = _reference.batch_norm_inference(x, rm, rv, w, b, axis=axis)
    rgi, rgw, rgb = _reference.batch_norm_backward(g, x, mean, invstd, w, axis=axis)
    # torch computes in float32 too and rounds once: within an ulp of the
    # reference each, so within 2 ulps of each other; bnfast within 1
    torch_y = _from_torch(ty, dtype)
    # torch's forward error (measured: up to ~200 ulps near zero in 2.13)
    # bounds the distance between the two, bnfast's own bound holds
    b64 = np.abs(b.astype(np.float64)).reshape([-1 if i == axis % x.ndim else 1 for i in range(x.ndim)])
    torch_err = np.abs(_f64(torch_y) - ry)
    assert _within_bound(y, ry, np.abs(ry) + 2 * b64)
    assert np.all(np.abs(_f64(y) - ry) <= torch_err + 2.0**-22 * (np.abs(ry) + 2 * b64)
                  + np.ldexp(1.0, np.frexp(ry)[1] - (11 if dtype == np.float16 else 8)))
    assert np.abs(_f64(yi) - _f64(_from_torch(tyi, dtype))).max() <= 2 * np.abs(torch_err).max() + 1e-2
    # running statistics (float32 in both), gradients of weight and bias (float32)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gw, tw.grad.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=1e-5, atol=1e-4)
    # grad_input: the error of each on the scale of the gradient's terms
    torch_gi = _from_torch(tx.grad, dtype).astype(np.float64)
    tol = 2.0 ** -(8 if dtype == np.float16 else 5) * np.abs(rgi).max()
    torch_err = np.abs(torch_gi - rgi).max()
    assert np.abs(gi.astype(np.float64) - rgi).max() <= max(torch_err, tol / 8)
    assert torch_err <= tol


# ------------------------------------------------------------------ layers


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("axis", [1, -1])
def test_float32_layer_takes_half_input(dtype, axis):
    x, g, _, _ = _data((8, 5, 6, 7), 1, dtype, offset=1.0)
    if axis == -1:
        x, g = np.ascontiguousarray(np.moveaxis(x, 1, -1)), np.ascontiguousarray(np.moveaxis(g, 1, -1))
    half, f32 = bnfast.BatchNorm2d(5, axis=axis), bnfast.BatchNorm2d(5, axis=axis)
    for layer in (half, f32):
        layer.weight[...] = np.linspace(0.5, 2, 5)
        layer.bias[...] = np.linspace(-1, 1, 5)
    for _ in range(2):  # training: the running statistics update twice
        y, y32 = half(x), f32(x.astype(np.float32))
        assert y.dtype == dtype and _same(y, y32.astype(dtype))
        gx, gx32 = half.backward(g), f32.backward(g.astype(np.float32))
        assert gx.dtype == dtype and _same(gx, gx32.astype(dtype))
    for name, value in half.state_dict().items():
        assert value.dtype == f32.state_dict()[name].dtype
        assert _same(value, f32.state_dict()[name]), name
    assert half.weight.grad.dtype == np.float32 and _same(half.weight.grad, f32.weight.grad)
    half.eval(), f32.eval()
    assert _same(half(x), f32(x.astype(np.float32)).astype(dtype))
    assert _same(half.backward(g), f32.backward(g.astype(np.float32)).astype(dtype))


@pytest.mark.parametrize("dtype", HALF)
def test_layer_dtype_rules(dtype):
    with pytest.raises(TypeError, match="float32 BatchNorm layer takes float16/bfloat16"):
        bnfast.BatchNorm2d(3, dtype=dtype)
    layer = bnfast.BatchNorm2d(3, dtype=np.float64)
    state = {k: v.copy() for k, v in layer.state_dict().items()}
    with pytest.raises(TypeError, match="half-precision input needs a float32 layer"):
        layer(np.ones((2, 3, 4, 4), dtype))
    for name, value in layer.state_dict().items():
        assert np.array_equal(value, state[name])


# --------------------------------------------------------------- bad input


@pytest.mark.parametrize("dtype", HALF)
def test_bad_input_is_refused_and_state_untouched(dtype):
    x, g, w, b = _data((4, 3, 5), 1, dtype)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    keep = rm.copy(), rv.copy()
    out = np.full(x.shape, 7, dtype)
    # half running statistics for half x: PyTorch updates them in the half
    # type; bnfast keeps running statistics in float32 only
    for bad in ({"running_var": np.ones(3, dtype)}, {"running_mean": np.zeros(3, dtype)}):
        args = {"running_mean": rm, "running_var": rv, **bad}
        with pytest.raises(TypeError, match="must be float32 for a"):
            bnfast.batch_norm_forward(x, w, b, args["running_mean"], args["running_var"], out=out)
        assert np.array_equal(rm, keep[0]) and np.array_equal(rv, keep[1])
        assert np.all(out.astype(np.float32) == 7)
    # float16 running_var for float32 x
    with pytest.raises(TypeError, match="dtype of the input"):
        bnfast.batch_norm_forward(x.astype(np.float32), w, b, rm, np.ones(3, dtype))
    assert np.array_equal(rv, keep[1])
    # mixed dtypes of x and grad_out; out of another dtype
    other = np.float32 if dtype == np.float16 else np.float16
    _, mean, invstd = bnfast.batch_norm_forward(x)
    with pytest.raises(TypeError, match="grad_out must have the dtype of x"):
        bnfast.batch_norm_backward(g.astype(other), x, mean, invstd)
    with pytest.raises(TypeError, match="grad_out must have the dtype of x"):
        bnfast.batch_norm_backward(g.astype(np.float32), x, mean, invstd)
    with pytest.raises(ValueError, match="out must have dtype"):
        bnfast.batch_norm_forward(x, w, b, rm, rv, out=np.empty(x.shape, np.float32))
    assert np.array_equal(rm, keep[0]) and np.array_equal(rv, keep[1])
    with pytest.raises(ValueError, match="out must have dtype"):
        bnfast.batch_norm_inference(x, rm, rv, out=np.empty(x.shape, other))
    # the normalization family does not take half precision
    with pytest.raises(TypeError, match="batch-norm ops only"):
        bnfast.layer_norm_forward(x, (5,))
    with pytest.raises(TypeError, match="batch-norm ops only"):
        bnfast.group_norm_forward(x, 1)


@pytest.mark.parametrize("dtype", HALF)
def test_half_per_channel_arguments_are_converted(dtype):
    """Read-only per-channel arguments may be given in any float type (float32 is used)."""
    x, g, w, b = _data((6, 3, 4), 1, dtype)
    y32w, m, s = bnfast.batch_norm_forward(x, w.astype(dtype), b.astype(dtype))
    y, m2, s2 = bnfast.batch_norm_forward(x, w.astype(dtype).astype(np.float32), b.astype(dtype).astype(np.float32))
    assert _same(y32w, y) and _same(m, m2) and _same(s, s2)


@pytest.mark.parametrize("dtype", HALF)
def test_strided_and_byte_order(dtype):
    x, g, w, b = _data((6, 4, 10), 1, dtype, offset=2.0)
    view = x[:, :, ::2]
    y, mean, invstd = bnfast.batch_norm_forward(view, w, b)
    y2, mean2, invstd2 = bnfast.batch_norm_forward(np.ascontiguousarray(view), w, b)
    assert _same(y, y2) and _same(mean, mean2) and _same(invstd, invstd2)
    gi, _, _ = bnfast.batch_norm_backward(g[:, :, ::2], view, mean, invstd, w)
    gi2, _, _ = bnfast.batch_norm_backward(np.ascontiguousarray(g[:, :, ::2]), np.ascontiguousarray(view), mean,
                                           invstd, w)
    assert _same(gi, gi2)
    if dtype == np.float16:
        swapped = x.astype(x.dtype.newbyteorder(">"))
        assert _same(bnfast.batch_norm_forward(swapped, w, b)[0], bnfast.batch_norm_forward(x, w, b)[0])


# --------------------------------------------------------------- benchmark


def test_half_bench_runs(tmp_path, capsys):
    """``bench --half`` at small sizes: a row per (case, half type), JSON written."""
    from bnfast import _bench

    path = tmp_path / "half.json"
    assert _bench.main(["--half", "--shapes", "2x3x4x4,8x16", "--threads", "1", "--no-torch", "--budget", "0",
                        "--rounds", "1", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert len(rows) == (2 + 1) * 3 * len(HALF_TYPES)  # (NCHW, NHWC; NC) x ops x half types
    assert {r["dtype"] for r in rows} == {d.name for d in HALF_TYPES}
    assert all(r["time_s"] > 0 and r["float32_s"] > 0 and r["torch_s"] is None for r in rows)
    assert "bfloat16" in capsys.readouterr().out or BF16 is None


@pytest.mark.parametrize("channels_last", [False, True])
def test_half_bench_torch_callables_match_bnfast(channels_last):
    """PyTorch's side of each ``--half`` case computes what bnfast computes."""
    torch = pytest.importorskip("torch")
    from bnfast import _bench_half

    rng = np.random.default_rng(0)
    x, g = rng.standard_normal((4, 3, 5, 6), dtype=np.float32), rng.standard_normal((4, 3, 5, 6), dtype=np.float32)
    if channels_last:
        x, g = np.ascontiguousarray(np.moveaxis(x, 1, -1)), np.ascontiguousarray(np.moveaxis(g, 1, -1))
    axis = -1 if channels_last else 1
    data = {"float32": (x, g)}
    data.update({d.name: (x.astype(d), g.astype(d)) for d in HALF_TYPES})
    for op in _bench_half.OPS:
        fns = _bench_half._fns(op, data, axis, torch, channels_last)
        for d in HALF_TYPES:
            ours = fns[d.name]()
            ours = ours[0] if isinstance(ours, tuple) else ours
            theirs = fns["torch_" + d.name]()
            theirs = theirs[0] if isinstance(theirs, tuple) else theirs
            if channels_last:  # back to the NHWC axis order of bnfast's result
                theirs = theirs.permute(0, *range(2, theirs.ndim), 1)
            t = theirs.detach().float().contiguous().numpy()
            np.testing.assert_allclose(_f64(ours), t, rtol=0, atol=0.05 if d.name == "bfloat16" else 0.01)


# ---- fused activations and residual (batch_norm_act_*) in half precision ----

_ACT_CASES = [("relu", True), ("leaky_relu", True), ("leaky_relu", False), ("elu", True),
              ("identity", True), ("identity", False)]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("act, with_x", _ACT_CASES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("axis", [1, -1])
def test_fused_ops_in_half_precision_follow_float32(dtype, act, with_x, residual, axis):
    """The fused forward is the float32 computation rounded once (bit for bit);
    its backward (from x, or in place from y) stays within a few half ulps of
    the float32 backward on the same values, per-channel results float32."""
    dt = np.dtype(dtype)
    rng = np.random.default_rng(11)
    shape = (4, 6, 5, 3) if axis == 1 else (4, 5, 3, 6)
    x = rng.standard_normal(shape).astype(dt)
    z = rng.standard_normal(shape).astype(dt) if residual else None
    g = rng.standard_normal(shape).astype(dt)
    w = (rng.random(6) + 0.5).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    rm32, rv32 = rm.copy(), rv.copy()

    def f32(a):
        return None if a is None else a.astype(np.float32)

    y, m, s = bnfast.batch_norm_act_forward(x, w, b, rm, rv, activation=act, residual=z, axis=axis)
    y32, m32, s32 = bnfast.batch_norm_act_forward(f32(x), w, b, rm32, rv32, activation=act,
                                                  residual=f32(z), axis=axis)
    assert y.dtype == dt and m.dtype == s.dtype == np.float32
    np.testing.assert_array_equal(y.view(np.uint16), y32.astype(dt).view(np.uint16))
    np.testing.assert_array_equal(m, m32)
    np.testing.assert_array_equal(rv, rv32)
    yi = bnfast.batch_norm_act_inference(x, rm, rv, w, b, activation=act, residual=z, axis=axis)
    yi32 = bnfast.batch_norm_act_inference(f32(x), rm, rv, w, b, activation=act, residual=f32(z), axis=axis)
    np.testing.assert_array_equal(yi.view(np.uint16), yi32.astype(dt).view(np.uint16))

    # the float32 reference backward on the very values the half backward sees
    gx, gw, gb, gz = bnfast.batch_norm_act_backward(g, y, m, s, w, b, activation=act, residual=z,
                                                    x=x if with_x else None, axis=axis)
    ref = bnfast.batch_norm_act_backward(f32(g), f32(y), m, s, w, b, activation=act, residual=f32(z),
                                         x=f32(x) if with_x else None, axis=axis)
    assert gx.dtype == dt and gw.dtype == gb.dtype == np.float32
    assert (gz is None) == (z is None) and (gz is None or gz.dtype == dt)
    u = 2.0**-11 if dt == np.float16 else 2.0**-8
    for got, want in zip((gx, gw, gb) + ((gz,) if z is not None else ()), ref):
        want = np.asarray(want, np.float64)
        err = np.abs(np.asarray(got, np.float64) - want).max()
        assert err <= 8 * u * np.abs(want).max(), (err, np.abs(want).max())


@pytest.mark.parametrize("dtype", HALF)
def test_fused_ops_half_bad_input(dtype):
    dt = np.dtype(dtype)
    x = np.ones((4, 3, 2, 2), dt)
    with pytest.raises(TypeError, match="residual"):
        bnfast.batch_norm_act_forward(x, residual=np.ones(x.shape, np.float32))
    rm, rv = np.zeros(3, np.float16), np.ones(3, np.float16)
    before = rm.copy(), rv.copy()
    with pytest.raises(TypeError):
        bnfast.batch_norm_act_forward(x, running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(rm, before[0])
    np.testing.assert_array_equal(rv, before[1])
