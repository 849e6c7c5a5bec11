"""Build the C++ kernel (kernels/) with CMake and put the module where Python imports it.

Shared by setup.sh / setup.bat (in place: hierarchos/hierarchos_kernels*.so, which the
editable install imports) and setup.py (into the wheel's build directory).

    python kernels/build.py [--dest DIR] [--build-dir DIR] [--jobs N] [--require] [--vulkan]

Prints one line on success (what was built, which ISA paths this CPU runs). When it cannot
build (no cmake, compiler, pybind11 or Python headers, or a compile error) it prints why
and exits 0, so that setup goes on with the numpy reference, or 1 with --require.
--vulkan also builds the Vulkan module `hierarchos_vulkan` (kernels/vulkan/, its own build
directory, so a failure there leaves the CPU kernel as it is) and names the device it found;
since it was asked for, a failure to build it exits 1.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "kernels"


class KernelBuildError(Exception):
    """Why the kernel could not be built, in one line."""


def _find_cmake() -> str:
    found = shutil.which("cmake")
    if found:
        return found
    try:  # the `cmake` wheel from PyPI ships a binary
        import cmake  # type: ignore[import-not-found]
        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        raise KernelBuildError("cmake not found (install it: apt install cmake, brew install cmake, "
                               "or pip install cmake)") from None


def _check_compiler() -> None:
    if os.name == "nt":
        return  # CMake finds MSVC through its Visual Studio generator
    candidates = [os.environ.get("CXX"), "c++", "g++", "clang++"]
    if not any(name and shutil.which(name.split()[0]) for name in candidates):
        raise KernelBuildError("no C++ compiler found (install g++ or clang++, or set CXX)")


def _run(command: list[str], log: Path) -> None:
    with log.open("a") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if result.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-12:]
        raise KernelBuildError(f"`{' '.join(command[:2])} ...` failed (log: {log}):\n    " + "\n    ".join(tail))


def build(dest: Path, build_dir: Path, jobs: int, module: str = "hierarchos_kernels",
          options: tuple[str, ...] = ()) -> Path:
    """Configure (with extra -D `options`), compile `module` and copy it into `dest`; returns the installed path."""
    try:
        import pybind11
    except ImportError:
        raise KernelBuildError("pybind11 is not installed (pip install 'pybind11>=2.12')") from None
    cmake = _find_cmake()
    _check_compiler()
    build_dir, dest = build_dir.resolve(), dest.resolve()  # cmake runs from the repository root
    build_dir.mkdir(parents=True, exist_ok=True)
    out_dir = build_dir / "out"
    log = build_dir / "build.log"
    log.write_text("")
    _run([cmake, "-S", str(SOURCE), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
          f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}",
          f"-DHK_OUTPUT_DIR={out_dir}", *options], log)
    _run([cmake, "--build", str(build_dir), "--config", "Release", "-j", str(jobs), "--target", module], log)
    built = sorted(glob.glob(str(out_dir / f"{module}*.so")) + glob.glob(str(out_dir / f"{module}*.pyd")))
    if not built:
        raise KernelBuildError(f"the build finished but no {module} module is in {out_dir}")
    dest.mkdir(parents=True, exist_ok=True)
    for stale in list(dest.glob(f"{module}*.so")) + list(dest.glob(f"{module}*.pyd")):
        stale.unlink()
    target = dest / Path(built[-1]).name
    shutil.copy2(built[-1], target)
    return target


def _load(name: str, module_path: Path):
    """The built module loaded by path (it need not be importable yet)."""
    spec = importlib.util.spec_from_file_location(name, module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def describe(module_path: Path) -> str:
    """Name the ISAs of the built CPU kernel."""
    module = _load("hierarchos_kernels", module_path)
    isas = module.available_isas()
    return f"ISA paths this CPU runs: {', '.join(isas)} (default {module.default_isa()})"


def describe_vulkan(module_path: Path) -> str:
    """The device the built Vulkan module opens, or why it opens none (building needs no device)."""
    module = _load("hierarchos_vulkan", module_path)
    status = module.init_status()
    if status:
        return f"no device usable here: {status}"
    info = module.device_info()
    return f"device: {info['name']} ({info['type']}, Vulkan {info['api_version']})"


def build_vulkan(args: argparse.Namespace) -> int:
    """--vulkan: build hierarchos_vulkan beside the CPU kernel; 1 when it cannot be built."""
    started = time.perf_counter()
    try:
        target = build(args.dest, args.build_dir.parent / "vulkan", args.jobs, "hierarchos_vulkan",
                       ("-DHIERARCHOS_VULKAN=ON",))
        summary = describe_vulkan(target)
    except (KernelBuildError, ImportError, OSError) as error:
        print(f"vulkan: error: the Vulkan backend was not built: {error}", file=sys.stderr)
        return 1
    shown = target.relative_to(ROOT) if target.is_relative_to(ROOT) else target
    print(f"vulkan: built {shown} in {time.perf_counter() - started:.0f}s; {summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=ROOT / "hierarchos", help="where the module goes (default: hierarchos/)")
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "kernels")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--require", action="store_true", help="a failed build is an error (exit 1)")
    parser.add_argument("--vulkan", action="store_true", help="also build the Vulkan module (a failure exits 1)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        target = build(args.dest, args.build_dir, args.jobs)
        summary = describe(target)
    except (KernelBuildError, ImportError, OSError) as error:
        level = "error" if args.require else "warning"
        print(f"kernel: {level}: the C++ kernel was not built: {error}", file=sys.stderr)
        if not args.require:
            print("kernel: hierarchos will use the slow numpy reference for quantized models", file=sys.stderr)
        return (1 if args.require else 0) or (build_vulkan(args) if args.vulkan else 0)
    shown = target.relative_to(ROOT) if target.is_relative_to(ROOT) else target
    print(f"kernel: built {shown} in {time.perf_counter() - started:.0f}s; {summary}")
    return build_vulkan(args) if args.vulkan else 0


if __name__ == "__main__":
    sys.exit(main())
