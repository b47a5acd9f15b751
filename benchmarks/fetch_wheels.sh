#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on the GPU machine (which has no network)
# into .gpu-wheels/ (git-ignored), for the machine's Python (3.12) on x86-64 Linux:
#
#   bash benchmarks/fetch_wheels.sh          # then run the device command in docs/benchmarks.md
#
# Only the pinned (==) lines of benchmarks/gpu_requirements.txt are fetched, without their
# dependencies (the others must be on the machine; gpu_check.sh says what is missing there).
# PY_VERSION overrides the Python version; EXTRA adds requirements (e.g. EXTRA="pyarrow==24.0.0").
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.gpu-wheels
py=${PY_VERSION:-3.12}
pins=$(grep -E '^[A-Za-z0-9_.-]+==' benchmarks/gpu_requirements.txt | sed 's/[[:space:]]*#.*//')
rm -rf "$dest"
mkdir -p "$dest"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" $pins ${EXTRA:-}
ls -l "$dest"
du -sh "$dest"
