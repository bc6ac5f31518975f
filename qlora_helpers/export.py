"""Stage 4, export: ship what was trained in forms that load anywhere.

* The adapter alone (``RUN_DIR/adapter``, written by training): a few MB of safetensors plus
  ``adapter_config.json``; loads with ``PeftModel.from_pretrained`` onto the ordinary, unquantized base.
* A merged 16-bit model (``RUN_DIR/export/merged``): the adapter added into 16-bit base weights, saved with
  its tokenizer and a model card, for servers that know nothing of PEFT or bitsandbytes. By default
  (``eval.merge_into: dequantized``) the weights are the dequantized NF4 ones the adapter was trained against,
  so the merged model answers as the evaluated 4-bit model did; ``original`` merges into the exact 16-bit
  weights, which the adapter never saw. It is never merged back into 4-bit: re-quantizing ``W + BA`` to NF4
  rounds away much of the small update and ties the result to bitsandbytes.
* Optionally the adapter on the Hugging Face Hub (``eval.push_to_hub``), with the token from
  :func:`qlora_helpers.secrets.hf_token`, never shown.

The merged model is checked against what it replaces, the same base weights with the adapter unmerged, on
the held-out prompts: greedy answers and logits. On a CPU both are compared in float32, so that nothing but
the 16-bit rounding of the merged weights separates them; float16 (11 significant bits) keeps far more of the
small update ``BA`` than bfloat16 (8), which is why ``eval.export_dtype`` defaults to float16, also after bf16
training (on an H200, a bf16-trained model's float16 export answered 56 of 60 prompts as evaluated, its bfloat16
export 55: docs/benchmarks.md). Then every form
a user can ship is scored on the same prompts (qlora_helpers.artifacts).
"""
from __future__ import annotations

import gc
import math
import time
from pathlib import Path
from typing import Any

from .artifacts import EVALUATED, evaluated_scores, merged_form, model_card, score_form, shipped_form
from .config import UserError
from .data import load_tokenizer
from .evaluate import generate, held_out_prompts, read_generations
from .gguf_export import check_request, export_and_score
from .model import load_base_model
from .runlock import writing
from .runs import memory_snapshot, read_json, write_json, write_text
from .stage import Stage

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MERGED_DIR = Path("export") / "merged"
# Prompts whose logits are compared position by position (all prompts' greedy answers are compared).
LOGIT_PROMPTS = 8
# The merge passes when it moves logits away from the unmerged model by less than this share of how far the
# adapter moves them from the base: a merge that lost the update, or doubled it, is at 100%. It cannot be much
# tighter, because the merged weights are stored in 16-bit: W + (alpha/r)·BA rounded to float16 loses a visible
# part of the small update even though W itself is exact (measured on the test profile's 2-step adapter: 28%,
# where rounding the base alone to float16 moves the logits by 0.2% as much).
MAX_SHARE_OF_ADAPTER_EFFECT = 0.5
# ... or by less than this, whatever the adapter's effect (an adapter that barely changed the model): it
# changes any token's probability by at most a factor exp(2 * 0.1), about 1.2.
LOGIT_NOISE_FLOOR = 0.1

class HubTokenMissing(UserError):
    """eval.push_to_hub names a repository but no token was found."""


class HubPushFailed(UserError):
    """The hub refused the push (wrong repository name, no write access, no network)."""


class ExportMismatch(RuntimeError):
    """The merged model does not reproduce base + adapter: the export is broken and must not ship."""


def adapter_dir(stage: Stage) -> Path:
    """The trained adapter, checked to hold the files PeftModel.from_pretrained needs."""
    path = stage.path("adapter")
    missing = [f for f in ADAPTER_FILES if not (path / f).exists()]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: run notebook 03_lora_training on this run directory first")
    return path


def load_unquantized(stage: Stage, dtype: str, path: str | None = None):
    """The base model (or the model at ``path``) in plain ``dtype``, with no quantization: what the
    adapter is merged into and what people load it onto. Same loader as training, quantization off."""
    model = load_base_model(stage, quantization=False, location=path, dtype=dtype)
    model.eval()
    return model


