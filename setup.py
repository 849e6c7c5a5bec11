"""setuptools hook: `pip install .` also builds the C++ kernel (kernels/) into the wheel when
cmake and a C++ compiler are present; without them it prints a warning and installs the
pure-Python package (quantized models then run on the numpy reference). Editable installs
(`pip install -e .`) skip it to stay fast: setup.sh builds the kernel in place instead.
Everything else about the package lives in pyproject.toml."""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = Path(__file__).resolve().parent


def _kernel_builder():
    spec = importlib.util.spec_from_file_location("hierarchos_kernel_build", HERE / "kernels" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithKernel(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        builder = _kernel_builder()
        build_temp = Path(self.get_finalized_command("build").build_temp) / "kernels"
        try:
            target = builder.build(Path(self.build_lib) / "hierarchos", build_temp, os.cpu_count() or 1)
            print(f"kernel: built {target.name} into the wheel")
        except (builder.KernelBuildError, OSError) as error:
            print(f"WARNING: hierarchos: the C++ kernel was not built ({error}); quantized models will use "
                  "the slow numpy reference", file=sys.stderr)


class PlatformDistribution(Distribution):
    """The wheel may carry a compiled module, so it must be tagged for this platform."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildPyWithKernel}, distclass=PlatformDistribution)
