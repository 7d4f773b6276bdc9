"""Build of the optional compiled read path (everything else is in pyproject.toml).

``shmkeyspace._speedups`` is optional: without a C compiler and Python headers
the build warns and installs the pure-Python reader (Reader.implementation ==
"python"), so ``pip install`` never fails for lack of a compiler. Wheel builds
(cibuildwheel, see pyproject.toml) set SHMKEYSPACE_REQUIRE_EXTENSION=1 so a
failed compile fails the build instead of shipping a slow wheel.
"""

import os

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shmkeyspace._speedups",
            ["shmkeyspace/_speedups.c"],
            optional=os.environ.get("SHMKEYSPACE_REQUIRE_EXTENSION", "") != "1",
            extra_compile_args=["-O2", "-Wall", "-std=gnu11"],
        )
    ]
)