def load_dequantized(stage: Stage, dtype: str):
    """The base quantized exactly as in training, then dequantized (transformers' ``model.dequantize()``) into
    plain ``dtype`` weights: the NF4-rounded values the adapter was trained against, as an ordinary model."""
    import torch

    import logging

    # transformers says, as a warning, that it dequantizes in fp32 and casts to `dtype`: what is asked for here
    noisy = logging.getLogger("transformers.integrations.bitsandbytes")
    level, _ = noisy.level, noisy.setLevel(logging.ERROR)
    try:
        model = load_base_model(stage).dequantize(dtype=getattr(torch, dtype))
    finally:
        noisy.setLevel(level)
    model.to(getattr(torch, dtype))  # the layers that were never quantized (embeddings, norms) too
    model.eval()
    return model


def merge_base(stage: Stage, into: str | None = None, dtype: str | None = None):
    """The 16-bit weights the adapter is merged into: eval.merge_into ("dequantized" or "original") in
    eval.export_dtype, unless given, on this process's device."""
    into, dtype = into or stage.cfg.eval.merge_into, dtype or stage.cfg.eval.export_dtype
    return load_dequantized(stage, dtype) if into == "dequantized" else load_unquantized(stage, dtype)


def with_adapter(stage: Stage, base):
    """``base`` with the trained adapter attached, not merged."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir(stage))).eval()


def base_plus_adapter(stage: Stage, dtype: str, into: str = "original"):
    """The adapter on the ``into`` base weights, unmerged: what a merge into them must reproduce."""
    return with_adapter(stage, merge_base(stage, into, dtype))


def _names(target_modules: list[str] | str | None) -> list[str]:
    """adapter_config.json's target_modules: a list of names, or one regular expression."""
    return [target_modules] if isinstance(target_modules, str) else sorted(target_modules or [])


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def save_merged(stage: Stage, merged, started: float | None = None) -> dict[str, Any]:
    """Save a merged model (``merge_and_unload``'s result) with its tokenizer to RUN_DIR/export/merged."""
    out = stage.path(str(MERGED_DIR))
    merged.config.use_cache = True  # the shared loader turns the KV cache off for training; users generate
    with writing(stage.run_dir, "export (the merged model)"):
        merged.save_pretrained(str(out))
        load_tokenizer(stage).save_pretrained(str(out))
    info = {"path": str(MERGED_DIR), "dtype": stage.cfg.eval.export_dtype, "merged_into": stage.cfg.eval.merge_into,
            "bytes": _dir_bytes(out)}
    if started is not None:
        info["wall_s"] = round(time.time() - started, 2)
    return info


def answer_logits(model, prompt_ids: list[int], answer_ids: list[int]):
    """Logits at each position that predicts an answer token (the decisions greedy decoding made), float32."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + answer_ids], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float().cpu()
    return logits[len(prompt_ids) - 1: len(prompt_ids) + len(answer_ids) - 1]


def _greedy_with_logits(model, tokenizer, prompts: list[str], stage: Stage, stop_ids: list[int], teacher=None):
    """Greedy answers to every prompt, and the logits along the first LOGIT_PROMPTS answers: this model's
    own, or ``teacher``'s answers fed in, so that two models are compared on the same tokens."""
    ev = stage.cfg.eval
    answers, _ = generate(model, tokenizer, prompts, ev.max_new_tokens, ev.batch_size, stop_ids)
    prompt_ids = prompts[:LOGIT_PROMPTS]
    logits = [answer_logits(model, p, a["token_ids"]) for p, a in zip(prompt_ids, teacher or answers)]
    return answers, prompt_ids, logits


def _max_abs_diff(a: list, b: list) -> float:
    return max(((x - y).abs().max().item() for x, y in zip(a, b) if x.numel()), default=0.0)


