"""The run directory: where every stage writes what it made and the next stage reads it.

Notebooks share nothing but this folder, so each one can run alone in a fresh kernel (as
papermill and Kaggle run them). Files are written atomically (a temporary file renamed into
place), so a kill mid-write leaves the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import secrets
import shutil
import sys
import time
from datetime import datetime
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .config import Config, UserError, config_from_dict
from .places import kaggle_working, on_kaggle

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILE = "config.json"


class CorruptFile(UserError):
    """A file the project wrote earlier cannot be read back (cut short by a kill or a full disk)."""


# --------------------------------------------------------------------------- files
class WriteFailed(UserError):
    """A file could not be written (a full disk, no permission); the old file, if any, is left as it was."""


def _write_failed(path: Path, exc: OSError) -> WriteFailed:
    return WriteFailed(f"{path}: cannot be written ({exc.strerror or exc}); the previous version, if any, is kept. "
                       "Free some space (or fix the permission) and run the same command again: it carries on "
                       "from the last checkpoint")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a library that writes a file itself (matplotlib, plotly, papermill);
    renamed over ``path`` when the block ends without an error, removed otherwise."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_failed(path, exc) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def failed_write(exc: BaseException) -> bool:
    """A full disk (or a file-size limit) as each writer reports it: an OSError, safetensors' own error, or torch.save's
    RuntimeError from its zip writer."""
    import errno

    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    text = str(exc)
    return (type(exc).__name__ == "SafetensorError" and "I/O error" in text) or \
        (isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text))


def write_text(path: str | Path, text: str) -> None:
    """Write atomically: a temporary file beside the target, flushed to disk, then renamed over it."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def replace_dir(tmp: str | Path, target: str | Path) -> None:
    """Swap a folder written beside its target in whole (a kill leaves the old folder or the new one, and at
    worst the old one under a temporary name, which the next swap removes)."""
    tmp, target = Path(tmp), Path(target)
    old = target.with_name(f".{target.name}.old")
    try:
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
    except OSError as exc:
        raise _write_failed(target, exc) from None
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | Path, default: Any = None) -> Any:
    """A JSON file the project wrote, or ``default`` when it does not exist; a corrupt one is a one-line error."""
    path = Path(path)
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFile(f"{path}: cannot be read back ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                          "it was probably cut short by a kill or a full disk: delete it and run the stage "
                          "that writes it again") from None


def save_config(cfg: Config, run_dir: str | Path) -> None:
    write_json(Path(run_dir) / CONFIG_FILE, cfg.to_dict())


def load_config(path: str | Path) -> Config:
    """The resolved config a run directory recorded (``path`` is the run directory or its config.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    raw = read_json(path)
    if raw is None:
        raise UserError(f"{path}: no such file; run notebook 01 (or `python -m qlora_helpers run`) on this run directory first")
    return config_from_dict(raw, path)


# --------------------------------------------------------------------------- where runs live
def runs_root() -> Path:
    """runs/ beside this checkout; on Kaggle, /kaggle/working/runs."""
    return kaggle_working() / "runs" if on_kaggle() else REPO_ROOT / "runs"


def default_run_dir() -> Path:
    """A new folder under runs/, created here: the time to the second and a random suffix, made with an exclusive
    mkdir, so two runs started in the same second never share one."""
    root = runs_root()
    ensure_dir(root, "runs folder")
    while True:
        path = root / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"run directory {path}: cannot be created ({exc.strerror or exc})") from None


def ensure_dir(path: Path, what: str = "run directory") -> Path:
    """Make a folder (and its parents), or say in one line why it cannot be one."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot be created ({exc.strerror or exc})") from None
    return path


def link_latest(path: Path) -> None:
    """runs/latest -> the newest run directory (only for folders directly under a folder named runs). Not on
    Kaggle: /kaggle/working becomes the kernel's output, and what Kaggle makes of a link there is not documented
    (a copy of the whole run would count twice against its 20 GB); latest_run_dir finds the run without one."""
    latest = path.parent / "latest"
    if path.parent.name != "runs" or path.name == "latest" or on_kaggle():
        return
    try:
        if latest.is_symlink() or not latest.exists():
            tmp = path.parent / f".latest.{os.getpid()}.tmp"
            if tmp.is_symlink():
                tmp.unlink()
            tmp.symlink_to(path.name)
            os.replace(tmp, latest)
    except OSError:
        pass


def latest_run_dir() -> Path | None:
    """runs/latest; on Kaggle, where there is no such link, the newest run directory in /kaggle/working/runs."""
    latest = runs_root() / "latest"
    if latest.exists():
        return latest.resolve()
    if on_kaggle() and runs_root().is_dir():
        found = sorted(p for p in runs_root().iterdir() if (p / CONFIG_FILE).is_file() and not p.name.startswith("."))
        return found[-1] if found else None
    return None


# --------------------------------------------------------------------------- measurements
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
          "gpu": None, "on_kaggle": on_kaggle()}
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
