"""One run at a time in a run directory: an advisory lock on ``RUN_DIR/.lock`` (``fcntl.flock``).

* ``python -m qlora_helpers run`` holds the lock from before its first notebook until its last one ends, and tells
  the notebook kernels it starts (``QLORA_RUN_LOCK`` in their environment) that their stage is covered by it.
* A notebook run by hand takes the lock only while it writes: ``start_stage`` (config.json), stage 1's data
  files, the whole of training, evaluation's files, the merged model and the export's metrics, the report. So notebook 01's kernel may stay open while notebook 02 runs, but a second
  pipeline, or a second training, on the same run directory is refused in one line that names the holder.
* The holder (pid, host, since when, what) is written into the lock file. The kernel drops a flock when its
  process ends, however it ends, so a killed run never leaves a lock behind: a stale ``.lock`` file is ignored.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from .config import UserError
from .runs import claim_run_dir

LOCK_FILE = ".lock"
ENV = "QLORA_RUN_LOCK"  # "<pid>:<run dir>": the process that holds this run directory's lock for its children

_held: dict[Path, list] = {}  # run dir -> [open lock file, how many times this process took it]


class RunDirBusy(UserError):
    """Another process is using this run directory."""


def _key(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve()


def holder(run_dir: str | Path) -> dict[str, Any] | None:
    """What the lock file says about the process holding it (None when empty or unreadable)."""
    try:
        record = json.loads((_key(run_dir) / LOCK_FILE).read_text(encoding="utf-8") or "null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe_holder(record: dict[str, Any] | None) -> str:
    if not record:
        return "another process (it has not written its name yet)"
    return (f"pid {record.get('pid')} on host {record.get('host')} since {record.get('since')} "
            f"({record.get('what', 'a run')})")


def _busy(run_dir: Path) -> RunDirBusy:
    return RunDirBusy(f"run directory {run_dir} is in use by {describe_holder(holder(run_dir))}; wait for it to "
                      "finish (or stop it), or use another RUN_DIR / --run-dir")


def _open(run_dir: Path):
    claim_run_dir(run_dir)  # a folder that is not a run's own is refused; the marker is written before the lock file
    try:
        return open(run_dir / LOCK_FILE, "a+", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"run directory {run_dir}: cannot be written ({exc.strerror or exc})") from None


def acquire(run_dir: str | Path, what: str) -> None:
    """Take the run directory's lock for this process, or raise RunDirBusy naming the holder. Re-entrant: a
    process that holds it already just counts one more use."""
    run_dir = _key(run_dir)
    if run_dir in _held:
        _held[run_dir][1] += 1
        return
    f = _open(run_dir)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        f.close()
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _busy(run_dir) from None
        # A filesystem without locks (some network mounts): run unlocked rather than not at all.
        print(f"[qlora] warning: cannot lock {run_dir / LOCK_FILE} ({exc.strerror}); two runs on this run "
              "directory at once would not be detected", file=sys.stderr)
        return
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.now().astimezone().isoformat(timespec="seconds"), "what": what}
    f.seek(0)
    f.truncate()
    f.write(json.dumps(record) + "\n")
    f.flush()
    _held[run_dir] = [f, 1]


def release(run_dir: str | Path) -> None:
    """Give back one use of the lock; the last one unlocks (the record is cleared first, so nobody reads it stale)."""
    run_dir = _key(run_dir)
    entry = _held.get(run_dir)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    f = _held.pop(run_dir)[0]
    try:
        f.truncate(0)
        f.flush()
    except OSError:
        pass
    f.close()  # closing the file drops the flock


def covered_by_parent(run_dir: str | Path) -> bool:
    """True when the process that started this one (the pipeline) holds this run directory's lock for it.

    Raises RunDirBusy when someone else holds it. False when nobody does (a notebook run by hand, or a pipeline
    that has died): the caller then takes the lock itself while it writes."""
    run_dir = _key(run_dir)
    pid, _, path = os.environ.get(ENV, "").partition(":")
    if _other_rank():
        return True
    if run_dir in _held:
        return False
    f = _open(run_dir)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False  # no locks on this filesystem (acquire warns)
        record = holder(run_dir) or {}
        if path and _key(path) == run_dir and str(record.get("pid")) == pid:
            return True
        raise _busy(run_dir) from None
    finally:
        f.close()
    return False


def _other_rank() -> bool:
    """A process of a data-parallel launch other than its main one (accelerate and torchrun set RANK and WORLD_SIZE,
    and the notebook kernel each process starts inherits them). Under the main process every write of the run
    directory is made, and its lock held, for all of them: were each to lock it too, the processes would refuse
    each other (seen when two ranks started their notebook at once)."""
    return int(os.environ.get("WORLD_SIZE") or 1) > 1 and int(os.environ.get("RANK") or 0) > 0


_HOLDS: set = set()


def hold(run_dir: str | Path, what: str) -> None:
    """Take the lock for a long write a notebook cell cannot wrap in a ``with`` (training: taken when it begins,
    given back when its results are saved); once per process, however often the cell runs again. Under the
    pipeline, a no-op."""
    run_dir = _key(run_dir)
    if run_dir in _HOLDS or covered_by_parent(run_dir):
        return
    acquire(run_dir, what)
    _HOLDS.add(run_dir)


def let_go(run_dir: str | Path) -> None:
    run_dir = _key(run_dir)
    if run_dir in _HOLDS:
        _HOLDS.discard(run_dir)
        release(run_dir)


@contextmanager
def writing(run_dir: str | Path, what: str) -> Iterator[None]:
    """Hold the run directory's lock while a stage run by hand writes into it (a no-op under the pipeline,
    which holds it for the whole run)."""
    if covered_by_parent(run_dir):
        yield
        return
    acquire(run_dir, what)
    try:
        yield
    finally:
        release(run_dir)


@contextmanager
def pipeline_lock(run_dir: str | Path) -> Iterator[None]:
    """The pipeline's lock for the whole run, announced to the notebook kernels it starts."""
    with announced_lock(run_dir, "python -m qlora_helpers run"):
        yield


@contextmanager
def announced_lock(run_dir: str | Path, what: str) -> Iterator[None]:
    """Hold the lock and announce it to the processes started meanwhile (the pipeline's notebook kernels, the
    processes of a data-parallel launch), so their stages go ahead under it. Under a holder that covers this
    process already, a no-op: the announcement it made reaches the new processes too."""
    if covered_by_parent(run_dir):
        yield
        return
    run_dir = _key(run_dir)
    acquire(run_dir, what)
    before = os.environ.get(ENV)
    os.environ[ENV] = f"{os.getpid()}:{run_dir}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before
        release(run_dir)
