"""The time budget of a whole run (``train.max_minutes``): training stops early enough that evaluation, the
export and the report still finish inside it.

A Kaggle session ends after 12 hours whatever is running, so the budget counts from the start of the session's
first stage, not from the start of training. That moment is kept in ``RUN_DIR/session.json``, so the stages
that follow (the next notebooks, and the training processes ``accelerate launch`` starts) count from it too.
A session belongs to a live process (the Kaggle kernel, or ``python -m qlora_helpers run``): once that process
is gone, the next stage starts a new session, as a new Kaggle version continuing an earlier run does.

What the stages after training need is estimated from the config (prompts x new tokens at a slow generation
speed, the model loaded from disk again for evaluation and the merge, the merged model written), with speeds
chosen below what a T4 does, so the estimate errs on the side of stopping training early.
"""
from __future__ import annotations

import math
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import Config
from .runs import CorruptFile, read_json, write_json

SESSION_FILE = "session.json"

# Assumed, not measured: deliberately slower than a T4 (the slowest GPU the recipes target), so the reserve is
# generous. One greedy decoding step of a whole batch per second: 4-bit (bitsandbytes dequantizes every weight
# at every step) and 16-bit; tokens per second of a validation forward pass in 4 bits; the speed of reading 16-bit
# weights from the disk (or an attached Kaggle input) and of writing the merged model; kernels, imports,
# tokenizers and the report.
DECODE_STEPS_PER_S_4BIT = 5.0
DECODE_STEPS_PER_S_16BIT = 10.0
FORWARD_TOKENS_PER_S_4BIT = 1000.0
DISK_BYTES_PER_S = 100e6
FIXED_S = 300.0


# --------------------------------------------------------------------------- the session
def _process_started(pid: int | None) -> float | None:
    """When process ``pid`` started (None if it does not exist): a pid alone could have been reused."""
    import psutil

    try:
        return psutil.Process(int(pid)).create_time() if pid else None
    except (psutil.Error, ValueError, TypeError):
        return None


def current_session(run_dir: str | Path) -> dict[str, Any] | None:
    """The session recorded in the run directory, if the process that owns it is still running."""
    try:
        session = read_json(Path(run_dir) / SESSION_FILE)
    except CorruptFile:
        return None
    if not isinstance(session, dict):
        return None
    started = _process_started(session.get("owner_pid"))
    if started is None or abs(started - float(session.get("owner_started") or 0)) > 1.0:
        return None
    return session


def begin_session(run_dir: str | Path, owner_pid: int | None = None) -> dict[str, Any]:
    """The session this stage belongs to: the recorded one while its owner runs, else a new one owned by
    ``owner_pid`` (default: this process), starting now."""
    session = current_session(run_dir)
    if session:
        return session
    pid = owner_pid or os.getpid()
    now = time.time()
    session = {"started": now, "started_at": datetime.fromtimestamp(now).isoformat(timespec="seconds"),
               "owner_pid": pid, "owner_started": _process_started(pid)}
    write_json(Path(run_dir) / SESSION_FILE, session)
    return session


# --------------------------------------------------------------------------- what comes after training
def after_training_estimate(cfg: Config, params_total: int | None) -> dict[str, float]:
    """Seconds the stages after training need, by part, from the config and the base model's parameter count
    (None: unknown, so loading and writing 16-bit weights is not counted)."""
    ev = cfg.eval
    batches = math.ceil(ev.num_prompts / ev.batch_size)
    val_examples = min(ev.max_val_examples or cfg.data.val_size, cfg.data.val_size)
    weights = 2.0 * (params_total or 0)  # 16-bit bytes, as read from disk and as written merged
    # evaluation's 4-bit load and the adapter on the plain base; with a merge: the merge base, the unmerged
    # reference, the merged model, the base of the other merged form
    loads = 2 + (4 if ev.export_merged else 0)
    parts = {
        # base and fine-tuned: answers to the held-out prompts, and the validation loss
        "evaluation_answers_s": 2 * batches * ev.max_new_tokens / DECODE_STEPS_PER_S_4BIT,
        "evaluation_loss_s": 2 * val_examples * cfg.data.max_seq_len / FORWARD_TOKENS_PER_S_4BIT,
        # every form that can ship answers every held-out prompt: the adapter on the plain base; with a merge,
        # the unmerged reference, the merged model and the other merged form
        "export_answers_s": (1 + (3 if ev.export_merged else 0)) * batches * ev.max_new_tokens / DECODE_STEPS_PER_S_16BIT,
        "model_loads_and_writes_s": (loads + (1 if ev.export_merged else 0)) * weights / DISK_BYTES_PER_S,
        "fixed_s": FIXED_S,
    }
    parts = {k: round(v, 1) for k, v in parts.items()}
    parts["total_s"] = round(sum(parts.values()), 1)
    return parts


def model_parameters(run_dir: str | Path | None) -> int | None:
    """The base model's parameter count as notebook 02 measured it (model/metrics.json), if it did."""
    if not run_dir:
        return None
    try:
        metrics = read_json(Path(run_dir) / "model" / "metrics.json", {}) or {}
    except CorruptFile:
        return None
    return (metrics.get("params") or {}).get("total")


def training_deadline(cfg: Config, run_dir: str | Path | None, now: float | None = None) -> dict[str, Any] | None:
    """When training must stop (epoch seconds) so the whole run fits ``train.max_minutes``, and why;
    None without a budget. Counted from the session's start, or from ``now`` when no session is recorded
    (training started alone, e.g. ``python -m qlora_helpers train`` from a shell)."""
    if not cfg.train.max_minutes:
        return None
    now = time.time() if now is None else now
    session = current_session(run_dir) if run_dir else None
    start = float(session["started"]) if session else now
    reserve = after_training_estimate(cfg, model_parameters(run_dir))
    deadline = start + cfg.train.max_minutes * 60 - reserve["total_s"]
    return {"max_minutes": cfg.train.max_minutes, "counted_from": "session start" if session else "training start",
            "session_started_at": datetime.fromtimestamp(start).isoformat(timespec="seconds"),
            "reserved_after_training_s": reserve["total_s"], "reserve": reserve, "deadline": deadline,
            "deadline_at": datetime.fromtimestamp(deadline).isoformat(timespec="seconds"),
            "minutes_for_training": round((deadline - now) / 60, 1)}


def describe_deadline(budget: dict[str, Any]) -> str:
    """One line for the notebook: the budget, what is kept for after training, and when training stops."""
    left = budget["minutes_for_training"]
    when = (f"stops by {budget['deadline_at'][11:]} ({left:g} min from now)" if left > 0
            else "has no time left: it stops after its first step")
    return (f"time budget: {budget['max_minutes']:g} min from the {budget['counted_from']} "
            f"({budget['session_started_at'][11:]}); {budget['reserved_after_training_s'] / 60:.1f} min kept for "
            f"evaluation, export and the report (estimated); training {when}")
