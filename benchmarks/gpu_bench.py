"""GPU speed and memory of QLoRA recipes on a Phi-3-mini-sized model, side by side with Unsloth and TRL, in one launch.

    python benchmarks/gpu_bench.py --lengths .dev/alpaca_lengths.json --out $OUT/gpu_bench.json

Speed and memory do not depend on the weights, so the model is Phi-3-mini's architecture with random
weights (benchmarks/random_model.py), quantized NF4 + double quant in memory, with LoRA r=32 on all four
projections, trained by the project's own training code (benchmarks/recipe.py: notebook 03's cells, argument for argument). Sequence lengths
are drawn from the token lengths of the real Alpaca sample (benchmarks/alpaca_lengths.py writes them).
Each recipe runs in its own process, so memory peaks and caps do not leak between recipes.

The launch has two phases on one GPU. First the sanity-* recipes run side by side (they measure loss only):
the seed recipe and each profile train on the same batches of learnable data from the same seed, and the JSON's
"sanity" entry holds every pair's loss curves and their largest relative gap. Then the timed recipes run one
at a time: the project's profiles, Unsloth's two settings (the fastest peer) and TRL's SFTTrainer on the
project's data and LoRA, each measured as non-padding tokens/s over the optimizer steps after warm-up, peak CUDA
allocated and reserved, and MFU (4 x 3.72e9 FLOP per token against the bf16 matrix rate measured in the same
launch). A recipe with profile_steps also records a torch.profiler per-kernel table of that many steps after
its timed steps. The end prints the side-by-side table with each row's ratio to Unsloth's row of its kind.

BENCH_SMOKE=1 runs the same code on a tiny model on the CPU (it checks the script and measures nothing).
--recipes 'a+b+c' runs several recipes in one process on one model (exploration: quicker, peaks less clean).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PHI3_MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 pad_token_id=32000, eos_token_id=32000, bos_token_id=1)
FLOP_PER_TOKEN = 4 * 3.72e9  # forward + backward through a frozen base with LoRA
SMOKE = os.environ.get("BENCH_SMOKE") == "1"  # a tiny model on the CPU: checks the script, measures nothing
LEARNABLE_VOCAB = 259  # token ids 3..258: data a random-weights model can learn, for comparing loss curves
ALL_FOUR = "qkv_proj,o_proj,gate_up_proj,down_proj"

# Every recipe: a profile plus config overrides, and a memory cap (GiB, None = whole GPU). Optional: kind (the
# Unsloth row it is compared with: t4 or fast), warmup/steps (fewer for the slow recipes, to fit the launch in ten
# minutes), profile_steps (a torch.profiler table), unsloth_checkpointing (runs Unsloth instead, Llama-shaped as
# its Phi-3 checkpoints are), trl (runs TRL's SFTTrainer with these SFTConfig options instead of the project's
# Trainer), sanity (a loss-only run on learnable data, compared with sanity-seed).
RECIPES: dict[str, dict] = {
    # The seed report's recipe as it really ran: its Llama list matched only o_proj and down_proj on Phi-3.
    "seed-recipe": {"profile": "kaggle-t4-seed", "cap_gib": None, "warmup": 2, "steps": 8, "overrides": {
        "lora.target_modules": "o_proj,down_proj", "train.gradient_checkpointing": True}},
    # The project's profiles exactly as committed (qlora_helpers/recipes/*.yaml); kaggle-t4 under a T4-sized cap.
    "kaggle-t4": {"profile": "kaggle-t4", "cap_gib": 15.0, "kind": "t4", "overrides": {}},
    "gpu-fast": {"profile": "gpu-fast", "cap_gib": None, "kind": "fast", "profile_steps": 2, "warmup": 4, "overrides": {}},
    "low-memory": {"profile": "low-memory", "cap_gib": None, "warmup": 2, "steps": 6, "overrides": {}},
    # Unsloth on the same data and Trainer: fp16 batch 32 padded with its checkpointing under the cap (what a T4
    # runs), and its fastest setting on this GPU (bf16, batch 32, no checkpointing).
    "unsloth-t4": {"profile": "kaggle-t4", "cap_gib": 15.0, "kind": "t4", "unsloth_checkpointing": "unsloth", "overrides": {
        "quant.compute_dtype": "float16", "train.packing": False, "train.micro_batch_size": 32, "train.grad_accum": 1,
        "train.gradient_checkpointing": False, "train.packing_row_tokens": 0, "train.torch_compile": False,
        "lora.dropout": 0.0}},
    "unsloth-fast": {"profile": "kaggle-t4", "cap_gib": None, "kind": "fast", "unsloth_checkpointing": False, "overrides": {
        "quant.compute_dtype": "bfloat16", "train.packing": False, "train.micro_batch_size": 32, "train.grad_accum": 1,
        "train.gradient_checkpointing": False, "train.packing_row_tokens": 0, "train.torch_compile": False,
        "lora.dropout": 0.0}},
    # TRL's SFTTrainer on the project's tokenized data, model, LoRA and TrainingArguments. kaggle-t4's rows of 1,024
    # tokens have no SFTTrainer equivalent (padding-free flattens a micro-batch into one row and refuses a custom
    # collator): its nearest is bfd packing into 1,024-token bins, one bin per micro-step, accumulated to about
    # kaggle-t4's tokens per step. gpu-fast's one packed row per micro-batch is SFTTrainer's padding_free.
    "trl-t4": {"profile": "kaggle-t4", "cap_gib": 15.0, "kind": "t4", "compare": "kaggle-t4", "overrides": {},
               "trl": {"packing": True, "packing_strategy": "bfd", "max_length": 1024, "bins_per_micro_batch": 1}},
    "trl-fast": {"profile": "gpu-fast", "cap_gib": None, "kind": "fast", "compare": "gpu-fast", "warmup": 4, "overrides": {},
                 "trl": {"packing": False, "padding_free": True, "max_length": None}},
}
# trl-t4 stops at its first optimizer step (SFTTrainer casts the LoRA weights of a 4-bit model to bf16 and fp16's
# GradScaler cannot unscale bf16 gradients: measured 2026-12-02); the same with the weights put back in fp32.
RECIPES["trl-t4-fp32lora"] = {**RECIPES["trl-t4"], "trl": {**RECIPES["trl-t4"]["trl"], "lora_fp32": True}}
# Numerical sanity: the seed recipe (targets corrected) and every profile on the same batches of 8 examples from
# the same seed, on data a random-weights model can learn (tokens from a 256-id subset, so the loss can fall from
# ln(32064) toward ln(256)); their loss curves must agree within a few percent. Only the batch shape changes
# (8 x 1 instead of the profile's). low-memory's micro-batches are groups of up to 512 tokens, which cannot hold the
# seed's exact batches: it packs the same examples, two groups (about 12 examples) per step.
SANITY = {"steps": 10, "learning_rate": 1e-3}  # data: LEARNABLE_VOCAB
RECIPES["sanity-seed"] = {"profile": "kaggle-t4-seed", "cap_gib": None, "sanity": True, "overrides": {}}
for _profile in ("kaggle-t4", "gpu-fast"):
    RECIPES[f"sanity-{_profile}"] = {"profile": _profile, "cap_gib": None, "sanity": True, "overrides": {
        "train.micro_batch_size": 8, "train.grad_accum": 1}}
RECIPES["sanity-low-memory"] = {"profile": "low-memory", "cap_gib": None, "sanity": True, "overrides": {
    "train.grad_accum": 2}}
# Launches of at most ten minutes on one H200 (--recipes NAME takes these names too). headline: every speed and
# memory figure the README quotes, each profile beside Unsloth's row of its kind (386 s on 2026-12-02: kaggle-t4
# 39 s, unsloth-t4 91 s, gpu-fast 134 s with its compiling, unsloth-fast 64 s, low-memory 58 s).
# sanity+trl: the loss-only sanity runs side by side, then TRL's SFTTrainer rows, each followed by the project's
# profile it stands in for, so every TRL ratio compares rows of one launch (390 s on 2026-12-02, without
# trl-t4-fp32lora, which took 113 s in a call of its own).
LAUNCHES = {
    "headline": ["kaggle-t4", "unsloth-t4", "gpu-fast", "unsloth-fast", "low-memory"],
    "sanity": ["sanity-seed", "sanity-kaggle-t4", "sanity-gpu-fast", "sanity-low-memory"],
    "trl": ["trl-t4", "trl-t4-fp32lora", "kaggle-t4", "trl-fast", "gpu-fast"],
}
DEFAULT_RECIPES = LAUNCHES["headline"]

# Levers tried one at a time (--recipes with these names; 'a+b' shares one process): what wins becomes a profile.
LEVERS = {
    "t4-b128-rows1024": ("kaggle-t4", 15.0, {"train.micro_batch_size": 128, "train.packing_row_tokens": 1024,
                                             "train.torch_compile": False}),
    "t4-b128-rows512": ("kaggle-t4", 15.0, {"train.micro_batch_size": 128, "train.packing_row_tokens": 512,
                                            "train.torch_compile": False}),
    "t4-b192-rows512": ("kaggle-t4", 15.0, {"train.micro_batch_size": 192, "train.packing_row_tokens": 512,
                                            "train.torch_compile": False}),
    "t4-b128-rows512-compile": ("kaggle-t4", 15.0, {"train.micro_batch_size": 128, "train.packing_row_tokens": 512,
                                                    "train.torch_compile": True}),
    "fast-b64": ("gpu-fast", None, {"train.micro_batch_size": 64, "train.torch_compile": False}),
    "fast-b128": ("gpu-fast", None, {"train.micro_batch_size": 128, "train.torch_compile": False}),
    "fast-b64-compile": ("gpu-fast", None, {"train.micro_batch_size": 64, "train.torch_compile": True}),
    "fast-b128-compile": ("gpu-fast", None, {"train.micro_batch_size": 128, "train.torch_compile": True}),
    "lowmem-tok512": ("low-memory", None, {"train.micro_batch_tokens": 512, "train.torch_compile": False}),
    "lowmem-tok1024": ("low-memory", None, {"train.micro_batch_tokens": 1024, "train.torch_compile": False}),
    "lowmem-tok512-compile": ("low-memory", None, {"train.micro_batch_tokens": 512, "train.torch_compile": True}),
    "lowmem-b1": ("low-memory", None, {"train.micro_batch_tokens": 0, "train.micro_batch_size": 1,
                                       "train.torch_compile": False}),
}
for _name, (_profile, _cap, _over) in LEVERS.items():
    RECIPES[_name] = {"profile": _profile, "cap_gib": _cap, "overrides": _over, "kind": _name.split("-")[0],
                      "profile_steps": 2, **({"warmup": 3, "steps": 8} if _name.startswith("lowmem") else
                                             {"warmup": 4, "steps": 10})}

UNSLOTH_DIR = Path(tempfile.gettempdir()) / "unsloth-phi3-mini-random"
TINY = dict(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=4096, pad_token_id=32000, eos_token_id=32000, bos_token_id=1)


def unsloth_model(cfg, checkpointing, seed):
    """Unsloth's own loader and LoRA on a Llama-shaped Phi-3-mini with random weights saved once to disk
    (its loader reads a folder with a tokenizer), r=32 on all seven split projections."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
    from unsloth import FastLanguageModel

    dtype = getattr(torch, cfg.quant.compute_dtype)
    UNSLOTH_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{UNSLOTH_DIR}.lock", "w") as lock:  # two processes may run both Unsloth recipes at once: save once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (UNSLOTH_DIR / "config.json").exists():
            shape = {k: v for k, v in PHI3_MINI.items() if not k.endswith("token_id")}
            with torch.device("cuda"):
                rnd = AutoModelForCausalLM.from_config(LlamaConfig(**shape, pad_token_id=2, bos_token_id=1, eos_token_id=2),
                                                       dtype=torch.bfloat16)
            rnd.save_pretrained(UNSLOTH_DIR)
            del rnd
            vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 32000)}}
            PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>",
                                    bos_token="<s>", eos_token="</s>", pad_token="</s>").save_pretrained(UNSLOTH_DIR)
            torch.cuda.empty_cache()
    model, tok = FastLanguageModel.from_pretrained(str(UNSLOTH_DIR), max_seq_length=cfg.data.max_seq_len, dtype=dtype,
                                                   load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(
        model, r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0, bias="none", random_state=seed,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing=checkpointing)
    return model, tok


def alpaca_like_examples(lengths: list[list[int]], n: int, max_len: int, seed: int, vocab: int = 32000) -> list[dict]:
    """Random token ids (3..vocab-1) with the (prompt, total) token lengths of real Alpaca examples."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, total = rng.choice(lengths)
        total = min(total, max_len)
        prompt = min(prompt, total - 1)
        ids = [rng.randrange(3, vocab) for _ in range(total)]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "prompt_len": prompt})
    return out


def bench_tokenizer():
    """A stand-in tokenizer: the collators only need pad ids (no text is ever decoded here)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0, "<s>": 1, "<pad>": 2}, unk_token="<unk>")),
                                  pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="<pad>")
    tok.pad_token_id  # noqa: B018
    return tok


