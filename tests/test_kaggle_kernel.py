"""The Kaggle kernel end to end, on the CPU, as Kaggle runs it: the committed kernel notebook executed top to bottom
(papermill) in a kernel whose Python is a throwaway environment, with /kaggle moved to a temporary folder
(QLORA_KAGGLE_ROOT) and the machine acting as Kaggle (QLORA_ON_KAGGLE=1). The install cell runs the installer of
a helper dataset that `make kaggle-dataset`'s code built into the fake /kaggle/input; the package is installed from
its wheel into the throwaway environment, never into this one. Then a second session: a new, empty
/kaggle/working, the first session's output attached read-only under /kaggle/input as Kaggle mounts a kernel's
output, and the same notebook continues the run from its checkpoint.

The throwaway environment sees this one's packages (a .pth file), so only what the kernel itself installs
lands in it; the CUDA-only extra (liger-kernel, which needs triton) is left out of this dataset's requirements.
"""
import hashlib
import json
import os
import sys
import sysconfig
import venv


from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import kaggle_build  # noqa: E402

KERNEL = REPO / "kaggle_kernel" / "qlora_pipeline.ipynb"
USER = "qlora-tester"
SLUG = "qlora-phi-3-t4-pipeline"


def throwaway_kernel(tmp_path):
    """A virtual environment layered on this one, registered as the Jupyter kernel 'qlora-kaggle-test'."""
    env = tmp_path / "kernel-venv"
    venv.create(env, with_pip=False, symlinks=True)
    (next((env / "lib").glob("python3*")) / "site-packages" / "this_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    spec = tmp_path / "jupyter" / "kernels" / "qlora-kaggle-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(env / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Kaggle test kernel", "language": "python"}))
    return env, tmp_path / "jupyter"


def fingerprint(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_kernel(out, root, overrides):
    import papermill as pm

    return pm.execute_notebook(str(KERNEL), str(out), parameters={"PROFILE": "test", "OVERRIDES": overrides},
                               kernel_name="qlora-kaggle-test", cwd=str(root / "working"), progress_bar=False)


def outputs(nb, cell_id):
    (cell,) = [c for c in nb.cells if c.get("id") == cell_id]
    return "".join(o.get("text", "") for o in cell.outputs)


def _all_output(nb):
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_the_kernel_runs_on_kaggle_then_a_new_version_continues_the_run(tmp_path, monkeypatch):
    env, jupyter = throwaway_kernel(tmp_path)
    first, second = tmp_path / "session1", tmp_path / "session2"
    for root in (first, second):
        (root / "working").mkdir(parents=True)
    dataset = kaggle_build.build_dataset(first / "input" / "datasets" / USER / "qlora-helpers", USER, gpu_extras=False)
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("QLORA_ON_KAGGLE", "1")
    monkeypatch.delenv("PYTHONPATH", raising=False)  # the kernel must import the package the install cell installed
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)

    # Session 1: the time budget is spent at once, so training stops after its first step, with a checkpoint
    # (and, to save time here, no merged model is exported: the second session exports it).
    monkeypatch.setenv("QLORA_KAGGLE_ROOT", str(first))
    nb = run_kernel(tmp_path / "session1.ipynb", first, {"train.max_minutes": 0.001, "eval.export_merged": False})
    assert "training has no time left: it stops after its first step" in _all_output(nb)
    install = outputs(nb, "kaggle-install")
    assert "qlora_helpers 0.2.0 is at " + str(env) in install, install
    assert "models still in memory: 0" in outputs(nb, "kaggle-free-02-03")  # nothing left for the training stage
    assert "models still in memory: 0" in outputs(nb, "kaggle-free-03-04")
    # a run nobody can type into (QLORA_BATCH, as Kaggle's Save & Run All) shows the playground as a table: no
    # widget keeps the fine-tuned model for later prompts, so nothing is left for the report
    assert "models still in memory: 0" in outputs(nb, "kaggle-free-04-05")
    (run,) = (first / "working" / "runs").iterdir()  # one run, and no `latest` link in Kaggle's output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train"]["stopped_by_time_budget"] and summary["train"]["steps"] == 1
    assert summary["train"]["processes"] == 1 and summary["train"]["examples_seen"] == 4
    assert "stopped at step 1 of 4" in (run / "report.md").read_text()

    # Session 2: a new version with the first one's output attached (read-only, as Kaggle mounts it).
    earlier = second / "input" / "notebooks" / USER / SLUG
    earlier.parent.mkdir(parents=True)
    (first / "working").rename(earlier)
    os.makedirs(second / "input" / "datasets" / USER)
    dataset.rename(second / "input" / "datasets" / USER / "qlora-helpers")
    before = fingerprint(second / "input")
    monkeypatch.setenv("QLORA_KAGGLE_ROOT", str(second))
    nb = run_kernel(tmp_path / "session2.ipynb", second, {})
    assert fingerprint(second / "input") == before, "the attached input was written to"
    continued = second / "working" / "runs" / run.name
    summary = json.loads((continued / "summary.json").read_text())
    assert summary["train"]["resumed_from_step"] == 1 and summary["train"]["steps"] == 4
    assert not summary["train"]["stopped_by_time_budget"]
    log = [json.loads(line) for line in (continued / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3, 4]
    assert (continued / "export" / "merged" / "config.json").exists()
    assert f"continuing the run {run.name} of an earlier session" in _all_output(nb)
