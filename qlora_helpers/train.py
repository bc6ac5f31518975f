"""Stage 3: what notebook 03's ``TrainingArguments(...)`` and ``Trainer(...)`` cells need around them: the datasets,
the number of steps, a guard on the arguments the cell built, resuming from the newest complete checkpoint, and
saving the best adapter with the whole run's numbers. The cells themselves are the one place the Trainer is built:
on two GPUs every process runs notebook 03 (qlora_helpers.distributed).

Plain Trainer rather than TRL's SFTTrainer: stage 1 already produced input_ids and labels with the prompt
masked, so what is left is batching (qlora_helpers.packing), and the Trainer's own checkpoint/resume is what
makes a lost Kaggle session cost minutes instead of the run.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .callbacks import read_metrics_log
from .config import UserError
from .data import load_split
from .runlock import let_go
from .runs import failed_write, memory_snapshot, read_json, replace_dir, write_json
from .stage import Stage


# --------------------------------------------------------------------------- data and length
def training_datasets(stage: Stage) -> tuple[list[dict], list[dict]]:
    """(train, validation) as the Trainer wants them: a list of {input_ids, labels} is a map-style dataset.
    With train.micro_batch_tokens each training item is a group of examples of at most that many tokens."""
    from .packing import group_by_tokens

    def strip(examples):
        return [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]

    val = load_split(stage.run_dir, "val")
    if stage.cfg.eval.max_val_examples:
        val = val[: stage.cfg.eval.max_val_examples]
    train = strip(load_split(stage.run_dir, "train"))
    if stage.cfg.train.micro_batch_tokens:
        train = group_by_tokens(train, stage.cfg.train.micro_batch_tokens)
    return train, strip(val)


def processes() -> int:
    """How many data-parallel processes train: WORLD_SIZE, which the launcher (accelerate launch, torchrun) sets in
    every process it starts; 1 otherwise. Not accelerate's PartialState: before the Trainer sets up the process
    group it reports 1 process on a CPU, so two processes would each plan twice the steps."""
    import os

    return max(1, int(os.environ.get("WORLD_SIZE") or 1))


def total_steps(stage: Stage, n_train: int, world: int | None = None) -> int:
    """Optimizer steps for the whole run: train.max_steps if set, else train.epochs passes over the training
    split, each step taking micro_batch_size x grad_accum examples on every one of `world` processes."""
    t = stage.cfg.train
    if t.max_steps:
        return t.max_steps
    per_step = t.micro_batch_size * t.grad_accum * (world or processes())
    return max(1, math.ceil(t.epochs * n_train / per_step))


# --------------------------------------------------------------------------- resuming
def resume_checkpoint(stage: Stage) -> str | None:
    """The newest checkpoint the Trainer can resume from exactly (qlora_helpers.checkpoints): a newer one that a
    kill or a full disk cut short, or that lacks the optimizer or scheduler state, is set aside with a warning
    naming it, never resumed half."""
    from .checkpoints import newest_complete

    _cpu_storages_load_on_cpu()
    found = newest_complete(stage)
    return str(found) if found else None


def finished_training(stage: Stage, n_train: int, world: int | None = None) -> dict[str, Any] | None:
    """The metrics of a run that has trained all its steps already, reported instead of trained again (the
    Trainer, resumed at its last step, would train one more); None when there is training left to do. A
    train.max_steps (or train.epochs) below the steps done is a one-line error, not a silent extra step; above the
    steps of a run whose learning-rate schedule ended at 0, also one (checkpoints.check_schedule_goes_on)."""
    from .checkpoints import check_not_past, check_schedule_goes_on, finished_metrics, newest_complete

    checkpoint = newest_complete(stage)
    done, total = checkpoint_step(checkpoint), total_steps(stage, n_train, world)
    check_not_past(stage, total, done, checkpoint)
    check_schedule_goes_on(stage, total, done, checkpoint)
    if done != total:
        return None
    from .hardware import resolve_optim

    metrics = read_train_metrics(stage.run_dir)
    if metrics.get("steps") != done or not stage.path("adapter", "adapter_config.json").exists():
        # Killed after the last checkpoint, before the adapter and metrics were saved: both from the checkpoints.
        t = stage.cfg.train
        examples = done * t.micro_batch_size * t.grad_accum * (world or 1)
        metrics = finished_metrics(stage, Path(checkpoint), {
            "steps": done, "max_steps": total, "processes": world or 1, "resumed_from_step": done,
            "stopped_by_time_budget": False, "examples_seen": examples, "epochs": round(examples / max(1, n_train), 4),
            **whole_run_numbers(stage.run_dir), "tokens_per_s": None, "packing": t.packing,
            "optim": resolve_optim(t.optim, stage.hw["device"]), "compute_dtype": stage.compute_dtype})
    further = ("to train longer, start a new run with more steps (its learning-rate schedule has ended)"
               if stage.cfg.train.lr_scheduler in ("cosine", "linear") else
               "raise train.max_steps or train.epochs to train further")
    print(f"[qlora] {stage.run_dir} has trained all {total} steps already (train/metrics.json): reported, not "
          f"trained again; {further}")
    return metrics


def whole_run_numbers(run_dir: str | Path) -> dict[str, Any]:
    """From train/metrics.jsonl, over every session of the run: the mean logged training loss of the steps the
    adapter went through (each once), the training time (every session's, also for steps a kill made the next
    session train again) and how many sessions it took."""
    log = read_metrics_log(run_dir)
    losses = [r["loss"] for r in log if r.get("kind") == "train" and isinstance(r.get("loss"), (int, float))]
    return {"train_loss": round(sum(losses) / len(losses), 4) if losses else None,
            "wall_s": round(max((r.get("elapsed_s") or 0.0 for r in log), default=0.0), 2),
            "sessions": max((r.get("session") or 1 for r in log), default=1)}


def _cpu_storages_load_on_cpu() -> None:
    """accelerate names the device of every process of a multi-process CPU run "cpu:0", and the Trainer resumes a
    data-parallel run with torch.load(map_location=args.device), which torch cannot map to "cpu:0". This teaches
    torch.load (public torch.serialization.register_package) to keep such storages on the CPU; nothing else changes."""
    import torch

    global _CPU_N_REGISTERED
    if _CPU_N_REGISTERED:
        return

    def restore(obj, location):
        return obj if location.startswith("cpu:") else None

    torch.serialization.register_package(9, lambda obj: None, restore)
    _CPU_N_REGISTERED = True


_CPU_N_REGISTERED = False


def checkpoint_step(checkpoint: str | Path | None) -> int | None:
    return int(str(checkpoint).rsplit("-", 1)[-1]) if checkpoint else None


# --------------------------------------------------------------------------- the stage
def connect_callbacks(trainer) -> None:
    """Give the time budget the Trainer's accelerator, so all processes agree on when to stop."""
    for cb in trainer.callback_handler.callbacks:
        if type(cb).__name__ == "TimeBudget":
            cb.accelerator = trainer.accelerator


