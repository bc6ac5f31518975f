"""Stage 3: train the LoRA adapter with transformers' Trainer, resumably and observably.

Plain Trainer rather than TRL's SFTTrainer: stage 1 already produced input_ids and labels with
the prompt masked, so all that is left is batching, and the Trainer's own checkpoint/resume is
what makes a lost Kaggle session cost minutes instead of the run.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load_config
from .data import IGNORE_INDEX, load_split
from .model import attach_lora, choose_compute_dtype, hardware, load_base_model, load_tokenizer, resolve_model_path
from .runs import memory_snapshot, peak_rss_gib, peak_gpu_reserved_gib, read_json, write_json


class TrainingDiverged(RuntimeError):
    pass


def to_dataset(examples: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
    """What the Trainer needs of each example: a list is a map-style dataset already."""
    return [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]


class PackedRowsCollator:
    """Padding-free packing into several rows of at most `row_tokens` tokens instead of one long row.

    Why: without flash-attention (a T4 has none, and sdpa is what runs there) the block-diagonal mask of a
    packed row is dense, so attention costs grow with the square of the row's length: one row of a 64-example
    micro-batch (~7,000 tokens) spends most of its time on masked-out blocks. Rows of ~1,000 tokens cut that
    ~7x. Examples go into rows first-fit by decreasing length; each row ends in a padding segment with its own
    position_ids (0, 1, ...) and no labels, so it is one more "example" that nothing attends to or from, and
    padding never touches real tokens. The first label of every example is dropped, as in
    DataCollatorWithFlattening: it would be predicted from the example before it.

    Only for attention that reads packing from position_ids row by row (sdpa, eager; flex is refused for speed).
    transformers' flash-attention path recognises packing only in a batch of one row, so there rows would attend
    across examples; model.attn_implementation offers no flash choice, so that cannot happen here.
    """

    def __init__(self, row_tokens: int, pad_token_id: int):
        self.row_tokens = row_tokens
        self.pad_token_id = pad_token_id

    def rows(self, lengths: list[int]) -> list[list[int]]:
        """Indices of the examples in each row, first-fit decreasing (an example longer than a row gets its own)."""
        rows: list[list[int]] = []
        fill: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            for r, used in enumerate(fill):
                if used + lengths[i] <= self.row_tokens:
                    rows[r].append(i)
                    fill[r] += lengths[i]
                    break
            else:
                rows.append([i])
                fill.append(lengths[i])
        return rows

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        rows = self.rows(lengths)
        width = max(sum(lengths[i] for i in row) for row in rows)
        ids, labels, positions = [], [], []
        for row in rows:
            r_ids, r_labels, r_pos = [], [], []
            for i in row:
                r_ids += features[i]["input_ids"]
                r_labels += [IGNORE_INDEX] + list(features[i]["labels"][1:])
                r_pos += range(lengths[i])
            pad = width - len(r_ids)
            ids.append(r_ids + [self.pad_token_id] * pad)
            labels.append(r_labels + [IGNORE_INDEX] * pad)
            positions.append(r_pos + list(range(pad)))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions)}


def make_collator(cfg: Config, tokenizer):
    """Padding-free packing by default: position_ids restart at each example and the attention (sdpa, flex,
    eager in transformers 5) is masked block-diagonally, so no token sees another example. The whole
    micro-batch is one row, or rows of train.packing_row_tokens. Padded batches are the fallback."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if cfg.train.packing and cfg.train.packing_row_tokens:
        return PackedRowsCollator(cfg.train.packing_row_tokens, tokenizer.pad_token_id)
    if cfg.train.packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


def resolve_optim(cfg: Config, device: str) -> str:
    if cfg.train.optim != "auto":
        return cfg.train.optim
    return "paged_adamw_8bit" if device == "cuda" else "adamw_torch"


def training_arguments(cfg: Config, run_dir: Path, compute_dtype: str, device: str):
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        output_dir=str(run_dir / "train" / "checkpoints"),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=math.ceil(t.warmup_ratio * t.max_steps),
        weight_decay=t.weight_decay,
        optim=resolve_optim(cfg, device),
        bf16=compute_dtype == "bfloat16",
        fp16=compute_dtype == "float16",
        gradient_checkpointing=t.gradient_checkpointing,
        use_liger_kernel=t.use_liger,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
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


