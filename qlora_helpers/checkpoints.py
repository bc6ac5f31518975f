"""Stage 3's checkpoints: which one a run resumes from, and whether the run has trained to the end already.

transformers' ``get_last_checkpoint`` returns the newest ``checkpoint-N`` folder whatever it holds, and the
Trainer resumes from a folder without ``optimizer.pt`` with a fresh optimizer and a restarted learning-rate
schedule, without a word. Here a checkpoint is resumed from only when every file the Trainer reads back is
there and whole; any other is set aside as ``incomplete-checkpoint-N`` (outside the Trainer's own
``checkpoint-*`` rotation) with a warning that names it, and the newest complete one before it is taken.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

from .config import UserError
from .runlock import writing
from .runs import replace_dir, write_json
from .stage import Stage

PREFIX = "checkpoint"
SET_ASIDE = "incomplete-checkpoint"
# What a resumed Trainer reads: its state (written last), the adapter, the optimizer and the schedule.
REQUIRED = ("trainer_state.json", "adapter_config.json", "optimizer.pt", "scheduler.pt")
WEIGHTS = ("adapter_model.safetensors", "model.safetensors")
OPTIONAL_TORCH = ("scaler.pt", "rng_state.pth")  # read back when present


def checkpoint_folder(stage: Stage) -> Path:
    return stage.path("train", "checkpoints")


def checkpoint_step(checkpoint: str | Path | None) -> int | None:
    return int(str(checkpoint).rsplit("-", 1)[-1]) if checkpoint else None


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip archive; one cut short has no central directory."""
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError) as exc:
        return f"{path.name} is cut short ({type(exc).__name__})"


def checkpoint_problem(folder: Path) -> str | None:
    """Why the Trainer could not resume from this folder exactly, or None when it can."""
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    weights = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        missing.append(WEIGHTS[0])
    if missing:
        return f"{', '.join(missing)} missing"
    for name in ("trainer_state.json", "adapter_config.json"):
        try:
            state = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"{name} cannot be read ({type(exc).__name__})"
        if name == "trainer_state.json" and not isinstance((state or {}).get("global_step") if isinstance(state, dict) else None, int):
            return f"{name} holds no global_step"
    try:
        from safetensors import safe_open

        with safe_open(str(weights), "pt"):
            pass
    except Exception as exc:  # safetensors raises its own error type for a header or a size that does not fit
        return f"{weights.name} cannot be read ({str(exc).splitlines()[0][:80]})"
    for name in ("optimizer.pt", "scheduler.pt") + OPTIONAL_TORCH:
        if (folder / name).exists():
            problem = _torch_file_problem(folder / name)
            if problem:
                return problem
    return None


def set_aside(folder: Path) -> Path | None:
    """Rename a checkpoint that cannot be resumed from out of the Trainer's sight; kept for a person to look at."""
    target = folder.with_name(f"{SET_ASIDE}-{checkpoint_step(folder)}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{SET_ASIDE}-{checkpoint_step(folder)}.{n}")
    try:
        os.rename(folder, target)
    except OSError:  # another process of a data-parallel run moved it first, or a read-only folder
        return None
    return target


def numbered_checkpoints(stage: Stage) -> list[Path]:
    """checkpoint-N folders, newest first."""
    folder = checkpoint_folder(stage)
    found = [p for p in folder.glob(f"{PREFIX}-*") if p.is_dir() and p.name.rsplit("-", 1)[-1].isdigit()] \
        if folder.is_dir() else []
    return sorted(found, key=checkpoint_step, reverse=True)


def newest_complete(stage: Stage, move_aside: bool = True) -> Path | None:
    """The newest checkpoint the Trainer can resume from exactly. Newer ones that cannot (a kill or a full disk
    cut them short, or optimizer/scheduler state is missing) are set aside, each with a warning naming it: only by
    the main process of a run about to train, holding the run directory (a checkpoint being written by a training
    that runs elsewhere is incomplete too, and must not be moved from under it). ``move_aside=False``: only look."""
    if not move_aside or int(os.environ.get("RANK") or 0) != 0:
        return next((f for f in numbered_checkpoints(stage) if checkpoint_problem(f) is None), None)
    with writing(stage.run_dir, "training"):
        for folder in numbered_checkpoints(stage):
            problem = checkpoint_problem(folder)
            if problem is None:
                return folder
            moved = set_aside(folder)
            print(f"[qlora] warning: {folder} cannot be resumed from ({problem}); "
                  + (f"set aside as {moved.name}; " if moved else "") + "looking at the one before it",
                  file=sys.stderr, flush=True)
    return None


