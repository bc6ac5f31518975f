"""Where things live on this machine: Kaggle's folders (relocatable for tests), the project's cache, and whether
someone sits at the notebook.

On Kaggle, inputs (datasets, models, earlier kernels' outputs) are mounted read-only under /kaggle/input
and only /kaggle/working is writable and kept as the kernel's output. ``QLORA_KAGGLE_ROOT`` moves that
root (tests run the Kaggle path in a temporary folder); ``QLORA_ON_KAGGLE=1`` makes this machine act as a
Kaggle kernel would.
"""
from __future__ import annotations

import os
from pathlib import Path


def on_kaggle() -> bool:
    """Inside a Kaggle kernel (Kaggle sets KAGGLE_KERNEL_RUN_TYPE), or told to act as one."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or os.environ.get("QLORA_ON_KAGGLE"))


def kaggle_root() -> Path:
    return Path(os.environ.get("QLORA_KAGGLE_ROOT") or "/kaggle")


def kaggle_input() -> Path:
    return kaggle_root() / "input"


def kaggle_working() -> Path:
    return kaggle_root() / "working"


def cache_dir() -> Path:
    """Converted models (the embedded GGUF, a user's .gguf file): ``QLORA_CACHE`` or ~/.cache/qlora_helpers."""
    return Path(os.environ.get("QLORA_CACHE") or Path.home() / ".cache" / "qlora_helpers")


def in_notebook() -> bool:
    """Running in a Jupyter kernel (a notebook, papermill, nbmake), not a plain Python process."""
    try:
        from IPython import get_ipython

        return type(get_ipython()).__name__ == "ZMQInteractiveShell"
    except ImportError:
        return False


BATCH_ENV = "QLORA_BATCH"  # set to 1 by whatever runs the notebooks with nobody at the keyboard (papermill, nbmake)


def interactive() -> bool:
    """A notebook someone can type into: a Jupyter kernel, not run by the pipeline or the tests (QLORA_BATCH=1) nor
    by Kaggle's "Save Version" (KAGGLE_KERNEL_RUN_TYPE=Batch)."""
    return (in_notebook() and os.environ.get(BATCH_ENV) != "1"
            and os.environ.get("KAGGLE_KERNEL_RUN_TYPE", "").lower() != "batch")
