"""Data-parallel QLoRA on the GPUs of one machine (Kaggle's T4 x2 case): speed-up, loss agreement, kill and resume.

    python benchmarks/ddp_bench.py --lengths .dev/alpaca_lengths.json --out $OUT/ddp_bench.json [-p key=value ...]

Every run goes through qlora_helpers.distributed.launch_command (the accelerate launch that notebook 03 runs on two
GPUs) and benchmarks/recipe.py's build_trainer and train (notebook 03's cells) (checkpoints, resume, rank-aware logging). Only the loader
differs from `python -m qlora_helpers train`: no weights can travel to the GPU machine, so each process builds
Phi-3-mini's architecture with random weights, quantized NF4 on its own GPU (model.build_random_model), under the
same per-process memory cap as a T4 (15 GiB). The data are Alpaca-length examples over a 256-token vocabulary, so
a random-weights model has something to learn and loss curves can be compared.

Measured:
1. speed: the same recipe (kaggle-t4: its micro-batch per GPU, 64 when measured on 2026-11-29) on 1 and on 2 GPUs, non-padding tokens/s over the
   steps after warm-up; the target is at least 1.8x.
2. loss agreement: the same global batch (1 GPU x accumulation 2 against 2 GPUs x 1) from the same seed, the
   training loss of every step.
3. kill and resume on 1 and on 2 GPUs: every process of the launch is SIGKILLed (as when a Kaggle session ends)
   after a checkpoint; the same command resumes from it and finishes; every step is logged once and, on 2 GPUs,
   the resumed steps' losses are compared with those of the uninterrupted run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import LEARNABLE_VOCAB, PHI3_MINI, SMOKE, TINY, alpaca_like_examples, bench_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CAP_GIB = 15.0
SMOKE_OVERRIDES = {"quant.compute_dtype": "float32", "train.use_liger": False, "train.optim": "adamw_torch",
                   "train.micro_batch_size": 4}


def make_run_dir(run_dir: Path, lengths: list, overrides: dict, n_train: int) -> None:
    """What notebooks 01 and 02 leave for stage 3: config.json and data/{train,val}.jsonl."""
    from qlora_helpers import build_config
    from qlora_helpers.runs import save_config

    cfg = build_config("kaggle-t4", overrides)
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir)
    examples = alpaca_like_examples(lengths, n_train + 16, cfg.data.max_seq_len, cfg.train.seed, vocab=LEARNABLE_VOCAB)
    (run_dir / "data").mkdir()
    for split, part in (("train", examples[:n_train]), ("val", examples[n_train:])):
        (run_dir / "data" / f"{split}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in part))


def worker(run_dir: Path, warmup: int, timed: int) -> None:
    """One data-parallel process: what train_stage does, with a random-weights model on this process's GPU."""
    import torch
    from transformers import Phi3Config, TrainerCallback

    from qlora_helpers.hardware import local_process_index
    from recipe import attach_lora
    from qlora_helpers.stage import stage_from_run_dir
    from recipe import build_trainer, train
    from random_model import build_random_model

    stage = stage_from_run_dir(run_dir)
    gpu = local_process_index()
    if SMOKE:
        model = attach_lora(stage, build_random_model(stage, Phi3Config(**TINY), "cpu"))
    else:
        torch.cuda.set_device(gpu)
        torch.cuda.set_per_process_memory_fraction(CAP_GIB * 2**30 / torch.cuda.get_device_properties(gpu).total_memory, gpu)
        model = attach_lora(stage, build_random_model(stage, Phi3Config(**PHI3_MINI), f"cuda:{gpu}"))
        torch.cuda.reset_peak_memory_stats(gpu)
    marks: dict[int, tuple[float, int]] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (warmup, warmup + timed):
                if not SMOKE:
                    torch.cuda.synchronize()
                marks[state.global_step] = (time.time(), int(state.num_input_tokens_seen))  # summed over processes

    trainer = build_trainer(stage, model, bench_tokenizer())
    trainer.add_callback(Clock())
    metrics = train(stage, trainer)
    peak = 0.0 if SMOKE else torch.cuda.max_memory_reserved(gpu) / 2**30
    out = {"gpu": gpu, "peak_reserved_gib": round(peak, 2), "metrics": metrics}
    if warmup in marks and warmup + timed in marks:
        (t_a, n_a), (t_b, n_b) = marks[warmup], marks[warmup + timed]
        out.update(tokens_per_s=round((n_b - n_a) / (t_b - t_a), 1), step_s=round((t_b - t_a) / timed, 3))
    (run_dir / f"bench-rank{gpu}.json").write_text(json.dumps(out))


