"""Kaggle packaging: the folders `make kaggle-dataset` and `make kaggle-kernel` build for the official Kaggle CLI
(`kaggle datasets create -p`, `kaggle kernels push -p`). Nothing here runs on Kaggle; what does is in the
package (qlora_helpers.sources finds attached inputs, qlora_helpers.pipeline runs the stages)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from qlora_helpers.config import UserError  # noqa: E402
from qlora_helpers.pipeline import notebooks  # noqa: E402

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


    meta = json.loads((REPO_ROOT / "kaggle-metadata.json").read_text().replace(USERNAME_PLACEHOLDER, user))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    code_file = REPO_ROOT / meta["code_file"]
    shutil.copy(code_file, out / code_file.name)
    meta["code_file"] = code_file.name
    _write_json(out / "kernel-metadata.json", meta)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python tools/kaggle_build.py dataset|kernel OUT [--user NAME]`` (what the Makefile runs)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python tools/kaggle_build.py", description=main.__doc__)
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
