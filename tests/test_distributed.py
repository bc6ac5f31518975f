"""Data-parallel training through accelerate launch, proven with two CPU processes over gloo: the same
launch command notebook 03 runs on two GPUs, each process running notebook 03 itself with its own copy of a tiny
random Llama.
Every step is logged once, one adapter and one set of checkpoints are written, examples count both
processes, and raising max_steps resumes from the checkpoint as on one GPU."""
import json
import os
import random
import subprocess

import pytest

from qlora_helpers import Stage, build_config
from qlora_helpers.config import ConfigError
from qlora_helpers.distributed import data_parallel_processes, launch_command, train_on_every_gpu
from qlora_helpers.runs import save_config

from conftest import REPO

STEPS, MICRO_BATCH = 4, 2


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smol_tokenizer):
    """A two-layer Llama with random weights and the embedded tokenizer, saved as a model folder. Hidden size 64:
    bitsandbytes' CPU kernels need every layer at least one quantization block (64) wide."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=smol_tokenizer.pad_token_id, eos_token_id=smol_tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


def _examples(n: int, rng: random.Random) -> list[dict]:
    """Stage 1's format: a prompt masked with -100, a response that carries the loss."""
    out = []
    for _ in range(n):
        prompt = [rng.randrange(10, 500) for _ in range(rng.randint(4, 8))]
        response = [rng.randrange(10, 500) for _ in range(rng.randint(2, 6))]
        out.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return out


def _run_dir(tmp_path, model_folder, max_steps=STEPS, **overrides):
    """What notebooks 01 and 02 leave for stage 3: config.json, data/{train,val}.jsonl and the quantization and LoRA
    configs notebook 02 builds for the profile. The test profile quantizes to NF4, so each process trains its own
    4-bit copy, as on two GPUs."""
    from recipe import save_profile_configs

    cfg = build_config("test", {"model.name": str(model_folder), "train.max_steps": max_steps,
                                "train.micro_batch_size": MICRO_BATCH, "train.eval_steps": 2, "train.save_steps": 2,
                                "eval.max_val_examples": 8, **overrides})
    save_config(cfg, tmp_path)
    save_profile_configs(Stage(cfg, tmp_path))
    rng = random.Random(0)
    for split, n in (("train", 32), ("val", 8)):
        path = tmp_path / "data" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(e) + "\n" for e in _examples(n, rng)))
    return cfg


