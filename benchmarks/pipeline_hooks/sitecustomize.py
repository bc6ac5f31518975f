"""The GPU memory cap of benchmarks/gpu_pipeline.py's T4 part, in every Python process it starts.

benchmarks/gpu_pipeline.py puts this folder first on PYTHONPATH of the processes it measures, so Python imports this
file at start-up (site's ``sitecustomize`` hook) in each of them: papermill, the notebook kernel, and whatever those
start (a data-parallel launch's processes too). With QLORA_BENCH_GPU_CAP_GIB set, it caps the CUDA caching allocator
of each process at that many GiB on every GPU, the mechanism benchmarks/gpu_bench.py and ddp_bench.py use
(``torch.cuda.set_per_process_memory_fraction(cap * 2**30 / total_memory, device)``), applied when the process
initialises CUDA: the call is queued with ``torch.cuda._lazy_call``, which torch runs inside its lazy CUDA
initialisation, as it does its own deferred calls. Nothing imports torch here: a finder on ``sys.meta_path`` waits for
the process's own ``import torch`` and queues the cap then. Each process that applies the cap appends one JSON line
(pid, argv, fraction per GPU, or the error) to QLORA_BENCH_CAP_LOG, so the driver can show the cap reached every
process that used CUDA. A sitecustomize this one hides (later on sys.path) still runs, after it.
"""
import json
import os
import sys
import time

CAP_ENV = "QLORA_BENCH_GPU_CAP_GIB"
LOG_ENV = "QLORA_BENCH_CAP_LOG"


def fraction(cap_gib: float, total_bytes: int) -> float:
    """The allocator fraction that allows ``cap_gib`` GiB of a GPU of ``total_bytes``."""
    return min(1.0, cap_gib * 2**30 / total_bytes)


def apply_cap(cap_gib: float) -> None:
    """Cap every visible GPU (run by torch inside its CUDA initialisation); never raises: a failure is logged."""
    import torch

    record = {"pid": os.getpid(), "argv": sys.argv[:4], "cap_gib": cap_gib, "time": time.time(), "devices": []}
    try:
        for index in range(torch.cuda.device_count()):
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(fraction(cap_gib, total), index)
            record["devices"].append({"index": index, "total_gib": round(total / 2**30, 2),
                                      "fraction": round(fraction(cap_gib, total), 6)})
    except Exception as exc:  # noqa: BLE001 - a deferred call that raises would break CUDA for the whole process
        record["error"] = f"{type(exc).__name__}: {exc}"
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _cap_gib() -> float:
    try:
        return float(os.environ.get(CAP_ENV) or 0)
    except ValueError:
        return 0.0


class _AfterTorchImport:
    """A meta path finder that lets the real finders find torch, then queues the cap once torch has loaded. It stays
    on sys.meta_path until torch is executed: a look-up alone (importlib.util.find_spec("torch"), as availability
    checks make before any import) must not use it up, which the first version did (the H200 run of 2026-12-03 ran
    its kernel uncapped until pipeline_hooks/cell_stats.py applied the cap)."""

    busy = False

    def find_spec(self, name, path=None, target=None):
        if name != "torch" or self.busy:
            return None
        self.busy = True
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self:
                    continue
                spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
                if spec is not None:
                    break
        finally:
            self.busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module
        finder = self

        def exec_then_queue(module):
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            exec_module(module)
            cap = _cap_gib()
            module.cuda._lazy_call(lambda: apply_cap(cap))

        spec.loader.exec_module = exec_then_queue
        return spec


def _chain() -> None:
    """Run the sitecustomize module this file hides, if any (the first other one on sys.path)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        candidate = os.path.join(entry or os.getcwd(), "sitecustomize.py")
        if os.path.abspath(entry or os.getcwd()) != here and os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as f:
                exec(compile(f.read(), candidate, "exec"), {"__name__": "sitecustomize", "__file__": candidate})
            return


if _cap_gib() > 0 and "torch" not in sys.modules:
    sys.meta_path.insert(0, _AfterTorchImport())
_chain()
