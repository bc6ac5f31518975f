"""Run the numbered notebooks in order with papermill, one fresh kernel each, into one run directory."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from .budget import begin_session
from .config import Config, UserError, build_config
from .runs import REPO_ROOT, default_run_dir, link_latest
from .sources import absolute_path, resolve_paths

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


class StageFailed(RuntimeError):
    pass


def notebooks(directory: Path = NOTEBOOK_DIR) -> list[Path]:
    """Every numbered notebook, found by glob so a new stage needs no list kept by hand."""
    return sorted(Path(directory).glob("[0-9][0-9]_*.ipynb"))


def resolve_run_request(profile: str, overrides: dict[str, Any], run_dir: str | Path | None,
                        base: str | Path | None = None) -> tuple[Config, str, dict[str, Any], Path]:
    """What a command line asked for, with every relative path made absolute against ``base`` (the directory
    the command was typed in), as the notebooks will see it: (config, profile, overrides, run directory)."""
    profile = absolute_path(profile, base) if profile.endswith((".yaml", ".yml")) else profile
    cfg = build_config(profile, overrides)  # fail here, in a second, not inside a notebook
    resolved = resolve_paths(cfg, base)
    overrides = dict(overrides)
    for key in ("data.source", "model.name"):
        if resolved.flat()[key] != cfg.flat()[key]:
            overrides[key] = resolved.flat()[key]
    run = Path(base or ".").joinpath(Path(run_dir).expanduser()).resolve() if run_dir else default_run_dir()
    return resolved, profile, overrides, run


def run_pipeline(cfg: Config, overrides: dict[str, Any], run_dir: str | Path, kernel: str = "python3",
                 notebook_dir: str | Path | None = None) -> Path:
    """Execute each notebook; stop at the first failure, naming the notebook, cell and error.
    ``notebook_dir``: where the notebooks are when not in this checkout (a Kaggle dataset)."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    run_dir = Path(run_dir).resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run directory {run_dir}: exists and is not a folder")
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    link_latest(run_dir)
    begin_session(run_dir)  # this process owns the session: the budget counts from now for every notebook
    params = {"PROFILE": cfg.profile, "OVERRIDES": dict(overrides), "RUN_DIR": str(run_dir)}
    notebook_dir = Path(notebook_dir or NOTEBOOK_DIR)
    for nb in notebooks(notebook_dir):
        out = run_dir / "notebooks" / nb.name
        print(f"[qlora] {nb.name} ...", flush=True)
        t0 = time.time()
        try:
            pm.execute_notebook(str(nb), str(out), parameters=params, kernel_name=kernel, cwd=str(notebook_dir),
                                progress_bar=False, log_output=True, stdout_file=sys.stdout, stderr_file=sys.stderr)
        except PapermillExecutionError as exc:
            first = (exc.evalue or "").strip().splitlines()
            raise StageFailed(f"{nb.name} failed in cell {exc.exec_count}: {exc.ename}: "
                              f"{first[0] if first else ''} (executed notebook: {out})") from None
        print(f"[qlora] {nb.name} done in {time.time() - t0:.0f}s", flush=True)
    return run_dir