def recipe_config(name: str, warmup: int, steps: int, seed: int, profile_steps: int = 0):
    """The validated Config a recipe trains with (profile + overrides + the benchmark's own timing keys)."""
    from qlora_helpers import build_config

    recipe = RECIPES[name]
    smoke_over = {"quant.compute_dtype": "float32", "train.use_liger": False, "model.attn_implementation": "sdpa",
                  "train.optim": "adamw_torch", "train.torch_compile": False} if SMOKE else {}
    sanity_over = {"train.learning_rate": SANITY["learning_rate"]} if recipe.get("sanity") else {}
    return build_config(recipe["profile"], {**recipe["overrides"], **sanity_over, **smoke_over,
                                            "train.max_steps": warmup + steps + profile_steps,
                                            "train.eval_steps": 10_000, "train.save_steps": 10_000,
                                            "train.logging_steps": 1, "train.max_minutes": 0.0, "train.seed": seed})


def examples_needed(cfg, lengths: list[list[int]], steps: int) -> int:
    """Examples for `steps` optimizer steps (micro-batches of micro_batch_tokens hold ~tokens / mean length)."""
    t = cfg.train
    per_step = t.micro_batch_size * t.grad_accum
    if t.micro_batch_tokens:
        mean = sum(min(total, cfg.data.max_seq_len) for _, total in lengths) / len(lengths)
        per_step = math.ceil(1.2 * t.grad_accum * t.micro_batch_tokens / mean)
    return per_step * (steps + 1)


