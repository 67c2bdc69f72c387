"""Compiles the C++ CPU kernels into the package at install (every variant of the target machine,
rz_kernels/build.py); everything else about the package is in pyproject.toml.

RZ_BUILD_CPU_KERNELS=0 installs without them (for a platform without a C++ compiler): quantized
matmuls then take XLA's slower paths. Otherwise a failed compile fails the install.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _load_build_module():
    """rz_kernels/build.py by path: importing the package would import jax, absent at build time."""
    spec = importlib.util.spec_from_file_location("_rz_kernels_build", ROOT / "rz_kernels" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


kernels = _load_build_module()


class BuildCpuKernels(build_ext):
    """Each variant is an 'extension' only so that setuptools places it (wheel, editable install)
    and tags the wheel for the platform; rz_kernels/build.py compiles it."""

    def run(self) -> None:
        kernels.LIBRARY_DIR.mkdir(exist_ok=True)  # where an editable install copies the libraries
        super().run()

    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split(".")) + ".so"

    def build_extension(self, ext: Extension) -> None:
        variant = kernels.variant_named(ext.name.rsplit(".", 1)[1].removeprefix("rz_cpu_"))
        try:
            kernels.build_variant(variant, Path(self.get_ext_fullpath(ext.name)))
        except kernels.KernelBuildError as error:
            raise SystemExit(
                f"{error}\n\nrz: the C++ CPU kernels did not compile. Install a C++ compiler (g++ or clang++, "
                "or set CXX), or install without them with RZ_BUILD_CPU_KERNELS=0 (quantized matmuls then take "
                "XLA's much slower paths)."
            ) from error


def _extensions() -> list[Extension]:
    if os.environ.get("RZ_BUILD_CPU_KERNELS", "1") == "0":
        return []
    return [
        Extension(
            f"rz_kernels.lib.rz_cpu_{variant.name}",
            [str(path.relative_to(ROOT)) for path in variant.inputs() if path.suffix != ".h"],
            depends=[str(path.relative_to(ROOT)) for path in variant.inputs() if path.suffix == ".h"],
        )
        for variant in kernels.variants_for()
    ]


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildCpuKernels})
