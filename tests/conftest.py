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


# A fake Hugging Face token: a run sees it like a real one and must never write or print it anywhere.
TOKEN_CANARY = "hf_FAKE_leak_canary_1234567890"


@pytest.fixture(scope="session")
def embedded_run(tmp_path_factory):
    """`python -m qlora_helpers run` on the default profile, as a user's `make run` (about 11 minutes on 2 cores),
    made once for the suite: test_pipeline checks the run, test_shipped_scores its scores. The HF token canary is
    set, so that the run can be searched for it."""
    import json

    run_dir = tmp_path_factory.mktemp("embedded") / "run"
    proc = run_cli("run", "--profile", "embedded", "--run-dir", str(run_dir), env={"HF_TOKEN": TOKEN_CANARY})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc, json.loads((run_dir / "summary.json").read_text())


# Timeouts only catch a hang: far above what a loaded 2-core machine takes (a pipeline on the embedded profile took
# 50+ minutes with three other pipelines running beside it).
def run_cli(*args, timeout=7200, env=None, cwd=None):
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
