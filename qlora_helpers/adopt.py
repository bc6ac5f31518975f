"""Continuing a run that an earlier session made: on Kaggle, a new version of a kernel starts with an empty
/kaggle/working, and the earlier version's output comes back only read-only, under /kaggle/input, when it is
attached as an input (``kernel_sources``; Add Input > Your Work). A run directory there is copied into
/kaggle/working/runs/<the same name>, where the stages can write, and training resumes from its newest complete
checkpoint as on any run directory.

The copy leaves out the merged 16-bit model (``export/merged``, gigabytes that notebook 04 writes again) and is
made in a temporary folder renamed into place, so a session killed during the copy leaves no half run behind.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .config import UserError
from .places import kaggle_input, on_kaggle
from .runs import CONFIG_FILE, MARKER, check_run_dir, is_marked, legacy_problem, runs_root

# /kaggle/input/<slug>/runs/<run> or /kaggle/input/notebooks/<owner>/<slug>/runs/<run>: a run's marker
# sits 4 or 6 levels down; deeper is not searched (an attached data set can hold many folders).
SEARCH_DEPTH = 6
NOT_COPIED = ("export/merged",)


def is_inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def is_run(folder: Path) -> bool:
    """A run directory this tool made: its marker, or (made before the marker existed) its config.json and layout."""
    try:
        return is_marked(folder) or ((folder / CONFIG_FILE).is_file() and legacy_problem(folder) is None)
    except OSError:
        return False


def attached_runs(root: Path | None = None) -> list[Path]:
    """Run directories under /kaggle/input (a run directory this tool made, inside a folder named runs), the
    newest first: run names begin with the time they were made."""
    root = root or kaggle_input()
    found = []
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if here.parent.name == "runs" and here.name != "latest" and is_run(here):
                found.append(here)
                dirnames.clear()
            elif len(here.relative_to(root).parts) >= SEARCH_DEPTH:
                dirnames.clear()
            else:
                dirnames.sort()
    return sorted(found, key=lambda p: p.name, reverse=True)


def _skip(source: Path):
    def ignore(folder: str, names: list[str]) -> set[str]:
        rel = Path(folder).relative_to(source)
        return {n for n in names if (rel / n).as_posix() in NOT_COPIED or n.startswith(".")}
    return ignore


def copy_run(source: Path, runs: Path | None = None) -> Path:
    """A writable copy of the read-only run directory ``source`` in runs/ (under /kaggle/working on Kaggle),
    under the same name; an existing copy (made earlier in this session) is used as it is."""
    runs = runs or runs_root()
    target = runs / source.name
    if is_run(target):
        return target  # copied earlier in this session
    check_run_dir(target)  # something else of that name is refused, never written over
    tmp = runs / f".{source.name}.copy-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        runs.mkdir(parents=True, exist_ok=True)
        # Contents only: permission bits copied from a read-only mount would make the copy read-only too.
        shutil.copytree(source, tmp, ignore=_skip(source), copy_function=shutil.copyfile, symlinks=False)
        for dirpath, _, filenames in os.walk(tmp):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot copy the earlier run {source} to {target} ({exc.strerror or exc}); "
                        "/kaggle/working holds at most 20 GB") from None
    print(f"[qlora] continuing the run {source.name} of an earlier session: copied from {source} (read-only) "
          f"to {target}, without {', '.join(NOT_COPIED)}", flush=True)
    return target


def writable_run_dir(path: Path) -> Path:
    """RUN_DIR as a stage can use it: a run directory under /kaggle/input is copied to runs/ first."""
    if is_inside(path, kaggle_input()):
        if not is_run(path):
            raise UserError(f"RUN_DIR {path}: no {MARKER} (or, from an older version, {CONFIG_FILE}) there, so it is no "
                            "run directory; on Kaggle an earlier run is at /kaggle/input/.../runs/<time> once its "
                            "kernel's output is attached")
        return copy_run(path)
    return path


def continue_attached_run() -> Path | None:
    """On Kaggle, when no run exists in /kaggle/working yet: the newest run attached under /kaggle/input (an
    earlier version's output), copied to /kaggle/working/runs. None when nothing is attached."""
    if not on_kaggle():
        return None
    found = attached_runs()
    if not found:
        return None
    if len(found) > 1:
        print(f"[qlora] {len(found)} earlier runs are attached; continuing the newest, {found[0].name} "
              f"(set RUN_DIR to choose another: {', '.join(str(p) for p in found[1:])})", flush=True)
    return copy_run(found[0])
