"""Training survives a lost session, stops on a time budget, and refuses to go on with a NaN loss."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from qlora_helpers import Stage, build_config
from qlora_helpers.checkpoints import newest_complete
from qlora_helpers.callbacks import TrainingDiverged, metrics_callback
from qlora_helpers.runs import claim_run_dir
from qlora_helpers.train import resume_checkpoint

from conftest import REPO


def last_checkpoint(run_dir):
    """The newest complete checkpoint, looked at from outside while a run may be writing the next one."""
    found = newest_complete(Stage(build_config("test"), run_dir), move_aside=False)
    return str(found) if found else None


def _cli(run_dir, *extra):
    env = dict(os.environ)
    return [sys.executable, "-m", "qlora_helpers", "run", "--profile", "test", "--run-dir", str(run_dir),
            "-p", "eval.export_merged=false", *extra], env


# An IPython startup file for the notebook kernels (IPYTHONDIR): once the Trainer has written the checkpoint of step
# PAUSE_AT, it says so in a file and waits there, so that the kill comes at that exact moment, not at whatever moment
# a poll from outside happens to see.
PAUSE_AFTER_CHECKPOINT = """
import importlib.abc, importlib.util, os, sys, time

class PauseAfterCheckpoint(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            save = module.Trainer._save_checkpoint

            def paused(trainer, *args, **kwargs):
                save(trainer, *args, **kwargs)
                if trainer.state.global_step == int(os.environ["PAUSE_AT"]):
                    open(os.environ["PAUSED"], "w").close()
                    time.sleep(3600)

            module.Trainer._save_checkpoint = paused

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, PauseAfterCheckpoint())
"""


def test_sigkill_during_training_then_the_same_command_resumes(tmp_path):
    run_dir = tmp_path / "run"
    cmd, env = _cli(run_dir)
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "pause.py").write_text(PAUSE_AFTER_CHECKPOINT)
    paused = tmp_path / "paused"
    # Its own process group, so the kill takes the notebook kernel too, as when a Kaggle session ends.
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**env, "IPYTHONDIR": str(tmp_path / "ipython"), "PAUSE_AT": "2", "PAUSED": str(paused)})
    try:
        while not paused.exists():
            assert proc.poll() is None, "the pipeline ended before the checkpoint of step 2"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert last_checkpoint(run_dir).endswith("checkpoint-2")  # and training was at step 2 of 4

    again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=7200)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["steps"] == 4 and summary["train"]["resumed_from_step"] == 2
    lines = [json.loads(l) for l in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if l["kind"] == "train"] == [1, 2, 3, 4]
    evals = [l["step"] for l in lines if l["kind"] == "eval"]
    assert evals == sorted(set(evals)) == [2, 4]


def _checkpoint(folder, step):
    """The files a resumed Trainer reads back, as it writes them (trainer_state.json last)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text("{}")
    torch.save({}, folder / "optimizer.pt")
    torch.save({}, folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_an_interrupted_checkpoint_is_not_resumed_from(tmp_path, capsys):
    claim_run_dir(tmp_path)  # a run directory (the checkpoints below are a run's)
    ckpts = tmp_path / "train" / "checkpoints"
    for step in (2, 4, 6):
        _checkpoint(ckpts / f"checkpoint-{step}", step)
    (ckpts / "checkpoint-6" / "trainer_state.json").unlink()  # killed before the Trainer wrote its state
    assert last_checkpoint(tmp_path).endswith("checkpoint-4") and (ckpts / "checkpoint-6").is_dir()  # only looked
    assert resume_checkpoint(Stage(build_config("test"), tmp_path)).endswith("checkpoint-4")
    assert "checkpoint-6 cannot be resumed from (trainer_state.json missing)" in capsys.readouterr().err
    assert (ckpts / "incomplete-checkpoint-6").is_dir()
    assert last_checkpoint(tmp_path / "nothing") is None


def test_a_nan_loss_stops_training_naming_the_step(tmp_path):
    cb = metrics_callback(Stage(build_config("test"), tmp_path))
    state = SimpleNamespace(global_step=0, num_input_tokens_seen=0, epoch=0.0)
    args = SimpleNamespace(world_size=1, process_index=0)
    cb.on_train_begin(args, state, None)
    state.global_step = 1
    cb.on_log(args, state, None, logs={"loss": 1.5, "learning_rate": 1e-4, "grad_norm": 1.0})
    state.global_step = 2
    with pytest.raises(TrainingDiverged, match=r"became nan at step 2: likely fp16 overflow"):
        cb.on_log(args, state, None, logs={"loss": math.nan, "learning_rate": 1e-4, "grad_norm": math.nan})
    lines = (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1]


def test_the_time_budget_stops_cleanly_with_a_checkpoint(tmp_path, smol_tokenizer):
    from qlora_helpers.data import prepare_data
    from recipe import attach_lora, build_trainer, load_base, train

    stage = Stage(build_config("test", {"train.max_steps": 50, "train.max_minutes": 0.001}), tmp_path)
    prepare_data(stage, smol_tokenizer)
    trainer = build_trainer(stage, attach_lora(stage, load_base(stage)), smol_tokenizer)
    metrics = train(stage, trainer)
    assert metrics["stopped_by_time_budget"] and metrics["steps"] == 1
    assert last_checkpoint(tmp_path).endswith("checkpoint-1")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_a_metrics_line_cut_short_by_a_kill_does_not_stop_the_resume(tmp_path):
    claim_run_dir(tmp_path)
    path = tmp_path / "train" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"step": 1, "kind": "train", "loss": 2.0}) + "\n"
                    + json.dumps({"step": 2, "kind": "train", "loss": 1.9}) + "\n" + '{"step": 3, "kind": "tr')
    cb = metrics_callback(Stage(build_config("test"), tmp_path))
    cb.on_train_begin(SimpleNamespace(world_size=1, process_index=0),
                      SimpleNamespace(global_step=2, num_input_tokens_seen=0, epoch=0.0), None)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]


def test_packed_rows_train_like_one_packed_row(tmp_path, smol_tokenizer):
    """train.packing_row_tokens changes the layout of a micro-batch, not the training: the same examples, the same
    losses, the same count of real (non-padding) tokens."""
    from qlora_helpers.data import prepare_data
    from recipe import attach_lora, build_trainer, load_base, train

    results = {}
    for rows in (0, 128):
        run_dir = tmp_path / f"rows{rows}"
        cfg = build_config("test", {"train.max_steps": 2, "train.micro_batch_size": 8,
                                    "train.packing_row_tokens": rows, "train.logging_steps": 1,
                                    "quant.compute_dtype": "float32"})
        stage = Stage(cfg, run_dir)
        prepare_data(stage, smol_tokenizer)
        trainer = build_trainer(stage, attach_lora(stage, load_base(stage)), smol_tokenizer)
        if rows:
            batch = trainer.data_collator(trainer.train_dataset[:8])
            assert batch["input_ids"].shape[0] > 1 and batch["input_ids"].shape[1] <= 128
        metrics = train(stage, trainer)
        losses = [json.loads(l)["loss"] for l in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()
                  if json.loads(l)["kind"] == "train"]
        results[rows] = (metrics["tokens_seen"], losses)
    assert results[0][0] == results[128][0]
    assert results[128][1] == pytest.approx(results[0][1], rel=1e-4)  # fp32: bf16 rounds differently per shape