# What each TrainingArguments field must be for this config: (field, value from the config). A cell that types
# another value trains something config.json does not record; the report would describe another run.
def _expected_arguments(stage: Stage, n_train: int, world: int) -> dict[str, Any]:
    from .hardware import resolve_optim

    t = stage.cfg.train
    return {
        "output_dir": str(stage.path("train", "checkpoints")), "max_steps": total_steps(stage, n_train, world),
        "per_device_train_batch_size": t.micro_batch_size, "gradient_accumulation_steps": t.grad_accum,
        "learning_rate": t.learning_rate, "lr_scheduler_type": t.lr_scheduler, "weight_decay": t.weight_decay,
        "optim": resolve_optim(t.optim, stage.hw["device"]), "bf16": stage.compute_dtype == "bfloat16",
        "fp16": stage.compute_dtype == "float16", "gradient_checkpointing": t.gradient_checkpointing,
        "use_liger_kernel": t.use_liger, "torch_compile": t.torch_compile, "logging_steps": t.logging_steps,
        "eval_steps": t.eval_steps, "save_steps": t.save_steps, "save_total_limit": t.save_total_limit,
        "seed": t.seed, "load_best_model_at_end": True, "metric_for_best_model": "eval_loss",
        "greater_is_better": False, "remove_unused_columns": False, "report_to": [],
        "use_cpu": stage.hw["device"] == "cpu",
    }


def check_training_arguments(stage: Stage, args, n_train: int, world: int) -> None:
    """Notebook 03's TrainingArguments against the config and this machine, before the Trainer sees them: every
    value the config decides (so config.json records what trained), checkpoints inside the run directory (a
    resume finds them, nothing is written elsewhere), the best adapter chosen by validation loss, fp16/bf16 as
    the hardware allows, and nothing reported to an outside service."""
    differ = []
    for key, want in _expected_arguments(stage, n_train, world).items():
        got = getattr(args, key)
        got = getattr(got, "value", got)
        if key == "report_to":
            got = [] if got in (None, "none", ["none"]) else got
        if got != want:
            differ.append(f"{key}={got!r} (the config says {want!r})")
    if differ:
        raise UserError("the TrainingArguments disagree with the config: " + "; ".join(differ[:4])
                        + ("; ..." if len(differ) > 4 else "") + ". Change the config (OVERRIDES / -p), not the cell")


