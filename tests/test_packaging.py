"""Release metadata: one version, SPDX license, LICENSE and CHANGELOG, the
cibuildwheel matrix, and what a build records about itself."""

from __future__ import annotations

import os
import re
import sys

import pytest

import bnfast
from bnfast import _config, _kernels, _version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    path = os.path.join(ROOT, "pyproject.toml")
    if not os.path.exists(path):
        pytest.skip("not run from a source tree or sdist")
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    with open(path, "rb") as f:
        return tomllib.load(f)


def test_version_is_single_sourced():
    assert bnfast.__version__ == _version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+)?(\.dev\d+)?", bnfast.__version__)
    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    attr = _pyproject()["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "bnfast._version.__version__"


def test_installed_metadata_matches():
    from importlib import metadata

    try:
        dist = metadata.distribution("bnfast")
    except metadata.PackageNotFoundError:
        pytest.skip("bnfast is not installed (source tree on PYTHONPATH)")
    if not os.path.samefile(os.path.dirname(str(dist.locate_file("bnfast/__init__.py"))),
                            os.path.dirname(bnfast.__file__)):  # fmt: skip
        pytest.skip("the installed bnfast is not the one imported")
    assert dist.version == bnfast.__version__
    assert dist.metadata["License-Expression"] == "BSD-3-Clause"


def test_license_and_changelog():
    pyproject = _pyproject()
    assert pyproject["project"]["license"] == "BSD-3-Clause"  # SPDX string, not the deprecated table
    requires = pyproject["build-system"]["requires"]
    setuptools_req = next(r for r in requires if r.startswith("setuptools"))
    minimum = tuple(int(v) for v in re.search(r">=\s*([\d.]+)", setuptools_req).group(1).split("."))
    assert minimum >= (77,), "license strings need setuptools >= 77"
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "BSD 3-Clause" in text and "bnfast developers" in text
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        headings = [line for line in f if line.startswith("## ")]
    assert headings[0].strip() == "## Unreleased"
    assert any(h.strip() == f"## {bnfast.__version__}" for h in headings)


def test_cibuildwheel_matrix():
    cibw = _pyproject()["tool"]["cibuildwheel"]
    assert cibw["build"].split() == [f"cp3{m}-*" for m in range(9, 14)]
    assert set(cibw["linux"]["archs"]) == {"x86_64", "aarch64"}
    assert {"x86_64", "arm64"} <= set(cibw["macos"]["archs"])
    assert cibw["macos"]["environment"]["BNFAST_NO_OPENMP"] == "1"  # Apple clang: no OpenMP
    assert cibw["test-command"] and cibw["test-requires"]


def test_build_records_openmp_and_threads():
    status = _config.openmp_status()
    if _kernels.openmp_enabled():
        assert status == "enabled"
    else:
        assert status.startswith("serial build")
        bnfast.set_num_threads(4)
        assert bnfast.get_num_threads() == 1
    assert _config.config()["threads"] == bnfast.get_num_threads()
