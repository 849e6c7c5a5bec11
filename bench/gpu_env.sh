# Sourced by bench/gpu.sh, the device-tool entry: $out (the device tool's $OUT), the carried
# wheels (.whl/, packages the GPU image lacks: datasets, dill, multiprocess, ...) when there are
# any, the environment every run wants, and the GPU's name, memory and driver in $out/gpu.txt.
out=${OUT:-/tmp/out}; mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then  # installed once per machine (two suites may run side by side)
  [ -e /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && touch /tmp/site/.installed; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
