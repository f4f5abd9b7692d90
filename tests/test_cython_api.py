"""Another Cython extension cimports bnfast's C API (bnfast/capi.pxd) and gets
the Python API's results: examples/cython/normalize.pyx, built here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import bnfast

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "cython")

pytest.importorskip("Cython")


@pytest.mark.skipif(not os.path.isdir(EXAMPLE) or not shutil.which("cc"), reason="needs the example and a C compiler")
def test_cython_extension_cimports_the_c_api(tmp_path):
    for name in ("normalize.pyx", "setup.py"):
        shutil.copy(os.path.join(EXAMPLE, name), tmp_path / name)
    env = dict(os.environ, CFLAGS="-O1 -DBN_NO_DISPATCH")  # one SIMD variant: a quick build
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(bnfast.__file__)), env.get("PYTHONPATH", "")])
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    code = (
        "import numpy as np, bnfast, normalize\n"
        "x = 1e4 + np.random.default_rng(0).standard_normal((4, 6, 50))\n"
        "y, m, i = normalize.normalize(x, 2)\n"
        "ry, rm, ri = bnfast.batch_norm_forward(x)\n"
        "print(float(abs(y - ry).max()), float(abs(m - rm).max()), float(abs(i - ri).max()))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    dy, dm, di = map(float, run.stdout.split())
    # the same algorithm; this build has the baseline SIMD variant only, whose contractions into
    # FMAs differ from the AVX-512 variant in the last bits
    assert dy <= 1e-10 and dm <= 1e-10 and di <= 1e-12