def metrics_callback(cfg: Config, run_dir: Path):
    """Appends one JSON line per log event to run_dir/train/metrics.jsonl; a resumed run first drops the
    lines past the checkpoint it resumes from, so every step appears exactly once."""
    from transformers import TrainerCallback

    path = run_dir / "train" / "metrics.jsonl"
    examples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum

    class MetricsJsonl(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.time()
            self.elapsed_before = 0.0
            self.last = (time.time(), state.num_input_tokens_seen)
            if args.process_index != 0:  # under DDP the file is the main process's alone
                return
            kept = []
            if path.exists():
                for line in path.read_text().splitlines():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # the line a kill cut short
                        continue
                    if rec["step"] <= state.global_step:
                        kept.append(line)
                        self.elapsed_before = max(self.elapsed_before, rec.get("elapsed_s", 0.0))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(l + "\n" for l in kept))

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "train_loss" in logs:  # the end-of-training summary, not a step
                return
            now, tokens = time.time(), state.num_input_tokens_seen
            is_eval = "eval_loss" in logs
            rec = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "kind": "eval" if is_eval else "train"}
            if is_eval:
                rec.update(eval_loss=logs["eval_loss"])
            else:
                dt = now - self.last[0]
                rec.update(loss=logs.get("loss"), learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                           tokens_per_s=round((tokens - self.last[1]) / dt, 1) if dt > 0 else None)
                self.last = (now, tokens)
                loss = logs.get("loss")
                if loss is not None and not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"training loss became {loss} at step {state.global_step}: likely fp16 overflow "
                        "(try quant.compute_dtype=bfloat16 on a GPU that has it) or a learning rate too high "
                        f"(train.learning_rate={cfg.train.learning_rate}); the last good checkpoint is kept")
            rec.update(tokens_seen=tokens, examples_seen=state.global_step * examples_per_step * max(1, args.world_size),
                       peak_gpu_reserved_gib=peak_gpu_reserved_gib(), peak_rss_gib=peak_rss_gib(),
                       elapsed_s=round(self.elapsed_before + now - self.t0, 2))
            if args.process_index == 0:
                with open(path, "a") as f:
                    f.write(json.dumps(rec) + "\n")

    return MetricsJsonl()


def _on_any_process(flag: bool) -> bool:
    """`flag` or-ed over every data-parallel process: under DDP all processes must stop at the same step,
    or the ones still going wait forever for the others in the next gradient all-reduce."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    from accelerate import PartialState

    votes = torch.tensor([int(flag)], device=PartialState().device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes.item())


def time_budget_callback(max_minutes: float):
    """Stops cleanly, with a checkpoint, before the session's time runs out."""
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        stopped = False

        def on_train_begin(self, args, state, control, **kw):
            self.deadline = time.time() + max_minutes * 60

        def on_step_end(self, args, state, control, **kw):
            if max_minutes and _on_any_process(time.time() >= self.deadline):
                control.should_save = True
                control.should_training_stop = True
                TimeBudget.stopped = True

    return TimeBudget()


def last_checkpoint(run_dir: Path) -> str | None:
    """The newest checkpoint that was written completely. The Trainer writes trainer_state.json last,
    so a checkpoint a kill interrupted (no trainer_state.json) is skipped, not resumed from."""
    ckpt_dir = run_dir / "train" / "checkpoints"
    complete = [p for p in ckpt_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()] if ckpt_dir.exists() else []
    return str(max(complete, key=lambda p: int(p.name.rsplit("-", 1)[-1]))) if complete else None


