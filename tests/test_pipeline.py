"""The papermill pipeline end to end, through the CLI: the default profile's run that the suite makes once
(`embedded_run`, tests/conftest.py; test_shipped_scores checks its scores), and a failing stage on the `test` profile."""
import json

import pytest

from conftest import REPO, TOKEN_CANARY, run_cli


def assert_token_never_leaks(run_dir, proc):
    """Every file of the run directory (executed notebooks, config dump, logs, report) and the captured output."""
    leaked = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
              if p.is_file() and TOKEN_CANARY.encode() in p.read_bytes()]
    assert not leaked, f"the HF token was written to {leaked}"
    assert TOKEN_CANARY not in proc.stdout and TOKEN_CANARY not in proc.stderr, "the HF token was printed"


@pytest.mark.xdist_group("embedded")
def test_pipeline_runs_every_notebook_and_writes_the_summary(embedded_run):
    run_dir, proc, s = embedded_run
    assert_token_never_leaks(run_dir, proc)
    # The notebook kernels' own messages (ipykernel's log lines) stay in their logs, off the terminal.
    assert "[IPKernelApp]" not in proc.stderr and "without encryption" not in proc.stderr, proc.stderr[-3000:]
    executed = sorted(p.name for p in (run_dir / "notebooks").glob("*.ipynb"))
    assert executed == sorted(p.name for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert s["profile"] == "embedded"
    assert s["params"]["total"] > 130e6 and 0 < s["params"]["trainable"] < s["params"]["total"]
    assert s["memory"]["peak_gpu_reserved_gib"] is None and s["memory"]["peak_rss_gib"] > 0
    # qlora_helpers/recipes/embedded.yaml: 0.8 epochs of the 1,000 training examples, 8 a step
    assert s["train"]["steps"] == 100 and s["train"]["examples_seen"] == 800
    assert s["train"]["tokens_seen"] > 0 and s["train"]["wall_s"] > 0
    for key in ("val_loss_before", "val_loss_after", "exact_match_before", "exact_match_after"):
        assert s["eval"][key] is not None
    for key in ("metrics", "adapter", "report", "loss_plot"):
        assert (run_dir / s["artifacts"][key]).exists(), key
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    report = (run_dir / "report.md").read_text()
    assert "validation loss" in report and "transformers" in report
    lines = [json.loads(l) for l in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    every = json.loads((run_dir / "config.json").read_text())["train"]["logging_steps"]
    assert [l["step"] for l in lines if l["kind"] == "train"] == list(range(every, 101, every))
    assert_benchmarks_build_what_the_notebooks_built(run_dir)


def assert_benchmarks_build_what_the_notebooks_built(run_dir):
    """The notebooks' cells are the definition of the three configuration objects; benchmarks/recipe.py (the
    benchmarks, tests that train outside a notebook, inspect-model) builds them from the profile alone and must
    agree with what notebooks 02 and 03 saved in this run."""
    from peft import LoraConfig

    from qlora_helpers.inspect_model import meta_model, profile_lora_config, profile_quantization_config
    from qlora_helpers.model import load_model_config
    from qlora_helpers.runs import load_config
    from qlora_helpers.stage import Stage
    from qlora_helpers.train import training_datasets
    from recipe import training_arguments

    stage = Stage(load_config(run_dir), run_dir)
    saved_bnb = json.loads((run_dir / "model" / "quantization_config.json").read_text())
    assert json.loads(json.dumps(profile_quantization_config(stage).to_dict(), default=str)) == saved_bnb
    saved_lora = LoraConfig.from_pretrained(str(run_dir / "model" / "lora")).to_dict()
    built_lora = profile_lora_config(stage, meta_model(stage, load_model_config(stage))).to_dict()
    comparable = lambda d: {k: sorted(v) if isinstance(v, (set, list)) else v  # noqa: E731
                            for k, v in d.items() if k != "base_model_name_or_path"}  # get_peft_model fills that in
    assert comparable(built_lora) == comparable(saved_lora)
    saved_args = json.loads((run_dir / "train" / "training_args.json").read_text())
    built_args = json.loads(json.dumps(training_arguments(stage, len(training_datasets(stage)[0]), world=1).to_dict(),
                                       default=str))
    differ = {k: (built_args.get(k), v) for k, v in saved_args.items()
              if k not in ("disable_tqdm", "hub_token") and built_args.get(k) != v}
    assert not differ, f"benchmarks/recipe.py builds other TrainingArguments than notebook 03: {differ}"


def test_a_failing_stage_names_the_notebook_and_the_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "2 + 2?", "output": 4}\n')  # found, but wrong inside
    proc = run_cli("run", "--profile", "test", "--run-dir", str(tmp_path / "run"),
                   "-p", f"data.source={tmp_path / 'bad.jsonl'}")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "01_data_preparation.ipynb failed in cell" in last and "DataError" in last and "bad.jsonl" in last
    assert not (tmp_path / "run" / "notebooks" / "02_quantized_model_loading.ipynb").exists()
    # A file that is not there at all is refused before a run directory is made.
    proc = run_cli("run", "--profile", "test", "--run-dir", str(tmp_path / "run2"),
                   "-p", f"data.source={tmp_path / 'missing.jsonl'}")
    assert proc.returncode == 2 and "missing.jsonl': no such file or folder" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run2").exists()
