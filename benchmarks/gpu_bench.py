"""GPU speed and memory of QLoRA recipes on a Phi-3-mini-sized model, side by side, in one launch.

    python benchmarks/gpu_bench.py --lengths .dev/alpaca_lengths.json --out $OUT/gpu_bench.json

Speed and memory do not depend on the weights, so the model is Phi-3-mini's architecture with random
weights (benchmarks/random_model.py), quantized NF4 + double quant in memory, with LoRA r=32,
trained by the project's own training code (qlora_helpers.train.build_trainer). Sequence lengths are
drawn from the token lengths of the real Alpaca sample (benchmarks/alpaca_lengths.py writes them).
Each recipe runs in its own process so memory peaks and caps do not leak between recipes; on a host with
several GPUs the recipes run side by side, one per GPU at a time (--gpus), in the same launch.

Measured per recipe: non-padding tokens/s over the optimizer steps after warm-up, peak CUDA allocated and
reserved, trainable parameters, MFU (4 x 3.72e9 FLOP per token against the GPU's measured bf16 matrix
rate). The sanity-* pair trains the seed recipe and gpu-fast on the same batches of learnable data from the
same seed; the JSON's "sanity" entry holds both loss curves and their largest relative gap.

BENCH_SMOKE=1 runs the same code on a tiny model on the CPU (it checks the script and measures nothing).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PHI3_MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 pad_token_id=32000, eos_token_id=32000, bos_token_id=1)
FLOP_PER_TOKEN = 4 * 3.72e9
SMOKE = os.environ.get("BENCH_SMOKE") == "1"  # a tiny model on the CPU: checks the script, measures nothing
LEARNABLE_VOCAB = 259  # token ids 3..258: data a random-weights model can learn, for comparing loss curves          # forward + backward through a frozen base with LoRA
ALL_FOUR = "qkv_proj,o_proj,gate_up_proj,down_proj"

# Every recipe: config overrides on a profile, plus a memory cap (GiB, None = whole GPU). Recipes named
# unsloth-* run Unsloth (the fastest peer) on the same data and Trainer, Llama-shaped as its Phi-3 checkpoints are.
RECIPES: dict[str, dict] = {
    # The seed report's recipe as it really ran: its Llama list matched only o_proj and down_proj on Phi-3.
    "seed-recipe": {"profile": "kaggle-t4-seed", "cap_gib": None, "overrides": {
        "lora.target_modules": "o_proj,down_proj", "train.gradient_checkpointing": True}},
    # The project's kaggle-t4 profile as committed, under a T4-sized cap, fp16.
    "kaggle-t4": {"profile": "kaggle-t4", "cap_gib": 15.0, "overrides": {}},
    # The fastest settings for a large GPU.
    "fast-bf16": {"profile": "gpu-fast", "cap_gib": None, "overrides": {}},
    # Least memory: batch 1, sequences up to 512, all four projections.
    "low-memory": {"profile": "low-memory", "cap_gib": None, "overrides": {}},
    "unsloth-t4": {"profile": "kaggle-t4", "cap_gib": 15.0, "unsloth_checkpointing": "unsloth", "overrides": {
        "quant.compute_dtype": "float16", "train.packing": False, "train.micro_batch_size": 32, "train.grad_accum": 1,
        "train.gradient_checkpointing": False, "lora.dropout": 0.0}},
    "unsloth-fast": {"profile": "kaggle-t4", "cap_gib": None, "unsloth_checkpointing": False, "overrides": {
        "quant.compute_dtype": "bfloat16", "train.packing": False, "train.micro_batch_size": 32, "train.grad_accum": 1,
        "train.gradient_checkpointing": False, "lora.dropout": 0.0}},
}
# Levers tried one at a time (python benchmarks/gpu_bench.py --recipes sweep): what wins becomes a profile default.
T4 = {"quant.compute_dtype": "float16", "model.attn_implementation": "sdpa", "lora.dropout": 0.0, "train.grad_accum": 1}
FAST = {"quant.compute_dtype": "bfloat16", "lora.dropout": 0.0, "train.grad_accum": 1, "train.gradient_checkpointing": False}
SWEEP = {
    "t4-b8-ckpt": {**T4, "train.micro_batch_size": 8, "train.gradient_checkpointing": True},
    "t4-b32-ckpt": {**T4, "train.micro_batch_size": 32, "train.gradient_checkpointing": True},
    "t4-b32-ckpt-liger": {**T4, "train.micro_batch_size": 32, "train.gradient_checkpointing": True, "train.use_liger": True},
    "t4-b16-nockpt-liger": {**T4, "train.micro_batch_size": 16, "train.gradient_checkpointing": False, "train.use_liger": True},
    "fast-b32-flex": {**FAST, "model.attn_implementation": "flex_attention", "train.micro_batch_size": 32},
    "fast-b32-flex-liger": {**FAST, "model.attn_implementation": "flex_attention", "train.micro_batch_size": 32, "train.use_liger": True},
    "fast-b32-sdpa-liger": {**FAST, "model.attn_implementation": "sdpa", "train.micro_batch_size": 32, "train.use_liger": True},
    "t4-b64-ckpt-liger": {**T4, "train.micro_batch_size": 64, "train.gradient_checkpointing": True, "train.use_liger": True},
    "t4-b64-ckpt-liger-dropout": {**T4, "lora.dropout": 0.1, "train.micro_batch_size": 64, "train.gradient_checkpointing": True, "train.use_liger": True},
    "fast-b64-flex-liger": {**FAST, "model.attn_implementation": "flex_attention", "train.micro_batch_size": 64, "train.use_liger": True},
}
for _name, _over in SWEEP.items():
    RECIPES[_name] = {"profile": "kaggle-t4", "cap_gib": 15.0 if _name.startswith("t4") else None, "overrides": _over}
# Packed rows of at most N tokens instead of one row per micro-batch: sdpa's block-diagonal mask is dense, so a
# 7,000-token row spends most of its attention on masked-out blocks (the T4 has no flash/flex attention).
for _rows in (1024, 2048):
    RECIPES[f"t4-b64-rows{_rows}"] = {"profile": "kaggle-t4", "cap_gib": 15.0, "overrides": {
        "train.micro_batch_size": 64, "train.packing_row_tokens": _rows}}
RECIPES["t4-b128-rows1024"] = {"profile": "kaggle-t4", "cap_gib": 15.0, "overrides": {
    "train.micro_batch_size": 128, "train.packing_row_tokens": 1024}}
RECIPES["fast-b64-rows2048"] = {"profile": "gpu-fast", "cap_gib": None, "overrides": {"train.packing_row_tokens": 2048}}

# Numerical sanity: recipe 1 (targets corrected) and recipe 3 on the same batches of 8 from the same seed, on data
# a random-weights model can learn (tokens from a 256-id subset, so the loss can fall from ln(32064) toward
# ln(256)); their loss curves must agree within a few percent. Only the batch shape of recipe 3 changes (8 x 1).
SANITY = {"steps": 20, "learning_rate": 1e-3}  # data: LEARNABLE_VOCAB
RECIPES["sanity-seed"] = {"profile": "kaggle-t4-seed", "cap_gib": None, "sanity": True, "overrides": {}}
RECIPES["sanity-fast"] = {"profile": "gpu-fast", "cap_gib": None, "sanity": True, "overrides": {
    "train.micro_batch_size": 8, "train.grad_accum": 1}}
DEFAULT_RECIPES = ["seed-recipe", "kaggle-t4", "fast-bf16", "low-memory", "unsloth-t4", "unsloth-fast",
                   "sanity-seed", "sanity-fast"]

UNSLOTH_DIR = Path(tempfile.gettempdir()) / "unsloth-phi3-mini-random"


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
    with open(f"{UNSLOTH_DIR}.lock", "w") as lock:  # two GPUs may run both Unsloth recipes at once: save once
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


TINY = dict(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=4096, pad_token_id=32000, eos_token_id=32000, bos_token_id=1)


def run_recipe(name: str, lengths_path: str, warmup: int, steps: int, seed: int) -> dict:
    recipe = RECIPES[name]
    if recipe.get("sanity"):
        warmup, steps = 0, SANITY["steps"]
    import torch
    from transformers import Phi3Config, TrainerCallback, set_seed

    from qlora_helpers import Stage, build_config
    from qlora_helpers.model import attach_lora, count_parameters
    from qlora_helpers.train import build_trainer
    from random_model import build_random_model

    device = "cpu" if SMOKE else "cuda"
    if recipe["cap_gib"] and not SMOKE:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(recipe["cap_gib"] * 2**30 / total)
    smoke_over = {"quant.compute_dtype": "float32", "train.use_liger": False, "model.attn_implementation": "sdpa",
                  "train.optim": "adamw_torch"} if SMOKE else {}
    sanity_over = {"train.learning_rate": SANITY["learning_rate"]} if recipe.get("sanity") else {}
    cfg = build_config(recipe["profile"], {**recipe["overrides"], **sanity_over, **smoke_over, "train.max_steps": warmup + steps,
                                           "train.eval_steps": 10_000, "train.save_steps": 10_000,
                                           "train.logging_steps": 1, "train.max_minutes": 0.0, "train.seed": seed})
    set_seed(seed)
    lengths = json.loads(Path(lengths_path).read_text())
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum
    examples = alpaca_like_examples(lengths, per_step * (warmup + steps + 1), cfg.data.max_seq_len, seed,
                                    vocab=LEARNABLE_VOCAB if recipe.get("sanity") else 32000)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        stage = Stage(cfg, run_dir)
        (run_dir / "data").mkdir()
        for split, part in (("train", examples), ("val", examples[:8])):
            (run_dir / "data" / f"{split}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in part))
        t0 = time.time()
        if name.startswith("unsloth"):
            model, tokenizer = unsloth_model(cfg, recipe["unsloth_checkpointing"], seed)
        else:
            model = attach_lora(stage, build_random_model(stage, Phi3Config(**(TINY if SMOKE else PHI3_MINI)), device))
            tokenizer = bench_tokenizer()
        load_s = time.time() - t0
        if not SMOKE:
            torch.cuda.reset_peak_memory_stats()

        class Clock(TrainerCallback):
            marks: dict = {}
            losses: list = []

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == warmup + steps or (warmup and state.global_step == warmup):
                    if not SMOKE:
                        torch.cuda.synchronize()
                    Clock.marks[state.global_step] = (time.time(), state.num_input_tokens_seen)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs and "train_loss" not in logs:
                    Clock.losses.append(round(float(logs["loss"]), 4))

        trainer = build_trainer(stage, model, tokenizer)
        trainer.add_callback(Clock())
        if not SMOKE:
            torch.cuda.synchronize()
        Clock.marks[0] = (time.time(), 0)
        trainer.train()
    (t_a, tok_a), (t_b, tok_b) = Clock.marks[warmup], Clock.marks[warmup + steps]
    tps = (tok_b - tok_a) / (t_b - t_a)
    return {"recipe": name, "profile": recipe["profile"], "overrides": recipe["overrides"], "cap_gib": recipe["cap_gib"],
            "config": {k: v for k, v in cfg.flat().items() if k.startswith(("train.", "lora.", "quant.", "model.attn", "data.max"))},
            "tokens_per_s": round(tps, 1), "mfu": None if SMOKE else round(tps * FLOP_PER_TOKEN / MATMUL_TFLOPS / 1e12, 4),
            "steps_timed": steps, "warmup_steps": warmup, "step_s": round((t_b - t_a) / steps, 3),
            "peak_allocated_gib": None if SMOKE else round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": None if SMOKE else round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "trainable_params": count_parameters(model)["trainable"], "load_s": round(load_s, 1),
            "losses": Clock.losses if recipe.get("sanity") else Clock.losses[:10]}


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help="comma-separated names, or 'sweep'")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpus", type=int, default=0, help="GPUs to spread recipes over (0 = every visible one)")
    ap.add_argument("--append", action="store_true", help="add to an existing --out file (same machine, later call)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        if args.one.startswith("unsloth"):
            import unsloth  # noqa: F401  (must come before transformers)
        print("RESULT " + json.dumps(run_recipe(args.one, args.lengths, args.warmup, args.steps, args.seed)), flush=True)
        return
    import torch
    import transformers, peft, bitsandbytes  # noqa: E401

    tflops = 0.0 if SMOKE else measure_matmul_tflops()
    results = {"gpu": "smoke test on CPU" if SMOKE else torch.cuda.get_device_name(0), "bf16_matmul_tflops_measured": tflops,
               "versions": {m.__name__: m.__version__ for m in (torch, transformers, peft, bitsandbytes)},
               "date": time.strftime("%Y-%m-%d"), "recipes": []}
    if args.append and Path(args.out).exists():
        results["recipes"] = json.loads(Path(args.out).read_text())["recipes"]
    names = list(SWEEP) if args.recipes == "sweep" else args.recipes.split(",")
    # One worker per GPU, each recipe in its own process on one GPU: recipes run side by side on a multi-GPU
    # host and still one at a time per GPU, so nothing shares a GPU with what it is measured against.
    gpus = 1 if SMOKE else (args.gpus or torch.cuda.device_count())
    queue = list(names)
    lock = threading.Lock()
    done: dict[str, dict] = {}

    def worker(gpu: int) -> None:
        while True:
            with lock:
                if not queue:
                    return
                name = queue.pop(0)
            res = run_one(name, gpu, args, tflops)
            res["gpu_index"] = gpu
            print(json.dumps(res), flush=True)
            with lock:
                done[name] = res
                ordered = [done[n] for n in names if n in done]
                results["recipes"] = previous + ordered
                results["sanity"] = sanity_check(ordered)
                Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    previous = results["recipes"]
    threads = [threading.Thread(target=worker, args=(g,)) for g in range(gpus)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("SANITY " + json.dumps(results["sanity"]), flush=True)


def run_one(name: str, gpu: int, args, tflops: float) -> dict:
    """One recipe in its own process on GPU `gpu`; its RESULT line, or the error it died with."""
    import importlib.util

    t0 = time.time()
    if name.startswith("unsloth") and importlib.util.find_spec("unsloth") is None and not os.environ.get("BENCH_UNSLOTH_PATH"):
        return {"recipe": name, "skipped": "unsloth is not importable"}
    env = {**os.environ, "BENCH_MATMUL_TFLOPS": str(tflops)}
    if not SMOKE:
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(64)))).split(",")[gpu]
    if name.startswith("unsloth") and os.environ.get("BENCH_UNSLOTH_PATH"):
        # Unsloth's own dependencies (trl, torchao, ...) only on its own processes' path.
        env["PYTHONPATH"] = os.environ["BENCH_UNSLOTH_PATH"] + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--one", name, "--lengths", args.lengths, "--out", args.out,
                           "--warmup", str(args.warmup), "--steps", str(args.steps), "--seed", str(args.seed)],
                          capture_output=True, text=True, env=env)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    res = json.loads(line[7:]) if line else {"recipe": name, "error": (proc.stderr or proc.stdout)[-1500:]}
    res["wall_s"] = round(time.time() - t0, 1)
    return res


def sanity_check(results: list[dict]) -> dict | None:
    """Recipe 1 against recipe 3 on the same batches: how far apart their losses are, step by step."""
    by = {r["recipe"]: r for r in results}
    seed, fast = by.get("sanity-seed", {}).get("losses"), by.get("sanity-fast", {}).get("losses")
    if not seed or not fast:
        return None
    n = min(len(seed), len(fast))
    rel = [abs(a - b) / abs(a) for a, b in zip(seed[:n], fast[:n])]
    return {"steps": n, "learning_rate": SANITY["learning_rate"], "loss_seed_recipe": seed[:n], "loss_fast": fast[:n],
            "loss_drop_seed_recipe": round(seed[0] - seed[n - 1], 4), "loss_drop_fast": round(fast[0] - fast[n - 1], 4),
            "max_rel_diff": round(max(rel), 4), "final_rel_diff": round(rel[-1], 4)}

if __name__ == "__main__":
    main()
