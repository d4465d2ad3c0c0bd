#!/usr/bin/env bash
# On the lent GPU machine (device tool, repository root; `.device/` carried): install the wheels the
# ComfyUI snapshot needs, then run the given benchmark command(s) with COMFYUI_PATH set. One loan, one call
# (benchmarks/README.md, "One GPU loan, one command"; the device tool's timeout_s 580):
#   bash benchmarks/run_on_device.sh python3 benchmarks/bench.py --budget 540
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .device/ComfyUI ] || [ ! -d .device/whl ]; then
    echo "run_on_device.sh: .device/ComfyUI and .device/whl are missing: see benchmarks/README.md" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export COMFYUI_PATH="$PWD/.device/ComfyUI"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
"$@"