@contextmanager
def while_training(stage: Stage):
    """Around ``trainer.train()``: out of GPU memory, or out of disk for a checkpoint, as one line saying what to
    change; and whatever stops training, the run directory is given back (save_training gives it back otherwise,
    once the results are saved)."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        let_go(stage.run_dir)
        t = stage.cfg.train
        raise UserError(
            f"out of GPU memory during training (peak reserved {memory_snapshot()['peak_gpu_reserved_gib']} GiB): lower "
            f"train.micro_batch_size (now {t.micro_batch_size}) and raise train.grad_accum, lower "
            f"data.max_seq_len (now {stage.cfg.data.max_seq_len}), or set train.gradient_checkpointing=true; "
            "running again resumes from the last checkpoint") from None
    except BaseException as exc:
        let_go(stage.run_dir)
        if not failed_write(exc):
            raise
        raise UserError(f"training could not write to {stage.path('train')} ({str(exc).strip().splitlines()[0][:160]}): "
                        "the disk is probably full; free some space and run again: training resumes from the last "
                        "complete checkpoint") from None


def save_training(stage: Stage, trainer, resume_from: str | None) -> dict[str, Any]:
    """After trainer.train(): the best adapter (by validation loss) to RUN_DIR/adapter, swapped in whole, and
    train/metrics.json with whole-run numbers (steps, examples, tokens, loss and wall time over every session)."""
    adapter = stage.path("adapter")
    tmp = adapter.with_name(f".adapter.{os.getpid()}.tmp")
    trainer.save_model(str(tmp))
    state, args = trainer.state, trainer.args
    session = next((cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "MetricsJsonl"), None)
    session_s = time.time() - session.t0 if session else None
    session_tokens = state.num_input_tokens_seen - (session.tokens_at_start if session else 0)
    budget = next((cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "TimeBudget"), None)
    n_train = len(trainer.train_dataset)
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    examples_seen = state.global_step * per_step
    metrics = {
        "steps": state.global_step,
        "max_steps": args.max_steps,
        "processes": args.world_size,
        "resumed_from_step": checkpoint_step(resume_from),
        "stopped_by_time_budget": bool(budget and budget.stopped),
        "time_budget": {k: v for k, v in (budget.budget or {}).items() if k != "deadline"} if budget else None,
        "examples_planned": args.max_steps * per_step,
        "examples_seen": examples_seen,
        "epochs": round(examples_seen / max(1, n_train), 4),
        "tokens_seen": int(state.num_input_tokens_seen),
        **whole_run_numbers(stage.run_dir),
        "tokens_per_s": round(session_tokens / session_s, 1) if session_s else None,  # this session's speed
        "best_eval_loss": state.best_metric,
        "best_checkpoint": Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
        "packing": stage.cfg.train.packing,
        "optim": args.optim.value if hasattr(args.optim, "value") else str(args.optim),
        "compute_dtype": stage.compute_dtype,
        "memory": memory_snapshot(),
    }
    if trainer.is_world_process_zero():  # the adapter and checkpoints are saved by the main process only, too
        replace_dir(tmp, adapter)
        # The arguments as the library writes them (to_dict hides tokens): what evaluation's Trainer reuses.
        write_json(stage.path("train", "training_args.json"), {k: v for k, v in args.to_dict().items() if k != "hub_token"})
        write_json(stage.path("train", "metrics.json"), metrics)
    let_go(stage.run_dir)
    return metrics


def read_train_metrics(run_dir: str | Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / "train" / "metrics.json", {})


def training_summary(metrics: dict[str, Any]):
    """train/metrics.json as a small table for notebook 03 (a pandas DataFrame): what a reader checks after training."""
    import pandas as pd

    m = metrics
    mem = m.get("memory") or {}

    def num(v, fmt="{:,}"):
        return fmt.format(v) if isinstance(v, (int, float)) else "not measured"

    best = f"{num(m.get('best_eval_loss'), '{:.4f}')} ({m['best_checkpoint']})" if m.get("best_checkpoint") else \
        num(m.get("best_eval_loss"), "{:.4f}")
    gpu = f", GPU reserved {mem['peak_gpu_reserved_gib']} GiB" if mem.get("peak_gpu_reserved_gib") is not None else ""
    rows = [
        ("optimizer steps", f"{m['steps']:,} of {m['max_steps']:,}" + (" (stopped by train.max_minutes)" if m.get("stopped_by_time_budget") else "")),
        ("processes", m.get("processes", 1)),
        ("resumed from step", m.get("resumed_from_step") or "none: a fresh start"),
        ("examples seen", f"{num(m.get('examples_seen'))} ({m.get('epochs')} epochs)"),
        ("tokens seen (this session)", num(m.get("tokens_seen"))),
        ("mean training loss", num(m.get("train_loss"), "{:.4f}")),
        ("best validation loss", best),
        ("training time", f"{num(m.get('wall_s'), '{:,.0f}')} s over {m.get('sessions', 1)} session(s)"),
        ("tokens/s (this session)", num(m.get("tokens_per_s"), "{:,.0f}")),
        ("peak memory", f"RSS {num(mem.get('peak_rss_gib'))} GiB{gpu}" if mem else "not measured"),
    ]
    return pd.DataFrame(rows, columns=["", "training"]).set_index("")
