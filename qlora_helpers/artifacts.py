"""What can ship, and what each form scores.

A QLoRA adapter is trained against the *NF4-rounded* base weights: every forward pass of training
dequantizes the 4-bit weights and adds the adapter's update to that. The forms a user can ship put the same
adapter next to different base weights, so they need not answer alike:

* ``4bit+adapter``: the adapter on the 4-bit base, as trained; what notebook 04's evaluation measures.
* ``original+adapter``: the adapter on the ordinary, unquantized base (``PeftModel.from_pretrained``).
* ``merged-original``: the adapter merged into the exact 16-bit base weights, which it never saw.
* ``merged-dequantized``: the adapter merged into the dequantized NF4 weights, the weights it was trained
  against, saved in 16-bit. ``eval.merge_into`` picks which merged form is exported (default this one).
* ``gguf-<type>``: the exported merged model converted to GGUF (``eval.export_gguf``), answered by llama.cpp or
  transformers' GGUF loader (qlora_helpers.gguf_export); each row says which.

The export stage scores every form on the held-out prompts with the evaluation's decoding and token budget,
and counts how many answers are exactly the evaluated model's. This module names the forms, scores them
and writes the merged model's card; qlora_helpers.export does the loading and merging.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .evaluate import score

FORMS = {
    "4bit+adapter": "the adapter on the 4-bit NF4 base, as trained (what the evaluation measured)",
    "original+adapter": "the adapter on the unquantized base",
    "merged-original": "merged into the exact 16-bit base weights",
    "merged-dequantized": "merged into the dequantized NF4 weights (the weights it was trained against), saved in 16-bit",
}
EVALUATED = "4bit+adapter"


def merged_form(merge_into: str) -> str:
    return f"merged-{merge_into}"


def shipped_form(export_merged: bool, merge_into: str) -> str:
    """The form a user takes away: the merged model when one is exported, else the adapter for the plain base."""
    return merged_form(merge_into) if export_merged else "original+adapter"


def score_form(answers: list[dict], examples: list[dict], evaluated: list[str] | None) -> dict[str, Any]:
    """One form's scores on the held-out prompts, and on how many it gives exactly the evaluated model's answer."""
    out = score(answers, examples, checkable=all(e.get("task") for e in examples))
    out["same_answer_as_evaluated"] = (sum(a["answer"] == b for a, b in zip(answers, evaluated))
                                       if evaluated and len(evaluated) == len(answers) else None)
    return out


def evaluated_scores(eval_metrics: dict[str, Any], prompts: int) -> dict[str, Any] | None:
    """The 4-bit model's row, from eval/metrics.json: None if the evaluation did not run on these prompts."""
    tuned = eval_metrics.get("finetuned")
    if not tuned or eval_metrics.get("prompts") != prompts:
        return None
    keys = ("rouge_l", "stop_rate", "exact_match", "exact_match_by_task")
    return {**{k: tuned.get(k) for k in keys}, "same_answer_as_evaluated": prompts}


def forms_rows(forms: dict[str, dict[str, Any]], shipped: str, prompts: int) -> list[dict[str, Any]]:
    """One row per form, the evaluated one first: what notebook 04, report.md and the model card show."""
    pct = lambda v: "n/a" if v is None else f"{v:.0%}"  # noqa: E731
    rows = []
    # The forms above, then any other (the GGUF files, qlora_helpers.gguf_export), which say what they are.
    for form in list(FORMS) + [f for f in forms if f not in FORMS]:
        s = forms.get(form)
        if s is None:
            continue
        what = FORMS.get(form) or s.get("what", form)
        same = s.get("same_answer_as_evaluated")
        rows.append({"form": form + (" (shipped)" if form == shipped else ""), "what it is": what,
                     "exact match": pct(s.get("exact_match")), "ROUGE-L": s.get("rouge_l"),
                     "stops": pct(s.get("stop_rate")),
                     "same answer as evaluated": "n/a" if same is None else f"{same}/{prompts}"})
    return rows


def forms_table(export_metrics: dict[str, Any]):
    """The forms side by side, a DataFrame for the notebook."""
    import pandas as pd

    f = export_metrics["forms"]
    return pd.DataFrame(forms_rows(f["scores"], f["shipped"], f["prompts"])).set_index("form")


