"""The run directory: where every stage writes what it made and the next stage reads it.

Notebooks share nothing but this folder, so each one can run alone in a fresh kernel (as
papermill and Kaggle run them). ``start_stage`` is the first call of every notebook.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, config_from_params, load_config

ON_KAGGLE = bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE"))
REPO_ROOT = Path(__file__).resolve().parent.parent


def write_json(path: str | Path, obj: Any) -> None:
    """Write atomically, so a kill mid-write never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path, default: Any = None) -> Any:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def default_run_dir() -> Path:
    base = Path("/kaggle/working/runs") if ON_KAGGLE else REPO_ROOT / "runs"
    return base / datetime.now().strftime("%Y%m%d-%H%M%S")


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    """RUN_DIR from the parameters cell, else $QLORA_RUN_DIR, else runs/latest (made by the last run)."""
    chosen = run_dir or os.environ.get("QLORA_RUN_DIR")
    if chosen:
        return Path(chosen).expanduser().resolve()
    latest = (Path("/kaggle/working/runs") if ON_KAGGLE else REPO_ROOT / "runs") / "latest"
    return latest.resolve() if latest.exists() else default_run_dir()


def start_stage(profile: str, overrides: dict | str | None, run_dir: str | None) -> tuple[Config, Path]:
    """Build the validated config from a notebook's parameters cell and find the run directory.

    The first stage of a run writes ``config.json``; later stages read the same values back from
    their own parameters, so a notebook opened alone behaves exactly as in the pipeline.
    ``QLORA_PROFILE`` (set by the test suite) replaces the parameters cell's profile.
    """
    from .kaggle import check_sources

    profile = os.environ.get("QLORA_PROFILE") or profile
    cfg = config_from_params(profile, overrides)
    check_sources(cfg)  # no internet and nothing attached: stop here, saying what to do
    path = resolve_run_dir(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    saved = path / "config.json"
    if saved.exists():
        previous = load_config(saved)
        if previous.to_dict() != cfg.to_dict():
            changed = [k for k, v in cfg.flat().items() if previous.flat().get(k) != v]
            if any(not k.startswith(("train.max_", "eval.")) for k in changed):
                raise ConfigError(f"run directory {path} was made with other settings ({', '.join(changed)}); "
                                  "use a new RUN_DIR or the same profile and overrides")
    cfg.save(saved)
    _link_latest(path)
    return cfg, path


def _link_latest(path: Path) -> None:
    latest = path.parent / "latest"
    if path.parent.name != "runs" or path.name == "latest":
        return
    try:
        if latest.is_symlink() or not latest.exists():
            tmp = path.parent / ".latest.tmp"
            if tmp.is_symlink():
                tmp.unlink()
            tmp.symlink_to(path.name)
            os.replace(tmp, latest)
    except OSError:
        pass


def peak_rss_gib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def peak_gpu_reserved_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_reserved() / 2**30, 3)


def memory_snapshot() -> dict[str, Any]:
    import torch

    snap = {"peak_rss_gib": peak_rss_gib(), "peak_gpu_reserved_gib": peak_gpu_reserved_gib(),
            "peak_gpu_allocated_gib": None}
    if torch.cuda.is_available():
        snap["peak_gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return snap


def environment() -> dict[str, Any]:
    """Package versions and hardware, for the report."""
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "papermill"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    hw = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
          "gpu": None, "on_kaggle": ON_KAGGLE}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        hw["gpu"] = f"{p.name} ({p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor})"
        hw["gpu_count"] = torch.cuda.device_count()
    return {"versions": versions, "hardware": hw}


class Timer:
    def __init__(self):
        self.start = time.time()

    @property
    def seconds(self) -> float:
        return round(time.time() - self.start, 2)
