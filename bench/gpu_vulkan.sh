#!/usr/bin/env bash
# One device-tool call for the Vulkan backend on an NVIDIA GPU: bring the Vulkan loader, build
# hierarchos_vulkan there, run tests/test_vulkan.py on the GPU's driver, then bench/bench_vulkan.py.
# The machine has no Vulkan loader, headers or glslc and no registry, so they travel in DIR
# (carry it; an ignored folder such as build/vkdev), made here on a Debian/Ubuntu machine:
#   DIR/gl/*.deb        apt-get download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2
#   DIR/sdk/include     vulkan/{vulkan.h,vulkan_core.h,vk_platform.h} and vk_video/ from libvulkan-dev
#   DIR/sdk/bin/glslc, DIR/sdk/lib/libshaderc.so.1   from the glslc and libshaderc1 packages
#   DIR/whl/*.whl       gguf (pure Python; the CLI test writes a GGUF file)
# Usage (device tool, carry DIR): bash bench/gpu_vulkan.sh DIR [extra bench_vulkan.py flags]
set -uo pipefail
dir=$(cd "${1:?usage: bash bench/gpu_vulkan.sh DIR [bench_vulkan.py flags]}" && pwd); shift
out=${OUT:-/tmp/out}; mkdir -p "$out"
for deb in "$dir"/gl/*.deb; do dpkg -x "$deb" /; done  # the loader (and glvnd) into /
ldconfig
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$dir"/whl/*.whl
export VULKAN_SDK="$dir/sdk" LD_LIBRARY_PATH="$dir/sdk/lib:${LD_LIBRARY_PATH:-}" PYTHONUNBUFFERED=1
export PYTHONPATH=".:/tmp/site:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 kernels/build.py --vulkan --jobs "$(nproc)" 2>&1 | tee "$out/build.log"
status() { python3 -c "from hierarchos.quant import vulkan; print(vulkan.vulkan_status() or vulkan.device_info())"; }
if status | grep -q "no Vulkan"; then  # the NVIDIA ICD manifest lives outside the loader's search path
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json VK_ICD_FILENAMES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
status | tee -a "$out/gpu.txt"
HIERARCHOS_REQUIRE_VULKAN=1 python3 -m pytest -q -p no:cacheprovider tests/test_vulkan.py 2>&1 | tee "$out/pytest_vulkan_gpu.log"
python3 bench/bench_vulkan.py --json "$out/vulkan_gpu.json" "$@" 2>&1 | tee "$out/bench_vulkan.log"
