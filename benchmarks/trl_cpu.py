"""TRL's SFTTrainer against the project's Trainer path on the CPU: the same tokenized examples, model, LoRA,
seed and TrainingArguments, in one process. It measures three things and asserts nothing:

* exactness: TRL's padding-free batch of the first micro-batch against the project's (DataCollatorWithFlattening),
  and the packed row's logits against each example run alone;
* the two loss curves, step by step, on the same batches (TRL's SFTConfig takes the project's arguments, so
  the sampler order and the learning-rate schedule are the same);
* tokens/s of training: the Trainer's own count of non-padding tokens over the wall time of train(), with
  no evaluation and no checkpoint in either.

    make bench-trl-cpu P="--steps 30"    # builds .venv-trl: trl 1.x needs datasets >= 4.7, the project pins 4.3.0
    .venv-trl/bin/python benchmarks/trl_cpu.py --steps 30 [-p data.source=../shared/data/alpaca_small.json]

Writes benchmarks/results/trl-cpu-<profile>-<data>-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from qlora_helpers import Stage, build_config
from qlora_helpers.config import parse_overrides
from qlora_helpers.data import load_tokenizer, prepare_data
from recipe import attach_lora, load_base
from qlora_helpers.packing import make_collator
from qlora_helpers.runs import environment
from qlora_helpers.train import training_datasets
from recipe import build_trainer

from gpu_bench import lora_dtypes, trl_trainer  # the GPU rows build SFTTrainer the same way


def exactness(stage: Stage, tokenizer, model) -> dict:
    """The first micro-batch through TRL's padding-free collator and the project's: the same tensors? And the
    packed row's logits against each example run alone: does any token see another example?"""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    train_ds, _ = training_datasets(stage)
    features = train_ds[: stage.cfg.train.micro_batch_size]
    theirs = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(features)
    ours = make_collator(stage, tokenizer)(features)
    same = {k: bool(torch.equal(theirs[k], ours[k])) for k in ("input_ids", "position_ids", "labels")}
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=theirs["input_ids"], position_ids=theirs["position_ids"]).logits[0].float()
        worst, start = 0.0, 0
        for f in features:
            n = len(f["input_ids"])
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0].float()
            worst = max(worst, (packed[start:start + n] - alone).abs().max().item())
            start += n
    model.train()
    return {"examples": len(features), "tokens": start, "same_batch_as_project": same,
            "max_abs_logit_diff_packed_vs_alone": round(worst, 6)}


def run(stage: Stage, tokenizer, which: str) -> dict:
    model = attach_lora(stage, load_base(stage))
    before = lora_dtypes(model)
    extra = {}
    if which == "project":
        trainer = build_trainer(stage, model, tokenizer)
        # the Trainer would evaluate at the last step (and keep the best checkpoint): training alone is timed
        trainer.args.eval_strategy, trainer.args.save_strategy = IntervalStrategy.NO, SaveStrategy.NO
        trainer.args.load_best_model_at_end = False
    else:
        extra = {"packing_exactness": exactness(stage, tokenizer, model)}
        # SFTConfig(padding_free=True): the micro-batch flattened into one row, as the project's collator does
        trainer = trl_trainer(stage, model, tokenizer, {"padding_free": True, "max_length": None})
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    losses = [round(e["loss"], 5) for e in trainer.state.log_history if "loss" in e]
    tokens = trainer.state.num_input_tokens_seen  # include_num_input_tokens_seen="non_padding" in both
    return {"trainer": which, "steps": trainer.state.global_step, "train_wall_s": round(wall, 2),
            "tokens": tokens, "tokens_per_s": round(tokens / wall, 1), "losses": losses,
            "lora_dtypes_before": before, "lora_dtypes_in_training": lora_dtypes(trainer.model), **extra}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="embedded")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("-p", "--param", action="append", default=[])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    overrides = {**parse_overrides(args.param), "train.max_steps": args.steps, "train.eval_steps": 10_000,
                 "train.save_steps": 10_000, "train.logging_steps": 1, "train.max_minutes": 0.0}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("project", "trl"):
            stage = Stage(build_config(args.profile, overrides), Path(tmp) / which)
            tokenizer = load_tokenizer(stage)
            prepare_data(stage, tokenizer)
            results.append(run(stage, tokenizer, which))
            r = results[-1]
            print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
    ours, theirs = results
    diffs = [abs(a - b) / b for a, b in zip(theirs["losses"], ours["losses"])]
    out = {"date": str(date.today()), "profile": args.profile, "overrides": overrides, "environment": environment(),
           "trl": __import__("trl").__version__, "results": results,
           "max_relative_loss_diff": round(max(diffs), 5), "mean_relative_loss_diff": round(sum(diffs) / len(diffs), 5),
           "speed_ratio_trl_over_project": round(theirs["tokens_per_s"] / ours["tokens_per_s"], 3)}
    name = f"trl-cpu-{args.profile}-{Path(str(overrides.get('data.source', 'embedded'))).stem}-{out['date']}.json"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / name).write_text(json.dumps(out, indent=2) + "\n")
    print(f"loss: TRL within {out['max_relative_loss_diff']:.2%} of the project's at every step "
          f"(mean {out['mean_relative_loss_diff']:.2%}); speed: TRL {out['speed_ratio_trl_over_project']}x "
          f"the project's tokens/s -> {Path(args.out) / name}")


if __name__ == "__main__":
    main()
