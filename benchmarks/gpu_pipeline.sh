#!/usr/bin/env bash
# The whole pipeline on the lent GPU machine (issue 24; benchmarks/gpu_pipeline.py says what each part measures),
# from a bare machine: stage the carried wheels, install what the machine lacks, run the parts asked for.
#
#   PARTS=t4 bash benchmarks/gpu_pipeline.sh "$OUT"                # call 1, carrying .dev/gpu-wheels/part1
#   PARTS=quality,resume bash benchmarks/gpu_pipeline.sh "$OUT"    # call 2, carrying .dev/gpu-wheels/part2
#   PARTS=stash bash benchmarks/gpu_pipeline.sh "$OUT"             # only copy this call's part to the machine
#
# The wheels come from `bash benchmarks/gpu_wheels.sh` (here, where PyPI is reachable), in parts of at most 60 MiB:
# each call carries one and leaves it in /tmp/gpu-pipeline/wheels, which stays while the machine is warm (about 30 s
# idle), so the calls must follow each other at once; a part that is missing is named in one line. The parts stop
# GPU_PIPELINE_SECONDS (default 570) after the start, inside the call's 10 minutes, and write what they measured:
# $OUT/gpu_pipeline.json (every part measured on this machine so far) and $OUT/gpu_pipeline-logs-<parts>.tar.gz.
set -euo pipefail
OUT=${1:?usage: PARTS=t4 bash benchmarks/gpu_pipeline.sh OUT_DIR}
PARTS=${PARTS:-t4,quality,resume}
HERE=$(cd "$(dirname "$0")/.." && pwd)
DEADLINE=$(( $(date +%s) + ${GPU_PIPELINE_SECONDS:-570} ))
mkdir -p "$OUT"
cd "$HERE"
unset PYTHONPATH
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$PARTS" != stash ]; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
fi
set -o pipefail
python3 benchmarks/gpu_pipeline.py run --parts "$PARTS" --out "$OUT" --deadline "$DEADLINE" 2>&1 \
  | grep --line-buffered -v -e 'it/s\]' -e 's/it\]' | tee "$OUT/gpu_pipeline-$(echo "$PARTS" | tr , -).log"
