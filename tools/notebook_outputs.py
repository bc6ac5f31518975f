"""The outputs the notebooks in notebooks/ are committed with: one real run of the embedded profile (the pipeline,
`python -m qlora_helpers run`, on this machine), copied back over the notebooks' cells. `make notebooks` runs it.

What is kept is what papermill executed, with what would be noise or private on GitHub taken out: papermill's
injected-parameters cell (the parameters cell keeps its own defaults, which are the embedded profile's), papermill's
timing metadata, and this machine's paths (the run directory becomes RUN_DIR, the home folder ~, this checkout .).
Each notebook records the hash of its cells' sources and the run's headline numbers in its metadata
(``qlora``); tests/test_notebooks.py fails when a cell is changed without running this again, and when the recorded
numbers are not those tests/test_shipped_scores.py records for the embedded profile.
"""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO_ROOT = TOOLS.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def source_hash(cells: list[dict]) -> str:
    """What the outputs were made from: every cell's type and source, in order (outputs and metadata left out)."""
    text = json.dumps([(c["cell_type"], "".join(c["source"]) if isinstance(c["source"], list) else c["source"])
                       for c in cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])])
    return hashlib.sha256(text.encode()).hexdigest()


def neutral(text: str, replacements: list[tuple[str, str]]) -> str:
    for old, new in replacements:
        text = text.replace(old, new)
    return text


def headline(run_dir: Path) -> dict:
    """The numbers a reader compares across the notebooks and the README: from the run's summary.json."""
    s = json.loads((run_dir / "summary.json").read_text())
    ev, shipped = s["eval"], s.get("shipped") or {}
    return {"exact_match_before": ev["exact_match_before"], "exact_match_after": ev["exact_match_after"],
            "val_loss_before": ev["val_loss_before"], "val_loss_after": ev["val_loss_after"],
            "stop_rate_after": ev.get("stop_rate_after"), "shipped_exact_match": shipped.get("exact_match"),
            "steps": s["train"]["steps"]}


def commit_outputs(run_dir: Path, notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """Copy the executed notebooks of `run_dir` over notebook_dir's, cleaned as the module says."""
    numbers = headline(run_dir)
    replacements = [(str(run_dir), "RUN_DIR"), (str(REPO_ROOT), "."), (str(Path.home()), "~")]
    written = []
    for executed in sorted((run_dir / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(neutral(executed.read_text(), [(json.dumps(o)[1:-1], n) for o, n in replacements]))
        nb["cells"] = [c for c in nb["cells"] if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
        for cell in nb["cells"]:
            cell.get("metadata", {}).pop("papermill", None)
            cell.get("metadata", {}).pop("execution", None)
        committed = json.loads((notebook_dir / executed.name).read_text())
        if source_hash(committed["cells"]) != source_hash(nb["cells"]):
            raise SystemExit(f"{executed.name}: the executed cells are not the committed ones; run this again")
        nb["metadata"].pop("papermill", None)
        nb["metadata"].pop("widgets", None)  # widget state: nothing a static page can show
        nb["metadata"]["qlora"] = {
            "outputs": "python tools/notebook_outputs.py (make notebooks): the embedded profile, one run",
            "source_sha256": source_hash(nb["cells"]), "made": date.today().isoformat(),
            "machine": f"{platform.machine()}, {platform.system()}, Python {platform.python_version()}",
            "numbers": numbers}
        out = notebook_dir / executed.name
        out.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python tools/notebook_outputs.py [--run-dir DIR]``: run the embedded profile and commit its outputs
    (``--run-dir`` of a finished run: use that run instead of making one)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python tools/notebook_outputs.py", description=main.__doc__)
    parser.add_argument("--run-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    tmp = None
    run_dir = args.run_dir
    if run_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="qlora-notebooks-"))
        run_dir = tmp / "run"
        subprocess.run([sys.executable, "-m", "qlora_helpers", "run", "--profile", "embedded", "--run-dir", str(run_dir)],
                       cwd=REPO_ROOT, check=True)
    for path in commit_outputs(run_dir.resolve()):
        print(f"[qlora] {path.relative_to(REPO_ROOT)}: outputs of {run_dir.name}")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