def _divergence(model, prompt_ids: list[int], reference: list[int], own: list[int]) -> dict[str, Any]:
    """Where two greedy answers part, and by how much ``model`` preferred its token over the reference's
    there: a margin within the logit error is a near-tie that rounding may break either way."""
    at = next((i for i, (a, b) in enumerate(zip(reference, own)) if a != b), min(len(reference), len(own)) - 1)
    logits = answer_logits(model, prompt_ids, own[: at + 1])[at]
    return {"position": at, "margin": round((logits[own[at]] - logits[reference[at]]).item(), 5)}


def _unmerged_pass(stage: Stage, into: str, dtype: str, tokenizer, prompts: list[str], stop_ids: list[int], reference: bool):
    """The adapter on the ``into`` base weights, unmerged: its greedy answers and, when it is the merge's
    ``reference``, its logits along its first answers with the adapter on and off (how far the adapter moves them)."""
    model = base_plus_adapter(stage, dtype, into)
    answers, prompt_ids, logits = _greedy_with_logits(model, tokenizer, prompts, stage, stop_ids)
    base_logits = None
    if reference:
        with model.disable_adapter():
            base_logits = [answer_logits(model, p, a["token_ids"]) for p, a in zip(prompt_ids, answers)]
    del model
    gc.collect()
    return answers, prompt_ids, logits, base_logits


def _check(stage: Stage, dtype: str, tokenizer, prompts: list[str], stop_ids: list[int], reference: tuple):
    """The saved merged model against its unmerged reference: greedy answers on every prompt, logits along
    the reference's first answers. A differing answer is accepted only where it parts at a near-tie."""
    ref_answers, prompt_ids, ref_logits, base_logits = reference
    model = load_unquantized(stage, dtype, path=str(stage.path(str(MERGED_DIR))))
    answers, _, logits = _greedy_with_logits(model, tokenizer, prompts, stage, stop_ids, teacher=ref_answers)
    error, effect = _max_abs_diff(logits, ref_logits), _max_abs_diff(ref_logits, base_logits)
    differing = {i: _divergence(model, prompts[i],
                                ref_answers[i]["token_ids"], m["token_ids"])
                 for i, m in enumerate(answers) if m["token_ids"] != ref_answers[i]["token_ids"]}
    del model
    gc.collect()
    tolerance = max(MAX_SHARE_OF_ADAPTER_EFFECT * effect, LOGIT_NOISE_FLOOR)
    # Both logits at a divergence can each move by up to `error`, so a margin below 2 * error is a near-tie.
    near_ties = {i: d for i, d in differing.items() if d["margin"] <= 2 * error}
    return answers, {
        "reference": f"the unmerged adapter on the {stage.cfg.eval.merge_into} base weights",
        "compared_in": dtype, "prompts": len(prompts), "greedy_identical": len(prompts) - len(differing),
        "near_ties": [{"prompt": i, **d} for i, d in near_ties.items()],
        "differing_beyond_ties": [{"prompt": i, **d} for i, d in differing.items() if i not in near_ties],
        "logit_prompts": len(ref_logits), "max_abs_logit_diff": round(error, 5),
        "adapter_effect_max_abs_logit": round(effect, 5), "tolerance": round(tolerance, 5),
        "tolerance_share": MAX_SHARE_OF_ADAPTER_EFFECT, "tolerance_floor": LOGIT_NOISE_FLOOR,
        "max_probability_factor": round(math.exp(2 * error), 4),
        "stored_as": stage.cfg.eval.export_dtype,
        "passed": error <= tolerance and len(near_ties) == len(differing),
    }


