"""Build the bnfast extension: portable by default, OpenMP when the compiler has it.

Environment:
    BNFAST_NATIVE=1      add -march=native (fastest on this machine, not portable)
    BNFAST_NO_OPENMP=1   build the serial kernels even where OpenMP is available
    CFLAGS, LDFLAGS      honoured, the OpenMP probe included (e.g. a sanitizer
                         build); an -O level in CFLAGS replaces the default -O3
"""

import os
import shlex
import shutil
import sys
import tempfile
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(HERE, "include")


def _user_flags(name):
    return shlex.split(os.environ.get(name, ""))


def _compiles_with(compiler, flags):
    """Whether a tiny OpenMP program compiles and links with ``flags`` and the
    user's CFLAGS/LDFLAGS (which the extension itself is built with)."""
    tmp = tempfile.mkdtemp(prefix="bnfast-omp-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){int n=0;\n#pragma omp parallel reduction(+:n)\nn+=1;\nreturn n>0?0:1;}\n")
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
        link_flags = flags + _user_flags("CFLAGS") + _user_flags("LDFLAGS")
        compiler.link_executable(objs, os.path.join(tmp, "probe"), extra_postargs=link_flags)
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    """build_ext that probes for OpenMP and picks portable optimization flags."""

    def build_extensions(self):
        ctype = self.compiler.compiler_type
        if ctype == "msvc":
            cflags, omp = ["/O2"], ["/openmp"]
        else:
            # the user's -O level wins (extra args come after CFLAGS on the command line)
            optimize = [] if any(f.startswith("-O") for f in _user_flags("CFLAGS")) else ["-O3"]
            cflags = optimize + ["-std=c11", "-fno-math-errno", "-ffp-contract=fast"]
            omp = ["-fopenmp"]
            if os.environ.get("BNFAST_NATIVE") == "1":
                cflags.append("-march=native")
        serial_asked = os.environ.get("BNFAST_NO_OPENMP") == "1"
        found = not serial_asked and _compiles_with(self.compiler, omp)
        if not found:
            if not serial_asked:
                warnings.warn("bnfast: OpenMP not available; building serial kernels", stacklevel=1)
            omp = []
        for ext in self.extensions:
            ext.extra_compile_args = cflags + omp
            ext.extra_link_args = omp if ctype != "msvc" else []
        self._build_config = {"OPENMP": bool(omp), "SERIAL_REQUESTED": serial_asked, "COMPILER": ctype}
        super().build_extensions()

    def run(self):
        super().run()  # setuptools builds in build_lib, then copies to src/ when --inplace
        self._write_build_config()

    def _write_build_config(self):
        """bnfast/_build_config.py beside the extension (build_lib, which the
        wheel is made of, and src/ for an in-place build): how this build was
        made, for show_config."""
        settings = getattr(self, "_build_config", None)
        if settings is None:  # nothing was configured (no extension built)
            return
        text = '"""How the extension was built: written by setup.py (not in version control)."""\n\n'
        text += "".join(f"{key} = {value!r}\n" for key, value in settings.items())
        dirs = {os.path.join(self.build_lib, "bnfast")}
        if self.inplace:
            dirs.add(os.path.dirname(self.get_ext_fullpath("bnfast._kernels")))
        for d in dirs:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "_build_config.py"), "w") as f:
                f.write(text)


class BuildPy(build_py):
    """build_py that also ships the C headers as package data, bnfast/include/bnfast/*.h,
    where bnfast.get_include() finds them in an installed package."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "bnfast", "include", "bnfast")
        os.makedirs(target, exist_ok=True)
        for name in sorted(os.listdir(os.path.join(INCLUDE, "bnfast"))):
            if name.endswith(".h"):
                self.copy_file(os.path.join(INCLUDE, "bnfast", name), os.path.join(target, name))


extensions = [
    Extension(
        "bnfast._kernels",
        ["src/bnfast/_kernels.pyx"],
        include_dirs=[INCLUDE, np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        depends=[os.path.join(INCLUDE, "bnfast", h) for h in os.listdir(os.path.join(INCLUDE, "bnfast"))],
    )
]

setup(
    ext_modules=cythonize(extensions, compiler_directives={"language_level": 3}),
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
)
