"""The GPU benchmarks must run the first time on a lent GPU, whose minutes are few: their BENCH_SMOKE mode runs
the same code on a tiny model on the CPU. These tests check the scripts work and report what they should; they
measure nothing."""
import json
import os
import subprocess
import sys

from conftest import REPO

# (prompt, total) token lengths, Alpaca-like: what benchmarks/alpaca_lengths.py writes from the real sample
LENGTHS = [[p, p + r] for p, r in ((30, 40), (45, 80), (60, 20), (25, 150), (80, 60), (40, 35))]


def _bench(tmp_path, script, *args, timeout=3600):
    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps(LENGTHS))
    env = {k: v for k, v in os.environ.items() if k not in ("QLORA_PROFILE", "QLORA_RUN_DIR")}
    env.update(BENCH_SMOKE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--lengths", str(lengths),
                           "--out", str(tmp_path / "out.json"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text())


def test_gpu_bench_measures_each_recipe_and_compares_the_sanity_pairs(tmp_path):
    out = _bench(tmp_path, "gpu_bench.py", "--recipes", "kaggle-t4,sanity-seed,sanity-low-memory,unsloth-t4,trl-fast",
                 "--warmup", "1", "--steps", "2")
    by = {r["recipe"]: r for r in out["recipes"]}
    assert by["kaggle-t4"]["tokens_per_s"] > 0 and by["kaggle-t4"]["trainable_params"] > 0
    assert by["kaggle-t4"]["config"]["train.packing_row_tokens"] == 1024
    assert "skipped" in by["unsloth-t4"] and "skipped" in by["trl-fast"]  # not installed here: said, not crashed
    # low-memory's micro-batches are groups of whole examples up to train.micro_batch_tokens
    assert by["sanity-low-memory"]["config"]["train.micro_batch_tokens"] > 0
    sanity = out["sanity"]
    assert sanity["steps"] == 10 and set(sanity["pairs"]) == {"low-memory"}
    assert sanity["max_rel_diff"] < 0.05  # the same examples from the same seed: the same loss curve, within batch noise
    assert "| kaggle-t4 | " in out["table"] and "| unsloth-t4 | unsloth is not importable |" in out["table"]


def test_ddp_bench_kills_every_process_and_the_relaunch_resumes(tmp_path):
    out = _bench(tmp_path, "ddp_bench.py", "--work", str(tmp_path / "work"), "--warmup", "2", "--timed", "6",
                 "--only", "resume1")
    assert out["resume_1gpu"] == {"killed_after_checkpoint": 4, "killed": True, "resumed_from_step": 4,
                                  "final_step": 8, "steps_logged_once": True}
