"""Packaging. Pure Python at install time: the CUDA sources (csrc/, kernels/) are shipped inside
the package as ``fastattn/_native/`` and compiled just-in-time on first use (fastattn._build),
so ``pip install .`` needs no GPU and no compiler."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
NATIVE_DIRS = ("csrc", "kernels")


class BuildPyWithNativeSources(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "fastattn" / "_native"
        for name in NATIVE_DIRS:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, target / name, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.o", "*.cubin"))


setup(cmdclass={"build_py": BuildPyWithNativeSources})
