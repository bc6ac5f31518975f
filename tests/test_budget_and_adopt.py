"""The whole-run time budget (qlora_helpers.budget) and continuing an earlier session's run from a read-only
input (qlora_helpers.adopt), through the public functions the stages call."""
import json
import os
import subprocess
import sys
import time

import pytest

from qlora_helpers import build_config
from qlora_helpers.adopt import attached_runs, copy_run
from qlora_helpers.budget import after_training_estimate, begin_session, current_session, training_deadline
from qlora_helpers.config import UserError
from qlora_helpers.stage import resolve_run_dir


# --------------------------------------------------------------------------- the budget
def test_the_reserve_for_kaggle_t4_counts_answers_loss_loads_and_the_merge():
    cfg = build_config("kaggle-t4")
    phi3 = 3_821_079_552  # Phi-3-mini's parameters
    parts = after_training_estimate(cfg, phi3)
    # 20 prompts in batches of 4, 128 new tokens, base and fine-tuned at 5 batch steps/s; the forms the export
    # scores (adapter on the plain base, the unmerged reference, both merged forms) at 10.
    assert parts["evaluation_answers_s"] == 2 * 5 * 128 / 5
    assert parts["export_answers_s"] == 4 * 5 * 128 / 10
    assert parts["evaluation_loss_s"] == 2 * 200 * 512 / 1000  # eval.max_val_examples x data.max_seq_len
    assert parts["model_loads_and_writes_s"] == pytest.approx(7 * 2 * phi3 / 100e6, abs=0.1)  # 6 loads + 1 write
    assert 15 * 60 < parts["total_s"] < 30 * 60
    without_merge = after_training_estimate(cfg.copy_with({"eval.export_merged": False}), phi3)
    assert without_merge["export_answers_s"] == 5 * 128 / 10 and without_merge["total_s"] < parts["total_s"]


def test_the_deadline_counts_from_the_session_start_that_the_run_directory_records(tmp_path):
    cfg = build_config("test", {"train.max_minutes": 60})
    assert training_deadline(build_config("test"), tmp_path) is None  # no budget
    alone = training_deadline(cfg, tmp_path, now=1000.0)  # no session: from now
    assert alone["counted_from"] == "training start"
    session = begin_session(tmp_path)
    assert session["owner_pid"] == os.getpid() and current_session(tmp_path) == session
    assert begin_session(tmp_path, owner_pid=1) == session  # a later stage of the same session keeps it
    later = training_deadline(cfg, tmp_path, now=session["started"] + 600)
    assert later["counted_from"] == "session start"
    assert later["deadline"] == pytest.approx(session["started"] + 3600 - later["reserved_after_training_s"])
    assert later["minutes_for_training"] == pytest.approx((3600 - 600 - later["reserved_after_training_s"]) / 60, abs=0.1)


def test_a_session_whose_process_has_ended_is_over(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        old = begin_session(tmp_path, owner_pid=child.pid)
        assert current_session(tmp_path) == old  # a stage in another process sees the owner's session
    finally:
        child.kill()
        child.wait()
    assert current_session(tmp_path) is None
    time.sleep(0.01)
    new = begin_session(tmp_path)
    assert new["started"] > old["started"] and new["owner_pid"] == os.getpid()
    (tmp_path / "session.json").write_text('{"started": 1, "owne')  # cut short by a kill: a new session
    assert current_session(tmp_path) is None


# --------------------------------------------------------------------------- an earlier session's run
def _run(folder, name, merged=True):
    run = folder / "runs" / name
    (run / "train" / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (run / "train" / "checkpoints" / "checkpoint-10" / "trainer_state.json").write_text("{}")
    (run / "config.json").write_text(json.dumps(build_config("test").to_dict()))
    if merged:
        (run / "export" / "merged").mkdir(parents=True)
        (run / "export" / "merged" / "model.safetensors").write_bytes(b"0" * 1000)
        (run / "export" / "metrics.json").write_text("{}")
    return run


@pytest.fixture
def kaggle(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_KAGGLE_ROOT", str(tmp_path))
    monkeypatch.setenv("QLORA_ON_KAGGLE", "1")
    (tmp_path / "working").mkdir()
    return tmp_path


def test_an_attached_earlier_run_is_copied_to_working_and_continued(kaggle):
    older = _run(kaggle / "input" / "notebooks" / "me" / "my-kernel", "20260101-120000-aaaa")
    newer = _run(kaggle / "input" / "notebooks" / "me" / "my-kernel", "20260102-090000-bbbb")
    _run(kaggle / "input" / "a" / "b" / "c" / "d" / "e", "20270101-000000-cccc")  # too deep to be an output
    os.chmod(newer / "config.json", 0o444)  # read-only, as a Kaggle input
    assert attached_runs() == [newer, older]
    run = resolve_run_dir("")
    assert run == kaggle / "working" / "runs" / newer.name
    assert (run / "train" / "checkpoints" / "checkpoint-10" / "trainer_state.json").is_file()
    assert (run / "export" / "metrics.json").is_file() and not (run / "export" / "merged").exists()
    (run / "config.json").write_text((run / "config.json").read_text())  # writable
    assert resolve_run_dir("") == run  # the next stage finds it in working, with no `latest` link there
    assert not (kaggle / "working" / "runs" / "latest").exists()


def test_a_run_dir_under_input_is_copied_and_one_that_is_no_run_is_refused(kaggle):
    older = _run(kaggle / "input" / "prev", "20260101-120000-aaaa", merged=False)
    assert resolve_run_dir(str(older)) == kaggle / "working" / "runs" / older.name
    with pytest.raises(UserError, match=r"no qlora-run.json \(or, from an older version, config.json\) there"):
        resolve_run_dir(str(kaggle / "input" / "prev"))


def test_nothing_attached_makes_a_new_run_and_off_kaggle_nothing_is_adopted(kaggle, monkeypatch):
    assert resolve_run_dir("").parent == kaggle / "working" / "runs"
    _run(kaggle / "input" / "prev", "20260101-120000-aaaa")
    monkeypatch.delenv("QLORA_ON_KAGGLE")
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    assert not resolve_run_dir("").is_relative_to(kaggle)


def test_a_copy_cut_short_leaves_no_run_behind(kaggle, monkeypatch):
    import shutil

    source = _run(kaggle / "input" / "prev", "20260101-120000-aaaa")

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    with pytest.raises(UserError, match="No space left on device"):
        copy_run(source)
    assert not [p for p in (kaggle / "working" / "runs").iterdir()]
