"""Build the optional Cython hot path under mahole/_fast/.

The extensions are optional for a plain `pip install` so that odd platforms still get the
pure-Python twins; `MAHOLE_BUILD_EXTENSION=yes` (set by CI and wheel builds) makes a failed
compile fatal instead of silently falling back.
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

REQUIRED = os.environ.get("MAHOLE_BUILD_EXTENSION", "").lower() in ("yes", "1", "true")
FAST = Path("mahole") / "_fast"

# recvmmsg/sendmmsg exist on Linux only; elsewhere the batch socket twin is used.
MODULES = ["_hot", "_sched", "_packets"] + (["_batch", "_relay"] if sys.platform.startswith("linux") else [])


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            self._skip(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._skip(exc)

    def _skip(self, exc):
        if REQUIRED:
            raise
        print(f"mahole: compiled hot path not built ({exc}); using the pure-Python twin",
              file=sys.stderr)


def extensions():
    try:
        from Cython.Build import cythonize
    except ImportError:
        if REQUIRED:
            raise
        return []
    exts = [
        Extension(f"mahole._fast.{name}", [str(FAST / f"{name}.pyx")],
                  extra_compile_args=["-O2"])
        for name in MODULES
    ]
    return cythonize(exts, language_level=3, compiler_directives={
        "boundscheck": False, "wraparound": False, "cdivision": True,
    })


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
