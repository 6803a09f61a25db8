"""Builds the one C extension, ladder.comm._shm (plain C on raw addresses: no torch needed to build it).

The project's metadata is in pyproject.toml. No -march: the build must run on any x86-64 or aarch64.
-fno-trapping-math lets gcc vectorize the branch-free fp16 conversions (nothing reads FP exception
flags); it permits no reassociation, so sums keep their rank order.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ladder.comm._shm",
            ["ladder/comm/_shm.c"],
            extra_compile_args=["-O3", "-fno-trapping-math", "-std=gnu11", "-Wall", "-Wextra"],
        ),
    ],
)
