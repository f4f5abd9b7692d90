"""Runtime SIMD dispatch: every kernel variant this CPU runs gives the reference's answers.

Each variant runs in a subprocess with ``BNFAST_FORCE_ISA`` set, as a user
would force it, and checks every core op against the float64 reference, with
the default streaming threshold and with streaming stores for every output.
Also here: the detected cache sizes and the streaming threshold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import bnfast
from bnfast import _kernels

# BNFAST_FORCE_ISA name -> simd_in_use() name; "baseline" is the build's own
NAMES = {"avx2": "AVX2+FMA", "avx512": "AVX-512"}
SHORT = {v: k for k, v in NAMES.items()}


def _short_name(in_use: str) -> str:
    return SHORT.get(in_use, "baseline")


_CHECK = textwrap.dedent(
    r"""
    import json, sys
    import numpy as np
    import bnfast
    from bnfast import _kernels, _reference

    def err(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b) / (1.0 + np.abs(b)))) if a.size else 0.0

    rng = np.random.default_rng(0)
    worst = {}
    shapes = [((4, 8, 9, 7), 1), ((4, 9, 7, 8), -1), ((33, 20), 1), ((2, 3, 300, 70), 1),
              ((5, 37, 3), -1), ((3, 70, 1), 1), ((2, 5, 17, 4, 3), 1),
              ((24, 256, 14, 14), 1), ((24, 14, 14, 256), -1)]
    for threads, stream in ((1, None), (2, None), (1, 0), (2, 0)):  # 0: stream every output
        _kernels.set_stream_threshold(stream)
        bnfast.set_num_threads(threads)
        for dtype, tol in ((np.float32, 2e-4), (np.float64, 1e-10)):
            for shape, axis in shapes:
                x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
                g = rng.standard_normal(shape).astype(dtype)
                C = shape[axis]
                w = rng.standard_normal(C).astype(dtype)
                b = rng.standard_normal(C).astype(dtype)
                rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
                y, mean, invstd = bnfast.batch_norm_forward(x, w, b, rm, rv, axis=axis)
                ry, rmean, rinvstd, rrm, rrv = _reference.batch_norm_forward(
                    x, w, b, np.zeros(C), np.ones(C), axis=axis)
                yi = bnfast.batch_norm_inference(x, rmean, 1 / rinvstd**2 - 1e-5, w, b, axis=axis)
                gi, gw, gb = bnfast.batch_norm_backward(g, x, mean, invstd, w, axis=axis)
                rgi, rgw, rgb = _reference.batch_norm_backward(g, x, mean, invstd, w, axis=axis)
                ge, _, _ = bnfast.batch_norm_backward(g, x, mean, invstd, w, training=False, axis=axis)
                rge, _, _ = _reference.batch_norm_backward(g, x, mean, invstd, w, training=False,
                                                           axis=axis)
                m = bnfast.moments(x, axis=axis)
                axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
                x64 = x.astype(np.float64)
                errors = {
                    "forward": max(err(y, ry), err(mean, rmean), err(invstd, rinvstd)),
                    "running": max(err(rm, rrm), err(rv, rrv)),
                    "inference": err(yi, ry),
                    "backward": max(err(gi, rgi), err(gw, rgw) / 100, err(gb, rgb) / 100),
                    "backward_eval": err(ge, rge),
                    "moments": max(err(m.mean, x64.mean(axis=axes)), err(m.var(), x64.var(axis=axes))),
                }
                for op, e in errors.items():
                    if e > tol:
                        print(f"FAIL {op} {shape} axis={axis} {np.dtype(dtype).name} "
                              f"threads={threads} stream={stream}: {e:.3g} > {tol:g}", file=sys.stderr)
                        sys.exit(1)
                    worst[op] = max(worst.get(op, 0.0), e)
    print(json.dumps({"in_use": _kernels.simd_in_use(), "worst": worst}))
    """
)


def _run(isa: str) -> dict:
    env = dict(os.environ, BNFAST_FORCE_ISA=isa)
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_each_variant_matches_reference(isa):
    if isa not in _kernels.simd_available():
        pytest.skip(f"{isa} kernels are not available on this CPU or build")
    result = _run(isa)
    expected = NAMES.get(isa, _kernels.simd_compiled().split(",")[0])
    assert result["in_use"] == expected


def test_default_is_best_available():
    env = {k: v for k, v in os.environ.items() if k != "BNFAST_FORCE_ISA"}
    code = "from bnfast import _kernels; print(_kernels.simd_in_use())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    available = _kernels.simd_available()
    best = next((NAMES[n] for n in ("avx512", "avx2") if n in available), None)
    assert out.stdout.strip() == (best or _kernels.simd_compiled().split(",")[0])


def test_unknown_isa_warns_and_falls_back():
    env = dict(os.environ, BNFAST_FORCE_ISA="no-such-isa")
    code = (
        "import warnings\nwith warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n    from bnfast import _kernels\n"
        "print(any('BNFAST_FORCE_ISA' in str(x.message) for x in w), _kernels.simd_in_use())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    warned, _ = out.stdout.split(maxsplit=1)
    assert warned == "True", out.stdout + out.stderr


def test_select_isa_roundtrip():
    before = _kernels.simd_in_use()
    try:
        for name in _kernels.simd_available():
            _kernels.select_isa(name)
        with pytest.raises(ValueError):
            _kernels.select_isa("no-such-isa")
    finally:
        _kernels.select_isa(_short_name(before))
    assert _kernels.simd_in_use() == before


def test_avx512_listed_only_where_compiled():
    """The avx512 variant is offered exactly when it is compiled in; forcing it
    where it is not available must fail loudly, not run something else."""
    compiled = "AVX-512" in _kernels.simd_compiled().split(", ")[1:]
    if "avx512" in _kernels.simd_available():
        assert compiled
    else:
        with pytest.raises(ValueError, match="not available"):
            _kernels.select_isa("avx512")


def test_show_config_reports_isa(capsys):
    bnfast.show_config()
    out = capsys.readouterr().out
    assert "simd_compiled" in out and "simd_in_use" in out
    assert _kernels.simd_in_use() in out


def _sysfs_caches():
    """{level: bytes} of cpu0's data/unified caches from Linux sysfs, or {}."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    sizes = {}
    if not os.path.isdir(base):
        return sizes
    for entry in sorted(os.listdir(base)):
        if not entry.startswith("index"):
            continue
        try:
            with open(os.path.join(base, entry, "level")) as f:
                level = int(f.read())
            with open(os.path.join(base, entry, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or not text:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        sizes.setdefault(level, int(text.rstrip("KMG")) * scale)
    return sizes


def test_cache_sizes_match_the_os():
    sizes = _kernels.cache_sizes()
    assert set(sizes) == {"l1d", "l2", "l3"}
    known = [v for v in sizes.values() if v is not None]
    assert all(isinstance(v, int) and v > 0 for v in known)
    assert known == sorted(known), sizes  # L1d <= L2 <= L3
    sysfs = _sysfs_caches()
    if not sysfs:
        pytest.skip("no Linux sysfs cache information to compare with")
    for level, key in ((1, "l1d"), (2, "l2"), (3, "l3")):
        if level in sysfs:
            assert sizes[key] == sysfs[level], (key, sizes, sysfs)


def test_default_stream_threshold_is_twice_the_last_level_cache():
    env = {k: v for k, v in os.environ.items() if k != "BNFAST_STREAM_BYTES"}
    code = "from bnfast import _kernels; print(_kernels.stream_threshold())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    sizes = _kernels.cache_sizes()
    llc = sizes["l3"] or sizes["l2"]
    assert int(out.stdout) == (2 * llc if llc else 16 << 20), out.stderr


def test_stream_threshold_setter():
    before = _kernels.stream_threshold()
    try:
        assert _kernels.set_stream_threshold(12345) == 12345 == _kernels.stream_threshold()
        assert _kernels.set_stream_threshold(0) == 0
        assert _kernels.set_stream_threshold(None) == _kernels.stream_threshold() > 0
        with pytest.raises(ValueError):
            _kernels.set_stream_threshold(-1)
        with pytest.raises(TypeError):
            _kernels.set_stream_threshold(1.5)
    finally:
        _kernels.set_stream_threshold(before)


@pytest.mark.parametrize("value,expected", [("1000", 1000), ("0", 0), ("lots", None)])
def test_stream_bytes_environment_override(value, expected):
    env = dict(os.environ, BNFAST_STREAM_BYTES=value)
    env.pop("BNFAST_FORCE_ISA", None)
    code = (
        "import warnings\nwith warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n    from bnfast import _kernels\n"
        "print(_kernels.stream_threshold(), any('BNFAST_STREAM_BYTES' in str(x.message) for x in w))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    threshold, warned = out.stdout.split()
    if expected is None:  # ignored with a warning: the default
        assert warned == "True" and int(threshold) > 0, out.stdout + out.stderr
    else:
        assert (int(threshold), warned) == (expected, "False"), out.stdout + out.stderr


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_streamed_and_plain_stores_agree(layout):
    """The same call with and without streaming stores, in every variant:
    bit-identical outputs (odd shapes: peeled heads, straddled lines, tails)."""
    import numpy as np

    rng = np.random.default_rng(11)
    before_isa, before_threshold = _kernels.simd_in_use(), _kernels.stream_threshold()
    try:
        for isa in _kernels.simd_available():
            _kernels.select_isa(isa)
            for dtype in (np.float32, np.float64):
                for shape in ((5, 24, 19, 21), (2, 7, 64, 33)):
                    x = rng.standard_normal(shape).astype(dtype)
                    axis = 1
                    if layout == "NHWC":
                        x, axis = np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1
                    # an output 4 bytes off a cache line: every streamed row needs a peel
                    buf = np.empty(x.size + 16, dtype)
                    off = (-buf.ctypes.data // buf.itemsize + 1) % (64 // buf.itemsize)
                    out = buf[off: off + x.size].reshape(x.shape)
                    runs = []
                    for threshold in (2**62, 0):
                        _kernels.set_stream_threshold(threshold)
                        y = bnfast.batch_norm_forward(x, axis=axis)[0]
                        bnfast.batch_norm_forward(x, axis=axis, out=out)
                        gi = bnfast.batch_norm_backward(x[::-1].copy(), x, *bnfast.batch_norm_forward(x, axis=axis)[1:],
                                                        axis=axis)[0]
                        runs.append((y, out.copy(), gi))
                    for a, b in zip(*runs):
                        assert np.array_equal(a, b), (isa, dtype, shape)
    finally:
        _kernels.set_stream_threshold(before_threshold)
        _kernels.select_isa(_short_name(before_isa))


def test_show_config_reports_caches(capsys):
    cfg = bnfast._config.config()
    for key in ("cache_l1d", "cache_l2", "cache_l3", "stream_threshold"):
        assert key in cfg
    assert cfg["stream_threshold"] == _kernels.stream_threshold()
    bnfast.show_config()
    out = capsys.readouterr().out
    assert "cache_l3" in out and "stream_threshold" in out
