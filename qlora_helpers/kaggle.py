"""Running on Kaggle: sources attached under /kaggle/input, the hub only when it can be reached, and the
driver that runs every stage notebook inside one Kaggle kernel.

A Kaggle kernel may have no internet (it is a per-notebook setting, off by default for some accounts).
Then a hub id fails deep inside transformers or datasets with a long connection traceback; here the first
cell of a notebook stops instead, saying what to attach or which setting to turn on.
"""
from __future__ import annotations

import os
import re
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from .config import Config, UserError

KAGGLE_INPUT = Path("/kaggle/input")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
# /kaggle/input/<dataset>/... or /kaggle/input/datasets/<owner>/<dataset>/...; deeper is not searched.
MAX_SEARCH_DEPTH = 5
STAGE_NOTEBOOK = "01_data_preparation.ipynb"  # marks the folder that holds the numbered notebooks


class HubUnreachable(UserError):
    """A model or dataset must come from the Hugging Face Hub, which cannot be reached, and none is attached."""


# --------------------------------------------------------------------------- the hub
@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap check, no download: offline mode set, else one TCP connection to the hub's host.

    Behind a proxy a direct connection proves nothing, so the hub is assumed reachable there.
    """
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def in_hub_cache(repo_id: str, repo_type: str) -> bool:
    """Whether a hub repo was downloaded before (offline mode can then still load it)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    snapshots = Path(HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


# --------------------------------------------------------------------------- attached sources
def _words(name: str) -> set[str]:
    return {w for w in re.split(r"[^a-z0-9]+", name.lower()) if w}


def attached_dataset(source: str, root: Path | None = None) -> Path | None:
    """A Kaggle dataset under /kaggle/input that stands in for the hub dataset ``source``.

    Matches by name: every word of the hub name (``alpaca-cleaned`` -> alpaca, cleaned) must appear in a
    data file's name (``alpaca_data_cleaned.json``) or in the name of a folder above it. A matching file
    is returned, else the matching folder (stage 1 reads every data file in it).
    """
    root = root or KAGGLE_INPUT
    if not root.is_dir():
        return None
    wanted = _words(source.rstrip("/").split("/")[-1])
    if not wanted:
        return None
    folder_match = None
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        if depth >= MAX_SEARCH_DEPTH:
            dirnames.clear()
        dirnames.sort()
        data_files = sorted(f for f in filenames if f.endswith(DATA_SUFFIXES) and not f.endswith("-metadata.json"))
        for name in data_files:
            if wanted <= _words(Path(name).stem):
                return here / name
        if data_files and folder_match is None and any(wanted <= _words(p) for p in here.relative_to(root).parts):
            folder_match = here
    return folder_match


def attached_model(name: str) -> Path | None:
    from .model import kaggle_input_match

    return kaggle_input_match(name)


# --------------------------------------------------------------------------- the check every stage makes
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_hub_id(value: str) -> bool:
    """``owner/name`` or ``name`` that is not a path on this machine (a missing local file is the
    stage's own error to report, not the hub's)."""
    return bool(HUB_ID.fullmatch(value)) and not value.endswith(DATA_SUFFIXES + (".gguf",)) \
        and not Path(value).expanduser().exists()


def hub_sources(cfg: Config) -> list[str]:
    """The config keys whose source would have to come from the hub now: a hub id that is neither
    attached under /kaggle/input nor in the hub cache."""
    needed = []
    model, data = cfg.model.name, cfg.data.source
    if model != "embedded" and is_hub_id(model) and not attached_model(model) and not in_hub_cache(model, "model"):
        needed.append("model.name")
    if data != "embedded" and is_hub_id(data) and not attached_dataset(data) and not in_hub_cache(data, "dataset"):
        needed.append("data.source")
    return needed


def check_sources(cfg: Config) -> None:
    """Stop at once, with what to do, when a source needs the hub and the hub cannot be reached."""
    needed = hub_sources(cfg)
    if not needed or hub_reachable():
        return
    what = " and ".join(f"{key} '{cfg.flat()[key]}'" for key in needed)
    attach = []
    if "model.name" in needed:
        attach.append("the model (Add Input > Models, e.g. microsoft/phi-3 > Transformers > phi-3-mini-4k-instruct)")
    if "data.source" in needed:
        attach.append("a dataset holding the data files (Add Input > Datasets, e.g. one with alpaca_data_cleaned.json)")
    raise HubUnreachable(
        f"{what} must come from the Hugging Face Hub, which cannot be reached (no internet, or HF_HUB_OFFLINE set). "
        f"On Kaggle, attach {' and '.join(attach)} or turn on Settings > Internet; "
        "elsewhere, point the key at a local copy or connect to the internet")


# --------------------------------------------------------------------------- the driver notebook
def stage_notebook_dir(root: Path | None = None) -> Path:
    """The folder with the numbered stage notebooks: this checkout's notebooks/, else the helper dataset
    attached under /kaggle/input (``make kaggle-dataset`` puts them there)."""
    from . import pipeline

    root = root or KAGGLE_INPUT
    if (pipeline.NOTEBOOK_DIR / STAGE_NOTEBOOK).exists():
        return pipeline.NOTEBOOK_DIR
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            if STAGE_NOTEBOOK in filenames:
                return Path(dirpath)
            if len(Path(dirpath).relative_to(root).parts) >= MAX_SEARCH_DEPTH:
                dirnames.clear()
    raise UserError(f"no {STAGE_NOTEBOOK} found here or under {root}: attach the helper dataset that "
                    "`make kaggle-dataset` builds (README, 'On Kaggle')")


def run_all_stages(profile: str, overrides: dict | str | None, run_dir: str = "") -> Path:
    """What the Kaggle kernel's one code file does: every stage notebook in order, each in a fresh kernel,
    into one run directory under /kaggle/working (papermill, exactly as ``python -m qlora_helpers run``)."""
    import json

    from .config import build_config
    from .pipeline import run_pipeline
    from .runs import default_run_dir

    overrides = json.loads(overrides) if isinstance(overrides, str) and overrides.strip() else dict(overrides or {})
    cfg = build_config(profile, overrides)
    check_sources(cfg)
    return run_pipeline(cfg, overrides, run_dir or default_run_dir(), notebook_dir=stage_notebook_dir())


# --------------------------------------------------------------------------- what `make kaggle-dataset` / `make kaggle-kernel` build
USERNAME_PLACEHOLDER = "your-kaggle-username"  # in kaggle-metadata.json; replaced by the real one when staging
HELPER_DATASET = "qlora-helpers"
DATASET_METADATA = {
    "title": "QLoRA helpers and notebooks",
    "subtitle": "The qlora_helpers wheel, pinned requirements and stage notebooks",
    "description": "Built by `make kaggle-dataset` from the kaggle-qlora repository: the helper package as a wheel, "
                   "requirements-kaggle.txt (everything but torch, which Kaggle ships) and the numbered stage "
                   "notebooks that the kernel runs with papermill.",
    "licenses": [{"name": "apache-2.0"}],
}


def kaggle_username(explicit: str = "") -> str:
    """The Kaggle username for the ids: given, else $KAGGLE_USERNAME, else the one in kaggle.json (the legacy
    API key file). A new-style API token (KAGGLE_API_TOKEN, ~/.kaggle/access_token) does not hold it."""
    import json

    if explicit or os.environ.get("KAGGLE_USERNAME"):
        return explicit or os.environ["KAGGLE_USERNAME"]
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle")
    for path in (config_dir / "kaggle.json", Path.home() / ".config" / "kaggle" / "kaggle.json"):
        if path.is_file():
            username = json.loads(path.read_text()).get("username")
            if username:
                return username
    raise UserError("no Kaggle username: pass KAGGLE_USER=<your username> to make (or set KAGGLE_USERNAME)")


def _write_json(path: Path, obj) -> None:
    import json

    path.write_text(json.dumps(obj, indent=2) + "\n")


def build_dataset(out: Path, user: str) -> Path:
    """The folder for `kaggle datasets create -p`: the wheel, requirements-kaggle.txt, the stage notebooks
    (flat: the CLI skips sub-folders by default) and dataset-metadata.json."""
    import shutil
    import subprocess
    import sys
    import tempfile

    from .pipeline import notebooks
    from .runs import REPO_ROOT

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:  # a clean copy: setuptools' build/ would keep deleted modules
        source = Path(tmp)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO_ROOT / name, source)
        shutil.copytree(REPO_ROOT / "qlora_helpers", source / "qlora_helpers",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(out.resolve()), str(source)], check=True)
    # The kernel runs on a GPU, so its requirements include the CUDA-only extras.
    (out / "requirements-kaggle.txt").write_text((REPO_ROOT / "requirements-kaggle.txt").read_text()
                                                 + (REPO_ROOT / "requirements-gpu.txt").read_text())
    for notebook in notebooks():
        shutil.copy(notebook, out)
    _write_json(out / "dataset-metadata.json", {"id": f"{user}/{HELPER_DATASET}", **DATASET_METADATA})
    return out


def build_kernel(out: Path, user: str) -> Path:
    """The folder for `kaggle kernels push -p`: kaggle-metadata.json as kernel-metadata.json (the name the
    CLI reads) with the username filled in, and the code file beside it."""
    import json
    import shutil

    from .runs import REPO_ROOT

    meta = json.loads((REPO_ROOT / "kaggle-metadata.json").read_text().replace(USERNAME_PLACEHOLDER, user))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    code_file = REPO_ROOT / meta["code_file"]
    shutil.copy(code_file, out / code_file.name)
    meta["code_file"] = code_file.name
    _write_json(out / "kernel-metadata.json", meta)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m qlora_helpers.kaggle dataset|kernel OUT [--user NAME]`` (what the Makefile runs)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m qlora_helpers.kaggle", description=main.__doc__)
    parser.add_argument("what", choices=("dataset", "kernel"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--user", default="", help="Kaggle username (default: $KAGGLE_USERNAME or kaggle.json)")
    args = parser.parse_args(argv)
    try:
        user = kaggle_username(args.user)
        out = (build_dataset if args.what == "dataset" else build_kernel)(args.out, user)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[qlora] {args.what} folder for {user}: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
