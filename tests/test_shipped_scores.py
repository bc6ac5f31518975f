"""The model that ships scores what the report says: the embedded profile end to end (`python -m qlora_helpers
run`, every notebook through papermill, about 10 minutes on 2 cores), then its numbers against the ones recorded
on this project's CPU machine.

Recorded 2026-12-02 by `make run` on a fresh clone (2-core Xeon, no GPU, fp32 compute), 60 held-out prompts,
greedy, 32 new tokens:

    form                 exact match   same answer as the evaluated 4-bit model
    4bit+adapter         60%           60/60   (what notebook 04's evaluation measured)
    original+adapter     50%           30/60
    merged-original      50%           30/60
    merged-dequantized   60%           60/60   (the default export, eval.merge_into=dequantized)

The adapter learned to correct the NF4-rounded weights; merged into the exact 16-bit weights it loses 10 points.
Two more runs on the same machine gave 62% / 50% / 50% / 62% and 60% / 50% / 50% / 60%: training on the CPU is
not bit-reproducible (validation loss 0.301-0.305), and a different CPU can change a near-tie here and there,
hence TOLERANCE. The shipped model answered as the evaluated one on all 60 prompts in each run, so WITHIN, the
issue's bar of 3 points (one prompt), is not loosened. With bf16 compute on the CPU (`auto` until 2026-12-02)
it agreed on only 54-57 of 60 answers and missed that bar once in CI: docs/benchmarks.md.

The run is the suite's shared `embedded_run` (tests/conftest.py).
"""
import json

import pytest

pytestmark = pytest.mark.xdist_group("embedded")  # the one embedded run: one process makes it for both modules

RECORDED = {"4bit+adapter": 0.60, "original+adapter": 0.50, "merged-original": 0.50, "merged-dequantized": 0.60}
TOLERANCE = 0.07  # about 4 of the 60 prompts
WITHIN = 0.03  # the shipped model against the evaluated one: at most one prompt apart


def test_every_form_scores_what_was_recorded(embedded_run):
    _, _, summary = embedded_run
    got = {form: s["exact_match"] for form, s in summary["forms"].items()}
    assert set(got) == set(RECORDED) | {"gguf-f16", "gguf-q8_0"}  # the GGUF forms: the next test
    for form, recorded in RECORDED.items():
        assert got[form] == pytest.approx(recorded, abs=TOLERANCE), (form, got)
    assert summary["eval"]["exact_match_after"] == got["4bit+adapter"]


def test_the_gguf_files_answer_as_the_evaluated_model(embedded_run):
    """eval.export_gguf's f16 and q8_0 files, answered by llama.cpp or (without llama-cpp-python, as on a fresh
    clone) transformers' GGUF loader: within the issue's 3 points of the evaluated model, in every table."""
    run_dir, _, summary = embedded_run
    evaluated = summary["eval"]["exact_match_after"]
    metrics = json.loads((run_dir / "export" / "metrics.json").read_text())
    files = {f["type"]: f for f in metrics["gguf"]["files"]}
    assert set(files) == {"f16", "q8_0"}
    report = (run_dir / "report.md").read_text()
    card = (run_dir / "export" / "merged" / "README.md").read_text()
    for t, f in files.items():
        s = summary["forms"][f"gguf-{t}"]
        assert abs(s["exact_match"] - evaluated) <= WITHIN, (t, s, evaluated)
        assert (run_dir / f["path"]).stat().st_size == f["bytes"] <= f["estimated_bytes"]
        assert f["metadata"]["eos_token_id"] == 2 and f["metadata"]["tokenizer_pre"] == "smollm"  # <|im_end|>
        assert (run_dir / f["modelfile"]).read_text().startswith("# Ollama: ollama create")
        row = f"| gguf-{t} | the shipped merged model as a GGUF file, {t}, answered by "
        assert row in report and row in card, t
        line = next(l for l in report.splitlines() if l.startswith(row))
        assert f"| {s['exact_match']:.0%} |" in line and line.endswith(f"| {s['same_answer_as_evaluated']}/60 |"), line


def test_the_default_export_scores_what_was_evaluated(embedded_run):
    run_dir, _, summary = embedded_run
    shipped, evaluated = summary["shipped"], summary["eval"]["exact_match_after"]
    assert shipped["form"] == "merged-dequantized" and summary["export"]["merged_into"] == "dequantized"
    assert abs(shipped["exact_match"] - evaluated) <= WITHIN, (shipped, evaluated)
    # the other merged form is measurably worse: why it is not the default
    assert summary["forms"]["merged-original"]["exact_match"] < shipped["exact_match"] - WITHIN
    assert summary["export"]["merge_verified"] is True
    report = (run_dir / "report.md").read_text()
    assert f"{evaluated:.0%}; shipped model: {shipped['exact_match']:.0%}" in report
    card = (run_dir / "export" / "merged" / "README.md").read_text()
    assert "| merged-dequantized (shipped) |" in card and "the dequantized NF4 weights the adapter was trained against" in card