def trl_trainer(stage, model, tokenizer, trl_opts: dict):
    """TRL's SFTTrainer with the project's TrainingArguments (as SFTConfig) on the project's tokenized examples."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from qlora_helpers.train import training_datasets
    from recipe import training_arguments

    train_ds, _ = training_datasets(stage)
    cfg = stage.cfg
    args = training_arguments(stage, len(train_ds)).to_dict()
    args.update(eval_strategy="no", save_strategy="no", load_best_model_at_end=False, metric_for_best_model=None,
                greater_is_better=None, report_to="none")
    opts = dict(trl_opts)
    bins = opts.pop("bins_per_micro_batch", None)
    lora_fp32 = opts.pop("lora_fp32", False)
    if bins:  # one bin of max_length tokens per micro-step, accumulated to about the profile's tokens per step
        mean = sum(len(e["input_ids"]) for e in train_ds) / len(train_ds)
        tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * mean
        args.update(per_device_train_batch_size=bins,
                    gradient_accumulation_steps=max(1, round(tokens_per_step / (0.95 * opts["max_length"] * bins))))
    before = lora_dtypes(model)
    trainer = SFTTrainer(model=model, args=SFTConfig(**args, **opts), train_dataset=Dataset.from_list(train_ds),
                         processing_class=tokenizer)
    after_init = lora_dtypes(trainer.model)
    if lora_fp32:  # undo SFTTrainer's cast of the LoRA weights to bf16 (under fp16 the GradScaler refuses bf16 grads)
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    trainer.bench_info = {"lora_dtypes_before": before, "lora_dtypes_after_sft_init": after_init,
                          "lora_dtypes_trained": lora_dtypes(trainer.model),
                          "is_loaded_in_4bit": bool(getattr(model, "is_loaded_in_4bit", False)),
                          "sft": {k: getattr(trainer.args, k) for k in (
                              "packing", "packing_strategy", "padding_free", "max_length", "per_device_train_batch_size",
                              "gradient_accumulation_steps", "gradient_checkpointing", "bf16", "fp16",
                              "use_liger_kernel")}, "padding_free_in_use": bool(getattr(trainer, "padding_free", False)),
                         "rows_after_prepare": len(trainer.train_dataset)}
    return trainer


def lora_dtypes(model) -> dict:
    out: dict = {}
    for p in model.parameters():
        if p.requires_grad:
            out[str(p.dtype)] = out.get(str(p.dtype), 0) + p.numel()
    return out


KERNEL_KINDS = [  # (kind, regex on the kernel name), first match wins
    ("4-bit dequantize (bitsandbytes)", r"dequant|kDequantize"),
    ("attention", r"flash|fmha|attention|flex|sdpa|cutlassF|cutlassB|mem_eff"),
    ("matmul", r"gemm|gemv|cutlass|nvjet|sm90_xmma|sm80_xmma|cublas|splitKreduce|wgmma|Kernel2"),
    ("optimizer (paged AdamW 8-bit)", r"optimizer|adam|Optimizer"),
    ("fused Triton (Liger, compiled)", r"^triton_|liger|_kernel$|_fwd|_bwd|rms|swiglu|rope|cross_entropy"),
    ("copies and casts", r"copy|Memcpy|Memset|cast|convert|fill"),
    ("elementwise and reductions", r"elementwise|vectorized|unrolled|reduce|Reduce|index|scatter|gather|cat|where"),
]


def kernel_table(prof, wall_s: float, steps: int, top: int = 40) -> dict:
    """torch.profiler's CUDA kernels over the profiled steps: the top kernels by GPU time, GPU time by kind, and
    how much of the wall time the GPU was busy (the rest is the CPU launching work or waiting)."""
    rows = []
    for evt in prof.key_averages():
        device_us = getattr(evt, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(evt, "self_cuda_time_total", 0)
        if device_us and str(getattr(evt, "device_type", "")).endswith("CUDA"):
            rows.append({"kernel": evt.key[:160], "calls": evt.count, "gpu_ms": round(device_us / 1e3, 3)})
    rows.sort(key=lambda r: -r["gpu_ms"])
    total = sum(r["gpu_ms"] for r in rows)
    kinds: dict[str, float] = {}
    for r in rows:
        kind = next((k for k, rx in KERNEL_KINDS if re.search(rx, r["kernel"])), "other")
        r["kind"] = kind
        kinds[kind] = kinds.get(kind, 0.0) + r["gpu_ms"]
    return {"steps": steps, "wall_ms": round(wall_s * 1e3, 1), "gpu_busy_ms": round(total, 1),
            "gpu_busy_share": round(total / (wall_s * 1e3), 3) if wall_s else None,
            "by_kind": {k: {"gpu_ms": round(v, 1), "share": round(v / total, 3)} for k, v in
                        sorted(kinds.items(), key=lambda kv: -kv[1])} if total else {},
            "top_kernels": rows[:top]}


def run_recipes(names: list[str], lengths_path: str, warmup_default: int, steps_default: int, seed: int) -> list[dict]:
    """Recipes in this process. Several names share one model (built for the first): for quick exploration only."""
    import gc

    import torch
    from transformers import Phi3Config, TrainerCallback, set_seed

    from qlora_helpers import Stage
    from qlora_helpers.model import count_parameters
    from qlora_helpers.runs import claim_run_dir
    from recipe import attach_lora, build_trainer
    from random_model import build_random_model

    first = RECIPES[names[0]]
    if first["cap_gib"] and not SMOKE:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(first["cap_gib"] * 2**30 / total)
    lengths = json.loads(Path(lengths_path).read_text())
    model = tokenizer = None
    results = []
    for name in names:
        recipe = RECIPES[name]
        warmup, steps = recipe.get("warmup", warmup_default), recipe.get("steps", steps_default)
        if recipe.get("sanity"):
            warmup, steps = 0, SANITY["steps"]
        if SMOKE:
            warmup, steps = min(warmup, 1), (steps if recipe.get("sanity") else min(steps, 2))
        profile_steps = 0 if SMOKE else recipe.get("profile_steps", 0)
        cfg = recipe_config(name, warmup, steps, seed, profile_steps)
        set_seed(seed)
        examples = alpaca_like_examples(lengths, examples_needed(cfg, lengths, warmup + steps + profile_steps),
                                        cfg.data.max_seq_len, seed, vocab=LEARNABLE_VOCAB if recipe.get("sanity") else 32000)
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = claim_run_dir(Path(tmp) / "run")  # a run directory of this tool's, marked before data lands
            stage = Stage(cfg, run_dir)
            (run_dir / "data").mkdir()
            for split, part in (("train", examples), ("val", examples[:8])):
                (run_dir / "data" / f"{split}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in part))
            t0 = time.time()
            if name.startswith("unsloth"):
                model, tokenizer = unsloth_model(cfg, recipe["unsloth_checkpointing"], seed)
            elif model is None:
                device = "cpu" if SMOKE else "cuda"
                model = attach_lora(stage, build_random_model(stage, Phi3Config(**(TINY if SMOKE else PHI3_MINI)), device))
                tokenizer = bench_tokenizer()
            elif hasattr(model, "gradient_checkpointing_disable"):
                model.gradient_checkpointing_disable()  # the Trainer turns it on again where the recipe has it
            load_s = time.time() - t0
            if not SMOKE:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()

            marks: dict = {}
            losses: list = []
            profiled: dict = {}

            class Clock(TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    step = state.global_step
                    if step in (warmup, warmup + steps) or (profile_steps and step == warmup + steps + profile_steps):
                        if not SMOKE:
                            torch.cuda.synchronize()
                        marks[step] = (time.time(), state.num_input_tokens_seen)
                    if profile_steps and step == warmup + steps:
                        profiled["prof"] = torch.profiler.profile(
                            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                        profiled["prof"].__enter__()
                        marks["prof_start"] = time.time()
                    if profile_steps and step == warmup + steps + profile_steps and "prof" in profiled:
                        profiled["prof"].__exit__(None, None, None)
                        profiled["wall_s"] = time.time() - marks["prof_start"]

                def on_log(self, args, state, control, logs=None, **kw):
                    if logs and "loss" in logs and "train_loss" not in logs:
                        losses.append(round(float(logs["loss"]), 4))

            info: dict = {}
            if recipe.get("trl"):
                trainer = trl_trainer(stage, model, tokenizer, recipe["trl"])
                info = trainer.bench_info
            else:
                trainer = build_trainer(stage, model, tokenizer)
            trainer.add_callback(Clock())
            if not SMOKE:
                torch.cuda.synchronize()
            marks[0] = (time.time(), 0)
            t_train = time.time()
            trainer.train()
            train_s = time.time() - t_train
        (t_a, tok_a), (t_b, tok_b) = marks[warmup], marks[warmup + steps]
        tps = (tok_b - tok_a) / (t_b - t_a)
        res = {"recipe": name, "profile": recipe["profile"], "overrides": recipe["overrides"], "cap_gib": recipe["cap_gib"],
               "kind": recipe.get("kind"),
               "config": {k: v for k, v in cfg.flat().items() if k.startswith(("train.", "lora.", "quant.", "model.attn", "data.max"))},
               "tokens_per_s": round(tps, 1), "mfu": None if SMOKE else round(tps * FLOP_PER_TOKEN / MATMUL_TFLOPS / 1e12, 4),
               "steps_timed": steps, "warmup_steps": warmup, "step_s": round((t_b - t_a) / steps, 3),
               "tokens_per_step": round((tok_b - tok_a) / steps), "warmup_s": round(t_a - marks[0][0], 1),
               "train_s": round(train_s, 1),
               "peak_allocated_gib": None if SMOKE else round(torch.cuda.max_memory_allocated() / 2**30, 2),
               "peak_reserved_gib": None if SMOKE else round(torch.cuda.max_memory_reserved() / 2**30, 2),
               "trainable_params": count_parameters(model)["trainable"], "load_s": round(load_s, 1),
               "losses": losses if recipe.get("sanity") else losses[:10], **info}
        if "prof" in profiled and "wall_s" in profiled:
            res["profile_table"] = kernel_table(profiled["prof"], profiled["wall_s"], profile_steps)
        results.append(res)
        print("RESULT " + json.dumps(res), flush=True)
        del trainer
        if name.startswith("unsloth"):
            model = None
        gc.collect()
    return results


MATMUL_TFLOPS = float(os.environ.get("BENCH_MATMUL_TFLOPS", "790"))


def measure_matmul_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return round(10 * 2 * 8192**3 / (time.time() - t0) / 1e12, 1)


def versions() -> dict:
    """Versions of what the recipes import, Unsloth's and TRL's from their own processes' path too."""
    from importlib.metadata import distributions

    extra = [p for p in os.environ.get("BENCH_UNSLOTH_PATH", "").split(os.pathsep) if p]
    found = {d.metadata["Name"].lower().replace("_", "-"): d.version  # the first on the path wins, as for imports
             for d in reversed(list(distributions(path=extra + sys.path)))}
    return {name: found.get(name) for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes",
                                               "liger-kernel", "triton", "trl", "datasets", "unsloth", "unsloth-zoo")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                    help="comma-separated names (or launches: " + ", ".join(LAUNCHES) + "); names joined by '+' share "
                         "one process and one model")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--append", action="store_true", help="add to an existing --out file (same machine, later call)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        if args.one.startswith("unsloth") and not SMOKE:
            import unsloth  # noqa: F401  (must come before transformers; never in a TRL process: it patches TRL)
        run_recipes(args.one.split("+"), args.lengths, args.warmup, args.steps, args.seed)
        return
    import torch

    t_launch = time.time()
    tflops = 0.0 if SMOKE else measure_matmul_tflops()
    results = {"gpu": "smoke test on CPU" if SMOKE else torch.cuda.get_device_name(0), "bf16_matmul_tflops_measured": tflops,
               "versions": versions(), "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "recipes": []}
    if args.append and Path(args.out).exists():
        results["recipes"] = json.loads(Path(args.out).read_text())["recipes"]
    previous = list(results["recipes"])
    groups = list(dict.fromkeys(g for name in args.recipes.split(",") for g in LAUNCHES.get(name, [name])))
    done: dict[str, dict] = {}
    lock = threading.Lock()

    def record(res_list: list[dict]) -> None:
        with lock:
            for res in res_list:
                done[res["recipe"]] = res
                print(json.dumps({k: v for k, v in res.items() if k not in ("profile_table", "config")}), flush=True)
            order = [n for g in groups for n in g.split("+")]
            results["recipes"] = previous + [done[n] for n in order if n in done]
            results["sanity"] = sanity_check(results["recipes"])
            results["table"] = side_by_side(results)
            results["launch_s"] = round(time.time() - t_launch, 1)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    # Phase 1: the loss-only sanity runs side by side (they share the GPU; nothing is timed while they run).
    sanity = [g for g in groups if all(RECIPES[n].get("sanity") for n in g.split("+"))]
    threads = [threading.Thread(target=lambda g=g: record(run_group(g, args, tflops))) for g in sanity]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Phase 2: the timed recipes, one at a time, each alone on the GPU.
    for g in groups:
        if g not in sanity:
            record(run_group(g, args, tflops))
    print("SANITY " + json.dumps(results.get("sanity")), flush=True)
    print(f"launch: {time.time() - t_launch:.0f} s")
    print(results.get("table", ""))


def run_group(group: str, args, tflops: float) -> list[dict]:
    """One process for the recipes of `group` ('a' or 'a+b'); their results, or the error it died with."""
    import importlib.util

    names = group.split("+")
    t0 = time.time()
    needs_unsloth = any(n.startswith(("unsloth", "trl")) for n in names)
    if needs_unsloth and not os.environ.get("BENCH_UNSLOTH_PATH"):
        missing = [p for p in ("unsloth", "trl") if any(n.startswith(p) for n in names) and importlib.util.find_spec(p) is None]
        if missing:
            return [{"recipe": n, "skipped": f"{missing[0]} is not importable"} for n in names]
    env = {**os.environ, "BENCH_MATMUL_TFLOPS": str(tflops)}
    if needs_unsloth and os.environ.get("BENCH_UNSLOTH_PATH"):
        # Unsloth's and TRL's own dependencies (trl, datasets, torchao, ...) only on their own processes' path.
        env["PYTHONPATH"] = os.environ["BENCH_UNSLOTH_PATH"] + os.pathsep + env.get("PYTHONPATH", "")
    deadline = float(os.environ.get("BENCH_DEADLINE") or 0)  # epoch seconds: a group still running then is stopped
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", group, "--lengths", args.lengths, "--out", args.out,
                               "--warmup", str(args.warmup), "--steps", str(args.steps), "--seed", str(args.seed)],
                              capture_output=True, text=True, env=env, timeout=max(1.0, deadline - time.time()) if deadline else None)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        proc = subprocess.CompletedProcess(exc.cmd, -9, out, "stopped at BENCH_DEADLINE")
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            found[res["recipe"]] = res
    out = [found.get(n) or {"recipe": n, "error": (proc.stderr or proc.stdout)[-2500:]} for n in names]
    for res in out:
        res["process_wall_s"] = round(time.time() - t0, 1)
    return out


