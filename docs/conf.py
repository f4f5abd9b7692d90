"""Sphinx configuration of bnfast's documentation.

Built by ``.ci/docs``.  At start-up this file generates, from the package as
it is imported (so nothing here goes stale when names are added):

* ``_api_lists.rst``: autosummary lists of ``bnfast.__all__``, of the
  ``__all__`` of every module listed there (``bnfast.nn``, ``bnfast.testing``)
  and of ``bnfast.nn.__all__``; ``api.rst`` includes it;
* ``_normalization_lists.rst``: the normalization functions and layers that
  exist in this version, for ``normalization.rst``;
* ``_generated/bench_*.rst``: tables from ``benchmarks/results/*.json``;
* ``_generated/demo.png`` and ``demo.txt``: ``python -m bnfast demo --plot``
  (run again only when the demo's source changes).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import bnfast
import bnfast.nn

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
GENERATED = DOCS / "_generated"
GENERATED.mkdir(exist_ok=True)

# -- project -------------------------------------------------------------------
project = "bnfast"
author = "the bnfast developers"
copyright = "the bnfast developers"
release = version = bnfast.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "numpydoc",
]
templates_path = ["_templates"]
exclude_patterns = ["_build", "_generated", "_api_lists.rst", "_normalization_lists.rst"]
# the generated lists are included by api.rst / normalization.rst; autosummary
# reads them itself to write the stub pages
autosummary_generate = ["api.rst", "_api_lists.rst"]
autodoc_typehints = "none"  # numpydoc's Parameters sections carry the types
autodoc_preserve_defaults = True  # dtype=np.float32, not <class 'numpy.float32'>
autodoc_member_order = "bysource"
# every public method has a docstring of its own (validate_docstrings.py); without
# inheritance an undocumented __call__ shows no "Call self as a function."
autodoc_inherit_docstrings = False
numpydoc_show_class_members = False  # members come from the class template
# numpydoc validation runs over every public docstring in validate_docstrings.py
# (called by .ci/docs), which also covers members the site does not render.

html_theme = "pydata_sphinx_theme"
html_title = f"bnfast {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "header_links_before_dropdown": 6,
}
# pages without sub-pages: no (empty) section navigation, the width to the text
html_sidebars = {page: [] for page in ("index", "installation", "performance", "guarantees", "c_api")}
html_static_path = ["_static"]
html_css_files = ["bnfast.css"]
html_show_sourcelink = False

doctest_global_setup = """
import numpy as np
import bnfast
"""

# -- generated lists -------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    """Write ``text`` unless the file already holds it (keeps Sphinx's caches)."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _kinds(module: types.ModuleType, names: list[str]):
    functions = [n for n in names if inspect.isroutine(getattr(module, n))]
    classes = [n for n in names if inspect.isclass(getattr(module, n))]
    return functions, classes


def _autosummary(names: list[str], template: str | None = None, toctree: bool = True) -> list[str]:
    lines = [".. autosummary::"]
    if toctree:
        lines.append("   :toctree: generated")
    if template:
        lines.append(f"   :template: {template}")
    lines.append("")
    lines += [f"   {n}" for n in names]
    return lines + [""]


def _heading(text: str, char: str) -> list[str]:
    return [text, char * len(text), ""]


def _module_section(module: types.ModuleType, exclude: dict[int, str]) -> list[str]:
    """Autosummary lists of ``module.__all__``; objects in ``exclude`` (by id) are linked only."""
    names = [n for n in module.__all__ if not isinstance(getattr(module, n), types.ModuleType)]
    own = [n for n in names if id(getattr(module, n)) not in exclude]
    again = [n for n in names if id(getattr(module, n)) in exclude]
    functions, classes = _kinds(module, own)
    lines = _heading(f"``{module.__name__}``", "-")
    lines += [f".. module:: {module.__name__}", ""]
    summary = (inspect.getdoc(module) or "").split("\n\n")[0].replace("\n", " ")
    if summary:
        lines += [summary, ""]
    if functions:
        lines += _heading("Functions", "~") + _autosummary(functions)
    if classes:
        lines += _heading("Classes", "~") + _autosummary(classes)  # _templates/autosummary/class.rst
    if again:
        links = ", ".join(f":obj:`{n} <{exclude[id(getattr(module, n))]}>`" for n in again)
        lines += [f"Also exported here, documented above: {links}.", ""]
    return lines


def generate_api_lists() -> None:
    modules = [bnfast] + [
        getattr(bnfast, n) for n in bnfast.__all__ if isinstance(getattr(bnfast, n), types.ModuleType)
    ]
    if bnfast.nn not in modules:
        modules.append(bnfast.nn)
    for module in modules:  # and the submodules listed in their __all__ (bnfast.nn.utils)
        modules += [getattr(module, n) for n in module.__all__
                    if isinstance(getattr(module, n), types.ModuleType) and getattr(module, n) not in modules]
    documented: dict[int, str] = {}
    lines = [".. generated by docs/conf.py from the modules' __all__; do not edit", ""]
    for module in modules:
        lines += _module_section(module, documented)
        for n in module.__all__:
            obj = getattr(module, n)
            if not isinstance(obj, types.ModuleType):
                documented.setdefault(id(obj), f"{module.__name__}.{n}")
    _write(DOCS / "_api_lists.rst", "\n".join(lines))
    return documented


NORMALIZATION_FAMILY = [
    "batch_norm", "batch_norm_forward", "batch_norm_backward", "batch_norm_inference",
    "layer_norm", "rms_norm", "group_norm", "instance_norm",
    "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "FilterResponseNorm2d",
]


def _normalization_names() -> list[str]:
    """The family above, then any other public ``*_norm`` or ``*Norm``/``*Norm<k>d``."""
    public = [n for m in (bnfast, bnfast.nn) for n in getattr(m, "__all__", ())]
    pattern = re.compile(r"(_norm|Norm(\dd)?)$")
    others = sorted({n for n in public if pattern.search(n) and n not in NORMALIZATION_FAMILY})
    return NORMALIZATION_FAMILY + others


def generate_normalization_lists(documented: dict[int, str]) -> None:
    """The family members that exist, each under the name its API page has."""
    found = []
    for name in _normalization_names():
        for module in (bnfast, bnfast.nn):
            if name in getattr(module, "__all__", ()):
                found.append(documented[id(getattr(module, name))])
                break
    functions = [n for n in found if not n.rsplit(".", 1)[1][0].isupper()]
    classes = [n for n in found if n.rsplit(".", 1)[1][0].isupper()]
    lines = [".. generated by docs/conf.py; do not edit", ""]
    if functions:
        lines += _heading("Functions", "-") + _autosummary(functions, toctree=False)
    if classes:
        lines += _heading("Layers", "-") + _autosummary(classes, toctree=False)
    _write(DOCS / "_normalization_lists.rst", "\n".join(lines))


# -- benchmark tables ------------------------------------------------------------------


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} µs"
    return f"{seconds * 1e3:.3f} ms"


