"""Run the numbered notebooks in order with papermill, one fresh kernel each, into one run directory."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from .budget import begin_session
from .config import Config, UserError, build_config, shorten
from .datasource import local_files
from .places import BATCH_ENV
from .runlock import pipeline_lock
from .runs import REPO_ROOT, claim_run_dir, default_run_dir, ensure_dir, failed_write, link_latest, write_text
from .sources import absolute_path, check_sources, resolve_paths
from .stage import check_directory

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


class StageFailed(UserError):
    """A notebook failed: which one, in which cell, with which error (its executed notebook is kept)."""


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
    check_sources(resolved)  # the hub cannot be reached and is needed: say so before a run directory is made
    local_files(resolved)  # data.source's files exist, have a known type and are regular files (never a FIFO)
    overrides = dict(overrides)
    for key in ("data.source", "model.name"):
        if resolved.flat()[key] != cfg.flat()[key]:
            overrides[key] = resolved.flat()[key]
    run = Path(base or ".").joinpath(Path(run_dir).expanduser()).resolve() if run_dir else default_run_dir()
    return resolved, profile, overrides, run


def run_pipeline(cfg: Config, overrides: dict[str, Any], run_dir: str | Path, kernel: str = "python3",
                 notebook_dir: str | Path | None = None) -> Path:
    """Execute each notebook; stop at the first failure, naming the notebook, cell and error.
    ``notebook_dir``: where the notebooks are when not in this checkout (a Kaggle dataset).

    Before any notebook runs, the run directory is checked (a folder this tool may write into, the same settings
    as before, no fewer steps than trained) and locked for the whole run: a refused run changes nothing on disk."""
    run_dir = Path(run_dir).resolve()
    check_directory(cfg, run_dir)
    claim_run_dir(run_dir)  # the marker first, then the lock
    with pipeline_lock(run_dir):
        check_directory(cfg, run_dir)  # again, now that no other run can change it
        ensure_dir(run_dir / "notebooks")
        link_latest(run_dir)
        begin_session(run_dir)  # this process owns the session: the time budget counts from now for every notebook
        params = {"PROFILE": cfg.profile, "OVERRIDES": dict(overrides), "RUN_DIR": str(run_dir)}
        os.environ[BATCH_ENV] = "1"  # nobody types into these kernels: the playground shows a table, not a widget
        notebook_dir = Path(notebook_dir or NOTEBOOK_DIR)
        for nb in notebooks(notebook_dir):
            print(f"[qlora] {nb.name} ...", flush=True)
            t0 = time.time()
            execute(nb, run_dir / "notebooks" / nb.name, params, kernel, notebook_dir)
            print(f"[qlora] {nb.name} done in {time.time() - t0:.0f}s", flush=True)
    return run_dir


def notebook_path(name: str) -> Path:
    """A stage notebook by file name: in this checkout's notebooks/, or in the copy an installed package carries
    (the Kaggle dataset's wheel), which is where the processes of a data-parallel launch find notebook 03."""
    for folder in (NOTEBOOK_DIR, Path(__file__).resolve().parent / "notebooks"):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"notebook {name} not found in {NOTEBOOK_DIR} nor in the installed package")


def execute(nb: Path, out: Path, params: dict[str, Any], kernel: str, cwd: Path, log_output: bool = True) -> None:
    """One notebook through papermill. papermill writes the executed notebook as it goes, in place; here it
    writes into notebooks/.running/ and the result is moved over the previous one when the notebook ends (also
    when it fails, with its error cell), so a kill or a full disk never leaves a notebook cut short. The kernel's
    own output goes to notebooks/NAME.kernel.log (qlora_helpers/kernels.py says why)."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    from .kernels import ENGINE, Stop

    running = ensure_dir(out.parent / ".running") / out.name
    kernel_log = out.with_suffix(".kernel.log")
    with open(kernel_log, "a", encoding="utf-8") as log:
        log.write(f"=== {nb.name}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    stop = Stop()
    try:
        interruptible(lambda: pm.execute_notebook(
            str(nb), str(running), parameters=params, kernel_name=kernel, cwd=str(cwd), progress_bar=False,
            log_output=log_output, engine_name=ENGINE, stop=stop, kernel_log=kernel_log, stdout_file=sys.stdout,
            stderr_file=sys.stderr), stop)
    except PapermillExecutionError as exc:
        keep_executed(running, out)
        first = (exc.evalue or "").strip().splitlines()
        raise StageFailed(f"{nb.name} failed in cell {exc.exec_count}: {exc.ename}: "
                          f"{shorten(first[0], 1000) if first else ''} (executed notebook: {out})") from None
    except RuntimeError as exc:  # nbclient's DeadKernelError, jupyter_client's "Kernel died before replying"
        if "died" not in str(exc):
            raise
        keep_executed(running, out)
        raise StageFailed(f"{nb.name}: its kernel died ({str(exc).strip()}; killed for lack of memory?); the "
                          f"kernel's own output: {kernel_log}") from None
    except OSError as exc:  # papermill could not write the notebook (a full disk): the previous one is kept
        if not failed_write(exc):
            raise
        raise StageFailed(f"{nb.name}: the executed notebook cannot be written ({exc.strerror or exc}); free some "
                          "space and run the same command again (training resumes from its last checkpoint)") from None
    keep_executed(running, out)


# How long a stopped notebook may take to end (the interrupted cell's cleanup, the kernel's shutdown) before its
# kernel is killed.
STOP_GRACE_S = 30


def interruptible(work, stop) -> None:
    """Run papermill where Ctrl-C can stop it. In the main thread, nbclient takes SIGINT for itself and, between
    cells, swallows it: the run went on as if nothing had been pressed. In a worker thread it cannot, so Ctrl-C
    reaches this thread, which tells ``stop`` (a running cell stops with KeyboardInterrupt, no further cell or kernel
    starts, nbclient shuts the kernel down), waits for the notebook to end (killing its kernel if it lingers, or at
    a second Ctrl-C), and raises KeyboardInterrupt for the command line to say how to resume."""
    import threading

    done, outcome = threading.Event(), {}

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed over to the main thread as it is
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name="papermill").start()
    try:
        while not done.wait(0.2):  # not Thread.join: an interrupted join can report a live thread as ended
            pass
    except KeyboardInterrupt:
        stop.stop()
        try:
            if not done.wait(STOP_GRACE_S):
                stop.kill()
                done.wait(STOP_GRACE_S)
        except KeyboardInterrupt:  # pressed again: no more waiting
            stop.kill()
        raise
    if "error" in outcome:
        raise outcome["error"]


def keep_executed(running: Path, out: Path) -> None:
    """Move a notebook papermill finished writing into place (its recorded output path corrected)."""
    import nbformat

    try:
        nb = nbformat.read(running, as_version=4)
    except Exception:  # cut short: keep the previous executed notebook
        return
    nb.metadata.get("papermill", {})["output_path"] = str(out)
    write_text(out, nbformat.writes(nb))
    running.unlink(missing_ok=True)
