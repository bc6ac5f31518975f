"""What each notebook cell cost, measured inside the kernel: an IPython startup file that benchmarks/gpu_pipeline.py
copies into the IPYTHONDIR it gives the kernels it measures (profile_default/startup/). Stdlib only, and torch is
read only if the notebook imported it: nothing here changes what the cells do or what the project records.

One JSON line per executed cell into QLORA_BENCH_CELL_LOG: the cell's sha1 (the driver finds the notebook cell by its
source), wall time, and for the cell alone
* peak GPU memory reserved and allocated by PyTorch's caching allocator on this process's GPU: the process's own peak
  (torch.cuda.max_memory_reserved/allocated, never reset here: the project's metrics files read it) where the cell
  raised it, which is exact; otherwise the highest value a sampler thread saw every SAMPLE_S during the cell;
* peak resident memory: VmHWM from /proc/self/status where the cell raised it (exact), otherwise sampled VmRSS;
* bytes written: /proc/self/io write_bytes (what reached the page cache for a disk) and wchar (every write call);
* the allocator's memory fraction in force (torch.cuda.get_per_process_memory_fraction): the cap, seen from inside.

The cap (QLORA_BENCH_GPU_CAP_GIB) is also applied from here: on the H200 on 2026-12-03 the kernel ran with no cap
and no line in QLORA_BENCH_CAP_LOG although sitecustomize.py's hook is on its PYTHONPATH, so before each cell, once
the notebook has imported torch, this queues the same call (or, where CUDA is already initialised uncapped, makes it
at once) unless it is queued or in force already. What it found is one line in QLORA_BENCH_CAP_LOG + ".probe".
"""


