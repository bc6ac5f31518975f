"""Stage 3's Trainer callbacks: the metrics log (RUN_DIR/train/metrics.jsonl, whole-run time and sessions, the
NaN guard), the whole run's time budget, and in a notebook a live loss plot. qlora_helpers.train hands them to
the Trainer; the report reads the log back with read_metrics_log.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from .config import UserError
from .places import interactive
from .runlock import hold, let_go
from .runs import peak_gpu_reserved_gib, peak_rss_gib, write_text
from .stage import Stage


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: a setting to change (dtype, learning rate), said in one line."""


def read_metrics_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """train/metrics.jsonl; a last line that a kill cut short is skipped."""
    path = Path(run_dir) / "train" / "metrics.jsonl"
    out = []
    for line in (path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def metrics_callback(stage: Stage):
    """Appends one JSON line per log event to RUN_DIR/train/metrics.jsonl; a resumed run first drops the
    lines past the checkpoint it resumes from, so every step appears exactly once. Stops on a NaN loss."""
    from transformers import TrainerCallback

    path = stage.path("train", "metrics.jsonl")
    cfg = stage.cfg

    class MetricsJsonl(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.time()
            self.tokens_at_start = state.num_input_tokens_seen
            self.last = (time.time(), state.num_input_tokens_seen)
            self.elapsed_before, self.session = 0.0, 1
            if args.process_index != 0:  # under DDP the file is the main process's alone
                return
            hold(stage.run_dir, "training")  # by hand: kept until the results are saved (runlock)
            log = read_metrics_log(stage.run_dir)
            if log:  # time adds up over every session, the steps a kill made this one train again included
                self.elapsed_before = max(rec.get("elapsed_s") or 0.0 for rec in log)
                self.session = max(rec.get("session") or 1 for rec in log) + 1
            write_text(path, "".join(json.dumps(rec) + "\n" for rec in log if rec["step"] <= state.global_step))

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "train_loss" in logs:  # the end-of-training summary, not a step
                return
            now, tokens = time.time(), state.num_input_tokens_seen
            rec = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
            if "eval_loss" in logs:
                rec.update(kind="eval", eval_loss=logs["eval_loss"])
            else:
                dt = now - self.last[0]
                rec.update(kind="train", loss=logs.get("loss"), learning_rate=logs.get("learning_rate"),
                           grad_norm=logs.get("grad_norm"),
                           tokens_per_s=round((tokens - self.last[1]) / dt, 1) if dt > 0 else None)
                self.last = (now, tokens)
                loss = logs.get("loss")
                if loss is not None and not math.isfinite(loss):
                    let_go(stage.run_dir)
                    raise TrainingDiverged(
                        f"training loss became {loss} at step {state.global_step}: likely fp16 overflow "
                        "(try quant.compute_dtype=bfloat16 on a GPU that has it) or a learning rate too high "
                        f"(train.learning_rate={cfg.train.learning_rate}); the last good checkpoint is kept")
            per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * max(1, args.world_size)
            rec.update(tokens_seen=tokens, examples_seen=state.global_step * per_step,
                       peak_gpu_reserved_gib=peak_gpu_reserved_gib(), peak_rss_gib=peak_rss_gib(),
                       elapsed_s=round(self.elapsed_before + now - self.t0, 2), session=self.session)
            if args.process_index == 0:
                with open(path, "a") as f:
                    f.write(json.dumps(rec) + "\n")

    return MetricsJsonl()


def time_budget_callback(stage: Stage):
    """Stops cleanly, with a checkpoint, when what is left of train.max_minutes is what the stages after training
    need (qlora_helpers.budget: counted from the session's start, which the run directory records). Under DDP
    every process must stop at the same step, or the others wait forever in the next all-reduce: the decision
    goes through the Trainer's accelerator (set_trigger / check_trigger)."""
    from transformers import TrainerCallback

    from .budget import describe_deadline, training_deadline

    class TimeBudget(TrainerCallback):
        stopped = False
        budget = None

        def on_train_begin(self, args, state, control, **kw):
            self.budget = training_deadline(stage.cfg, stage.run_dir)
            if self.budget and args.process_index == 0:
                print(f"[qlora] {describe_deadline(self.budget)}", flush=True)

        def on_step_end(self, args, state, control, **kw):
            if not self.budget:
                return
            accelerator = getattr(self, "accelerator", None)
            late = time.time() >= self.budget["deadline"]
            if late and accelerator is not None:
                accelerator.set_trigger()
            due = accelerator.check_trigger() if accelerator is not None else late
            if due:
                control.should_save = True
                control.should_training_stop = True
                self.stopped = True

    return TimeBudget()


def loss_points(run_dir: str | Path) -> tuple[list, list]:
    """(step, training loss) and (step, validation loss) pairs from train/metrics.jsonl."""
    log = read_metrics_log(run_dir)
    return ([(r["step"], r["loss"]) for r in log if r["kind"] == "train" and r.get("loss") is not None],
            [(r["step"], r["eval_loss"]) for r in log if r["kind"] == "eval"])


def loss_figure(train: list, val: list, max_steps: int | None = None, size: tuple = (6, 3)):
    """The training and validation loss against the optimizer step, as a matplotlib Figure (no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="training loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    if max_steps:
        ax.set_xlim(0, max_steps)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def png(fig) -> bytes:
    """A figure as PNG bytes: what a notebook embeds, whatever matplotlib backend the kernel has."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def live_plot_callback():
    """In a notebook, a loss plot that redraws at every log step: an IPython display handle updated with a PNG, so
    it needs no widgets and the saved notebook keeps the last figure as an image that renders anywhere."""
    from transformers import TrainerCallback

    class LivePlot(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            from IPython.display import Markdown, display

            self.train, self.val = [], []
            self.handle = display(Markdown("*The loss plot appears here at the first logged step.*"), display_id=True)

        def on_log(self, args, state, control, logs=None, **kw):
            from IPython.display import Image

            logs = logs or {}
            if "loss" in logs and "train_loss" not in logs:
                self.train.append((state.global_step, logs["loss"]))
            if "eval_loss" in logs:
                self.val.append((state.global_step, logs["eval_loss"]))
            if not self.train or args.process_index != 0:
                return
            self.handle.update(Image(data=png(loss_figure(self.train, self.val, state.max_steps)), format="png"))

    return LivePlot()


def training_callbacks(stage: Stage) -> list:
    """metrics.jsonl (and the NaN guard), the time budget, and in a notebook someone watches a live loss plot (run
    unattended, notebook 03 draws the finished plot from the log instead)."""
    return [metrics_callback(stage), time_budget_callback(stage)] + ([live_plot_callback()] if interactive() else [])
