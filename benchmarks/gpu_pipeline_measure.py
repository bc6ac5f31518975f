"""How benchmarks/gpu_pipeline.py measures: per-cell records (pipeline_hooks/cell_stats.py) summed into stages, the
device memory nvidia-smi sees per process, a process and all it started killed at once, and what a run directory and
an executed notebook say. Pure functions where possible (tests/test_gpu_pipeline.py checks them)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

STAGE_CELL = re.compile(r"^[sc](\d\d)-")  # kernel notebook: s02-...; stage notebooks: c02-...


# --------------------------------------------------------------------------- cells into stages
def stage_of(cell_id: str) -> str:
    """The stage a cell belongs to: '01'..'05'; 'install' (the kernel's install cell); 'free-AA-BB' (the kernel's
    cell between two stages that frees what the first held); 'other' (parameters, the closing plots)."""
    match = STAGE_CELL.match(cell_id or "")
    if match:
        return match.group(1)
    if cell_id == "kaggle-install":
        return "install"
    if (cell_id or "").startswith("kaggle-free-"):
        return "free-" + cell_id[len("kaggle-free-"):]
    return "other"


def cells_by_sha(notebooks: list[Path]) -> dict[str, list[tuple[str, str]]]:
    """{sha1 of a code cell's source (what cell_stats.py hashes): [(stage, cell id), ...]} for the given notebooks.
    A stage notebook's cells belong to its number (its parameters cell to 'other'); the kernel notebook's by their
    ids (stage_of). One source can be several cells: each stage's start_stage cell reads the same."""
    out: dict[str, list[tuple[str, str]]] = {}
    for nb in notebooks:
        numbered = re.match(r"(\d\d)_", Path(nb).name)
        for i, cell in enumerate(json.loads(Path(nb).read_text())["cells"]):
            if cell["cell_type"] != "code":
                continue
            cell_id = cell.get("id") or f"{Path(nb).stem}-{i}"
            if "parameters" in cell.get("metadata", {}).get("tags", []):
                stage = "other"
            else:
                stage = numbered.group(1) if numbered else stage_of(cell_id)
            sha = hashlib.sha1("".join(cell["source"]).encode()).hexdigest()
            out.setdefault(sha, []).append((stage, cell_id))
    return out


def attribute(records: list[dict], ids: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """(stage, cell id) of each record. A source several cells share goes to the stage of the next record of the
    same process that has one stage only (cells run in order, and a stage starts with its start_stage cell), else
    of the last one before it; papermill's injected parameters cell, which no notebook holds, is 'other'."""
    def sole(rec):
        found = {c[0] for c in ids.get(rec["sha1"], [])}
        return next(iter(found)) if len(found) == 1 else None

    out = []
    for i, rec in enumerate(records):
        cands = ids.get(rec["sha1"])
        if not cands:
            injected = rec.get("first_line", "").startswith("# Parameters")
            out.append(("other", "injected-parameters" if injected else "unknown"))
            continue
        if len({c[0] for c in cands}) == 1:
            out.append(cands[0])
            continue
        same = [r for r in records if r["pid"] == rec["pid"]]
        at = same.index(rec)
        near = [sole(r) for r in same[at + 1:]] + [sole(r) for r in reversed(same[:at])]
        wanted = next((s for s in near if s in {c[0] for c in cands}), None)
        out.append(next((c for c in cands if c[0] == wanted), cands[0]))
    return out


def read_jsonl(path: Path) -> list[dict]:
    out = []
    for line in (Path(path).read_text().splitlines() if Path(path).is_file() else []):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def stages(records: list[dict], ids: dict[str, list[tuple[str, str]]], device: list[dict] | None = None) -> dict[str, dict]:
    """Per stage, from the per-cell records: wall time (sum of its cells), peak GPU memory reserved and allocated by
    PyTorch (the highest of its cells; 'exact' when that cell raised the process's own peak), peak RSS (likewise),
    bytes written, and the processes. ``device``: nvidia-smi samples [{"t", "pid", "mib"}], whose highest value for
    the stage's processes within its cells' time is what the GPU held for them, CUDA context included."""
    out: dict[str, dict] = {}
    for rec, (stage, cell) in zip(records, attribute(records, ids)):
        s = out.setdefault(stage, {"cells": 0, "wall_s": 0.0, "gpu_reserved_peak_gib": None,
                                            "gpu_reserved_exact": None, "gpu_allocated_peak_gib": None,
                                            "rss_peak_gib": 0.0, "rss_peak_exact": None, "write_bytes": 0,
                                            "wchar": 0, "pids": [], "windows": [], "failed": [], "peak_cell": None,
                                            "memory_fraction": None})
        s["cells"] += 1
        s["wall_s"] = round(s["wall_s"] + rec["wall_s"], 2)
        s["windows"].append([rec["t0"], rec["t1"]])
        if rec["pid"] not in s["pids"]:
            s["pids"].append(rec["pid"])
        if not rec.get("ok", True):
            s["failed"].append({"cell": cell, "error": rec.get("error")})
        reserved = rec.get("gpu_reserved_peak_gib")
        if reserved is not None and (s["gpu_reserved_peak_gib"] is None or reserved > s["gpu_reserved_peak_gib"]):
            s.update(gpu_reserved_peak_gib=reserved, gpu_reserved_exact=rec.get("gpu_reserved_exact"), peak_cell=cell)
        allocated = rec.get("gpu_allocated_peak_gib")
        if allocated is not None:
            s["gpu_allocated_peak_gib"] = max(s["gpu_allocated_peak_gib"] or 0.0, allocated)
        if rec.get("rss_peak_gib", 0) > s["rss_peak_gib"]:
            s.update(rss_peak_gib=rec["rss_peak_gib"], rss_peak_exact=rec.get("rss_peak_exact"))
        for key in ("write_bytes", "wchar"):
            s[key] += rec.get(key) or 0
        if rec.get("gpu_memory_fraction") is not None:  # the cap the stage's cells ran under (the lowest seen)
            s["memory_fraction"] = min(s["memory_fraction"] or 1.0, rec["gpu_memory_fraction"])
    for s in out.values():
        s["disk_written_gib"] = round(s.pop("write_bytes") / 2**30, 3)
        s["all_writes_gib"] = round(s.pop("wchar") / 2**30, 3)
        windows = s.pop("windows")
        mib = [d["mib"] for d in device or [] if d["pid"] in s["pids"]
               and any(t0 - 0.5 <= d["t"] <= t1 + 0.5 for t0, t1 in windows)]
        s["device_used_peak_gib"] = round(max(mib) / 1024, 3) if mib else None
    return out


# --------------------------------------------------------------------------- processes
def descendants(pid: int) -> list[int]:
    """Every process started by ``pid``, directly or not (Linux /proc), including those in sessions of their own
    (a Jupyter kernel, a data-parallel launch's workers), which killing a process group would miss."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to ``pid``, its process group and everything it started: as when a machine or session ends."""
    victims = descendants(pid)
    for p in [pid, *victims]:
        try:
            os.kill(p, sig)
        except OSError:
            pass
    try:
        os.killpg(pid, sig)
    except OSError:
        pass
    return [pid, *victims]


class DeviceSampler:
    """nvidia-smi's memory used per process, every ``ms`` milliseconds, in a thread (what the GPU holds for a
    process: PyTorch's reserved memory plus its CUDA context and libraries). No nvidia-smi: no samples."""

    def __init__(self, ms: int = 500):
        self.samples: list[dict] = []
        self.error = None
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                          "--format=csv,noheader,nounits", f"--loop-ms={ms}"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError as exc:
            self.proc, self.error = None, str(exc)
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                self.samples.append({"t": time.time(), "pid": int(parts[0]), "mib": int(parts[1])})

    def stop(self) -> list[dict]:
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.samples


# --------------------------------------------------------------------------- what a run left
def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return default


def notebook_errors(path: Path) -> list[dict]:
    """The error outputs of an executed notebook: cell id, exception name and first line of its message."""
    nb = read_json(path, {"cells": []})
    found = []
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            if out.get("output_type") == "error":
                found.append({"cell": cell.get("id"), "ename": out.get("ename"),
                              "evalue": (out.get("evalue") or "").strip().splitlines()[:1]})
    return found


def cell_text(path: Path, cell_id: str) -> str:
    """The stream output of one cell of an executed notebook (the kernel's install cell, say)."""
    nb = read_json(path, {"cells": []})
    for cell in nb.get("cells", []):
        if cell.get("id") == cell_id:
            texts = [o.get("text", "") for o in cell.get("outputs", [])]
            return "".join("".join(t) if isinstance(t, list) else t for t in texts)
    return ""


def run_summary(run_dir: Path) -> dict:
    """What a finished (or partly finished) run directory says: summary.json and the stages' metrics files."""
    run_dir = Path(run_dir)
    train = read_json(run_dir / "train" / "metrics.json", {})
    export = read_json(run_dir / "export" / "metrics.json", {})
    return {"summary": read_json(run_dir / "summary.json"),
            "preflight": read_json(run_dir / "model" / "preflight.json"),
            "train": {k: v for k, v in train.items() if k != "memory"} or None, "train_memory": train.get("memory"),
            "export": {k: export.get(k) for k in ("merged", "verification", "forms", "memory")} if export else None,
            "folders_gib": {p.name: round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**30, 3)
                            for p in sorted(run_dir.iterdir()) if p.is_dir()} if run_dir.is_dir() else {}}


def big_files(folder, names) -> list[str]:
    """shutil.copytree's ignore for the logs: weights, optimizer states, tokenizers and the tokenized data (the
    Alpaca sample's text) stay out."""
    return [n for n in names if n.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf"))
            or n in ("tokenizer.json", "train.jsonl", "val.jsonl")]


def logged_steps(run_dir: Path, kind: str = "train") -> list[dict]:
    return [r for r in read_jsonl(Path(run_dir) / "train" / "metrics.jsonl") if r.get("kind") == kind]
