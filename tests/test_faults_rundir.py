"""Fault injection, whose folder it is (issue 23): a run, a stage run by hand, the train command and the lock write only
into a folder that does not exist yet, an empty one, or a run directory this tool made (qlora-run.json, written
first). A project folder, a model folder, the repository checkout and anything else are refused in one line naming
the folder, and nothing in them changes."""
import json
import os
import subprocess
import sys

import pytest

from qlora_helpers import build_config, start_stage
from qlora_helpers.runs import MARKER, NotARunDir, REPO_ROOT, is_marked, save_config

from conftest import REPO, run_cli
from test_faults_cli import one_error_line, tree


def _project(tmp):
    """A person's project folder: their data where stage 1 would write its own."""
    folder = tmp / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text(json.dumps({"instruction": "2 + 2?", "output": "4"}) + "\n")
    return folder


def _model(tmp):
    """A model folder: its config.json is no run's (read as one it would have been all defaults, so 'the same')."""
    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    return folder


def _model_with_data(tmp):
    folder = _model(tmp)
    (folder / "data").mkdir()
    (folder / "data" / "train.jsonl").write_text("{}\n")
    return folder


def _only_a_run_config(tmp):
    """A saved run config copied into a folder of other things: the config alone does not make a run directory."""
    folder = _project(tmp)
    save_config(build_config("test"), tmp / "donor")
    (folder / "config.json").write_text((tmp / "donor" / "config.json").read_text())
    return folder


def _fake_marker(tmp):
    folder = _project(tmp)
    (folder / MARKER).write_text('{"made_by": "someone else"}')
    return folder


FOREIGN = {"a project folder": _project, "a model folder": _model, "a model folder with data/": _model_with_data,
           "a run config among other files": _only_a_run_config, "a marker of another tool": _fake_marker}


@pytest.mark.parametrize("kind", FOREIGN)
def test_run_refuses_a_folder_it_did_not_make_and_changes_nothing(kind, tmp_path):
    folder = FOREIGN[kind](tmp_path)
    before = tree(folder)
    done = run_cli("run", "--profile", "test", "--run-dir", str(folder), timeout=300)
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and f"run directory {folder}: refused" in line, line
    assert tree(folder) == before and not (folder / ".lock").exists()


@pytest.mark.parametrize("kind", FOREIGN)
def test_every_stage_by_hand_refuses_it_too(kind, tmp_path):
    folder = FOREIGN[kind](tmp_path)
    before = tree(folder)
    with pytest.raises(NotARunDir, match="refused"):
        start_stage("test", {}, str(folder))  # the first cell of every notebook
    done = run_cli("train", "--run-dir", str(folder))
    assert done.returncode == 2 and "refused" in one_error_line(done.stderr), done.stderr[-2000:]
    from qlora_helpers.runlock import acquire

    with pytest.raises(NotARunDir):
        acquire(folder, "a stage that writes")  # the lock is never the first file in a folder
    assert tree(folder) == before


@pytest.mark.parametrize("where", [".", "notebooks", "qlora_helpers", "runs", "a-new-folder-in-the-checkout"])
def test_the_repository_checkout_is_no_run_directory(where, tmp_path):
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a checkout")
    target = REPO_ROOT / where
    existed = target.exists()
    before = tree(target) if existed and where != "." else None
    done = run_cli("run", "--profile", "test", "--run-dir", where, cwd=REPO)
    assert done.returncode == 2 and "is inside the repository checkout" in one_error_line(done.stderr)
    assert target.exists() == existed and (before is None or tree(target) == before)
    with pytest.raises(NotARunDir, match="inside the repository checkout"):
        start_stage("test", {}, str(target))


def test_a_new_or_empty_folder_is_marked_before_anything_else_is_written(tmp_path, monkeypatch):
    written = []
    import qlora_helpers.runs as runs

    real = runs.write_text
    monkeypatch.setattr(runs, "write_text", lambda path, text: (written.append(os.path.basename(path)), real(path, text)))
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (tmp_path / "new" / "run", empty):
        start_stage("test", {}, str(folder))
        assert is_marked(folder) and written[0] == MARKER
        written.clear()
    assert start_stage("test", {}, str(empty)).run_dir == empty  # marked: the next stage goes ahead


def test_a_run_directory_from_before_the_marker_is_recognised_strictly_and_marked(tmp_path, capsys):
    run = tmp_path / "old-run"
    save_config(build_config("test"), tmp_path / "donor")
    (run / "data").mkdir(parents=True)
    (run / "config.json").write_text((tmp_path / "donor" / "config.json").read_text())
    (run / "data" / "metrics.json").write_text(json.dumps({"rows_read": 200}))
    (run / "data" / "train.jsonl").write_text("{}\n")
    (run / "notebooks").mkdir()
    assert start_stage("test", {}, str(run)).run_dir == run
    assert is_marked(run) and "from before qlora-run.json existed" in capsys.readouterr().err
    # Stage 1 never finished (no metrics.json) is not enough to tell it from a person's folder:
    half = tmp_path / "half"
    (half / "data").mkdir(parents=True)
    (half / "config.json").write_text((run / "config.json").read_text())
    (half / "data" / "train.jsonl").write_text("{}\n")
    with pytest.raises(NotARunDir, match=r"data/ holds no stage 1 metrics"):
        start_stage("test", {}, str(half))


def test_runs_latest_pointing_at_a_foreign_folder_is_refused(tmp_path, monkeypatch):
    from qlora_helpers import runs

    monkeypatch.setattr(runs, "runs_root", lambda: tmp_path / "runs")
    (tmp_path / "runs").mkdir()
    project = _project(tmp_path)
    (tmp_path / "runs" / "latest").symlink_to(project)
    before = tree(project)
    with pytest.raises(NotARunDir, match=f"run directory {project}: refused"):
        start_stage("test", {}, "")  # RUN_DIR empty: runs/latest
    assert tree(project) == before


def test_a_kaggle_copy_keeps_the_marker_and_never_copies_over_another_folder(tmp_path, monkeypatch):
    from qlora_helpers.adopt import copy_run
    from qlora_helpers.stage import resolve_run_dir

    monkeypatch.setenv("QLORA_KAGGLE_ROOT", str(tmp_path))
    monkeypatch.setenv("QLORA_ON_KAGGLE", "1")
    source = tmp_path / "input" / "prev" / "runs" / "20260101-120000-aaaa"
    save_config(build_config("test"), source)
    copied = resolve_run_dir("")
    assert copied == tmp_path / "working" / "runs" / source.name and is_marked(copied)
    other = tmp_path / "working" / "runs" / "20260202-000000-bbbb"
    _project(tmp_path / "x")
    os.rename(tmp_path / "x" / "project", other)
    before = tree(other)
    clash = _renamed(source, other.name)  # an earlier run attached under the name of a folder already there
    with pytest.raises(NotARunDir):
        copy_run(clash)
    assert tree(other) == before


def _renamed(source, name):
    target = source.with_name(name)
    os.rename(source, target)
    return target


def test_two_stages_claiming_one_new_folder_at_once_both_get_a_run_directory(tmp_path):
    code = "import sys\nfrom qlora_helpers import start_stage\nstart_stage('test', {}, sys.argv[1])\nprint('ok')"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    # Both are this tool's: one waits for or loses the lock race only while config.json is written.
    assert all(out.strip() == "ok" or "is in use by" in err for out, err in outs), outs
    assert is_marked(tmp_path / "run")