# --------------------------------------------------------------------------- a run that has trained already
def check_not_past(stage: Stage, total: int, done: int | None, checkpoint: Path | None) -> None:
    """A run cannot be made shorter than it has trained: that would be a silent extra step and a wrong report."""
    if done and done > total:
        key = "train.max_steps" if stage.cfg.train.max_steps else "train.epochs"
        value = stage.cfg.train.max_steps or stage.cfg.train.epochs
        raise UserError(f"{key}={value} means {total} steps, but run directory {stage.run_dir} has trained "
                        f"{done} steps already ({checkpoint.name if checkpoint else 'checkpoint'}); raise {key} to "
                        "train further, or use a new RUN_DIR")


def resumed_learning_rate(checkpoint: Path) -> float | None:
    """The learning rate of the first step after resuming from ``checkpoint``: the Trainer takes it from the
    optimizer state, which the scheduler set at the checkpoint's step (scheduler.pt's last value). None when it
    cannot be read."""
    import torch

    try:
        state = torch.load(checkpoint / "scheduler.pt", map_location="cpu", weights_only=True)
        return float(max(state["_last_lr"]))
    except Exception:  # noqa: BLE001 - checked complete already; an unreadable value is not a reason to stop
        return None


def check_schedule_goes_on(stage: Stage, total: int, done: int | None, checkpoint: Path | None) -> None:
    """A run that trained to the end of a decaying schedule (cosine, linear) ends at a learning rate of 0. Made
    longer, the Trainer would take its next step at that 0 and the steps after it on a schedule stretched after
    the fact; refused instead, saying how to train longer. A schedule that has not ended, or a constant one, goes
    on: the Trainer rebuilds it for the new length (docs/runs.md)."""
    if checkpoint is None or not done or done >= total:
        return
    lr = resumed_learning_rate(checkpoint)
    if lr is None or lr > 0:
        return
    key = "train.max_steps" if stage.cfg.train.max_steps else "train.epochs"
    value = stage.cfg.train.max_steps or stage.cfg.train.epochs
    raise UserError(f"{key}={value} means {total} steps, but run directory {stage.run_dir} finished its "
                    f"{stage.cfg.train.lr_scheduler} learning-rate schedule at step {done} with a learning rate of 0 "
                    f"({checkpoint.name}); trained further, it would take its next step at a learning rate of 0. To "
                    f"train longer, start a new run with {key}={value} (another RUN_DIR), or keep {key} as it was")


def adapter_from_checkpoint(stage: Stage, checkpoint: Path) -> None:
    """RUN_DIR/adapter from a checkpoint folder (what trainer.save_model writes, without the optimizer state),
    swapped in whole: a kill leaves the old adapter or the new one."""
    skip = {"optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json"}
    target = stage.path("adapter")
    tmp = target.with_name(f".adapter.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp, ignore=lambda d, names: [n for n in names if n in skip or n.startswith("rng_state")])
    replace_dir(tmp, target)


def finished_metrics(stage: Stage, checkpoint: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """For a run killed after its last checkpoint but before the adapter and metrics were saved: both from the
    checkpoints alone (the best one by validation loss, as load_best_model_at_end would have chosen)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    best = state.get("best_model_checkpoint")
    best_folder = checkpoint.with_name(Path(best).name) if best else checkpoint
    best_folder = best_folder if best_folder.is_dir() else checkpoint
    metrics.update(best_eval_loss=state.get("best_metric"), best_checkpoint=best_folder.name,
                   tokens_seen=int(state.get("num_input_tokens_seen") or 0))
    if int(os.environ.get("RANK") or 0) == 0:  # under a data-parallel launch, the main process writes
        adapter_from_checkpoint(stage, best_folder)
        write_json(stage.path("train", "metrics.json"), metrics)
    return metrics