def launch(run_dir: Path, processes: int, warmup: int, timed: int, kill_after_checkpoint: int | None = None) -> dict:
    """launch_command's accelerate launch, with this file's worker in place of `-m qlora_helpers train`."""
    from qlora_helpers.distributed import launch_command

    cmd = launch_command(run_dir, processes)
    assert cmd[-5:-2] == ["-m", "qlora_helpers", "train"], cmd
    cmd = cmd[:-5] + [__file__, "--worker", "--run-dir", str(run_dir), "--warmup", str(warmup), "--timed", str(timed)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(processes))}
    if SMOKE:
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    log = open(run_dir / f"launch-{time.time():.0f}.log", "w")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed = False
    if kill_after_checkpoint:
        ckpt = run_dir / "train" / "checkpoints" / f"checkpoint-{kill_after_checkpoint}" / "trainer_state.json"
        while proc.poll() is None and not ckpt.exists():
            time.sleep(0.05)
        if proc.poll() is None:
            # Everything dies at once, as when a Kaggle session ends: the launcher and the training processes
            # (torch's elastic agent starts those in sessions of their own, so killing the group is not enough).
            import psutil

            family = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
            for p in family:
                p.send_signal(signal.SIGKILL)
            psutil.wait_procs(family, timeout=30)
            killed = True
    rc = proc.wait()
    out = {"processes": processes, "rc": rc, "killed": killed, "wall_s": round(time.time() - t0, 1)}
    if rc and not killed:
        text = Path(log.name).read_text()
        first = text.find("Traceback")  # the worker's own error, before the launcher's summary
        out["error"] = (text[first:first + 4000] if first >= 0 else "") + "\n...\n" + text[-1500:]
        return out
    rank0 = run_dir / "bench-rank0.json"
    if rank0.exists() and not killed:
        out.update(json.loads(rank0.read_text()))
        out["peak_reserved_gib_per_gpu"] = [json.loads((run_dir / f"bench-rank{g}.json").read_text())["peak_reserved_gib"]
                                            for g in range(processes)]
    return out


def losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(l) for l in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if l["kind"] == "train"]
    steps = [l["step"] for l in train]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {l["step"]: l["loss"] for l in train}


