"""Padding-free packing vs padded batches on the same examples, same steps, same seed (CPU or GPU).

    .venv/bin/python benchmarks/cpu_packing.py --steps 30 [-p data.source=../shared/data/alpaca_small.json]

Trains the configured profile twice through the project's own training code, once with
``train.packing=true`` and once with ``false``, and writes wall time, tokens/s (non-padding) and the final
training loss of each to benchmarks/results/. A benchmark, not a test: it measures, it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

from qlora_helpers import Stage, build_config
from qlora_helpers.config import parse_overrides
from qlora_helpers.data import load_tokenizer, prepare_data
from qlora_helpers.runs import environment
from recipe import attach_lora, build_trainer, load_base, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="embedded")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("-p", "--param", action="append", default=[])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    base = {**parse_overrides(args.param), "train.max_steps": args.steps, "train.eval_steps": args.steps,
            "train.save_steps": args.steps, "train.logging_steps": 1}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for packing in (True, False):
            cfg = build_config(args.profile, {**base, "train.packing": packing})
            run_dir = Path(tmp) / f"packing-{packing}"
            stage = Stage(cfg, run_dir)
            tok = load_tokenizer(stage)
            data = prepare_data(stage, tok)
            trainer = build_trainer(stage, attach_lora(stage, load_base(stage)), tok)
            t0 = time.time()
            m = train(stage, trainer)
            results.append({"packing": packing, "steps": m["steps"], "train_wall_s": round(time.time() - t0, 2),
                            "tokens_seen": m["tokens_seen"], "tokens_per_s": m["tokens_per_s"],
                            "train_loss": m["train_loss"], "examples_seen": m["examples_seen"],
                            "peak_rss_gib": m["memory"]["peak_rss_gib"], "data_source": data["source"],
                            "train_tokens_p50_p95_max": [data["train_lengths"][k] for k in ("p50", "p95", "max")]})
            print(json.dumps(results[-1]), flush=True)
    packed, padded = results
    out = {"date": str(date.today()), "profile": args.profile, "overrides": base, "environment": environment(),
           "results": results, "speedup_wall": round(padded["train_wall_s"] / packed["train_wall_s"], 3)}
    name = f"packing-{args.profile}-{Path(str(base.get('data.source', 'embedded'))).stem}-{out['date']}.json"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / name).write_text(json.dumps(out, indent=2) + "\n")
    print(f"speed-up of packing (wall time): {out['speedup_wall']}x -> {Path(args.out) / name}")


if __name__ == "__main__":
    main()
