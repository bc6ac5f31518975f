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
import stat
import sys
from datetime import datetime
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .config import SECTIONS, Config, UserError, config_from_dict, shorten
from .places import kaggle_working, on_kaggle

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILE = "config.json"
# The first file a run writes into its run directory: what makes a folder one of this tool's run directories
# (config.json does not: a model folder has one too).
MARKER = "qlora-run.json"
MADE_BY = "qlora_helpers"


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


def not_a_regular_file(path: Path) -> str | None:
    """What ``path`` is when it exists but is no regular file that can be read to its end (a FIFO, a device, a
    socket: reading one waits for a writer or never ends), else None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return None


def file_sha256(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | Path, default: Any = None) -> Any:
    """A JSON file the project wrote, or ``default`` when it does not exist; a corrupt one is a one-line error."""
    path = Path(path)
    if not path.exists():
        return default
    kind = not_a_regular_file(path)
    if kind:
        raise UserError(f"{path}: is {kind}, not a file this project wrote")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFile(f"{path}: cannot be read back ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                          "it was probably cut short by a kill or a full disk: delete it and run the stage "
                          "that writes it again") from None


def save_config(cfg: Config, run_dir: str | Path) -> None:
    """config.json, into a run directory this tool made (claimed first: marked, or refused in one line)."""
    write_json(claim_run_dir(run_dir) / CONFIG_FILE, cfg.to_dict())


def load_config(path: str | Path) -> Config:
    """The resolved config a run directory recorded (``path`` is the run directory or its config.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    raw = read_json(path)
    if raw is None:
        raise UserError(f"{path}: no such file; run notebook 01 (or `python -m qlora_helpers run`) on this run directory first")
    return config_from_dict(raw, path)


# --------------------------------------------------------------------------- whose folder it is
class NotARunDir(UserError):
    """A folder a run must not write into: it holds files this tool did not write."""


# What a run directory made before the marker existed holds at its top level (besides hidden temporary files).
LEGACY_LAYOUT = {CONFIG_FILE, "session.json", ".lock", "data", "model", "train", "adapter", "eval", "export", "report",
                 "notebooks", "report.md", "summary.json", ".adapter.old"}


def _names(names: list[str]) -> str:
    return ", ".join(repr(shorten(n, 40)) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def is_marked(path: Path) -> bool:
    """The folder holds this tool's marker: a regular file whose JSON says this tool made the folder."""
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("made_by") == MADE_BY


def legacy_problem(path: Path) -> str | None:
    """Why ``path`` (a folder that is not empty and holds no marker) is not a run directory this tool made before it
    wrote a marker, or None when it is one.

    Strict, so that no other folder passes: config.json is a whole saved run config (the six sections and the
    profile, nothing else), every entry at the top level is one the stages write, and data/, if there, holds
    stage 1's metrics."""
    entries = sorted(p.name for p in path.iterdir())
    if MARKER in entries:
        return f"its {MARKER} is not this tool's marker"
    foreign = [n for n in entries if n not in LEGACY_LAYOUT and not (n.startswith(".") and ".tmp" in n)]
    if foreign:
        return f"it holds {_names(foreign)}, which no run writes, and no {MARKER}"
    config = path / CONFIG_FILE
    if not config.is_file():
        return f"it holds {_names(entries)} but no {MARKER} and no {CONFIG_FILE}"
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = None
    if not (isinstance(raw, dict) and set(raw) == {"profile", *SECTIONS} and all(isinstance(raw[s], dict) for s in SECTIONS)):
        return f"it holds no {MARKER}, and its {CONFIG_FILE} is another program's, not a run's saved settings"
    if (path / "data").exists():
        metrics = path / "data" / "metrics.json"
        try:
            ok = metrics.is_file() and "rows_read" in json.loads(metrics.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            ok = False
        if not ok:
            return f"it holds no {MARKER}, and its data/ holds no stage 1 metrics (data/metrics.json)"
    return None


def inside_checkout(path: Path) -> bool:
    """Inside this package's git checkout (not under its runs/ folder)."""
    if not (REPO_ROOT / ".git").exists():
        return False  # an installed package (a Kaggle dataset, site-packages): no checkout to protect
    if path == REPO_ROOT / "runs":
        return True  # the folder that holds the runs is no run
    return path.is_relative_to(REPO_ROOT) and not path.is_relative_to(REPO_ROOT / "runs")


def _contents(path: Path) -> list[Path]:
    """What a folder holds, less a marker another process is writing this moment (write_json's temporary file, which
    it renames to MARKER): two stages claiming one new folder at once both get it."""
    being_marked = f".{Path(MARKER).stem}."
    return [p for p in path.iterdir() if not (p.name.startswith(being_marked) and ".tmp" in p.name)]


def run_dir_problem(path: Path) -> str | None:
    """Why a run may not write into ``path`` (resolved), or None: it may write into a folder that does not exist
    yet, an empty one, or a run directory this tool made (marked), or one it made before the marker existed."""
    path = Path(path).expanduser().resolve()
    if inside_checkout(path):
        return (f"it is inside the repository checkout {REPO_ROOT}, where a run's notebooks and files would mix with "
                f"the project's own (use {REPO_ROOT / 'runs'}/<name> or a folder outside the checkout)")
    if not path.exists():
        return None
    if not path.is_dir():
        return "it exists and is not a folder"
    try:
        if is_marked(path) or not _contents(path):
            return None
        return legacy_problem(path)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"


def check_run_dir(path: str | Path) -> Path:
    """Refuse, in one line and before anything is written, a folder that is not a run's own (see run_dir_problem)."""
    path = Path(path)
    problem = run_dir_problem(path)
    if problem:
        raise NotARunDir(f"run directory {path}: refused, {problem}; a run writes only into a new or empty folder "
                         f"or a run directory this tool made")
    return path


def claim_run_dir(path: str | Path) -> Path:
    """Make ``path`` this tool's run directory: checked (check_run_dir), created, and marked before any other file
    is written into it. A run directory from before the marker existed is marked now, with a line saying so."""
    path = check_run_dir(path)
    if is_marked(path):
        return path
    legacy = path.is_dir() and bool(_contents(path))
    ensure_dir(path)
    record = {"made_by": MADE_BY, "created": datetime.now().astimezone().isoformat(timespec="seconds"),
              "note": "this folder is a run directory of qlora_helpers; a run writes only into folders marked so"}
    if legacy:
        record["marked_later"] = True
        print(f"[qlora] {path}: a run directory from before {MARKER} existed (its config.json and layout are this "
              f"tool's); marked now", file=sys.stderr, flush=True)
    write_json(path / MARKER, record)
    return path


def require_run_dir(path: str | Path) -> Path:
    """An existing run directory an earlier stage made (for a stage that only continues one): refused otherwise."""
    path = Path(path)
    if not path.is_dir() or not any(path.iterdir()):
        return path  # the caller says what is missing
    return claim_run_dir(path)


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
        found = sorted(p for p in runs_root().iterdir() if p.is_dir() and not p.name.startswith(".")
                       and (is_marked(p) or (p / CONFIG_FILE).is_file() and legacy_problem(p) is None))
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
