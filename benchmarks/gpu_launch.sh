#!/usr/bin/env bash
# One launch of the GPU benchmark on a lent GPU machine, from a bare machine: install the carried wheels, then run.
#
#   bash benchmarks/gpu_launch.sh OUT_DIR [final|explore]     # final: the headline rows (README's table)
#   RECIPES=sanity,trl bash benchmarks/gpu_launch.sh OUT_DIR final   # the loss sanity runs and TRL's rows
#
# Expects, in the checkout's .dev/ (or beside the checkout, in ../ when run from .dev/perf): wheels/ (pydantic and its three helpers,
# liger-kernel, and Unsloth's and TRL's wheels: unsloth, unsloth_zoo, trl, datasets, ...), site/bitsandbytes (the
# wheel unpacked with only its cpu and cuda130 libraries) and alpaca_lengths.json (benchmarks/alpaca_lengths.py).
# docs/benchmarks.md says how to fetch them. Unsloth's and TRL's packages go on their processes' path only.
set -euo pipefail
OUT=${1:?out dir}; MODE=${2:-final}
HERE=$(cd "$(dirname "$0")/.." && pwd)
if [ -d "$HERE/.dev/wheels" ]; then DEV="$HERE/.dev"; else DEV=$(cd "$HERE/.." && pwd); fi
MAIN=/tmp/site-main; EXTRA=/tmp/site-extra
mkdir -p "$MAIN" "$EXTRA" "$OUT"
if [ ! -e "$MAIN/.done" ]; then
  main_whl=$(ls "$DEV"/wheels/{pydantic,pydantic_core,annotated_types,typing_inspection,liger_kernel}-*.whl)
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$MAIN" $main_whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$EXTRA" \
    $(ls "$DEV"/wheels/*.whl | grep -v -e /pydantic -e /annotated_types -e /typing_inspection -e /liger_kernel)
  touch "$MAIN/.done"
fi
export PYTHONPATH="$HERE:$DEV/site:$MAIN" BENCH_UNSLOTH_PATH="$EXTRA" PYTHONUNBUFFERED=1 \
       HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
cd "$HERE"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__)"
LEN="$DEV/alpaca_lengths.json"
if [ "$MODE" = final ]; then  # recipes still running ten minutes after the start are stopped and reported so
  BENCH_DEADLINE=$(( $(date +%s) + ${BENCH_SECONDS:-540} )) python3 benchmarks/gpu_bench.py --lengths "$LEN" \
    --out "$OUT/gpu_bench.json" ${RECIPES:+--recipes "$RECIPES"} ${APPEND:+--append} 2>&1 | grep -v -e 'it/s\]' -e 's/it\]' >> "$OUT/gpu_bench.log"
  tail -n 40 "$OUT/gpu_bench.log"
  exit
fi
# explore: levers one group at a time, most informative first, each group in one process, stopping before the
# call's ten minutes run out; every group appends to the same JSON.
START=$(date +%s)
run() {  # run GROUP MAX_SECONDS [extra args]
  local left=$(( 575 - ($(date +%s) - START) )); local g=$1 cap=$2; shift 2
  if [ "$left" -lt 45 ]; then echo "SKIP $g (${left}s left)"; return; fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $g (limit ${cap}s, $(( $(date +%s) - START ))s in)"
  BENCH_DEADLINE=$(( $(date +%s) + cap )) python3 benchmarks/gpu_bench.py --lengths "$LEN" --out "$OUT/explore.json" --append --recipes "$g" "$@" \
    2>&1 | grep -v -e '^{' -e 'it/s\]' -e 's/it\]' >> "$OUT/explore.log" || echo "group $g failed: $?"
  python3 - "$OUT/explore.json" <<'EOF' || true
import json, sys
for r in json.load(open(sys.argv[1]))["recipes"][-4:]:
    print(" ", r["recipe"], r.get("tokens_per_s"), r.get("peak_reserved_gib"), r.get("warmup_s"), r.get("process_wall_s"),
          (r.get("error") or "")[-300:].replace("\n", " | "))
EOF
}
compile_won() {  # did fast-b64-compile beat fast-b64?
  python3 - "$OUT/explore.json" <<'EOF'
import json, sys
by = {r["recipe"]: r for r in json.load(open(sys.argv[1]))["recipes"]}
a, b = by.get("fast-b64", {}).get("tokens_per_s"), by.get("fast-b64-compile", {}).get("tokens_per_s")
sys.exit(0 if a and b and b > 1.03 * a else 1)
EOF
}
run "fast-b64+fast-b128" 110
run "fast-b64-compile+fast-b128-compile" 200
run "t4-b128-rows1024+t4-b128-rows512+t4-b192-rows512" 110
run "lowmem-tok512+lowmem-tok1024" 110
run "trl-fast" 80 --warmup 3 --steps 6
if compile_won; then
  run "lowmem-tok512-compile" 120
  run "t4-b128-rows512-compile" 140
fi
echo "explore: $(( $(date +%s) - START )) s"
