"""Run the numbered notebooks in order with papermill, one fresh kernel each, into one run directory."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .config import Config
from .runs import REPO_ROOT, _link_latest

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


class StageFailed(RuntimeError):
    pass


def notebooks(directory: Path = NOTEBOOK_DIR) -> list[Path]:
    """Every numbered notebook, found by glob so a new stage needs no list kept by hand."""
    return sorted(Path(directory).glob("[0-9][0-9]_*.ipynb"))


def run_pipeline(cfg: Config, overrides: dict[str, str], run_dir: str | Path, kernel: str = "python3",
                 notebook_dir: str | Path | None = None) -> Path:
    """Execute each notebook; stop at the first failure, naming the notebook, cell and error.
    ``notebook_dir``: where the notebooks are when not in this checkout (a Kaggle dataset)."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    _link_latest(run_dir)
    (run_dir / "notebooks").mkdir(exist_ok=True)
    # Explicit parameters win over the variables the test suite sets for nbmake.
    for var in ("QLORA_PROFILE", "QLORA_RUN_DIR"):
        os.environ.pop(var, None)
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