def generate_bench_table(name: str) -> None:
    """A list-table of ``benchmarks/results/<name>.json``: one row per case,
    1- and 2-thread columns side by side."""
    data = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
    meta, rows = data["meta"], data["results"]
    threads = sorted({r["threads"] for r in rows})
    cases: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        key = (r["op"], tuple(r["shape"]), r["layout"], r["dtype"])
        cases.setdefault(key, {})[r["threads"]] = r
    head = ["op", "shape", "layout", "dtype"]
    for t in threads:
        head += [f"{t} thread{'s' if t > 1 else ''}: time", "vs PyTorch"]
    lines = [
        ".. generated by docs/conf.py from benchmarks/results; do not edit",
        "",
        f"Measured on {meta['cpu']} ({meta['cpus']} logical CPUs, {meta['simd_in_use']} kernels, "
        f"OpenMP {'on' if meta['openmp'] else 'off'}), NumPy {meta['numpy']}, PyTorch {meta.get('torch')}.",
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "   :class: bnfast-bench",
        "",
    ]

    def row(cells):
        out = [f"   * - {cells[0]}"]
        out += [f"     - {c}" for c in cells[1:]]
        return out

    lines += row(head)
    for (op, shape, layout, dtype), by_threads in cases.items():
        cells = [op, "(" + ", ".join(map(str, shape)) + ")", layout, dtype]
        for t in threads:
            r = by_threads.get(t)
            cells.append(_fmt_time(r["time_s"]) if r else "")
            st = r and r.get("speedup_torch")
            cells.append(f"{st:.2f}x" if st else "")
        lines += row(cells)
    lines.append("")
    for t in threads:
        vals = [by[t]["speedup_torch"] for by in cases.values() if t in by and by[t].get("speedup_torch")]
        if vals:
            gm = math.exp(sum(math.log(v) for v in vals) / len(vals))
            lines.append(
                f"* {t} thread(s): geometric-mean speedup over PyTorch {gm:.2f}x over {len(vals)} cases "
                f"(slowest {min(vals):.2f}x, fastest {max(vals):.2f}x)."
            )
    _write(GENERATED / f"bench_{name}.rst", "\n".join(lines) + "\n")


# -- demo figure ---------------------------------------------------------------------


def generate_demo() -> None:
    """``python -m bnfast demo --plot``: the figure and the printed table.

    Run again only when ``bnfast/_demo.py`` changes (its hash is stored
    beside the outputs); about 5-10 s on two cores.
    """
    import bnfast._demo as demo

    digest = hashlib.sha256(Path(demo.__file__).read_bytes()).hexdigest()
    png, txt, stamp = GENERATED / "demo.png", GENERATED / "demo.txt", GENERATED / "demo.sha256"
    if png.exists() and txt.exists() and stamp.exists() and stamp.read_text() == digest:
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, "-m", "bnfast", "demo", "--plot", str(png)],
        capture_output=True, text=True, env=env, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"python -m bnfast demo failed:\n{done.stdout}\n{done.stderr}")
    lines = [ln for ln in done.stdout.splitlines() if not ln.startswith("curves saved to")]
    txt.write_text("\n".join(lines).rstrip() + "\n")
    stamp.write_text(digest)


_documented = generate_api_lists()
generate_normalization_lists(_documented)
generate_bench_table("amd-epyc-zen4-2core")
generate_demo()
