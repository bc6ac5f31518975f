"""Kaggle packaging: what `make kaggle-dataset`, `make kaggle-kernel` and `make kaggle-notebook` build for the
official Kaggle CLI (`kaggle datasets create -p`, `kaggle kernels push -p`). Nothing here runs on Kaggle but the
installer (kaggle_install.py, shipped in the dataset) and the kernel notebook (kaggle_kernel.py builds it from
notebooks/); what the stages do there is in the package (qlora_helpers.sources finds attached inputs,
qlora_helpers.adopt continues an earlier version's run).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO_ROOT = TOOLS.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(TOOLS))

from kaggle_install import pins, requirements  # noqa: E402
from kaggle_kernel import KERNEL_FILE, write_kernel_notebook  # noqa: E402
from qlora_helpers import __version__  # noqa: E402
from qlora_helpers.config import UserError  # noqa: E402
from qlora_helpers.pipeline import notebooks  # noqa: E402

USERNAME_PLACEHOLDER = "your-kaggle-username"  # in kaggle-metadata.json; replaced by the real one when staging
HELPER_DATASET = "qlora-helpers"
KERNEL_NOTEBOOK = REPO_ROOT / "kaggle_kernel" / KERNEL_FILE  # the committed copy of what kaggle_kernel.py builds
DATASET_METADATA = {
    "title": "QLoRA helpers and notebooks",
    "subtitle": "The qlora_helpers wheel, its Kaggle installer and pinned requirements",
    "description": "Built by `make kaggle-dataset` from the kaggle-qlora repository: the helper package as a wheel, "
                   "requirements-kaggle.txt (what the kernel adds to Kaggle's image) and kaggle_install.py, which the "
                   "kernel's first code cell runs: it installs those on top of the image and holds every other "
                   "package (torch, pyarrow, the Jupyter packages) at the image's version. Built with WHEELS=1 it "
                   "also holds the wheel of every pinned package (each under its own license: transformers, peft, "
                   "accelerate, tokenizers, safetensors, rouge-score Apache-2.0; bitsandbytes, gguf MIT; liger-kernel "
                   "BSD-2-Clause), so the kernel installs with the internet off.",
    "licenses": [{"name": "apache-2.0"}],
}
# Kaggle's GPU image: CPython 3.12 on Ubuntu 22.04 (glibc 2.35), x86-64 (tools/kaggle_image.txt).
KAGGLE_PYTHON = "3.12"
KAGGLE_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(35, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
# Published on PyPI as source only: built here into a wheel (pure Python, so one wheel fits every Python 3).
SOURCE_ONLY = {"rouge-score"}


def kaggle_username(explicit: str = "") -> str:
    """The Kaggle username for the ids: given, else $KAGGLE_USERNAME, else the one in kaggle.json (the legacy
    API key file). A new-style API token (KAGGLE_API_TOKEN, ~/.kaggle/access_token) does not hold it."""
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
    path.write_text(json.dumps(obj, indent=2) + "\n")


def kernel_requirements(gpu_extras: bool = True) -> str:
    """requirements-kaggle.txt as the kernel installs it: with the CUDA-only extras (requirements-gpu.txt) for a
    GPU kernel; without them for a CPU (the tests: liger-kernel needs triton, which a CPU machine lacks)."""
    text = (REPO_ROOT / "requirements-kaggle.txt").read_text()
    return text + (REPO_ROOT / "requirements-gpu.txt").read_text() if gpu_extras else text


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "-q"], check=True)


def build_wheelhouse(out: Path, requirements_file: Path, kaggle: bool = True) -> list[Path]:
    """The wheel of every pinned requirement, into ``out`` (flat: `kaggle datasets create` skips sub-folders):
    for Kaggle's Python 3.12 on manylinux x86-64, or with ``kaggle=False`` for the running interpreter (the
    tests). Only what requirements-kaggle.txt pins: what the image already has needs no wheel."""
    wanted = pins(requirements(requirements_file))
    binary = [f"{n}=={v}" for n, v in wanted.items() if n not in SOURCE_ONLY]
    target = ["--python-version", KAGGLE_PYTHON, "--implementation", "cp"] if kaggle else []
    for platform in (KAGGLE_PLATFORMS if kaggle else []):
        target += ["--platform", platform]
    before = set(out.glob("*.whl"))
    _pip("download", "--no-deps", "--only-binary=:all:", *target, "-d", str(out), *binary)
    for name in sorted(set(wanted) & SOURCE_ONLY):
        _pip("wheel", "--no-deps", "-w", str(out), f"{name}=={wanted[name]}")
    return sorted(set(out.glob("*.whl")) - before)


def build_dataset(out: Path, user: str, wheels: bool = False, gpu_extras: bool = True, kaggle: bool = True) -> Path:
    """The folder for `kaggle datasets create -p`: the package's wheel, requirements-kaggle.txt, the installer and
    dataset-metadata.json; with ``wheels``, the wheel of every pinned requirement too (for ``kaggle=False``: for
    the running interpreter, as the tests build it)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:  # a clean copy: setuptools' build/ would keep deleted modules
        source = Path(tmp)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO_ROOT / name, source)
        shutil.copytree(REPO_ROOT / "qlora_helpers", source / "qlora_helpers",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # The stage notebooks travel inside the wheel: each process of a data-parallel launch runs notebook 03 from
        # there (qlora_helpers.pipeline.notebook_path), outputs cleared (they would only make the wheel bigger).
        (source / "qlora_helpers" / "notebooks").mkdir()
        for nb in notebooks():
            (source / "qlora_helpers" / "notebooks" / nb.name).write_text(without_outputs(nb.read_text()))
        _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out.resolve()), str(source))
    (out / "requirements-kaggle.txt").write_text(kernel_requirements(gpu_extras))
    shutil.copy(TOOLS / "kaggle_install.py", out)
    if wheels:
        build_wheelhouse(out, out / "requirements-kaggle.txt", kaggle=kaggle)
    _write_json(out / "dataset-metadata.json", {"id": f"{user}/{HELPER_DATASET}", **DATASET_METADATA})
    return out


