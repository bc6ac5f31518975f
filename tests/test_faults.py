"""Fault injection, training side: kills in the middle of checkpoint and adapter writes, checkpoints and files cut
short, a full disk, Ctrl-C. Each fault is followed by the same command again, and the run must end exactly as one
that was never interrupted: every step logged once, the same tokens, the same losses, nothing silently wrong.

Everything trains a two-layer random Llama (test_distributed's `tiny_llama`) so that a training session costs
seconds; one uninterrupted run (`reference`, module scope) is the yardstick. A kill is a real SIGKILL of a real
`python -m qlora_helpers train` process, at the moment a monkeypatched writer has written half its file.
The pipeline side (locks, refusals, kills of `run`, one-line errors) is tests/test_faults_cli.py.
"""
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_helpers import Stage, UserError
from qlora_helpers.checkpoints import checkpoint_problem, newest_complete
from qlora_helpers.runs import CorruptFile, WriteFailed, load_config, read_json, save_config
from qlora_helpers.callbacks import read_metrics_log

from conftest import REPO, ctrl_c_reaches_it
from test_distributed import _run_dir, tiny_llama  # noqa: F401 (fixture)

STEPS = 6
SETTINGS = {"train.save_total_limit": 10, "train.logging_steps": 1}


def make_run(path, model, max_steps=STEPS, **overrides):
    """What notebooks 01 and 02 leave for training: config.json, data/ (32 training examples), the model configs."""
    path.mkdir(parents=True, exist_ok=True)
    return _run_dir(path, model, max_steps=max_steps, **{**SETTINGS, **overrides})


def train_here(run_dir):
    """Training in this process with notebook 03's cells as benchmarks/recipe.py mirrors them (the same helpers
    around the same Trainer: resume, callbacks, save)."""
    from qlora_helpers.data import load_tokenizer
    from recipe import attach_lora, build_trainer, load_base, train

    run_dir = Path(run_dir)
    stage = Stage(load_config(run_dir), run_dir)
    return train(stage, build_trainer(stage, attach_lora(stage, load_base(stage)), load_tokenizer(stage)))


TRAIN_PROCESS = """
import sys
sys.path.insert(0, {benchmarks!r})
sys.path.insert(0, {tests!r})
from qlora_helpers.__main__ import reporting_errors
from test_faults import train_here
sys.exit(reporting_errors(lambda: train_here(sys.argv[1]) and 0, "train"))
"""


def train_cli(run_dir, patch="", timeout=3600, **popen):
    """Training in its own process, as notebook 03's cells do it, after `patch` (Python run first), with the command
    line's one-line errors: a SIGKILL there is a kill of the process that trains."""
    code = patch + TRAIN_PROCESS.format(benchmarks=str(REPO / "benchmarks"), tests=str(REPO / "tests"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", code, str(run_dir)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, **popen)


def wait_until_free(run_dir, timeout=60):
    """`python -m qlora_helpers train` runs notebook 03 in a kernel; SIGKILLed, it leaves that kernel behind until the
    kernel sees its parent gone (ipykernel checks every second) and exits, giving the run directory back. The
    next run would be refused as busy meanwhile, so wait for that, not for a guessed time."""
    from qlora_helpers.runlock import RunDirBusy, acquire, release

    deadline = time.time() + timeout
    while True:
        try:
            acquire(run_dir, "the test")
            release(run_dir)
            return
        except RunDirBusy:
            assert time.time() < deadline, f"{run_dir} still held {timeout} s after the kill"
            time.sleep(0.1)


def last_error_line(stderr):
    """The one error line, last on stderr (progress bars may come before it), and no traceback."""
    lines = [line for line in re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr)) if line.strip()]
    assert "Traceback" not in stderr and [l for l in lines if l.startswith("error:")] == lines[-1:], stderr[-3000:]
    return lines[-1]


def steps_logged(run_dir, kind="train"):
    return [r["step"] for r in read_metrics_log(run_dir) if r["kind"] == kind]


def losses(run_dir):
    return [r["loss"] for r in read_metrics_log(run_dir) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama):  # noqa: F811
    """One uninterrupted run of STEPS steps, checkpoints every 2 (all kept)."""
    run_dir = tmp_path_factory.mktemp("reference")
    make_run(run_dir, tiny_llama)
    metrics = train_here(run_dir)
    assert metrics["steps"] == STEPS and steps_logged(run_dir) == list(range(1, STEPS + 1))
    return run_dir, metrics


