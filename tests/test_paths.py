"""A relative path means what the user meant: relative to where the command is typed (or, in a notebook opened by
hand, where the notebook runs), made absolute before the notebooks start elsewhere; a hub id stays a hub id."""
import json

import pytest

from qlora_helpers import build_config
from qlora_helpers.sources import absolute_path, resolve_paths

from conftest import REPO, run_cli

ROWS = [{"instruction": f"Repeat the word {w}.", "input": "", "output": w}
        for w in ("apple river stone cloud garden window yellow planet silver forest candle bridge orange music "
                  "winter pencil rabbit castle dragon ocean butter copper desert engine feather guitar hammer "
                  "island jacket kettle ladder mirror").split()]


def test_relative_paths_resolve_against_the_given_folder_and_hub_ids_stay(tmp_path):
    (tmp_path / "data.jsonl").write_text("")
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert absolute_path("data.jsonl", tmp_path) == str(tmp_path / "data.jsonl")
    assert absolute_path("./missing.jsonl", tmp_path) == str(tmp_path / "missing.jsonl")  # looks like a path
    assert absolute_path("org/model", tmp_path) == str(tmp_path / "org" / "model")  # exists here: a folder
    assert absolute_path("yahma/alpaca-cleaned", tmp_path) == "yahma/alpaca-cleaned"  # not here: a hub id
    assert absolute_path("embedded", tmp_path) == "embedded"
    cfg = resolve_paths(build_config("test", {"data.source": "data.jsonl", "model.name": "org/model"}), tmp_path)
    assert (cfg.data.source, cfg.model.name) == (str(tmp_path / "data.jsonl"), str(tmp_path / "org" / "model"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, smol_tokenizer):
    """A user's folder, outside the repository: their data file and a small local model folder (a two-layer
    Llama with random weights and the embedded tokenizer, so that training is quick)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("user")
    (folder / "my_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=smol_tokenizer.pad_token_id, eos_token_id=smol_tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder / "models" / "tiny")
    smol_tokenizer.save_pretrained(folder / "models" / "tiny")
    return folder


FAST = ["-p", "train.max_steps=2", "-p", "eval.num_prompts=2", "-p", "data.train_size=24", "-p", "data.val_size=6",
        "-p", "eval.export_merged=false"]


def test_check_data_inspect_model_and_run_accept_the_same_relative_paths(workspace):
    checked = run_cli("check-data", "my_data.jsonl", "--model", "models/tiny", cwd=workspace)
    assert checked.returncode == 0, checked.stderr
    assert f"rows read: {len(ROWS)}" in checked.stdout and str(workspace / "my_data.jsonl") in checked.stdout
    inspected = run_cli("inspect-model", "--model", "models/tiny", "--random-weights", cwd=workspace)
    assert inspected.returncode == 0, inspected.stderr
    assert str(workspace / "models" / "tiny") in inspected.stdout

    done = run_cli("run", "--profile", "test", "--run-dir", "runs/mine", "-p", "data.source=my_data.jsonl",
                   "-p", "model.name=models/tiny", *FAST, cwd=workspace)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = workspace / "runs" / "mine"
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["data"]["source"] == str(workspace / "my_data.jsonl")  # recorded as the absolute path
    assert saved["model"]["name"] == str(workspace / "models" / "tiny")
    report = (run_dir / "report.md").read_text()
    assert str(workspace / "my_data.jsonl") in report and str(workspace / "models" / "tiny") in report


def test_from_the_repository_root_a_relative_data_path_is_found(workspace, tmp_path):
    relative = "../" * len(REPO.parts) + str(workspace / "my_data.jsonl").lstrip("/")  # relative to the repo root
    done = run_cli("run", "--profile", "test", "--run-dir", str(tmp_path / "run"), "-p", f"data.source={relative}",
                   "-p", f"model.name={workspace / 'models' / 'tiny'}", *FAST, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["source"] == str(workspace / "my_data.jsonl")


def test_a_relative_path_that_does_not_exist_is_named_absolutely(tmp_path):
    proc = run_cli("check-data", "nope.jsonl", cwd=tmp_path)
    assert proc.returncode == 2 and str(tmp_path / "nope.jsonl") in proc.stderr and "no such file" in proc.stderr
