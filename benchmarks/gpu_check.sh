#!/usr/bin/env bash
# The GPU check as one command on the GPU machine (docs/benchmarks.md, "GPU check"):
#
#   bash benchmarks/fetch_wheels.sh                                    # here, once: the wheels to carry
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-wheels"], timeout_s=540)   # the device tool
#
# Installs the carried wheels the machine lacks into a private folder (nothing of the machine's own
# is replaced), then runs benchmarks/gpu_check.py with its 420 s budget. The table, results.json and
# the log land in $OUT/gpu_check (the device tool brings $OUT back), or runs/gpu_check elsewhere.
# Extra arguments go to gpu_check.py (e.g. --budget_s 300, or --smoke on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
site=${GPU_CHECK_SITE:-/tmp/prefopt-gpu-check-site}
out=${OUT:-runs}/gpu_check
mkdir -p "$out"
"$py" benchmarks/gpu_wheels.py benchmarks/gpu_requirements.txt .gpu-wheels "$site" 2>&1 | tee "$out/packages.txt"
export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec "$py" benchmarks/gpu_check.py --out "$out" "$@"
