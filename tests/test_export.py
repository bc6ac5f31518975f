"""Evaluation scoring and the export: an adapter that loads onto an unquantized base in a fresh process, a merged
16-bit model that answers like base + adapter, a hub push that never runs by accident and never shows a token."""
import json
import subprocess
import sys

import pytest

from qlora_helpers import Stage, build_config
from qlora_helpers.config import ConfigError
from qlora_helpers.data import load_tokenizer
from qlora_helpers.runs import save_config
from qlora_helpers.sources import embedded_model_dir

FAKE_TOKEN = "hf_FAKEtoken1234567890abcdef"


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory):
    """One tiny QLoRA run through the helpers (data, 2 training steps on the NF4 base, export), made once."""
    from qlora_helpers.data import prepare_data
    from recipe import attach_lora, build_trainer, export, load_base, save_profile_configs, train

    run_dir = tmp_path_factory.mktemp("export-run")
    stage = Stage(build_config("test", {"train.max_steps": 2}), run_dir)
    save_config(stage.cfg, run_dir)
    tokenizer = load_tokenizer(stage)
    prepare_data(stage, tokenizer)
    save_profile_configs(stage)
    model = attach_lora(stage, load_base(stage))
    train(stage, build_trainer(stage, model, tokenizer))
    del model
    return stage, run_dir, export(stage)


# --------------------------------------------------------------------------- scoring
def test_exact_match_forgives_case_and_a_full_stop_except_where_case_is_the_task():
    from qlora_helpers.evaluate import is_exact

    assert is_exact(" Odd. ", "odd", "parity")
    assert is_exact("35", "35", "add") and not is_exact("35 apples", "35", "add")
    assert is_exact("APPLE", "APPLE", "uppercase")
    assert not is_exact("apple", "APPLE", "uppercase") and not is_exact("Apple", "APPLE", "uppercase")


def test_score_counts_exact_match_per_task_and_the_stop_rate():
    from qlora_helpers.evaluate import score

    examples = [{"response": "odd", "task": "parity"}, {"response": "even", "task": "parity"},
                {"response": "CAT", "task": "uppercase"}, {"response": "7", "task": "add"}]
    answers = [{"answer": "Odd.", "stopped": True}, {"answer": "odd", "stopped": True},
               {"answer": "cat", "stopped": False}, {"answer": "7", "stopped": True}]
    s = score(answers, examples, checkable=True)
    assert s["exact_match"] == 0.5 and s["stop_rate"] == 0.75
    assert s["exact_match_by_task"] == {"add": 1.0, "parity": 0.5, "uppercase": 0.0}
    free_form = score(answers, [{"response": e["response"], "task": ""} for e in examples], checkable=False)
    assert free_form["exact_match"] is None and free_form["exact_match_by_task"] is None


def test_rouge_l_is_one_for_the_reference_and_zero_for_nothing_in_common():
    from qlora_helpers.evaluate import rouge_l

    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == 1.0
    assert rouge_l(["dogs bark"], ["the cat sat"]) == 0.0
    assert 0 < rouge_l(["the cat sat"], ["the cat sat on the mat"]) < 1


def test_answers_are_marked_where_cut_at_the_budget_or_exact():
    from qlora_helpers.evaluate import marked

    row = {"base": "To solve this", "base_stopped": False, "base_exact": False,
           "finetuned": "87", "finetuned_stopped": True, "finetuned_exact": True}
    assert marked(row, "base") == "To solve this …" and marked(row, "finetuned") == "87 ✓"


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("override, fragment", [
    ("eval.push_to_hub=not a repo", "config key 'eval.push_to_hub'"),
    ("eval.push_to_hub=https://huggingface.co/me/x", "config key 'eval.push_to_hub'"),
    ("eval.export_dtype=float32", "config key 'eval.export_dtype': 'float32' is not one of"),
])
def test_bad_export_keys_fail_naming_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_config("test", [override])


