#!/usr/bin/env bash
# Set up hierarchos in the current Python environment (a venv is recommended).
#   bash setup.sh            install hierarchos and its dependencies (editable)
#   bash setup.sh --test     also install the test dependencies (pytest, hypothesis)
#   bash setup.sh --vulkan   also build the Vulkan backend of the C++ kernel (not available yet)
# Safe to run again. Uses $PYTHON if set, else `python`, else `python3`.
# torch: an importable torch is kept as it is (CUDA users: install your CUDA build of torch
# first); otherwise $TORCH_SPEC (default torch==2.13.0) is installed before everything else.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

with_test=0
with_vulkan=0
for arg in "$@"; do
  case "$arg" in
    --test) with_test=1 ;;
    --vulkan) with_vulkan=1 ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (known: --test, --vulkan, --help)" >&2; exit 2 ;;
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
# KERNEL BUILD: a later issue builds the pybind11 extension `hierarchos_kernels` here
# (cmake -S kernels -B build/kernels && cmake --build build/kernels), and with --vulkan
# its GLSL shaders. Until then nothing is built and nothing needs it.
echo "kernel: not built yet (the C++ kernel is planned; nothing uses it yet)"
if [ "$with_vulkan" = 1 ]; then
  echo "vulkan: not built yet: Vulkan backend comes with the kernel"
fi

echo "done. Try: $PY hierarchos_cli.py train --tiny --epochs 1 --out-dir runs/tiny  (then: demo --model-path runs/tiny)"