def sanity_check(results: list[dict]) -> dict | None:
    """Each sanity-<profile> run against sanity-seed on the same data: how far apart their losses are, step by step."""
    by = {r["recipe"]: r for r in results}
    seed = by.get("sanity-seed", {}).get("losses")
    if not seed:
        return None
    out = {"steps": len(seed), "learning_rate": SANITY["learning_rate"], "loss_seed_recipe": seed, "pairs": {}}
    for name, r in by.items():
        if not name.startswith("sanity-") or name == "sanity-seed" or not r.get("losses"):
            continue
        other = r["losses"]
        n = min(len(seed), len(other))
        rel = [abs(a - b) / abs(a) for a, b in zip(seed[:n], other[:n])]
        out["pairs"][name.removeprefix("sanity-")] = {
            "steps": n, "losses": other[:n], "loss_drop": round(other[0] - other[n - 1], 4),
            "loss_drop_seed_recipe": round(seed[0] - seed[n - 1], 4),
            "max_rel_diff": round(max(rel), 4), "final_rel_diff": round(rel[-1], 4)}
    out["max_rel_diff"] = max((p["max_rel_diff"] for p in out["pairs"].values()), default=None)
    return out


def side_by_side(results: dict) -> str:
    """The launch's table: every timed recipe with tokens/s, MFU, peak reserved and its ratio to Unsloth's row of
    the same kind in this launch (a TRL row: to the project's profile it stands in for, in this launch)."""
    rows = [r for r in results["recipes"] if not r["recipe"].startswith("sanity-")]
    unsloth = {r["kind"]: r.get("tokens_per_s") for r in rows if r["recipe"].startswith("unsloth") and r.get("kind")}
    ours = {r["recipe"]: r.get("tokens_per_s") for r in rows}
    lines = ["| recipe | tokens/s | MFU | peak reserved | vs Unsloth | vs the project |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['recipe']} | {r.get('skipped') or 'error'} | | | | |")
            continue
        ref = unsloth.get(r.get("kind"))
        ratio = f"{r['tokens_per_s'] / ref:.2f}x vs unsloth-{r['kind']}" if ref else ""
        mine = RECIPES.get(r["recipe"], {}).get("compare")
        vs_ours = f"{r['tokens_per_s'] / ours[mine]:.2f}x vs {mine}" if ours.get(mine) else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
        peak = f"{r['peak_reserved_gib']:.2f} GiB" if r.get("peak_reserved_gib") is not None else ""
        lines.append(f"| {r['recipe']} | {r['tokens_per_s']:,.0f} | {mfu} | {peak} | {ratio} | {vs_ours} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