# --------------------------------------------------------------------------- the adapter, in a fresh process
LOAD_ADAPTER = r"""
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base_path, adapter_path, prompt = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(base_path)
base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16)
ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
with torch.no_grad():
    base_logits = base(input_ids=ids).logits.float()
model = PeftModel.from_pretrained(base, adapter_path)
with torch.no_grad():
    logits = model(input_ids=ids).logits.float()
    out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
print(json.dumps({
    "lora_layers": sum(1 for n, _ in model.named_modules() if n.endswith("lora_A")),
    "quantized_layers": sum(1 for m in model.modules() if "4bit" in type(m).__name__ or "8bit" in type(m).__name__),
    "dtype": str(next(model.base_model.model.model.parameters()).dtype),
    "new_tokens": out.shape[1] - ids.shape[1],
    "text": tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
    "adapter_moves_logits_by": (logits - base_logits).abs().max().item(),
}))
"""


def test_adapter_loads_onto_an_unquantized_base_in_a_fresh_process(exported_run):
    from qlora_helpers.evaluate import held_out_prompts, held_out_texts

    stage, run_dir, _ = exported_run
    tokenizer = load_tokenizer(stage)
    examples, _, _ = held_out_prompts(stage, tokenizer)
    prompt = held_out_texts(stage, tokenizer, examples)[0]  # as a user would type it, in a fresh process
    proc = subprocess.run([sys.executable, "-c", LOAD_ADAPTER, str(embedded_model_dir()), str(run_dir / "adapter"), prompt],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["quantized_layers"] == 0 and got["dtype"] == "torch.bfloat16"
    assert got["lora_layers"] == 30 * 7  # every linear layer of the 30 blocks
    assert got["new_tokens"] > 0 and got["text"].strip()
    assert got["adapter_moves_logits_by"] > 0


def test_the_adapter_folder_has_what_peft_needs(exported_run):
    _, run_dir, metrics = exported_run
    files = {p.name for p in (run_dir / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert metrics["adapter"]["path"] == "adapter" and metrics["adapter"]["r"] == 16
    assert len(metrics["adapter"]["target_modules"]) == 7


# --------------------------------------------------------------------------- the merged model
def test_merged_export_is_16_bit_with_its_tokenizer_and_no_quantization(exported_run):
    from safetensors import safe_open

    _, run_dir, metrics = exported_run
    merged = run_dir / "export" / "merged"
    assert metrics["merged"] == {**metrics["merged"], "path": "export/merged", "dtype": "float16"}
    config = json.loads((merged / "config.json").read_text())
    assert config["dtype"] == "float16" and "quantization_config" not in config
    assert (merged / "tokenizer.json").exists() and (merged / "tokenizer_config.json").exists()
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
        names = list(f.keys())
    assert dtypes == {"F16"}, dtypes
    assert not any("lora" in n for n in names)


def test_export_verification_passed_and_was_measured(exported_run):
    _, _, metrics = exported_run
    check = metrics["verification"]
    assert check["passed"] and check["compared_in"] == "float32"
    assert check["reference"] == "the unmerged adapter on the dequantized base weights"
    # an answer may part only where the two best tokens are within the logit error of each other (a near-tie)
    assert check["prompts"] == 4 and check["greedy_identical"] + len(check["near_ties"]) == 4
    assert check["differing_beyond_ties"] == []
    assert all(t["margin"] <= 2 * check["max_abs_logit_diff"] for t in check["near_ties"])
    assert check["max_abs_logit_diff"] <= check["tolerance"]
    assert check["tolerance"] == pytest.approx(0.5 * check["adapter_effect_max_abs_logit"], abs=1e-4)  # lost or doubled: 100%
    assert check["max_probability_factor"] == pytest.approx(2.718281828 ** (2 * check["max_abs_logit_diff"]), rel=1e-3)


def test_every_form_that_can_ship_is_scored_and_the_merged_model_has_a_card(exported_run):
    from qlora_helpers.artifacts import FORMS

    _, run_dir, metrics = exported_run
    forms = metrics["forms"]
    assert forms["shipped"] == "merged-dequantized" and forms["prompts"] == 4
    # notebook 04's evaluation did not run in this fixture, so the 4-bit row is not there
    assert set(forms["scores"]) == set(FORMS) - {"4bit+adapter"}
    for s in forms["scores"].values():
        assert 0 <= s["rouge_l"] <= 1 and 0 <= s["stop_rate"] <= 1 and 0 <= s["exact_match"] <= 1
    card = (run_dir / "export" / "merged" / "README.md").read_text()
    assert "merged into the dequantized NF4 weights the adapter was trained against" in card
    assert "| merged-dequantized (shipped) |" in card and "merged-original" in card


def test_merged_model_answers_like_the_dequantized_base_plus_adapter(exported_run):
    """Checked here with plain transformers and peft, not the export's own check: the base loaded in NF4 as in
    training and dequantized, the adapter on it unmerged, against the merged model; greedy answers to the test
    prompts are identical and the logits along them agree, both compared in float32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_helpers.evaluate import held_out_prompts
    from qlora_helpers.model import load_quantization_config

    stage, run_dir, _ = exported_run
    cfg = stage.cfg
    tokenizer = load_tokenizer(stage)
    _, prompts, stop_ids = held_out_prompts(stage, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), quantization_config=load_quantization_config(stage),
                                                dtype=stage.torch_dtype).dequantize(dtype=torch.float32).float()
    reference = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "merged", dtype=torch.float32).eval()

    def greedy_and_logits(model, ids):
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=cfg.eval.max_new_tokens, do_sample=False,
                                 eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
            return out[0, ids.shape[1]:].tolist(), out, model(input_ids=out).logits[0, ids.shape[1] - 1:]

    identical = 0
    for prompt in prompts:
        ids = torch.tensor([prompt])
        ref_tokens, ref_sequence, ref_logits = greedy_and_logits(reference, ids)
        merged_tokens, _, _ = greedy_and_logits(merged, ids)
        with torch.no_grad():
            merged_logits = merged(input_ids=ref_sequence).logits[0, ids.shape[1] - 1:]
            with reference.disable_adapter():
                base_logits = reference(input_ids=ref_sequence).logits[0, ids.shape[1] - 1:]
        error = (merged_logits - ref_logits).abs().max().item()
        assert error < 0.5 * (ref_logits - base_logits).abs().max().item(), (prompt, error)
        if merged_tokens == ref_tokens:
            identical += 1
        else:  # they may part only where the reference's two best tokens are within the logit error (a near-tie)
            at = next(i for i, (a, b) in enumerate(zip(ref_tokens, merged_tokens)) if a != b)
            margin = (ref_logits[at, ref_tokens[at]] - ref_logits[at, merged_tokens[at]]).item()
            assert 0 <= margin <= 2 * error, (prompt, at, margin, error)
    assert identical >= len(prompts) - 1


def test_merge_into_original_merges_into_the_exact_16_bit_weights(exported_run, tmp_path):
    """eval.merge_into=original on the same adapter: the merged weights are the original ones plus the update,
    and the check compares against the adapter on the unquantized base."""
    import shutil

    from safetensors import safe_open

    from recipe import export

    stage, run_dir, metrics = exported_run
    other = tmp_path / "run"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("export"))
    stage = Stage(stage.cfg.copy_with({"eval.merge_into": "original"}), other)
    save_config(stage.cfg, other)
    got = export(stage)
    assert got["verification"]["passed"]
    assert got["verification"]["reference"] == "the unmerged adapter on the original base weights"
    assert got["forms"]["shipped"] == "merged-original" and got["merged"]["merged_into"] == "original"
    # the two runs scored the same forms alike: one adapter, the same prompts
    assert got["forms"]["scores"]["original+adapter"] == metrics["forms"]["scores"]["original+adapter"]
    # an embedding (never quantized) is the same in both; a quantized projection differs by the NF4 rounding
    tensors = {}
    for name in ("dequantized", "original"):
        folder = (run_dir if name == "dequantized" else other) / "export" / "merged"
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            tensors[name] = {k: f.get_tensor(k).float() for k in ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight")}
    assert (tensors["dequantized"]["model.embed_tokens.weight"] == tensors["original"]["model.embed_tokens.weight"]).all()
    assert (tensors["dequantized"]["model.layers.0.mlp.down_proj.weight"]
            != tensors["original"]["model.layers.0.mlp.down_proj.weight"]).float().mean() > 0.5


# --------------------------------------------------------------------------- the hub and the token
@pytest.fixture
def no_token(monkeypatch):
    """No $HF_TOKEN and no Kaggle secrets client, whatever the machine running the tests has."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setitem(sys.modules, "kaggle_secrets", None)  # import fails as outside Kaggle


@pytest.fixture
def hub_unreachable(monkeypatch):
    """Any call to the hub fails the test: nothing may be attempted."""
    from huggingface_hub import HfApi

    def refuse(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    monkeypatch.setattr(HfApi, "upload_folder", refuse)


def test_hf_token_comes_from_the_environment_then_kaggle_secrets(monkeypatch, no_token):
    import types

    from qlora_helpers.secrets import hf_token

    assert hf_token() is None
    monkeypatch.setenv("HF_TOKEN", f" {FAKE_TOKEN}\n")
    assert hf_token() == FAKE_TOKEN
    monkeypatch.delenv("HF_TOKEN")

    class Client:
        secrets = {"HF_TOKEN": FAKE_TOKEN}

        def get_secret(self, label):
            if label not in self.secrets:
                raise RuntimeError(f"secret {label} not attached")
            return self.secrets[label]

    monkeypatch.setitem(sys.modules, "kaggle_secrets", types.SimpleNamespace(UserSecretsClient=Client))
    assert hf_token() == FAKE_TOKEN
    Client.secrets = {}
    assert hf_token() is None  # Kaggle's "not attached" error means no token, and its text goes nowhere


def test_nothing_is_pushed_or_looked_up_when_push_to_hub_is_empty(exported_run, monkeypatch, hub_unreachable):
    import qlora_helpers.secrets
    from qlora_helpers.export import push_adapter

    stage, run_dir, metrics = exported_run
    monkeypatch.setattr(qlora_helpers.secrets, "hf_token", lambda: pytest.fail("the token was looked up"))
    assert stage.cfg.eval.push_to_hub == "" and push_adapter(stage) is None
    assert metrics["hub"] is None


def test_push_without_a_token_fails_in_one_line_saying_how_to_provide_it(exported_run, no_token, hub_unreachable):
    from qlora_helpers.config import UserError
    from qlora_helpers.export import HubTokenMissing, push_adapter

    _, run_dir, _ = exported_run
    stage = Stage(build_config("test", {"eval.push_to_hub": "someone/my-adapter"}), run_dir)
    with pytest.raises(HubTokenMissing) as err:
        push_adapter(stage)
    message = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in message
    assert "someone/my-adapter" in message and "HF_TOKEN" in message and "Kaggle" in message and "Secrets" in message


def test_a_missing_token_fails_the_export_before_the_merge(exported_run, monkeypatch, no_token, hub_unreachable):
    import qlora_helpers.export as export
    import recipe

    _, run_dir, _ = exported_run
    monkeypatch.setattr(export, "merge_base", lambda *a: pytest.fail("merged before checking for a token"))
    with pytest.raises(export.HubTokenMissing, match="HF_TOKEN"):
        recipe.export(Stage(build_config("test", {"eval.push_to_hub": "someone/my-adapter"}), run_dir))


def test_a_failed_push_never_shows_the_token(exported_run, monkeypatch, capsys):
    from huggingface_hub import HfApi

    from qlora_helpers.export import HubPushFailed, push_adapter

    _, run_dir, _ = exported_run
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)

    def leaky(self, *args, **kwargs):  # a hub error that echoes the token back
        raise RuntimeError(f"401 Unauthorized: invalid token {FAKE_TOKEN}\nmore detail")

    monkeypatch.setattr(HfApi, "create_repo", leaky)
    stage = Stage(build_config("test", {"eval.push_to_hub": "someone/my-adapter"}), run_dir)
    with pytest.raises(HubPushFailed) as err:
        push_adapter(stage)
    assert FAKE_TOKEN not in str(err.value) and "\n" not in str(err.value) and "401 Unauthorized" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    out = capsys.readouterr()
    assert FAKE_TOKEN not in out.out + out.err


def test_a_push_uploads_the_adapter_without_the_pickle_and_names_the_hub_base(exported_run, monkeypatch, tmp_path):
    from huggingface_hub import HfApi

    from qlora_helpers.export import push_adapter

    _, run_dir, _ = exported_run
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    uploaded = {}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        from pathlib import Path

        uploaded.update(files=sorted(p.name for p in Path(folder_path).iterdir()),
                        config=json.loads((Path(folder_path) / "adapter_config.json").read_text()))
        return type("Commit", (), {"oid": "abc123"})()

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    cfg = build_config("test", {"eval.push_to_hub": "someone/my-adapter"})
    cfg.model.name = "HuggingFaceTB/SmolLM2-135M-Instruct"  # as if the base had come from the hub
    result = push_adapter(Stage(cfg, run_dir))
    assert result == {"repo_id": "someone/my-adapter", "url": "https://huggingface.co/someone/my-adapter",
                      "commit": "abc123", "private": True}
    assert "adapter_model.safetensors" in uploaded["files"] and "training_args.bin" not in uploaded["files"]
    assert uploaded["config"]["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert FAKE_TOKEN not in json.dumps(result)


# --------------------------------------------------------------------------- the report
def test_report_shows_the_export_and_says_what_was_not_measured(exported_run):
    from qlora_helpers.report import NM, write_report

    _, run_dir, _ = exported_run
    summary = write_report(run_dir)  # notebook 04's evaluation did not run on this run directory
    assert summary["export"] == {"adapter": "adapter", "merged": "export/merged", "merged_dtype": "float16",
                                 "merged_into": "dequantized", "merge_verified": True, "hub_url": None}
    assert summary["shipped"]["form"] == "merged-dequantized"
    assert set(summary["forms"]) == {"original+adapter", "merged-original", "merged-dequantized"}
    assert summary["artifacts"]["merged_model"] == "export/merged"
    assert summary["eval"]["val_loss_before"] is None
    report = (run_dir / "report.md").read_text()
    assert report.index("## Summary") < report.index("## Export") < report.index("## Appendix")
    assert "`export/merged/` (float16, merged into the dequantized base weights)" in report
    assert "verified: greedy answers identical to the unmerged adapter on the dequantized base weights" in report
    assert "| merged-dequantized (shipped) |" in report
    assert f"validation loss, base → fine-tuned | {NM} → {NM}" in report
    assert "notebook 04 did not run" in report
    assert FAKE_TOKEN not in report


def test_the_report_still_reads_an_export_written_by_the_previous_version(exported_run, tmp_path):
    """A Kaggle run continued by a newer kernel (adopt.py) keeps the export/metrics.json the old version wrote."""
    import shutil

    from qlora_helpers.report import write_report

    _, run_dir, metrics = exported_run
    old = tmp_path / "run"
    shutil.copytree(run_dir, old, ignore=shutil.ignore_patterns("merged"))
    check = {k: v for k, v in metrics["verification"].items()
             if k not in ("reference", "tolerance_share", "tolerance_floor", "max_probability_factor", "stored_as")}
    merged = {k: v for k, v in metrics["merged"].items() if k != "merged_into"}
    (old / "export" / "metrics.json").write_text(json.dumps({**metrics, "merged": merged, "verification": check,
                                                             "forms": None}))
    summary = write_report(old)
    assert summary["shipped"] is None and summary["export"]["merged_into"] is None
    assert "verified: greedy answers identical to base + adapter" in (old / "report.md").read_text()


# --------------------------------------------------------------------------- the playground (notebook 04)
def test_the_playground_answers_with_and_without_the_adapter(exported_run, monkeypatch):
    from peft import PeftModel

    import qlora_helpers.places as places
    from qlora_helpers.model import load_base_model
    from qlora_helpers.playground import answer_pair, playground

    stage, run_dir, _ = exported_run
    tokenizer = load_tokenizer(stage)
    model = PeftModel.from_pretrained(load_base_model(stage), str(run_dir / "adapter")).eval()  # notebook 04's cell
    answers = answer_pair(stage, model, tokenizer, "What is 2 + 3? Answer with the number only.", 8)
    assert set(answers) == {"base", "fine-tuned"}
    assert all(isinstance(a["answer"], str) and a["new_tokens"] <= 8 for a in answers.values())
    # unattended (papermill, nbmake, a Kaggle batch run): one held-out prompt's two answers as a table
    static = playground(stage, model, tokenizer)._repr_html_()
    assert "<b>prompt</b>" in static and "<b>base</b>" in static and "<b>fine-tuned</b>" in static
    monkeypatch.setattr(places, "interactive", lambda: True)
    widget = playground(stage, model, tokenizer)  # builds without a frontend and waits for nothing
    pick, text, (budget, button), out = widget.children[0], widget.children[1], widget.children[2].children, widget.children[3]
    assert pick.options[0][1] == -1 and len(pick.options) == stage.cfg.eval.num_prompts + 1
    pick.value = 0  # picking a held-out prompt fills the text box
    assert text.value and budget.value == stage.cfg.eval.max_new_tokens
    button.click()
    shown = "".join(str(o.get("data", {}).get("text/html", "")) for o in out.outputs)
    assert "<b>base</b>" in shown and "<b>fine-tuned</b>" in shown
