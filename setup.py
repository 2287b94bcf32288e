"""The one part of the build pyproject.toml cannot declare: bankd's flat-search kernel.

bankd/search/_flatip.c is a plain C library (loaded with ctypes by
bankd/search/flat_kernel.py, never imported). It is optional: where it does not compile
(no C compiler, not x86-64) the install goes on and bankd searches flat indexes with FAISS.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "bankd.search._flatip",
            sources=["bankd/search/_flatip.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
