import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "alpaca_small.json"


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded model's tokenizer (SmolLM2, ChatML template), converted once and cached."""
    from qlora_helpers import build_config
    from qlora_helpers.model import load_tokenizer

    return load_tokenizer(build_config("test"))


def run_cli(*args, timeout=900, env=None):
    import subprocess

    full_env = {**os.environ, **(env or {})}
    for var in ("QLORA_PROFILE", "QLORA_RUN_DIR"):
        full_env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "qlora_helpers", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=full_env)
