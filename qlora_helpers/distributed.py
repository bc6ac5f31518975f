"""Training on several GPUs (Kaggle's T4 x2): one process per GPU under ``accelerate launch``, each running notebook
03 itself, with its own 4-bit copy of the model; the Trainer sees the launcher's environment (RANK, WORLD_SIZE),
wraps the model in DDP and averages the LoRA gradients at every step.

So the cells a reader sees in notebook 03 (``from_pretrained``, ``get_peft_model``, ``TrainingArguments(...)``,
``Trainer(...)``, ``trainer.train``) are what every process runs: there is no second copy of them here. A notebook
kernel is one process, so notebook 03 starts the launch from its training cell (``train_on_every_gpu``) and shows
the first process's output as it comes; each launched process runs ``python -m qlora_helpers train --run-dir DIR``,
which executes notebook 03 on that run directory with papermill. The first process writes checkpoints, metrics and
the adapter; every process's executed notebook is kept in ``RUN_DIR/notebooks/ranks/`` (a failed launch's too).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .config import UserError
from .runlock import announced_lock
from .runs import check_run_dir, read_json
from .stage import Stage, stage_from_run_dir

TRAINING_NOTEBOOK = "03_lora_training.ipynb"


def data_parallel_processes(stage: Stage) -> int:
    """How many processes train: inside a launch, the launch's; else train.num_processes GPUs (0 = every visible
    one), or 1 without two GPUs."""
    from .hardware import check_processes

    return launched_processes() or check_processes(stage.cfg.train.num_processes, stage.hw)


def launched_processes() -> int:
    """WORLD_SIZE, which accelerate launch and torchrun set in every process they start; 0 outside a launch."""
    return int(os.environ.get("WORLD_SIZE") or 0)


def must_launch(num_processes: int) -> bool:
    """Whether this kernel starts the launch rather than training itself: several processes are wanted and this is
    not already one of them."""
    return num_processes > 1 and not launched_processes()


def launch_command(run_dir: str | Path, num_processes: int) -> list[str]:
    """``accelerate launch`` of notebook 03, one process per GPU. Every launcher setting is given, so no
    ``accelerate config`` file is needed and none found on the machine changes what runs; port 0 picks a free
    one. Mixed precision is the Trainer's own (fp16/bf16 from the config), not the launcher's."""
    multi = ["--multi_gpu", "--main_process_port", "0"] if num_processes > 1 else []
    return [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "qlora_helpers", "train", "--run-dir", str(run_dir)]


class LaunchFailed(UserError):
    pass


def train_on_every_gpu(stage: Stage, num_processes: int) -> dict[str, Any]:
    """From notebook 03's kernel: run notebook 03 once per GPU under accelerate launch, holding the run directory for
    the processes it starts, with their output shown here as it comes; returns the metrics the first one wrote."""
    cmd = launch_command(stage.run_dir, num_processes)
    print("[qlora] " + " ".join(cmd[1:]), flush=True)
    with announced_lock(stage.run_dir, f"training on {num_processes} processes"):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        try:
            for line in proc.stdout:
                print(line, end="", flush=True)
        except BaseException:  # an interrupted kernel must not leave the GPUs training behind it
            proc.terminate()
            proc.wait()
            raise
    if proc.wait():
        raise LaunchFailed(f"data-parallel training on {num_processes} processes exited with status {proc.returncode} "
                           f"(its output is above; every process's notebook is in {stage.path('notebooks', 'ranks')}); "
                           "running this again resumes from the last checkpoint")
    return read_json(stage.path("train", "metrics.json"))


def run_training_notebook(run_dir: str | Path, kernel: str = "python3") -> dict[str, Any]:
    """``python -m qlora_helpers train``: notebook 03 on a run directory that notebooks 01 and 02 made, through
    papermill, with the run's own settings. Under accelerate launch this is each process's work (only the first
    one's output is shown); outside a launch it is stage 3 run by hand, which on several GPUs launches itself."""
    from .pipeline import execute, notebook_path

    run_dir = check_run_dir(Path(run_dir).resolve())  # a folder this tool did not make is refused, untouched
    for needed in ("config.json", "data/train.jsonl", "model/lora/adapter_config.json"):
        if not (run_dir / needed).exists():
            raise UserError(f"--run-dir {run_dir}: no {needed} there; run notebooks 01 and 02 on it first "
                            "(or python -m qlora_helpers run)")
    cfg = stage_from_run_dir(run_dir).cfg
    params = {"PROFILE": cfg.profile, "OVERRIDES": {k: v for k, v in cfg.flat().items() if k != "profile"},
              "RUN_DIR": str(run_dir)}
    rank = int(os.environ.get("RANK") or 0)
    name = TRAINING_NOTEBOOK if not launched_processes() else f"rank{rank}-{TRAINING_NOTEBOOK}"
    out = run_dir / "notebooks" / ("ranks" if launched_processes() else "") / name
    nb = notebook_path(TRAINING_NOTEBOOK)
    execute(nb, out, params, kernel, nb.parent, log_output=rank == 0)
    return read_json(run_dir / "train" / "metrics.json", {}) or {}
