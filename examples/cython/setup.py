"""Build the example: ``python setup.py build_ext --inplace`` (needs bnfast, Cython, a C compiler)."""

import os

import bnfast
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("normalize", ["normalize.pyx"], include_dirs=[bnfast.get_include()],
                   extra_compile_args=["-fopenmp"], extra_link_args=["-fopenmp"])],
        # where `cimport bnfast.capi` finds bnfast/capi.pxd: the directory holding the package
        include_path=[os.path.dirname(os.path.dirname(bnfast.__file__))],
        compiler_directives={"language_level": 3},
    )
)