def _launch(run_dir, num_processes, timeout=3600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(launch_command(run_dir, num_processes), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _logged_steps(run_dir, kind):
    lines = [json.loads(l) for l in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    return [l["step"] for l in lines if l["kind"] == kind]


def test_two_processes_log_once_save_once_count_both_and_resume(tmp_path, tiny_llama):
    # A constant schedule: a finished cosine run cannot be made longer (it ended at a learning rate of 0).
    constant = {"train.lr_scheduler": "constant"}
    _run_dir(tmp_path, tiny_llama, **constant)
    out = _launch(tmp_path, 2)
    assert out.count("[qlora] training finished") == 1  # only the main process reports

    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["resumed_from_step"] is None
    assert metrics["examples_seen"] == STEPS * MICRO_BATCH * 2  # both processes' micro-batches
    assert _logged_steps(tmp_path, "train") == list(range(1, STEPS + 1))
    assert _logged_steps(tmp_path, "eval") == [2, 4]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    checkpoints = sorted(p.name for p in (tmp_path / "train" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    # one adapter per checkpoint, and each process's RNG state next to it (so a resume restores both)
    last = tmp_path / "train" / "checkpoints" / "checkpoint-4"
    assert len(list(last.glob("adapter_model.safetensors"))) == 1
    assert sorted(p.name for p in last.glob("rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]

    # a longer run on the same directory resumes from checkpoint-4 and logs each new step once
    _run_dir(tmp_path, tiny_llama, max_steps=STEPS + 2, **constant)
    _launch(tmp_path, 2)
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert metrics["steps"] == STEPS + 2 and metrics["resumed_from_step"] == STEPS
    assert metrics["examples_seen"] == (STEPS + 2) * MICRO_BATCH * 2
    assert _logged_steps(tmp_path, "train") == list(range(1, STEPS + 3))
    assert _logged_steps(tmp_path, "eval") == [2, 4, 6]


def test_the_time_budget_stops_both_processes_at_the_same_step(tmp_path, tiny_llama, capsys):
    """One process stopping alone would leave the other waiting forever in the next all-reduce. Launched the way
    notebook 03 does on several GPUs, with the launcher's output shown as it comes."""
    _run_dir(tmp_path, tiny_llama, max_steps=50, **{"train.max_minutes": 0.0001})
    metrics = train_on_every_gpu(Stage(build_config("test"), tmp_path), 2)
    assert metrics["stopped_by_time_budget"] and metrics["steps"] == 1
    assert capsys.readouterr().out.count("[qlora] training finished") == 1
    assert (tmp_path / "train" / "checkpoints" / "checkpoint-1" / "trainer_state.json").exists()


def test_one_process_through_the_same_launcher(tmp_path, tiny_llama):
    _run_dir(tmp_path, tiny_llama)
    _launch(tmp_path, 1)
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["examples_seen"] == STEPS * MICRO_BATCH
    assert _logged_steps(tmp_path, "train") == list(range(1, STEPS + 1))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_without_two_gpus_training_stays_in_one_process():
    assert data_parallel_processes(Stage(build_config("test"))) == 1
    with pytest.raises(ConfigError, match=r"train.num_processes': 2 processes, but this machine has 0 GPUs"):
        data_parallel_processes(Stage(build_config("test", {"train.num_processes": 2})))
    with pytest.raises(ConfigError, match="must be >= 0"):
        build_config("test", {"train.num_processes": -1})
    assert "--multi_gpu" in launch_command("run", 2) and "--multi_gpu" not in launch_command("run", 1)


def test_each_process_loads_onto_its_own_gpu(monkeypatch):
    from qlora_helpers.hardware import device_of, local_process_index

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert local_process_index() == 0 and device_of({"device": "cuda"}) == "cuda:0"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_process_index() == 1 and device_of({"device": "cuda"}) == "cuda:1"
    assert device_of({"device": "cpu"}) == "cpu"


def test_train_on_a_directory_without_data_is_one_line(tmp_path, capsys):
    from qlora_helpers.__main__ import main

    assert main(["train", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run notebooks 01 and 02" in err


def test_two_processes_train_the_same_examples_and_count_the_budget_from_the_sessions_start(tmp_path, tiny_llama):
    """train.epochs sets how many examples are trained on, whatever the GPUs: half an epoch of the 32 examples
    is 8 steps of 2 on one process and 4 steps of 2 x 2 on two. And the training processes count the time
    budget from the session's start that the run directory records (here an hour ago: the kernel that owns
    it, this process, started the session's first stage then), not from their own start."""
    from qlora_helpers.budget import SESSION_FILE, begin_session
    from qlora_helpers.train import total_steps

    cfg = _run_dir(tmp_path, tiny_llama, max_steps=0, **{"train.epochs": 0.5, "train.max_minutes": 30})
    assert total_steps(Stage(cfg, tmp_path), 32, world=1) == 8
    session = begin_session(tmp_path)
    (tmp_path / SESSION_FILE).write_text(json.dumps({**session, "started": session["started"] - 3600}))
    metrics = train_on_every_gpu(Stage(cfg, tmp_path), 2)
    assert metrics["max_steps"] == 4 and metrics["examples_planned"] == 16 and metrics["processes"] == 2
    assert metrics["stopped_by_time_budget"] and metrics["steps"] == 1
    assert metrics["time_budget"]["counted_from"] == "session start"
