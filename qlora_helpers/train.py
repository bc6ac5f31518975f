"""Stage 3: the pieces of transformers' Trainer for this config, built and checked here, so notebook 03 and
the data-parallel command (qlora_helpers.distributed) train alike.

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

from .callbacks import read_metrics_log, training_callbacks
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


def resolve_optim(optim: str, device: str) -> str:
    """train.optim, where auto means paged 8-bit AdamW on a GPU (bitsandbytes) and plain AdamW on a CPU."""
    if optim != "auto":
        return optim
    return "paged_adamw_8bit" if device == "cuda" else "adamw_torch"


def training_arguments(stage: Stage, n_train: int, world: int | None = None):
    import os

    from transformers import TrainingArguments

    t, device = stage.cfg.train, stage.hw["device"]
    steps = total_steps(stage, n_train, world)
    dynamo = ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_DYNAMO_MODE", "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION")
    if t.torch_compile:
        # Regional compilation (accelerate's TorchDynamoPlugin reads this when the Trainer builds its accelerator):
        # one decoder layer is compiled and the other layers reuse it, about a minute instead of many.
        os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] = "1"
    else:  # TrainingArguments(torch_compile=True) sets these for the process: an earlier config must not leak
        for key in dynamo:
            os.environ.pop(key, None)
    return TrainingArguments(
        output_dir=str(stage.path("train", "checkpoints")),
        max_steps=steps,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=math.ceil(t.warmup_ratio * steps),
        weight_decay=t.weight_decay,
        optim=resolve_optim(t.optim, device),
        bf16=stage.compute_dtype == "bfloat16",
        fp16=stage.compute_dtype == "float16",
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        use_liger_kernel=t.use_liger,
        # Compiled layers fuse their norms, activations and rotary embedding themselves; Liger keeps the fused
        # linear cross-entropy, which runs outside the layers.
        liger_kernel_config={"rms_norm": False, "swiglu": False, "rope": False} if t.use_liger and t.torch_compile else None,
        torch_compile=t.torch_compile,
        # Under DDP every LoRA weight gets a gradient at every step and the frozen base needs none, so there is
        # nothing for DDP's per-step search for unused parameters to find; the Trainer would turn it on because
        # a PeftModel is not a PreTrainedModel.
        ddp_find_unused_parameters=False,
        logging_steps=t.logging_steps,
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        seed=t.seed,
        data_seed=t.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda",
        use_cpu=device == "cpu",
    )


def check_liger(stage: Stage) -> None:
    """Liger's kernels are Triton kernels: CUDA only, and a separate package (checked when the run starts, too)."""
    from .hardware import check_liger as check

    check(stage.cfg.train.use_liger, stage.hw)


# --------------------------------------------------------------------------- resuming
def resume_checkpoint(stage: Stage) -> str | None:
    """The newest checkpoint the Trainer can resume from exactly (qlora_helpers.checkpoints): a newer one that a
    kill or a full disk cut short, or that lacks the optimizer or scheduler state, is set aside with a warning
    naming it, never resumed half."""
    from .checkpoints import newest_complete

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
def build_trainer(stage: Stage, model, tokenizer):
    """The Trainer notebook 03 builds, for the command line: the same arguments, collator and callbacks."""
    from transformers import Trainer

    from .packing import make_collator

    check_liger(stage)
    _cpu_storages_load_on_cpu()
    train_ds, val_ds = training_datasets(stage)
    # transformers recognises packed rows (and masks attention between examples) only when no KV cache is
    # built; with use_cache on, an eval-mode forward would silently attend across examples.
    model.config.use_cache = False
    trainer = Trainer(model=model, args=training_arguments(stage, len(train_ds)), train_dataset=train_ds,
                      eval_dataset=val_ds, data_collator=make_collator(stage, tokenizer), processing_class=tokenizer,
                      callbacks=training_callbacks(stage))
    connect_callbacks(trainer)
    return trainer


def connect_callbacks(trainer) -> None:
    """Give the time budget the Trainer's accelerator, so all processes agree on when to stop."""
    for cb in trainer.callback_handler.callbacks:
        if type(cb).__name__ == "TimeBudget":
            cb.accelerator = trainer.accelerator


@contextmanager
def out_of_memory_advice(stage: Stage):
    """Out of GPU memory, or out of disk for a checkpoint, during training: one line saying what to change."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        t = stage.cfg.train
        raise UserError(
            f"out of GPU memory during training (peak reserved {memory_snapshot()['peak_gpu_reserved_gib']} GiB): lower "
            f"train.micro_batch_size (now {t.micro_batch_size}) and raise train.grad_accum, lower "
            f"data.max_seq_len (now {stage.cfg.data.max_seq_len}), or set train.gradient_checkpointing=true; "
            "running again resumes from the last checkpoint") from None
    except Exception as exc:
        if not failed_write(exc):
            raise
        raise UserError(f"training could not write to {stage.path('train')} ({str(exc).strip().splitlines()[0][:160]}): "
                        "the disk is probably full; free some space and run again: training resumes from the last "
                        "complete checkpoint") from None


def train(stage: Stage, trainer) -> dict[str, Any]:
    """Train (resuming from the newest complete checkpoint), save the best adapter, write metrics; a run that
    has trained all its steps already is reported, not trained again."""
    done = finished_training(stage, len(trainer.train_dataset), trainer.args.world_size)
    if done is not None:
        return done
    resume_from = resume_checkpoint(stage)
    try:
        with out_of_memory_advice(stage):
            trainer.train(resume_from_checkpoint=resume_from)
    except BaseException:
        let_go(stage.run_dir)  # save_training gives it back otherwise, once the results are saved
        raise
    return save_training(stage, trainer, resume_from)


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
        write_json(stage.path("train", "metrics.json"), metrics)
    let_go(stage.run_dir)
    return metrics


def read_train_metrics(run_dir: str | Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / "train" / "metrics.json", {})
