"""Training on several GPUs (Kaggle's T4 x2): one process per GPU under ``accelerate launch``, each with its
own 4-bit copy of the model; the Trainer wraps it in DDP and averages the LoRA gradients at every step.

A notebook kernel is a single process, so notebook 03 starts the launch and shows its output; the same
command works from a shell: ``accelerate launch --num_processes 2 -m qlora_helpers train --run-dir DIR``.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from .config import UserError
from .data import load_tokenizer
from .model import attach_lora, load_base_model
from .runs import read_json
from .sources import check_sources
from .stage import Stage, stage_from_run_dir
from .train import build_trainer, train


def data_parallel_processes(stage: Stage) -> int:
    """How many processes train: train.num_processes GPUs (0 = every visible one), or 1 without two GPUs."""
    from .hardware import check_processes

    return check_processes(stage.cfg.train.num_processes, stage.hw)


def train_stage(run_dir: str | Path) -> dict[str, Any]:
    """Stage 3 on a run directory that notebooks 01 and 02 made, outside a notebook: what
    ``python -m qlora_helpers train`` runs in each process under ``accelerate launch``."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists() or not (run_dir / "data" / "train.jsonl").exists():
        raise UserError(f"--run-dir {run_dir}: no config.json or data/train.jsonl there; run notebooks 01 and 02 "
                        "on it first (or python -m qlora_helpers run)")
    stage = stage_from_run_dir(run_dir)
    check_sources(stage.cfg, data=False)  # the data is in data/; the model may be a hub id: fail fast offline
    tokenizer = load_tokenizer(stage)
    model = attach_lora(stage, load_base_model(stage))
    return train(stage, build_trainer(stage, model, tokenizer))


def launch_command(run_dir: str | Path, num_processes: int) -> list[str]:
    """``accelerate launch`` of the train stage, one process per GPU. Every launcher setting is given, so no
    ``accelerate config`` file is needed and none found on the machine changes what runs; port 0 picks a free
    one. Mixed precision is the Trainer's own (fp16/bf16 from the config), not the launcher's."""
    multi = ["--multi_gpu", "--main_process_port", "0"] if num_processes > 1 else []
    return [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "qlora_helpers", "train", "--run-dir", str(run_dir)]


class LaunchFailed(UserError):
    pass


def train_data_parallel(stage: Stage, num_processes: int) -> dict[str, Any]:
    """Train on `num_processes` GPUs from a notebook: the stage runs under accelerate launch, its output shown
    here as it comes; returns the metrics its main process wrote."""
    cmd = launch_command(stage.run_dir, num_processes)
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
    return read_json(stage.path("train", "metrics.json"))
