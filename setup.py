"""Build the compiled kernels in ``cshard/`` against NumPy's headers (compiler directives live in the .pyx)."""

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "cshard._kernels",
        ["cshard/_kernels.pyx"],
        include_dirs=[np.get_include(), "cshard"],
        depends=["cshard/stream_copy.h", "cshard/gather.h"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    )
]

setup(ext_modules=cythonize(extensions))