def without_outputs(notebook_json: str) -> str:
    """A notebook's JSON with every code cell's outputs and execution count cleared."""
    nb = json.loads(notebook_json)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def build_kernel_notebook(path: Path = KERNEL_NOTEBOOK) -> Path:
    """The kernel notebook, from notebooks/01..05 (kaggle_kernel.py)."""
    return write_kernel_notebook(path, notebooks(), __version__)


def build_kernel(out: Path, user: str, resume: bool = False) -> Path:
    """The folder for `kaggle kernels push -p`: kaggle-metadata.json as kernel-metadata.json (the name the CLI
    reads) with the username filled in, and the kernel notebook freshly built beside it. ``resume``: the kernel
    also attaches its own latest output (kernel_sources), so the new version continues that run."""
    meta = json.loads((REPO_ROOT / "kaggle-metadata.json").read_text().replace(USERNAME_PLACEHOLDER, user))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    code_file = Path(meta["code_file"]).name
    build_kernel_notebook(out / code_file)
    meta["code_file"] = code_file
    if resume:
        meta["kernel_sources"] = sorted(set(meta.get("kernel_sources", [])) | {meta["id"]})
    _write_json(out / "kernel-metadata.json", meta)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python tools/kaggle_build.py dataset|kernel OUT [--user NAME] [--wheels] [--resume]`` or
    ``python tools/kaggle_build.py notebook`` (what the Makefile runs)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python tools/kaggle_build.py", description=main.__doc__)
    parser.add_argument("what", choices=("dataset", "kernel", "notebook"))
    parser.add_argument("out", type=Path, nargs="?", default=None)
    parser.add_argument("--user", default="", help="Kaggle username (default: $KAGGLE_USERNAME or kaggle.json)")
    parser.add_argument("--wheels", action="store_true", help="dataset: add every pinned package's wheel (offline install)")
    parser.add_argument("--resume", action="store_true", help="kernel: attach its own latest output to continue that run")
    args = parser.parse_args(argv)
    try:
        if args.what == "notebook":
            print(f"[qlora] kernel notebook: {build_kernel_notebook(args.out or KERNEL_NOTEBOOK)}")
            return 0
        if args.out is None:
            raise UserError(f"{args.what}: give the folder to build, e.g. dist/kaggle-{args.what}")
        user = kaggle_username(args.user)
        out = (build_dataset(args.out, user, wheels=args.wheels) if args.what == "dataset"
               else build_kernel(args.out, user, resume=args.resume))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"error: {' '.join(exc.cmd[2:5])} ... failed with status {exc.returncode} (pip's output is above)",
              file=sys.stderr)
        return 1
    print(f"[qlora] {args.what} folder for {user}: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
