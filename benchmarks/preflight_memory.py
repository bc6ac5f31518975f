"""Measure peak GPU memory of QLoRA training steps and compare it with qlora_helpers.preflight's estimate.

Runs on a CUDA machine with a random-weights Phi-3-mini (same shapes, so the same memory as the real
model), the pipeline's own loading (NF4 + double quant, LoRA on the kaggle-t4 profile's targets) and the
Trainer, for fixed token counts (the estimate's slopes) and for Alpaca-like lengths (median about 150,
capped at 512: the conditions of the measurements in the README). One JSON line per case; the committed
benchmarks/preflight_memory.jsonl is what tests/test_preflight.py holds the estimate to.

    python benchmarks/preflight_memory.py --model /tmp/phi3 --out results.jsonl
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# name: (config overrides, example lengths per batch: "fixed:N" or "alpaca", steps)
CASES = {
    "fp16 b1 padded 512 ckpt": ({"train.micro_batch_size": 1, "train.gradient_checkpointing": True, "train.packing": False}, "fixed:512", 3),
    "fp16 b1 padded 512 no-ckpt": ({"train.micro_batch_size": 1, "train.gradient_checkpointing": False, "train.packing": False}, "fixed:512", 3),
    "fp16 b4 padded 512 ckpt": ({"train.micro_batch_size": 4, "train.gradient_checkpointing": True, "train.packing": False}, "padded:512", 3),
    "fp16 b4 padded 512 no-ckpt": ({"train.micro_batch_size": 4, "train.gradient_checkpointing": False, "train.packing": False}, "padded:512", 3),
    "fp16 packed 8x512 ckpt": ({"train.micro_batch_size": 8, "train.gradient_checkpointing": True}, "fixed:512", 3),
    "fp16 packed 8x512 no-ckpt": ({"train.micro_batch_size": 8, "train.gradient_checkpointing": False}, "fixed:512", 3),
    "fp16 packed 16x512 ckpt": ({"train.micro_batch_size": 16, "train.gradient_checkpointing": True}, "fixed:512", 3),
    "fp16 packed 8 alpaca ckpt": ({"train.micro_batch_size": 8, "train.gradient_checkpointing": True}, "alpaca", 12),
    "fp16 packed 64 alpaca ckpt": ({"train.micro_batch_size": 64, "train.gradient_checkpointing": True}, "alpaca", 8),
    "fp16 packed 16 alpaca no-ckpt": ({"train.micro_batch_size": 16, "train.gradient_checkpointing": False}, "alpaca", 12),
    "fp16 packed 32 alpaca no-ckpt": ({"train.micro_batch_size": 32, "train.gradient_checkpointing": False}, "alpaca", 8),
}


def make_random_model(path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Phi3Config

    config = Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                        pad_token_id=32000, eos_token_id=32000, bos_token_id=1)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def example_lengths(kind: str, batch: int, steps: int, rng: random.Random) -> list[list[int]]:
    """Lengths of the examples of each batch."""
    if kind.startswith("fixed:"):
        return [[int(kind.split(":")[1])] * batch for _ in range(steps)]
    if kind.startswith("padded:"):  # one full-length example per batch, the rest shorter: a real attention mask
        top = int(kind.split(":")[1])
        return [[top] + [rng.randint(top // 4, top - 1) for _ in range(batch - 1)] for _ in range(steps)]
    return [[max(16, min(512, int(rng.lognormvariate(5.01, 0.6)))) for _ in range(batch)] for _ in range(steps)]


def run_cases(model_path: str, dtype: str, names: list[str], out: Path) -> None:
    import numpy as np
    import torch
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    import importlib.metadata as md

    from qlora_helpers import Stage, build_config
    from recipe import attach_lora, load_base

    base = Stage(build_config("kaggle-t4", {"quant.compute_dtype": dtype, "model.name": model_path}))
    model = attach_lora(base, load_base(base))
    torch.cuda.synchronize()
    after_load = torch.cuda.memory_allocated()
    machine = (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, " + ", ".join(
        f"{pkg} {md.version(pkg)}" for pkg in ("transformers", "peft", "bitsandbytes")) + ", sdpa")
    rng = random.Random(0)

    def padded_collator(features):
        width = max(len(f["input_ids"]) for f in features)
        pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
        return {"input_ids": torch.tensor([pad(f["input_ids"], 0) for f in features]),
                "labels": torch.tensor([pad(f["labels"], -100) for f in features]),
                "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features])}

    for name in names:
        overrides, kind, steps = CASES[name]
        cfg = build_config("kaggle-t4", {"quant.compute_dtype": dtype, **overrides})
        batches = example_lengths(kind, cfg.train.micro_batch_size, steps, rng)
        examples = [{"input_ids": [rng.randint(10, 32000) for _ in range(n)],
                     "labels": [-100] * (n // 3) + [rng.randint(10, 32000) for _ in range(n - n // 3)]}
                    for batch in batches for n in batch]
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        else:
            model.gradient_checkpointing_disable()
        args = TrainingArguments(output_dir="/tmp/bench-out", max_steps=steps,
                                 per_device_train_batch_size=cfg.train.micro_batch_size, gradient_accumulation_steps=1,
                                 learning_rate=1e-4, optim="paged_adamw_8bit", fp16=dtype == "float16",
                                 bf16=dtype == "bfloat16", gradient_checkpointing=cfg.train.gradient_checkpointing,
                                 gradient_checkpointing_kwargs={"use_reentrant": False}, save_strategy="no",
                                 eval_strategy="no", logging_steps=1, report_to="none", remove_unused_columns=False,
                                 dataloader_num_workers=0, seed=0)
        collator = (DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
                    if cfg.train.packing else padded_collator)

        class InOrder(Trainer):  # batches exactly as built above
            def _get_train_sampler(self, *a, **k):
                return torch.utils.data.SequentialSampler(self.train_dataset)

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        free_before = torch.cuda.mem_get_info()[0]
        trainer = InOrder(model=model, args=args, train_dataset=examples, data_collator=collator)
        error = None
        try:
            trainer.train()
        except torch.OutOfMemoryError as exc:
            error = str(exc).splitlines()[0]
        peak_alloc, peak_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        device_used = free_before - torch.cuda.mem_get_info()[0]
        all_lengths = np.array([n for batch in batches for n in batch])
        stats = {"mean": float(all_lengths.mean()), "max": int(all_lengths.max()),
                 "p50": float(np.percentile(all_lengths, 50)), "p90": float(np.percentile(all_lengths, 90))}
        heaviest = max(sum(b) if cfg.train.packing else max(b) * len(b) for b in batches)
        record = {"case": name, "overrides": {"quant.compute_dtype": dtype, **overrides}, "dtype": dtype, "steps": steps, "heaviest_batch_tokens": heaviest, "length_stats": stats,
                  "weights_and_lora_alloc_gib": round(after_load / 2**30, 3),
                  "peak_allocated_gib": round(peak_alloc / 2**30, 3), "peak_reserved_gib": round(peak_reserved / 2**30, 3),
                  "device_used_growth_gib": round(device_used / 2**30, 3),
                  "error": error, "machine": machine}
        print(json.dumps(record), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
        trainer.optimizer = None
        del trainer
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="folder for the random-weights Phi-3-mini (made if missing)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").exists():
        make_random_model(args.model)
    names = [n for n in args.cases.split(",") if n] or list(CASES)
    run_cases(args.model, args.dtype, names, Path(args.out))


if __name__ == "__main__":
    main()