def copy_run(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    return run_dir


# --------------------------------------------------------------------------- kills in the middle of writes
# Each patch writes half a file the way the real writer would have started it, then SIGKILLs its own process.
DIE_WRITING_OPTIMIZER = """
import io, os, signal, torch
_save = torch.save
def save(obj, f, *args, **kwargs):
    if str(f).endswith(os.path.join("checkpoint-2", "optimizer.pt")):
        buf = io.BytesIO(); _save(obj, buf); data = buf.getvalue()
        open(f, "wb").write(data[: len(data) // 2]); os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *args, **kwargs)
torch.save = save
"""
DIE_WRITING_TRAINER_STATE = """
import dataclasses, json, os, signal
from transformers.trainer_callback import TrainerState
_save = TrainerState.save_to_json
def save_to_json(self, path):
    if "checkpoint-4" in path:
        text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)
        open(path, "w").write(text[: len(text) // 2]); os.kill(os.getpid(), signal.SIGKILL)
    return _save(self, path)
TrainerState.save_to_json = save_to_json
"""
DIE_SWAPPING_IN_THE_ADAPTER = """
import os, signal
import qlora_helpers.train as train
train.replace_dir = lambda tmp, target: os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kills_in_the_middle_of_checkpoint_and_adapter_writes_then_the_run_ends_as_if_never_killed(
        tmp_path, tiny_llama, reference):  # noqa: F811
    run_dir = tmp_path / "run"
    make_run(run_dir, tiny_llama)

    # 1: killed while the first checkpoint's optimizer.pt is half written: no complete checkpoint at all
    first = train_cli(run_dir, DIE_WRITING_OPTIMIZER)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert checkpoint_problem(run_dir / "train" / "checkpoints" / "checkpoint-2") is not None

    # 2: starts over (checkpoint-2 set aside, named), killed while checkpoint-4's trainer_state.json is half written
    second = train_cli(run_dir, DIE_WRITING_TRAINER_STATE)
    assert second.returncode == -signal.SIGKILL, second.stderr[-2000:]
    assert "checkpoint-2 cannot be resumed from" in second.stderr and "set aside as incomplete-checkpoint-2" in second.stderr

    # 3: resumes from checkpoint-2 (checkpoint-4 set aside), trains to the end, killed while swapping in the adapter
    third = train_cli(run_dir, DIE_SWAPPING_IN_THE_ADAPTER)
    assert third.returncode == -signal.SIGKILL, third.stderr[-2000:]
    assert "checkpoint-4 cannot be resumed from (trainer_state.json cannot be read" in third.stderr
    assert not (run_dir / "train" / "metrics.json").exists()

    # 4: the same command again: all steps are trained, so the adapter and metrics come from the checkpoints
    fourth = train_cli(run_dir)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert "has trained all 6 steps already" in fourth.stdout
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()

    # Whole-run numbers are the uninterrupted run's: each step once, the same tokens, the same losses.
    ref_dir, ref = reference
    metrics = read_json(run_dir / "train" / "metrics.json")
    assert steps_logged(run_dir) == list(range(1, STEPS + 1)) and steps_logged(run_dir, "eval") == [2, 4, 6]
    assert metrics["steps"] == STEPS and metrics["tokens_seen"] == ref["tokens_seen"]
    assert losses(run_dir) == pytest.approx(losses(ref_dir), rel=1e-3)
    assert metrics["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-3)
    assert metrics["best_eval_loss"] == pytest.approx(ref["best_eval_loss"], rel=1e-3)
    assert metrics["sessions"] == 3  # the three that trained; wall time counts all of them
    elapsed = [r["elapsed_s"] for r in read_metrics_log(run_dir)]
    assert elapsed == sorted(elapsed) and metrics["wall_s"] == max(elapsed)
    aside = sorted(p.name for p in (run_dir / "train" / "checkpoints").iterdir() if p.name.startswith("incomplete"))
    assert aside == ["incomplete-checkpoint-2", "incomplete-checkpoint-4"]

    # 5: and once more: reported, not trained again
    before = (run_dir / "train" / "metrics.jsonl").read_text()
    assert train_here(run_dir)["steps"] == STEPS
    assert (run_dir / "train" / "metrics.jsonl").read_text() == before
    assert not (run_dir / "train" / "checkpoints" / "checkpoint-7").exists()


DIE_BEFORE_THE_CONFIG_IS_RENAMED = """
import os, signal, sys
_fsync = os.fsync
def fsync(fd):
    _fsync(fd)
    if "config" in os.readlink(f"/proc/self/fd/{fd}"):
        os.kill(os.getpid(), signal.SIGKILL)  # the new config is whole in its temporary file, not yet renamed
os.fsync = fsync
from qlora_helpers import start_stage
start_stage("test", {"train.max_steps": 8}, sys.argv[1])
"""
CONFIG_WRITER = """
import sys
from qlora_helpers import build_config
from qlora_helpers.runs import save_config
configs = [build_config("test", {"data.system_prompt": "x" * 200_000}), build_config("test")]
print("writing", flush=True)
for i in range(10**6):
    save_config(configs[i % 2], sys.argv[1])
"""


def test_sigkills_while_config_json_is_written_leave_the_old_one_or_the_new_one(tmp_path):
    from qlora_helpers.stage import start_stage

    run_dir = tmp_path / "run"
    start_stage("test", {}, str(run_dir))
    killed = subprocess.run([sys.executable, "-c", DIE_BEFORE_THE_CONFIG_IS_RENAMED, str(run_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=3600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert load_config(run_dir).train.max_steps == 4  # the old one, whole
    assert start_stage("test", {"train.max_steps": 8}, str(run_dir)).cfg.train.max_steps == 8

    rng = random.Random(int(os.environ.get("QLORA_FAULT_SEED", "18")))
    for _ in range(5):  # a 200 kB config rewritten in a loop, killed at random moments
        proc = subprocess.Popen([sys.executable, "-c", CONFIG_WRITER, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.wait()
        assert len(load_config(run_dir).data.system_prompt) in (0, 200_000)


def test_random_sigkills_of_training_never_lose_or_repeat_a_step(tmp_path, tiny_llama, reference):  # noqa: F811
    """Uninstrumented kills at random moments (seeded, so a failure can be replayed), then a run to the end."""
    run_dir = tmp_path / "run"
    make_run(run_dir, tiny_llama)
    rng = random.Random(int(os.environ.get("QLORA_FAULT_SEED", "18")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "qlora_helpers", "train", "--run-dir", str(run_dir)]
    log = run_dir / "train" / "metrics.jsonl"
    for _ in range(2):
        before = log.stat().st_ino if log.exists() else None
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        # Training has begun when the log is rewritten (a new file); then the kill comes at a random moment of it.
        while (not log.exists() or log.stat().st_ino == before) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.wait()
        wait_until_free(run_dir)
    done = train_cli(run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_json(run_dir / "train" / "metrics.json")
    assert steps_logged(run_dir) == list(range(1, STEPS + 1))
    assert metrics["steps"] == STEPS and metrics["tokens_seen"] == reference[1]["tokens_seen"]


# --------------------------------------------------------------------------- files cut short
def _cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


CHECKPOINT_FAULTS = {
    "trainer_state.json cut short": lambda c: _cut(c / "trainer_state.json"),
    "adapter_model.safetensors cut short": lambda c: _cut(c / "adapter_model.safetensors", 0.9),
    "adapter_model.safetensors empty": lambda c: _cut(c / "adapter_model.safetensors", 0),
    "optimizer.pt missing": lambda c: (c / "optimizer.pt").unlink(),
    "scheduler.pt missing": lambda c: (c / "scheduler.pt").unlink(),
    "optimizer.pt cut short": lambda c: _cut(c / "optimizer.pt"),
    "rng_state.pth cut short": lambda c: _cut(c / "rng_state.pth"),
    "adapter_config.json missing": lambda c: (c / "adapter_config.json").unlink(),
}


@pytest.mark.parametrize("fault", CHECKPOINT_FAULTS)
def test_a_damaged_newest_checkpoint_is_set_aside_by_name_and_the_one_before_is_resumed(
        fault, reference, tmp_path, capsys):
    run_dir = copy_run(reference, tmp_path)
    newest = run_dir / "train" / "checkpoints" / "checkpoint-6"
    CHECKPOINT_FAULTS[fault](newest)
    found = newest_complete(Stage(load_config(run_dir), run_dir))
    assert found.name == "checkpoint-4"
    err = capsys.readouterr().err
    assert f"{newest} cannot be resumed from" in err and "set aside as incomplete-checkpoint-6" in err
    assert err.count("\n") == 1
    assert not newest.exists() and (newest.parent / "incomplete-checkpoint-6").is_dir()


def test_the_trainer_resumes_from_the_checkpoint_chosen_and_the_numbers_add_up(reference, tmp_path, capsys):
    run_dir = copy_run(reference, tmp_path)
    _cut(run_dir / "train" / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors")
    metrics = train_here(run_dir)
    assert "checkpoint-6 cannot be resumed from" in capsys.readouterr().err
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == STEPS
    assert metrics["tokens_seen"] == reference[1]["tokens_seen"]
    assert steps_logged(run_dir) == list(range(1, STEPS + 1))
    assert losses(run_dir) == pytest.approx(losses(reference[0]), rel=1e-3)
    assert metrics["sessions"] == 2


def test_a_metrics_log_cut_anywhere_reads_back_as_whole_lines(reference, tmp_path):
    run_dir = copy_run(reference, tmp_path)
    path = run_dir / "train" / "metrics.jsonl"
    data, whole = path.read_bytes(), read_metrics_log(run_dir)
    for cut in random.Random(5).sample(range(len(data)), 12):
        path.write_bytes(data[:cut])
        records = read_metrics_log(run_dir)
        assert records == whole[: len(records)]
    path.write_bytes(data[:-1] + b"\xff\xfe garbage\n")  # bytes that are not even UTF-8
    assert read_metrics_log(run_dir) == whole[:-1]


def test_files_the_project_wrote_cut_short_are_named_in_one_line(reference, tmp_path, capsys):
    from qlora_helpers.__main__ import main
    from qlora_helpers.data import load_split
    from qlora_helpers.report import build_summary

    run_dir = copy_run(reference, tmp_path)
    _cut(run_dir / "data" / "train.jsonl", 0.3)
    with pytest.raises(CorruptFile, match=r"train\.jsonl: line \d+ cannot be read back"):
        load_split(run_dir, "train")
    assert main(["train", "--run-dir", str(run_dir)]) == 1  # notebook 03 stops there, naming its cell and the file
    line = last_error_line(capsys.readouterr().err)
    assert "03_lora_training.ipynb failed in cell" in line and "train.jsonl: line" in line

    _cut(run_dir / "train" / "metrics.json")
    with pytest.raises(CorruptFile, match=r"train/metrics\.json: cannot be read back"):
        build_summary(run_dir)

    from qlora_helpers.evaluate import read_generations

    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "generations.jsonl").write_text('{"prompt": "2 + 2?", "reference": "4"}\n{"prompt": "3 +')
    with pytest.raises(CorruptFile, match=r"eval/generations\.jsonl: cannot be read back"):
        read_generations(run_dir)

    _cut(run_dir / "config.json")
    assert main(["train", "--run-dir", str(run_dir)]) == 2
    assert f"{run_dir / 'config.json'}: cannot be read back" in last_error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- resuming with other lengths
def test_a_finished_run_is_reported_and_a_shorter_one_refused(reference, tmp_path):
    from qlora_helpers.stage import start_stage

    run_dir = copy_run(reference, tmp_path)
    save_config(load_config(run_dir).copy_with({"train.max_steps": 4}), run_dir)
    with pytest.raises(UserError, match=r"train\.max_steps=4 means 4 steps, but run directory .* has trained 6 steps "
                                        r"already \(checkpoint-6\); raise train\.max_steps"):
        train_here(run_dir)
    overrides = {k: v for k, v in load_config(run_dir).flat().items() if k != "profile"}
    with pytest.raises(UserError, match=r"train\.max_steps=4, but run directory .* has trained 6 steps already"):
        start_stage("test", overrides, str(run_dir))
    assert not (run_dir / "train" / "checkpoints" / "checkpoint-5").exists()


# --------------------------------------------------------------------------- a full disk
def _file_size_limit(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_next_run_completes(tmp_path, tiny_llama, reference):  # noqa: F811
    """RLIMIT_FSIZE makes every write past 64 KiB fail as a full disk does (without root or a tmpfs): the first
    checkpoint's adapter (128 KiB) cannot be written."""
    run_dir = tmp_path / "run"
    make_run(run_dir, tiny_llama)
    full = train_cli(run_dir, preexec_fn=_file_size_limit(64 * 1024))
    assert full.returncode == 2, full.stderr[-3000:]
    last = last_error_line(full.stderr)
    assert last.startswith("error: training could not write to") and "disk is probably full" in last
    again = train_cli(run_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoint-2 cannot be resumed from" in again.stderr
    assert steps_logged(run_dir) == list(range(1, STEPS + 1))
    assert read_json(run_dir / "train" / "metrics.json")["tokens_seen"] == reference[1]["tokens_seen"]


def _no_space(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def _half_then_no_space(fig, path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"\x89PNG half an image")
    _no_space()


# writer -> (what it writes, where the full disk strikes)
ENOSPC_WRITERS = {
    "write_json (config.json)": "os.fsync",            # after the data went into the temporary file
    "write_text (report.md)": "os.replace",            # at the rename
    "atomic_path (a plot savefig writes)": "savefig",  # inside the library's own write, half an image written
    "replace_dir (the adapter)": "os.rename",          # while moving the old adapter aside
}


@pytest.mark.parametrize("writer", ENOSPC_WRITERS)
def test_a_write_that_fails_half_way_keeps_the_old_file_and_says_so_in_one_line(writer, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from qlora_helpers import runs

    target = tmp_path / ("adapter" if "adapter" in writer else "report.png" if "plot" in writer else "file.json")
    if target.name == "adapter":
        target.mkdir()
        (target / "adapter_config.json").write_text("old")
        new = tmp_path / "new-adapter"
        new.mkdir()
        (new / "adapter_config.json").write_text("new")
    else:
        target.write_text("old")
    where = ENOSPC_WRITERS[writer]
    if where == "savefig":
        monkeypatch.setattr(Figure, "savefig", _half_then_no_space)
    else:
        monkeypatch.setattr(runs.os, where.split(".")[1], _no_space)
    with pytest.raises(WriteFailed) as err:
        if writer.startswith("write_json"):
            runs.write_json(target, {"new": "x" * 10_000})
        elif writer.startswith("write_text"):
            runs.write_text(target, "new " * 10_000)
        elif writer.startswith("atomic_path"):
            with runs.atomic_path(target) as tmp:
                Figure().savefig(tmp)
        else:
            runs.replace_dir(new, target)
    monkeypatch.undo()
    message = str(err.value)
    assert "\n" not in message and "No space left on device" in message and "run the same command again" in message
    assert str(target) in message
    assert (target / "adapter_config.json" if target.is_dir() else target).read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


# --------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_during_training_is_one_line_exit_130_and_leaves_nothing_behind(tmp_path, tiny_llama):  # noqa: F811
    run_dir = tmp_path / "run"
    make_run(run_dir, tiny_llama, max_steps=400, **{"train.eval_steps": 200, "train.save_steps": 200})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "qlora_helpers", "train", "--run-dir", str(run_dir)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_reaches_it)
    deadline = time.time() + 300
    while len(steps_logged(run_dir)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert last_error_line(err) == ("error: interrupted (Ctrl-C); run the same command again to resume (training "
                                    "carries on from its last checkpoint)")
    from qlora_helpers.runlock import acquire, release

    acquire(run_dir, "the next run")  # the training lock went with the process
    release(run_dir)
    assert steps_logged(run_dir)[:2] == [1, 2]


# --------------------------------------------------------------------------- the same seed, the same model
def test_the_same_seed_gives_the_same_adapter_bit_for_bit_and_another_seed_another(tmp_path, tiny_llama):  # noqa: F811
    """Issue 23: LoRA's A matrices were drawn from an unseeded generator, so train.seed repeated nothing. On the CPU
    the same seed now gives the same adapter file, byte for byte; another seed gives another."""
    from safetensors.torch import load_file

    from recipe import attach_lora, load_base

    files = {}
    for name, seed in (("first", 7), ("again", 7), ("other", 8)):
        run_dir = tmp_path / name
        make_run(run_dir, tiny_llama, max_steps=2, **{"train.seed": seed})
        done = train_cli(run_dir)
        assert done.returncode == 0, done.stderr[-3000:]
        files[name] = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert files["first"] == files["again"] and files["first"] != files["other"]
    # Not only the data order: the adapters start alike under one seed and apart under two.
    start = {}
    for name in ("first", "other"):
        stage = Stage(load_config(tmp_path / name), tmp_path / name)
        model = attach_lora(stage, load_base(stage))
        start[name] = {k: v.clone() for k, v in model.named_parameters() if "lora_A" in k}
    again = attach_lora(Stage(load_config(tmp_path / "again"), tmp_path / "again"), load_base(stage))
    assert all((again.get_parameter(k) == v).all() for k, v in start["first"].items())
    assert any((start["other"][k] != v).any() for k, v in start["first"].items())
    assert load_file(str(tmp_path / "first" / "adapter" / "adapter_model.safetensors")).keys()


# --------------------------------------------------------------------------- a longer run, never at a learning rate of 0
def test_a_finished_run_made_longer_is_refused_rather_than_trained_at_a_learning_rate_of_0(reference, tmp_path):
    """The cosine schedule ended at 0 at step 6; the Trainer, resumed with train.max_steps=8, would take step 7 at the
    optimizer's learning rate, 0. Refused in one line, early (start_stage) and where training starts."""
    import torch

    from qlora_helpers.stage import start_stage

    run_dir = copy_run(reference, tmp_path)
    last = torch.load(run_dir / "train" / "checkpoints" / "checkpoint-6" / "scheduler.pt", weights_only=True)
    assert max(last["_last_lr"]) == 0.0  # the case itself: the schedule's end
    overrides = {**{k: v for k, v in load_config(run_dir).flat().items() if k != "profile"}, "train.max_steps": 8}
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"finished its cosine learning-rate schedule at step 6 with a learning rate "
                                        r"of 0 \(checkpoint-6\).*start a new run with train\.max_steps=8"):
        start_stage("test", overrides, str(run_dir))
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before
    save_config(load_config(run_dir).copy_with({"train.max_steps": 8}), run_dir)
    with pytest.raises(UserError, match=r"with a learning rate of 0 \(checkpoint-6\)"):
        train_here(run_dir)
    assert not (run_dir / "train" / "checkpoints" / "checkpoint-7").exists()


def test_a_run_made_longer_before_its_schedule_ended_goes_on_above_0(reference, tmp_path):
    """Killed after checkpoint-4 of 6, then given train.max_steps=8: it resumes at step 5 on the schedule the Trainer
    builds for 8 steps (cosine, stretched), never at 0 before the new end."""
    run_dir = copy_run(reference, tmp_path)
    shutil.rmtree(run_dir / "train" / "checkpoints" / "checkpoint-6")
    shutil.rmtree(run_dir / "adapter")
    (run_dir / "train" / "metrics.json").unlink()
    save_config(load_config(run_dir).copy_with({"train.max_steps": 8}), run_dir)
    metrics = train_here(run_dir)
    assert metrics["steps"] == 8 and metrics["resumed_from_step"] == 4
    rates = {r["step"]: r["learning_rate"] for r in read_metrics_log(run_dir) if r["kind"] == "train"}
    assert all(rates[step] > 0 for step in (5, 6, 7, 8))


def test_a_constant_schedule_made_longer_goes_on_at_its_rate(tmp_path, tiny_llama):  # noqa: F811
    run_dir = tmp_path / "run"
    make_run(run_dir, tiny_llama, max_steps=2, **{"train.lr_scheduler": "constant"})
    assert train_here(run_dir)["steps"] == 2
    save_config(load_config(run_dir).copy_with({"train.max_steps": 4}), run_dir)
    assert train_here(run_dir)["steps"] == 4
    rates = [r["learning_rate"] for r in read_metrics_log(run_dir) if r["kind"] == "train"]
    assert rates == [load_config(run_dir).train.learning_rate] * 4