def logit_check_sentence(check: dict[str, Any]) -> str:
    """The merge check in words a reader can judge: the error as a share of the adapter's own effect, and
    the most it can change any token's probability (a logit error e moves a log-probability by at most 2e)."""
    if "tolerance_share" not in check:  # export/metrics.json written by an earlier version (a continued Kaggle run)
        return (f"max |logit diff| {check['max_abs_logit_diff']:.3g} where the adapter moves logits by up to "
                f"{check['adapter_effect_max_abs_logit']:.3g} (tolerance {check['tolerance']:.3g})")
    share = check["max_abs_logit_diff"] / check["adapter_effect_max_abs_logit"] if check["adapter_effect_max_abs_logit"] else 0.0
    return (f"the merged model's logits differ from the unmerged model's by at most {check['max_abs_logit_diff']:.3g}, "
            f"{100 * share:.2g}% of the {check['adapter_effect_max_abs_logit']:.3g} by which the adapter itself moves them (a "
            f"merge that lost or doubled the update would be at 100%; the check fails above "
            f"{check['tolerance_share']:.0%}, or {check['tolerance_floor']} for an adapter that barely moves them); the "
            f"difference is the {check.get('stored_as', '16-bit')} rounding of the merged weights, and changes any "
            f"token's probability by at most a factor {check['max_probability_factor']:.3g}")


def model_card(export_metrics: dict[str, Any], base_model: str, hub_id: str | None, merge_into: str, dtype: str,
               run_name: str) -> str:
    """README.md of the merged model: what it was merged into and why, what each form scored, how to load it."""
    f, check, a = export_metrics["forms"], export_metrics.get("verification") or {}, export_metrics["adapter"]
    rows = forms_rows(f["scores"], f["shipped"], f["prompts"])
    header = list(rows[0]) if rows else []
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    why = ("the dequantized NF4 weights the adapter was trained against, so it answers as the evaluated 4-bit model "
           "did (`eval.merge_into: original` merges into the exact 16-bit weights instead)" if merge_into == "dequantized" else
           "the exact 16-bit base weights, which the adapter never saw during training (it was trained against their "
           "NF4-rounded copy); `eval.merge_into: dequantized` merges into those instead")
    return "\n".join([
        "---", *([f"base_model: {hub_id}"] if hub_id else []), "library_name: transformers",
        "tags: [qlora, lora, merged]", "---", "",
        f"# {base_model} + QLoRA adapter, merged ({dtype})", "",
        f"Made by the qlora_helpers pipeline, run `{run_name}`: a LoRA adapter (r={a.get('r')}, "
        f"alpha={a.get('lora_alpha')}, on {', '.join(a.get('target_modules', []))}) trained on the 4-bit NF4 "
        f"quantized base, then merged into {why}.", "",
        f"## Scores on {f['prompts']} held-out prompts (greedy, the evaluation's token budget)", "", *table, "",
        "The merge check: " + (logit_check_sentence(check) + "." if check else "not run."), "",
        "## Load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", dtype="auto")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", "", *_gguf_card_section(export_metrics)])


def _gguf_card_section(export_metrics: dict[str, Any]) -> list[str]:
    """Where the GGUF files are and the command that runs each (their scores are rows of the table above)."""
    files = (export_metrics.get("gguf") or {}).get("files") or []
    if not files:
        return []
    lines = ["## GGUF (llama.cpp, Ollama, LM Studio)", "",
             "The same model converted by llama.cpp's converter, in `../gguf/` (rows `gguf-<type>` above). Each file "
             "carries the chat template and end-of-turn token training used; Ollama reads its own template from the "
             "Modelfile beside it.", "", "```sh"]
    for f in files:
        name, modelfile = Path(f["path"]).name, Path(f["modelfile"]).name
        lines += [f"llama-cli -m ../gguf/{name} -cnv",
                  f"ollama create {f['ollama_model']} -f ../gguf/{modelfile} && ollama run {f['ollama_model']}"]
    return lines + ["```", ""]