def _install_cell_stats():
    import hashlib
    import json
    import os
    import sys
    import threading
    import time

    path = os.environ.get("QLORA_BENCH_CELL_LOG")
    ip = get_ipython()  # noqa: F821 - defined in an IPython startup file
    if not path or ip is None:
        return
    sample_s = 0.05
    gib = 2**30
    device = int(os.environ.get("LOCAL_RANK") or 0)

    def status(field):
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def io():
        try:
            with open("/proc/self/io") as f:
                return {k: int(v) for k, v in (line.split(":") for line in f)}
        except (OSError, ValueError):
            return {}

    def cuda():
        torch = sys.modules.get("torch")
        try:
            if torch is None or not torch.cuda.is_initialized():
                return None
            found = {"reserved": torch.cuda.memory_reserved(device), "allocated": torch.cuda.memory_allocated(device),
                     "max_reserved": torch.cuda.max_memory_reserved(device),
                     "max_allocated": torch.cuda.max_memory_allocated(device)}
        except Exception:  # noqa: BLE001 - a measurement must never break a cell
            return None
        try:
            found["fraction"] = torch.cuda.get_per_process_memory_fraction(device)
        except Exception:  # noqa: BLE001 - older torch
            found["fraction"] = None
        return found

    state = {"cell": None, "cap_done": False}
    lock = threading.Lock()
    try:
        cap_gib = float(os.environ.get("QLORA_BENCH_GPU_CAP_GIB") or 0)
    except ValueError:
        cap_gib = 0.0
    cap_log = os.environ.get("QLORA_BENCH_CAP_LOG")

    def log_line(target, record):
        if target:
            with open(target, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def apply_cap(how):
        torch = sys.modules["torch"]
        record = {"pid": os.getpid(), "argv": sys.argv[:4], "cap_gib": cap_gib, "time": time.time(), "devices": [],
                  "via": "ipython-startup: " + how}
        try:
            for index in range(torch.cuda.device_count()):
                total = torch.cuda.get_device_properties(index).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * gib / total), index)
                record["devices"].append({"index": index, "total_gib": round(total / gib, 2),
                                          "fraction": round(min(1.0, cap_gib * gib / total), 6),
                                          "reserved_gib_then": round(torch.cuda.memory_reserved(index) / gib, 3)})
        except Exception as exc:  # noqa: BLE001 - never break the kernel
            record["error"] = f"{type(exc).__name__}: {exc}"
        log_line(cap_log, record)

    def ensure_cap():
        """Before a cell: the cap queued or in force once torch is imported (see the module's docstring)."""
        torch = sys.modules.get("torch")
        if state["cap_done"] or cap_gib <= 0 or torch is None or not hasattr(torch, "cuda"):
            return
        state["cap_done"] = True
        sc = sys.modules.get("sitecustomize")
        probe = {"pid": os.getpid(), "sitecustomize": getattr(sc, "__file__", None),
                 "pythonpath": os.environ.get("PYTHONPATH"), "sys_path_head": sys.path[:4],
                 "finder_waiting": any(type(f).__name__ == "_AfterTorchImport" for f in sys.meta_path)}
        try:
            if torch.cuda.is_initialized():
                fraction = torch.cuda.get_per_process_memory_fraction(device)
                probe.update(cuda_initialized=True, fraction=fraction)
                if fraction >= 0.999:
                    apply_cap("CUDA already initialised without the cap; applied at once")
                    probe["action"] = "applied at once"
            else:
                queued = [getattr(c[0], "__qualname__", "") for c in getattr(torch.cuda, "_queued_calls", [])]
                probe.update(cuda_initialized=False, queued=queued)
                if not any("_AfterTorchImport" in q or "apply_cap" in q for q in queued):
                    torch.cuda._lazy_call(lambda: apply_cap("queued before CUDA initialisation"))
                    probe["action"] = "queued"
        except Exception as exc:  # noqa: BLE001
            probe["error"] = f"{type(exc).__name__}: {exc}"
        log_line(cap_log + ".probe" if cap_log else None, probe)

    def sampler():
        while True:
            time.sleep(sample_s)
            cell = state["cell"]
            if cell is None:
                continue
            rss, gpu = status("VmRSS"), cuda()
            with lock:
                if rss:
                    cell["rss_max"] = max(cell["rss_max"], rss)
                if gpu:
                    cell["reserved_max"] = max(cell["reserved_max"], gpu["reserved"])
                    cell["allocated_max"] = max(cell["allocated_max"], gpu["allocated"])

    def pre(info):
        ensure_cap()
        gpu = cuda() or {}
        state["cell"] = {"t0": time.time(), "hwm0": status("VmHWM") or 0, "io0": io(), "gpu0": gpu,
                         "rss_max": status("VmRSS") or 0, "reserved_max": gpu.get("reserved", 0),
                         "allocated_max": gpu.get("allocated", 0)}

    def post(result):
        cell = state["cell"]
        if cell is None:
            return
        t1, hwm1, io1, gpu1 = time.time(), status("VmHWM") or 0, io(), cuda() or {}
        with lock:
            state["cell"] = None
        gpu0 = cell["gpu0"]
        rec = {"pid": os.getpid(), "count": result.execution_count,
               "sha1": hashlib.sha1(result.info.raw_cell.encode()).hexdigest(),
               "first_line": result.info.raw_cell.strip().split("\n", 1)[0][:100],
               "t0": round(cell["t0"], 3), "t1": round(t1, 3), "wall_s": round(t1 - cell["t0"], 3),
               "ok": result.error_in_exec is None and result.error_before_exec is None,
               "error": type(result.error_in_exec or result.error_before_exec).__name__
               if not (result.error_in_exec is None and result.error_before_exec is None) else None}
        if hwm1 > cell["hwm0"]:
            rec.update(rss_peak_gib=round(hwm1 / gib, 3), rss_peak_exact=True)
        else:
            rec.update(rss_peak_gib=round(max(cell["rss_max"], status("VmRSS") or 0) / gib, 3), rss_peak_exact=False)
        if gpu1:
            for kind in ("reserved", "allocated"):
                before, after = gpu0.get("max_" + kind, 0), gpu1["max_" + kind]
                if after > before:
                    rec[f"gpu_{kind}_peak_gib"], rec[f"gpu_{kind}_exact"] = round(after / gib, 3), True
                else:
                    rec[f"gpu_{kind}_peak_gib"] = round(max(cell[kind + "_max"], gpu1[kind]) / gib, 3)
                    rec[f"gpu_{kind}_exact"] = False
            rec["gpu_reserved_end_gib"] = round(gpu1["reserved"] / gib, 3)
            if gpu1["fraction"] is not None:
                rec["gpu_memory_fraction"] = round(gpu1["fraction"], 6)  # the cap in force (1.0: none)
        for key in ("write_bytes", "wchar"):
            if key in io1 and key in cell["io0"]:
                rec[key] = io1[key] - cell["io0"][key]
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    threading.Thread(target=sampler, daemon=True, name="cell-stats").start()
    ip.events.register("pre_run_cell", pre)
    ip.events.register("post_run_cell", post)


_install_cell_stats()
del _install_cell_stats
