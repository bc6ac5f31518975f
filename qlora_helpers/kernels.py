"""The kernel each notebook of the pipeline runs in (papermill -> nbclient -> jupyter_client), set up for a terminal.

* Local sockets: the kernel talks to the pipeline over Unix sockets in a private folder (zmq's ipc transport), not over
  TCP on localhost, which any local user can reach and which ipykernel warns about on every start.
* The kernel process's own output goes to a log file. What a notebook prints reaches the terminal through papermill,
  from the notebook's outputs; the kernel's raw stdout and stderr carry ipykernel's own messages (jupyter_client
  interrupts every kernel it shuts down, and ipykernel logs that), a second copy of what C extensions print, and, when a
  kernel dies, its last words. nbclient's messages about the kernel ("Kernel died ...") go to the same file, and the
  pipeline's one-line error names it.
* Ctrl-C stops a notebook at any moment without a word from its kernel: see :class:`Stop`.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from nbclient.util import run_sync
from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine, papermill_engines

ENGINE = "qlora"


class Stopped(Exception):
    """Raised in the thread that runs papermill once Ctrl-C was pressed: no kernel starts, no cell is sent."""


class Stop:
    """Ctrl-C, handed from the main thread to the thread that runs papermill.

    A kernel takes SIGINT as "stop this cell" only while it runs one: before ipykernel has set itself up (the first
    second or two after launch) SIGINT kills it with a traceback, and while it is idle or shutting down ipykernel
    ignores it. So the kernel is signalled only from the moment it has announced the cell's code (``execute_input``,
    which ipykernel sends from inside the handler that turns SIGINT into KeyboardInterrupt in the cell) until the
    cell's reply. At any other moment nothing is signalled: once stopped, no kernel is launched, no cell is sent, and
    a cell's reply ends the notebook; nbclient then shuts the kernel down as usual. One lock makes each of these steps
    atomic with ``stop()``, so no moment falls between them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stopped = False
        self._cell_kernel: int | None = None  # the pid of the kernel running a cell now
        self._kernels: list[int] = []  # the process groups of the kernels launched

    def stop(self) -> None:
        """Main thread, on Ctrl-C."""
        with self._lock:
            self.stopped = True
            if self._cell_kernel:
                _signal(self._cell_kernel, signal.SIGINT)

    def kill(self) -> None:
        """Main thread, when a stopped notebook does not end (a cell that ignores KeyboardInterrupt, Ctrl-C again)."""
        with self._lock:
            for group in self._kernels:
                _signal(group, signal.SIGKILL, group=True)

    def check(self) -> None:
        """Before a kernel is launched and before each cell is sent."""
        with self._lock:
            if self.stopped:
                raise Stopped("interrupted")

    def launched(self, group: int) -> None:
        with self._lock:
            self._kernels.append(group)

    def cell_running(self, pid: int) -> None:
        """The kernel announced the cell's code: from now until the reply, SIGINT interrupts the cell."""
        with self._lock:
            self._cell_kernel = pid
            if self.stopped:
                _signal(pid, signal.SIGINT)

    def cell_ended(self) -> None:
        with self._lock:
            self._cell_kernel = None
            if self.stopped:
                raise Stopped("interrupted")


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except OSError:  # already gone
        pass


class LocalKernel:
    """Mixin for an nbclient NotebookClient: its kernel talks over Unix sockets in a private folder (zmq's ipc
    transport) instead of TCP on localhost. The folder is short (a socket path holds at most 107 bytes) and is removed
    when the notebook ends."""

    _socket_dir: str | None = None

    def create_kernel_manager(self):
        if os.name != "posix":
            return super().create_kernel_manager()
        self._socket_dir = tempfile.mkdtemp(prefix="qlora-kernel-")
        named = {"kernel_name": self.kernel_name} if self.kernel_name else {}
        self.km = self.kernel_manager_class(config=self.config, transport="ipc",
                                            ip=os.path.join(self._socket_dir, "kernel"), **named)
        return self.km

    def execute(self, **kwargs):
        try:
            return super().execute(**kwargs)
        finally:
            if self._socket_dir:
                shutil.rmtree(self._socket_dir, ignore_errors=True)


class PipelineClient(LocalKernel, PapermillNotebookClient):
    """papermill's client with a local kernel whose own output goes to ``kernel_log``, stopped by ``stop``."""

    def __init__(self, nb_man, stop: Stop, kernel_log: Path, **kw) -> None:
        super().__init__(nb_man, on_cell_execute=lambda **_: stop.check(), on_cell_executed=lambda **_: stop.cell_ended(),
                         **kw)
        self.stop, self.kernel_log = stop, kernel_log

    async def async_start_new_kernel(self, **kwargs) -> None:
        self.stop.check()
        with open(self.kernel_log, "ab") as log:  # the kernel keeps its own copy of the descriptor
            await super().async_start_new_kernel(stdout=log, stderr=log, **kwargs)
        provisioner = self.km.provisioner
        self.stop.launched(provisioner.pgid or provisioner.pid)

    # nbclient binds the synchronous name to its own coroutine when the class is made: bind it to this one
    start_new_kernel = run_sync(async_start_new_kernel)

    def process_message(self, msg, cell, cell_index):
        if msg.get("msg_type") == "execute_input":
            self.stop.cell_running(self.km.provisioner.pid)
        return super().process_message(msg, cell, cell_index)

    def log_output_message(self, output):
        """What a cell prints reaches the terminal until Ctrl-C; after it, only the executed notebook keeps it. An
        interrupted cell can print a traceback of its own: IPython's, when the KeyboardInterrupt lands where its
        traceback formatter fails (seen in an import: "assert isinstance(frame_info.lineno, int)")."""
        if not self.stop.stopped:
            super().log_output_message(output)


class PipelineEngine(NBClientEngine):
    """papermill's nbclient engine with :class:`PipelineClient` (``engine_name="qlora"``)."""

    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, stop: Stop, kernel_log: Path, log_output=False,
                                 stdout_file=None, stderr_file=None, start_timeout=60, execution_timeout=None,
                                 **kwargs):
        kwargs.pop("input_path", None)
        with _client_log(kernel_log) as log:
            return PipelineClient(nb_man, stop, kernel_log, kernel_name=kernel_name, log=log, log_output=log_output,
                                  stdout_file=stdout_file, stderr_file=stderr_file, startup_timeout=start_timeout,
                                  timeout=execution_timeout, **kwargs).execute()


class _client_log:
    """nbclient's own messages about the kernel, into the kernel's log file (one notebook runs at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> logging.Logger:
        self.logger = logging.getLogger("qlora_helpers.kernel")
        self.logger.propagate = False
        self.logger.setLevel(logging.WARNING)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("[nbclient] %(levelname)s | %(message)s"))
        self.logger.addHandler(self.handler)
        return self.logger

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()


papermill_engines.register(ENGINE, PipelineEngine)
