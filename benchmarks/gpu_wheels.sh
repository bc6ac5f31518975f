#!/usr/bin/env bash
# The wheels benchmarks/gpu_pipeline.sh needs on the lent GPU machine, into .dev/gpu-wheels/part1, part2, ... (one
# part per call of the device tool). Run here, where PyPI is reachable, after `make setup`:
#
#   bash benchmarks/gpu_wheels.sh            # download (kept in .dev/gpu-wheels-cache/), trim, cut into parts
#   bash benchmarks/gpu_wheels.sh --check    # only measure the working tree and the parts against the 64 MiB a call
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python benchmarks/gpu_wheels.py "$@"