def live_plot_callback():
    """In a notebook, a loss plot that redraws at every log step (an IPython display handle, so it needs no
    widgets and leaves the final figure in the saved notebook)."""
    from transformers import TrainerCallback

    class LivePlot(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            from IPython.display import display

            self.train, self.val = [], []
            self.handle = display("training: the loss plot appears at the first log step", display_id=True)

        def on_log(self, args, state, control, logs=None, **kw):
            import matplotlib.pyplot as plt

            logs = logs or {}
            if "loss" in logs and "train_loss" not in logs:
                self.train.append((state.global_step, logs["loss"]))
            if "eval_loss" in logs:
                self.val.append((state.global_step, logs["eval_loss"]))
            if not self.train or not args.process_index == 0:
                return
            fig, ax = plt.subplots(figsize=(6, 3))
            ax.plot(*zip(*self.train), label="training loss")
            if self.val:
                ax.plot(*zip(*self.val), "o-", label="validation loss")
            ax.set_xlabel("step")
            ax.set_xlim(0, state.max_steps)
            ax.legend()
            self.handle.update(fig)
            plt.close(fig)

    return LivePlot()


def in_notebook() -> bool:
    try:
        from IPython import get_ipython

        return type(get_ipython()).__name__ == "ZMQInteractiveShell"
    except ImportError:
        return False


def check_liger(cfg: Config, device: str) -> None:
    """Liger's kernels are Triton kernels: CUDA only, and a separate package."""
    import importlib.util

    from .config import ConfigError

    if not cfg.train.use_liger:
        return
    if device != "cuda":
        raise ConfigError("train.use_liger=true needs a CUDA GPU (Liger's kernels are Triton kernels); "
                          "set train.use_liger=false on this machine")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("train.use_liger=true needs the liger-kernel package: pip install --no-deps liger-kernel==0.8.5")


def build_trainer(cfg: Config, run_dir: str | Path, model, tokenizer):
    """The Trainer for this config, on the datasets stage 1 wrote."""
    from transformers import Trainer

    run_dir = Path(run_dir)
    hw = hardware()
    compute_dtype = choose_compute_dtype(cfg.quant.compute_dtype, hw)
    check_liger(cfg, hw["device"])
    train_ds = to_dataset(load_split(run_dir, "train"))
    val = load_split(run_dir, "val")
    if cfg.eval.max_val_examples:
        val = val[: cfg.eval.max_val_examples]
    budget = time_budget_callback(cfg.train.max_minutes)
    callbacks = [metrics_callback(cfg, run_dir), budget] + ([live_plot_callback()] if in_notebook() else [])
    # transformers recognises packed rows (and masks attention between examples) only when no KV cache is
    # built; with use_cache on, an eval-mode forward would silently attend across examples.
    model.config.use_cache = False
    trainer = Trainer(model=model, args=training_arguments(cfg, run_dir, compute_dtype, hw["device"]),
                      train_dataset=train_ds, eval_dataset=to_dataset(val),
                      data_collator=make_collator(cfg, tokenizer), processing_class=tokenizer,
                      callbacks=callbacks)
    trainer.time_budget = budget
    _checkpoints_loadable_on_cpu(trainer.args)
    return trainer


def _checkpoints_loadable_on_cpu(args) -> None:
    """accelerate names the device of a multi-process CPU run "cpu:0", and the Trainer resumes a data-parallel
    run with torch.load(map_location=args.device), which cannot map to "cpu:0"; plain "cpu" is the same device.
    (On GPUs the device is cuda:N and nothing changes.)"""
    import torch

    if args.device == torch.device("cpu", 0):
        args.__dict__["_setup_devices"] = torch.device("cpu")  # the cached value behind args.device


def train(cfg: Config, run_dir: str | Path, trainer) -> dict[str, Any]:
    """Train (resuming from the latest checkpoint if there is one), save the best adapter, write metrics."""
    import torch

    run_dir = Path(run_dir)
    resume = last_checkpoint(run_dir)
    resumed_from = int(resume.rsplit("-", 1)[-1]) if resume else None
    t0 = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except torch.OutOfMemoryError:
        mem = memory_snapshot()
        raise RuntimeError(
            f"out of GPU memory during training (peak reserved {mem['peak_gpu_reserved_gib']} GiB): lower "
            f"train.micro_batch_size (now {cfg.train.micro_batch_size}) and raise train.grad_accum, lower "
            f"data.max_seq_len (now {cfg.data.max_seq_len}), or set train.gradient_checkpointing=true") from None
    wall = time.time() - t0
    adapter_dir = run_dir / "adapter"
    trainer.save_model(str(adapter_dir))  # the best adapter by eval_loss (load_best_model_at_end)
    state = trainer.state
    n_train = len(trainer.train_dataset)
    examples_seen = state.global_step * cfg.train.micro_batch_size * cfg.train.grad_accum * max(1, trainer.args.world_size)
    metrics = {
        "steps": state.global_step,
        "max_steps": cfg.train.max_steps,
        "resumed_from_step": resumed_from,
        "stopped_by_time_budget": bool(getattr(trainer.time_budget, "stopped", False)),
        "examples_seen": examples_seen,
        "epochs": round(examples_seen / max(1, n_train), 4),
        "tokens_seen": int(state.num_input_tokens_seen),
        "wall_s": round(wall, 2),
        "tokens_per_s": round((state.num_input_tokens_seen - trainer._initial_num_input_tokens_seen) / wall, 1) if wall else None,
        "train_loss": round(result.training_loss, 4),
        "best_eval_loss": state.best_metric,
        "best_checkpoint": Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
        "packing": cfg.train.packing,
        "optim": trainer.args.optim.value if hasattr(trainer.args.optim, "value") else str(trainer.args.optim),
        "compute_dtype": choose_compute_dtype(cfg.quant.compute_dtype, hardware()),
        "memory": memory_snapshot(),
    }
    if trainer.is_world_process_zero():  # the adapter and checkpoints are saved by the main process only, too
        write_json(run_dir / "train" / "metrics.json", metrics)
    return metrics


def train_stage(run_dir: str | Path) -> dict[str, Any]:
    """Stage 3 on a run directory that notebooks 01 and 02 made, outside a notebook: what
    ``python -m qlora_helpers train`` runs in each process under ``accelerate launch``. Every process loads
    its own quantized copy onto its own GPU; the Trainer wraps it in DDP and splits the batches."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.exists() or not (run_dir / "data" / "train.jsonl").exists():
        raise ConfigError(f"--run-dir {run_dir}: no config.json or data/train.jsonl there; run notebooks 01 and 02 "
                          "on it first (or python -m qlora_helpers run)")
    cfg = load_config(config_path)
    model_path, _ = resolve_model_path(cfg)
    tokenizer = load_tokenizer(cfg, model_path)
    model = attach_lora(cfg, load_base_model(cfg, model_path))
    return train(cfg, run_dir, build_trainer(cfg, run_dir, model, tokenizer))


def data_parallel_processes(cfg: Config) -> int:
    """How many processes train: train.num_processes GPUs (0 = every visible one), or 1 without two GPUs."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    wanted = cfg.train.num_processes
    if wanted > max(gpus, 1):
        raise ConfigError(f"config key 'train.num_processes': {wanted} processes, but this machine has {gpus} GPUs "
                          "(one process per GPU); set 0 for all of them or 1")
    return wanted or max(gpus, 1)


def launch_command(run_dir: str | Path, num_processes: int) -> list[str]:
    """``accelerate launch`` of the train stage, one process per GPU. Every launcher setting is given, so no
    ``accelerate config`` file is needed and none found on the machine changes what runs; port 0 picks a free
    one. Mixed precision is the Trainer's own (fp16/bf16 from the config), not the launcher's."""
    multi = ["--multi_gpu", "--main_process_port", "0"] if num_processes > 1 else []
    return [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "qlora_helpers", "train", "--run-dir", str(run_dir)]


class LaunchFailed(RuntimeError):
    pass


def train_data_parallel(run_dir: str | Path, num_processes: int) -> dict[str, Any]:
    """Train on `num_processes` GPUs from a notebook: a kernel is one process, so the stage runs under
    accelerate launch, its output shown here as it comes; returns the metrics its main process wrote."""
    run_dir = Path(run_dir)
    cmd = launch_command(run_dir, num_processes)
    print("[qlora] " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
    except BaseException:  # an interrupted kernel must not leave the GPUs training behind it
        proc.terminate()
        proc.wait()
        raise
    if proc.wait():
        raise LaunchFailed(f"data-parallel training on {num_processes} GPUs exited with status {proc.returncode} "
                           "(its output is above); running this again resumes from the last checkpoint")
    return read_json(run_dir / "train" / "metrics.json")


def read_metrics_log(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "train" / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