def rel_diff(a: dict[int, float], b: dict[int, float]) -> dict:
    common = sorted(set(a) & set(b))
    if not common:
        return {"steps": 0}
    rel = [abs(a[s] - b[s]) / abs(b[s]) for s in common]
    return {"steps": len(common), "max_rel_diff": round(max(rel), 5), "mean_rel_diff": round(sum(rel) / len(rel), 5)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths")
    ap.add_argument("--out")
    ap.add_argument("--work", default="/tmp/ddp-bench")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timed", type=int, default=20)
    ap.add_argument("-p", dest="overrides", action="append", default=[], help="config override on kaggle-t4, key=value")
    ap.add_argument("--only", default="warm,speed,loss,resume1,resume2")
    ap.add_argument("--timed-speed", type=int, default=40, help="timed steps of the speed runs")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.run_dir), args.warmup, args.timed)
        return
    import shutil

    import torch

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    lengths = json.loads(Path(args.lengths).read_text())
    steps = args.warmup + args.timed
    half = steps // 2
    # Loss curves are logged at every step; the speed runs keep the profile's own logging interval (a log step
    # synchronises the GPUs with the CPU).
    base = {"train.max_steps": steps, "train.logging_steps": 1, "train.eval_steps": steps, "train.save_steps": steps,
            "train.learning_rate": 1e-3, "eval.max_val_examples": 16, "train.max_minutes": 0.0}
    user = dict(o.split("=", 1) for o in args.overrides)
    base.update({**(SMOKE_OVERRIDES if SMOKE else {}), **user})
    from qlora_helpers import build_config

    micro = build_config("kaggle-t4", base).train.micro_batch_size
    n_train = micro * 2 * steps  # one epoch covers every step, on 1 or 2 GPUs
    result = {"date": time.strftime("%Y-%m-%d"), "gpus": ["smoke test on CPU"] if SMOKE else [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
              "cap_gib_per_process": CAP_GIB, "profile": "kaggle-t4", "overrides": base, "runs": {}}

    def save():
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)

    only = args.only.split(",")
    runs = result["runs"]
    if "warm" in only:
        # Triton compiles Liger's kernels on first use and caches them on disk: a short launch first, so neither
        # speed run pays for compiling inside its timed steps.
        make_run_dir(work / "warm-up", lengths, {**base, "train.max_steps": 6, "train.eval_steps": 6,
                                                 "train.save_steps": 6}, n_train)
        runs["warm-up"] = {"wall_s": launch(work / "warm-up", 2, 1, 4)["wall_s"]}
    if "speed" in only:
        n_speed = args.warmup + args.timed_speed
        speed = {**base, "train.logging_steps": build_config("kaggle-t4").train.logging_steps,
                 "train.max_steps": n_speed, "train.eval_steps": n_speed, "train.save_steps": n_speed, **user}
        result["speed_overrides"] = speed
        for n in (1, 2):
            make_run_dir(work / f"speed-{n}gpu", lengths, speed, micro * 2 * n_speed)
            runs[f"speed-{n}gpu"] = launch(work / f"speed-{n}gpu", n, args.warmup, args.timed_speed)
            print(f"speed-{n}gpu", json.dumps(runs[f"speed-{n}gpu"]), flush=True)
        one, two = runs["speed-1gpu"].get("tokens_per_s"), runs["speed-2gpu"].get("tokens_per_s")
        result["speedup_2_over_1"] = round(two / one, 3) if one and two else None
        save()
    if "loss" in only:
        # The same global batch from the same seed: 1 GPU with accumulation 2 against 2 GPUs with accumulation 1.
        make_run_dir(work / "loss-1gpu-accum2", lengths, {**base, "train.grad_accum": 2}, n_train)
        runs["loss-1gpu-accum2"] = launch(work / "loss-1gpu-accum2", 1, args.warmup, args.timed)
        make_run_dir(work / "loss-2gpu", lengths, base, n_train)
        runs["loss-2gpu"] = launch(work / "loss-2gpu", 2, args.warmup, args.timed)
        a, b = losses(work / "loss-1gpu-accum2"), losses(work / "loss-2gpu")
        result["loss_agreement"] = {**rel_diff(a, b), "loss_1gpu_accum2": [a[s] for s in sorted(a)],
                                    "loss_2gpu": [b[s] for s in sorted(b)]}
        save()
    for n in (1, 2):
        if f"resume{n}" not in only:
            continue
        # Kill every process after the checkpoint at half way, relaunch the same command, compare with a straight run.
        over = {**base, "train.eval_steps": half, "train.save_steps": half}
        run_dir = work / f"resume-{n}gpu"
        make_run_dir(run_dir, lengths, over, n_train)
        runs[f"resume-{n}gpu-killed"] = launch(run_dir, n, args.warmup, args.timed, kill_after_checkpoint=half)
        runs[f"resume-{n}gpu-resumed"] = launch(run_dir, n, args.warmup, args.timed)
        save()
        resumed_run = runs[f"resume-{n}gpu-resumed"]
        print(f"resume-{n}gpu", json.dumps(resumed_run)[-4000:], flush=True)
        check = {"killed_after_checkpoint": half, "killed": runs[f"resume-{n}gpu-killed"]["killed"],
                 "resumed_from_step": resumed_run.get("metrics", {}).get("resumed_from_step"),
                 "final_step": resumed_run.get("metrics", {}).get("steps")}
        if not resumed_run["rc"]:
            resumed = losses(run_dir)
            check["steps_logged_once"] = sorted(resumed) == list(range(1, steps + 1))
            straight_dir = work / ("loss-2gpu" if n == 2 else "loss-1gpu-accum2")
            if n == 2 and (straight_dir / "train" / "metrics.jsonl").exists():
                check["resumed_vs_uninterrupted"] = rel_diff({s: v for s, v in resumed.items() if s > half},
                                                             losses(straight_dir))
        result[f"resume_{n}gpu"] = check
        save()

if __name__ == "__main__":
    main()
