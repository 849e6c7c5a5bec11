#!/usr/bin/env bash
# Set up hierarchos in the current Python environment (a venv is recommended).
#   bash setup.sh            install hierarchos and its dependencies (editable)
#   bash setup.sh --test     also install the test dependencies (pytest, hypothesis)
#   bash setup.sh --vulkan   also build the Vulkan backend (chat --device vulkan for quantized models)
#   bash setup.sh --require-kernel   fail (exit 1) when the C++ kernel cannot be built
# The C++ kernel (kernels/) is built in place when cmake and a C++ compiler are present;
# without them hierarchos runs quantized models on a slow numpy reference. With --test on
# Debian/Ubuntu as root, the aarch64 cross compiler + qemu-user come too (NEON kernel test).
# --vulkan needs the Vulkan headers, loader and glslc: installed with apt-get when missing on
# Debian/Ubuntu as root, else named; a failed Vulkan build is an error (exit 1).
# Safe to run again. Uses $PYTHON if set, else `python`, else `python3`.
# torch: an importable torch is kept as it is (CUDA users: install your CUDA build of torch
# first); otherwise $TORCH_SPEC (default torch==2.13.0) is installed before everything else.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

with_test=0
with_vulkan=0
require_kernel=0
for arg in "$@"; do
  case "$arg" in
    --test) with_test=1 ;;
    --vulkan) with_vulkan=1 ;;
    --require-kernel) require_kernel=1 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (known: --test, --vulkan, --require-kernel, --help)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "setup.sh: hierarchos needs Python >= 3.10; '$PY' is $("$PY" --version 2>&1 || echo 'not found')" >&2
  exit 1
fi
pip_install() { PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --disable-pip-version-check "$@"; }

echo "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# ---- torch (first, so the rest sees it satisfied) ---------------------------------
if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
  TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
  echo "torch: not found, installing $TORCH_SPEC"
  pip_install "$TORCH_SPEC"
fi
echo "torch: $("$PY" -W ignore -c 'import torch; print(torch.__version__, "(CUDA " + torch.version.cuda + ")" if torch.version.cuda else "(CPU build)")')"

# ---- hierarchos and its Python dependencies ---------------------------------------
if [ "$with_test" = 1 ]; then target='.[test]'; else target='.'; fi
echo "hierarchos: pip install -e $target"
pip_install -e "$target"

# ---- C++ kernel (kernels/) --------------------------------------------------------
# pybind11 + CMake extension, copied to hierarchos/hierarchos_kernels*.so for the editable
# install. A failed build is a warning (numpy reference fallback) unless --require-kernel.
pip_install "pybind11>=2.12" || echo "kernel: could not install pybind11 from PyPI"
if [ "$with_test" = 1 ] && [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] && [ "$(id -u)" = 0 ] \
   && command -v apt-get >/dev/null 2>&1 \
   && ! { command -v aarch64-linux-gnu-g++ && command -v qemu-aarch64; } >/dev/null 2>&1; then
  echo "kernel: installing g++-aarch64-linux-gnu and qemu-user (apt) for the NEON kernel test"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu qemu-user; } \
    >/dev/null 2>&1 || echo "kernel: (could not install them; the NEON test will be skipped)"
fi
build_args=()
if [ "$with_vulkan" = 1 ]; then
  build_args+=(--vulkan)
  # ---- Vulkan backend (kernels/vulkan/): headers + glslc to build, the loader to run ----------
  if [ "$(uname -s)" = Linux ]; then
    missing=()
    { [ -f /usr/include/vulkan/vulkan.h ] || [ -f /usr/local/include/vulkan/vulkan.h ] \
      || [ -f "${VULKAN_SDK:-/nonexistent}/include/vulkan/vulkan.h" ]; } || missing+=(libvulkan-dev)
    { command -v glslc || [ -x "${VULKAN_SDK:-/nonexistent}/bin/glslc" ]; } >/dev/null 2>&1 || missing+=(glslc)
    { ldconfig -p 2>/dev/null || true; } | grep -q 'libvulkan\.so\.1' || missing+=(libvulkan1)
    if [ "${#missing[@]}" -gt 0 ]; then
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "vulkan: installing ${missing[*]} (apt)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >/dev/null 2>&1 \
          || echo "vulkan: apt-get install ${missing[*]} failed; the build below says what is still missing" >&2
      else
        echo "vulkan: missing ${missing[*]}; install them (Debian/Ubuntu: sudo apt-get install ${missing[*]};" \
             "Fedora: sudo dnf install vulkan-headers vulkan-loader-devel glslc; or the LunarG Vulkan SDK)," \
             "plus a Vulkan driver (your GPU's, or mesa-vulkan-drivers for the CPU driver lavapipe)" >&2
      fi
    fi
  fi
fi
if [ "$require_kernel" = 1 ]; then
  "$PY" kernels/build.py --require "${build_args[@]}"
  "$PY" -c 'import hierarchos.hierarchos_kernels' || { echo "setup.sh: the built kernel does not import" >&2; exit 1; }
else
  "$PY" kernels/build.py "${build_args[@]}"
fi

echo "done. Try: $PY hierarchos_cli.py train --tiny --epochs 1 --out-dir runs/tiny  (then: demo --model-path runs/tiny)"
