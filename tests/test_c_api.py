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
CONFIGS = [(cc, lang, openmp) for cc, lang in COMPILERS for openmp in (True, False)]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Every configuration's build, started at once: each compiles the whole
    header-only library (about 50 s), and side by side they take the cores
    together instead of one after another."""
    started = {}
    for cc, lang, openmp in CONFIGS:
        exe = tmp_path_factory.mktemp("c_api") / "forward"
        flags = ["-O2", "-fopenmp"] if openmp else ["-O2"]
        std = ["-std=c11"] if lang == "c" else []
        command = [cc, "-x", lang, *std, *flags, "-I", INCLUDE, SOURCE, "-o", str(exe), "-lm"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started[cc, lang, openmp] = exe, process
    yield started
    for _, process in started.values():
        process.kill()
        process.wait()


@pytest.mark.skipif(not COMPILERS or not os.path.isfile(SOURCE), reason="needs a C compiler and the example")
@pytest.mark.parametrize("cc,lang,openmp", CONFIGS)
def test_c_program_matches_python(builds, cc, lang, openmp):
    exe, process = builds[cc, lang, openmp]
    _, stderr = process.communicate(timeout=900)
    if process.returncode != 0 and openmp and "fopenmp" in stderr:
        pytest.skip("compiler without OpenMP")
    assert process.returncode == 0, stderr
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
