import os
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# benchmarks/recipe.py builds notebook 03's objects from a profile, for tests that train outside a notebook.
sys.path.insert(0, str(REPO / "benchmarks"))
SHARED_DATA = REPO.parent / "shared" / "data" / "alpaca_small.json"


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded model's tokenizer (SmolLM2, ChatML template), converted once and cached."""
    from qlora_helpers import Stage, build_config
    from qlora_helpers.data import load_tokenizer

    return load_tokenizer(Stage(build_config("test")))


def run_cli(*args, timeout=900, env=None, cwd=None):
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "qlora_helpers", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO, env=full_env)


def stage_for(tmp_path, profile="test", overrides=None):
    """A Stage on a fresh run directory (what start_stage gives a notebook), for tests that call helpers."""
    from qlora_helpers import Stage, build_config
    from qlora_helpers.runs import claim_run_dir

    return Stage(build_config(profile, overrides or {}), claim_run_dir(tmp_path))  # marked, as start_stage does


def ctrl_c_reaches_it() -> None:
    """For Popen(preexec_fn=...) in tests that press Ctrl-C: the child takes SIGINT as a terminal's Ctrl-C even
    when the suite itself runs as a background job (a shell's `make test &` starts it with SIGINT ignored, and
    every child inherits that, so the signal would do nothing)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