def check_and_score(stage: Stage, merged: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Check the saved merged model against the adapter unmerged on the same base weights, and score every form
    a user can ship on the held-out prompts (qlora_helpers.artifacts.FORMS), one model in memory at a time (a
    16-bit Phi-3 next to another would not fit a T4). On a CPU everything runs in float32, so the 16-bit
    rounding of the merged weights is all that separates a merged model from its reference."""
    import torch

    t0, cfg = time.time(), stage.cfg
    dtype = "float32" if stage.hw["device"] == "cpu" else cfg.eval.export_dtype
    tokenizer = load_tokenizer(stage)
    examples, prompts, stop_ids = held_out_prompts(stage, tokenizer)
    gens = read_generations(stage.run_dir)
    evaluated = [g["finetuned"] for g in gens] if len(gens) == len(prompts) else None
    scores: dict[str, Any] = {}
    done = evaluated_scores(read_json(stage.run_dir / "eval" / "metrics.json", {}), len(prompts))
    if done:
        scores[EVALUATED] = done
    into = cfg.eval.merge_into if merged else None

    answers, *rest = _unmerged_pass(stage, "original", dtype, tokenizer, prompts, stop_ids, reference=into == "original")
    scores["original+adapter"] = score_form(answers, examples, evaluated)
    check = None
    if merged:
        reference = (answers, *rest) if into == "original" else \
            _unmerged_pass(stage, into, dtype, tokenizer, prompts, stop_ids, reference=True)
        answers, check = _check(stage, dtype, tokenizer, prompts, stop_ids, reference)
        scores[merged_form(into)] = score_form(answers, examples, evaluated)
        # The other merged form, not saved: merged in eval.export_dtype as it would ship, answering in `dtype`.
        other = "original" if into == "dequantized" else "dequantized"
        model = with_adapter(stage, merge_base(stage, other)).merge_and_unload().to(getattr(torch, dtype))
        answers, _ = generate(model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size, stop_ids)
        del model
        gc.collect()
        scores[merged_form(other)] = score_form(answers, examples, evaluated)
    forms = {"prompts": len(prompts), "compared_in": dtype, "shipped": shipped_form(bool(merged), cfg.eval.merge_into),
             "scores": scores, "wall_s": round(time.time() - t0, 2)}
    return check, forms


# --------------------------------------------------------------------------- the hub
def hub_id(name: str) -> str | None:
    """model.name when it names a model on the hub (not a local folder, a GGUF file or the embedded model)."""
    return name if "/" in name and not Path(name).expanduser().exists() and not name.endswith(".gguf") else None


def stage_for_hub(stage: Stage, adapter: Path, staging: Path) -> Path:
    """A copy of the adapter fit to publish: without ``training_args.bin`` (a pickle of the Trainer's
    settings, unsafe to load and not needed), and naming the base model by its hub id when the run
    loaded it from a local or Kaggle path, so ``AutoPeftModelForCausalLM.from_pretrained(repo)`` finds it."""
    import json
    import shutil

    out = staging / "adapter"
    shutil.copytree(adapter, out, ignore=shutil.ignore_patterns("training_args.bin"))
    cfg = stage.cfg
    name = hub_id(cfg.model.name)
    if name:
        config_path = out / "adapter_config.json"
        adapter_cfg = json.loads(config_path.read_text())
        adapter_cfg["base_model_name_or_path"] = name
        adapter_cfg["revision"] = cfg.model.revision or None
        config_path.write_text(json.dumps(adapter_cfg, indent=2) + "\n")
    return out


def hub_token_for(repo_id: str) -> str:
    """The token to push with, or a one-line error saying how to provide one."""
    from .secrets import HOW_TO_PROVIDE, hf_token

    token = hf_token()
    if not token:
        raise HubTokenMissing(f"eval.push_to_hub={repo_id!r}: no Hugging Face token found; {HOW_TO_PROVIDE}")
    return token


def push_adapter(stage: Stage) -> dict[str, Any] | None:
    """Upload the adapter folder to ``eval.push_to_hub`` (a private repository is created if needed).

    Nothing happens, and no token is looked up, when the key is empty. Errors name the repository and
    how to fix it; the token never appears in them (the hub's message is passed on with it blanked out).
    """
    repo_id = stage.cfg.eval.push_to_hub.strip()
    if not repo_id:
        return None
    folder = adapter_dir(stage)
    token = hub_token_for(repo_id)
    from huggingface_hub import HfApi

    import tempfile

    api = HfApi(token=token)
    try:
        with tempfile.TemporaryDirectory() as staging:
            url = api.create_repo(repo_id, private=True, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(stage_for_hub(stage, folder, Path(staging))),
                                       commit_message=f"QLoRA adapter from run {stage.run_dir.name}")
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one line without the token
        first = (str(exc).strip().splitlines() or [""])[0].replace(token, "***")
        raise HubPushFailed(f"eval.push_to_hub={repo_id!r}: the push failed ({type(exc).__name__}: {first})") from None
    return {"repo_id": repo_id, "url": str(url), "commit": getattr(commit, "oid", None), "private": True}


# --------------------------------------------------------------------------- the stage
def check_before_export(stage: Stage) -> None:
    """What must hold before minutes go into a merge: an adapter to export, and a token if a push was asked for."""
    adapter_dir(stage)
    check_request(stage)  # eval.export_gguf: the converter, the architecture, the disk
    if stage.cfg.eval.push_to_hub.strip():
        hub_token_for(stage.cfg.eval.push_to_hub.strip())  # a missing token fails now, not after the merge


def finish_export(stage: Stage, merged: dict[str, Any] | None) -> dict[str, Any]:
    """After the merge (``merged``: what save_merged returned, or None): check the merged model, score every
    form that can ship, write the merged model's card, push the adapter if asked, and write
    RUN_DIR/export/metrics.json."""
    import json

    run_dir, adapter = stage.run_dir, adapter_dir(stage)
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    check, forms = check_and_score(stage, merged)
    gguf = export_and_score(stage, merged, check, forms)  # GGUF files and their rows of the forms table
    metrics: dict[str, Any] = {
        "adapter": {"path": "adapter", "bytes": _dir_bytes(adapter), "base_model": adapter_cfg.get("base_model_name_or_path"),
                    "r": adapter_cfg.get("r"), "lora_alpha": adapter_cfg.get("lora_alpha"),
                    "target_modules": _names(adapter_cfg.get("target_modules"))},
        "merged": merged, "verification": check, "forms": forms, "gguf": gguf, "hub": None,
    }
    metrics["memory"] = memory_snapshot()
    with writing(run_dir, "export"):
        write_json(run_dir / "export" / "metrics.json", metrics)  # kept even if the check or the push fails
        if merged:
            write_text(run_dir / MERGED_DIR / "README.md",
                       model_card(metrics, stage.model.description, hub_id(stage.cfg.model.name), merged["merged_into"],
                                  merged["dtype"], run_dir.name))
    if check and not check["passed"]:
        raise ExportMismatch(f"the merged model does not reproduce {check['reference']} (max |logit diff| "
                             f"{check['max_abs_logit_diff']}, tolerance {check['tolerance']}; "
                             f"{len(check['differing_beyond_ties'])} answers differ beyond a near-tie): do not use "
                             f"{run_dir / MERGED_DIR}; details in {run_dir / 'export' / 'metrics.json'}")
    metrics["hub"] = push_adapter(stage)
    with writing(run_dir, "export"):
        write_json(run_dir / "export" / "metrics.json", metrics)
    return metrics


def export_table(metrics: dict[str, Any]):
    """What was exported, where, and whether the merge was verified: a DataFrame for the notebook."""
    import pandas as pd

    from .artifacts import logit_check_sentence

    merged, check, hub = metrics.get("merged"), metrics.get("verification"), metrics.get("hub")
    rows = [("adapter", metrics["adapter"]["path"], f"{metrics['adapter']['bytes'] / 2**20:.1f} MiB",
             "loads onto the unquantized base: PeftModel.from_pretrained(base, adapter)")]
    if merged:
        rows.append((f"merged model (into the {merged['merged_into']} weights)", merged["path"],
                     f"{merged['bytes'] / 2**20:.1f} MiB, {merged['dtype']}",
                     f"greedy answers identical to {check['reference']} on {check['greedy_identical']}/"
                     f"{check['prompts']} prompts; {logit_check_sentence(check)} (compared in {check['compared_in']})"))
    else:
        rows.append(("merged model", "not exported (eval.export_merged=false)", "", ""))
    rows.append(("Hugging Face Hub", hub["url"] if hub else "not pushed (eval.push_to_hub is empty)", "", ""))
    return pd.DataFrame(rows, columns=["what", "where", "size", "notes"])
