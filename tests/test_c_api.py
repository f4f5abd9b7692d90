"""The headers (bnfast.get_include()) are a self-contained C (and C++) API: the
example program examples/c/normalize_nchw.c, which includes bnfast.h alone,
built with the system compiler with and without OpenMP, gives the Python API's
results; the version macros are the package's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import bnfast

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = bnfast.get_include()
SOURCE = os.path.join(os.path.dirname(HERE), "examples", "c", "normalize_nchw.c")
COMPILERS = [(cc, lang) for cc, lang in (("cc", "c"), ("c++", "c++")) if shutil.which(cc)]


@pytest.mark.skipif(not COMPILERS or not os.path.isfile(SOURCE), reason="needs a C compiler and the example")
@pytest.mark.parametrize("cc,lang", COMPILERS)
@pytest.mark.parametrize("openmp", [True, False])
def test_c_program_matches_python(tmp_path, cc, lang, openmp):
    exe = tmp_path / "forward"
    flags = ["-O2", "-fopenmp"] if openmp else ["-O2"]
    std = ["-std=c11"] if lang == "c" else []
    build = subprocess.run([cc, "-x", lang, *std, *flags, "-I", INCLUDE, SOURCE, "-o", str(exe), "-lm"],
                           capture_output=True, text=True)
    if build.returncode != 0 and openmp and "fopenmp" in build.stderr:
        pytest.skip("compiler without OpenMP")
    assert build.returncode == 0, build.stderr
    rng = np.random.default_rng(0)
    x = (1e3 + rng.standard_normal((3, 5, 7 * 9))).astype(np.float32)
    text = f"{x.shape[0]} {x.shape[1]} {x.shape[2]}\n" + "\n".join(f"{v:.9g}" for v in x.ravel())
    run = subprocess.run([str(exe)], input=text, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    values = np.array(run.stdout.split(), dtype=np.float32)
    y, mean, invstd = bnfast.batch_norm_forward(x)
    np.testing.assert_array_equal(values[: x.size].reshape(x.shape), y)
    np.testing.assert_array_equal(values[x.size :: 2], mean)
    np.testing.assert_array_equal(values[x.size + 1 :: 2], invstd)


def test_get_include_has_the_headers_and_the_version_is_the_packages():
    header = os.path.join(INCLUDE, "bnfast", "bnfast.h")
    assert os.path.isfile(header)
    text = open(header).read()
    numbers = {k: int(v) for k, v in re.findall(r"#define BNFAST_VERSION_(MAJOR|MINOR|PATCH) (\d+)", text)}
    assert f"{numbers['MAJOR']}.{numbers['MINOR']}.{numbers['PATCH']}" == bnfast.__version__
    assert f'#define BNFAST_VERSION "{bnfast.__version__}"' in text
