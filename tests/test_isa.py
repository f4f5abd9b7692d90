"""Runtime SIMD dispatch: every kernel variant this CPU runs gives the reference's answers.

Each variant runs in a subprocess with ``BNFAST_FORCE_ISA`` set, as a user
would force it, and checks every core op against the float64 reference.
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
              ((24, 256, 14, 14), 1), ((24, 14, 14, 256), -1)]  # streamed outputs
    for threads in (1, 2):
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
                              f"threads={threads}: {e:.3g} > {tol:g}", file=sys.stderr)
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
