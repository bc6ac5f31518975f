"""Stage 4, export: ship what was trained in forms that load anywhere.

* The adapter alone (``RUN_DIR/adapter``, written by training): a few MB of safetensors plus
  ``adapter_config.json``; loads with ``PeftModel.from_pretrained`` onto the ordinary, unquantized base.
* A merged 16-bit model (``RUN_DIR/export/merged``): the adapter added into a 16-bit copy of the base,
  saved with its tokenizer, for servers that know nothing of PEFT or bitsandbytes. It is never merged
  into the 4-bit weights: re-quantizing ``W + BA`` to NF4 rounds away much of the small update and
  ties the result to bitsandbytes.
* Optionally the adapter on the Hugging Face Hub (``eval.push_to_hub``), with the token from
  :func:`qlora_helpers.secrets.hf_token`, never shown.

The merged model is checked against what it replaces, base + adapter unmerged, on the held-out prompts:
greedy answers and logits. On a CPU both are compared in float32, so that nothing but the 16-bit
rounding of the merged weights separates them. That rounding is not nothing: the update ``BA`` is small
next to ``W``, and bfloat16 (8 significant bits) rounds away a visible part of it; float16 (11 bits) keeps
it, which is why ``eval.export_dtype`` defaults to float16.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from .config import UserError
from .data import load_tokenizer
from .evaluate import generate, held_out_prompts, score
from .model import load_base_model
from .runs import memory_snapshot, write_json
from .stage import Stage

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MERGED_DIR = Path("export") / "merged"
# Prompts whose logits are compared position by position (all prompts' greedy answers are compared).
LOGIT_PROMPTS = 8
# The merge passes when it moves logits away from base + adapter by less than this share of how far the
# adapter moves them from the base: a merge that lost the update (share ~1) or doubled it fails.
MAX_SHARE_OF_ADAPTER_EFFECT = 0.5
# ... or by less than this, whatever the adapter's effect (an adapter that barely changed the model).
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


def base_plus_adapter(stage: Stage, dtype: str):
    """Unquantized base with the trained adapter attached, not merged: the reference for the merge."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_unquantized(stage, dtype), str(adapter_dir(stage)))
    model.eval()
    return model


def _names(target_modules: list[str] | str | None) -> list[str]:
    """adapter_config.json's target_modules: a list of names, or one regular expression."""
    return [target_modules] if isinstance(target_modules, str) else sorted(target_modules or [])


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def merge_base(stage: Stage):
    """The 16-bit weights the adapter is merged into (eval.export_dtype), unquantized, on this process's device."""
    return load_unquantized(stage, stage.cfg.eval.export_dtype)


def save_merged(stage: Stage, merged, started: float | None = None) -> dict[str, Any]:
    """Save a merged model (``merge_and_unload``'s result) with its tokenizer to RUN_DIR/export/merged."""
    out = stage.path(str(MERGED_DIR))
    merged.config.use_cache = True  # the shared loader turns the KV cache off for training; users generate
    merged.save_pretrained(str(out))
    load_tokenizer(stage).save_pretrained(str(out))
    info = {"path": str(MERGED_DIR), "dtype": stage.cfg.eval.export_dtype, "bytes": _dir_bytes(out)}
    if started is not None:
        info["wall_s"] = round(time.time() - started, 2)
    return info


def merge_adapter(stage: Stage) -> dict[str, Any]:
    """Merge the adapter into the 16-bit base and save it: what notebook 04 does in its own cells."""
    from peft import PeftModel

    t0 = time.time()
    # safe_merge checks every merged weight for NaN/inf before it replaces the original.
    merged = PeftModel.from_pretrained(merge_base(stage), str(adapter_dir(stage))).merge_and_unload(safe_merge=True)
    info = save_merged(stage, merged, t0)
    del merged
    gc.collect()
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
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[:LOGIT_PROMPTS]]
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


def verify_merged(stage: Stage) -> dict[str, Any]:
    """Does the merged 16-bit model answer like base + adapter? Loads one model at a time (a merged Phi-3
    next to its reference would not fit a T4), compares greedy answers on every held-out prompt and
    logits along the first few answers, and how far the adapter moves those logits from the base, so a
    merge that lost the update shows. A differing answer is accepted only where it parts at a near-tie."""
    t0 = time.time()
    dtype = "float32" if stage.hw["device"] == "cpu" else stage.cfg.eval.export_dtype
    tokenizer = load_tokenizer(stage)
    examples, prompts, stop_ids = held_out_prompts(stage, tokenizer)

    reference = base_plus_adapter(stage, dtype)
    ref_answers, prompt_ids, ref_logits = _greedy_with_logits(reference, tokenizer, prompts, stage, stop_ids)
    with reference.disable_adapter():
        base_logits = [answer_logits(reference, p, a["token_ids"]) for p, a in zip(prompt_ids, ref_answers)]
    del reference
    gc.collect()

    merged = load_unquantized(stage, dtype, path=str(stage.path(str(MERGED_DIR))))
    merged_answers, _, merged_logits = _greedy_with_logits(merged, tokenizer, prompts, stage, stop_ids, teacher=ref_answers)
    error, effect = _max_abs_diff(merged_logits, ref_logits), _max_abs_diff(ref_logits, base_logits)
    differing = {i: _divergence(merged, tokenizer(prompts[i], add_special_tokens=False)["input_ids"],
                                ref_answers[i]["token_ids"], m["token_ids"])
                 for i, m in enumerate(merged_answers) if m["token_ids"] != ref_answers[i]["token_ids"]}
    del merged
    gc.collect()

    tolerance = max(MAX_SHARE_OF_ADAPTER_EFFECT * effect, LOGIT_NOISE_FLOOR)
    # Both logits at a divergence can each move by up to `error`, so a margin below 2 * error is a near-tie.
    near_ties = {i: d for i, d in differing.items() if d["margin"] <= 2 * error}
    return {
        "compared_in": dtype, "prompts": len(prompts), "greedy_identical": len(prompts) - len(differing),
        "near_ties": [{"prompt": i, **d} for i, d in near_ties.items()],
        "differing_beyond_ties": [{"prompt": i, **d} for i, d in differing.items() if i not in near_ties],
        "logit_prompts": len(ref_logits), "max_abs_logit_diff": round(error, 5),
        "adapter_effect_max_abs_logit": round(effect, 5), "tolerance": round(tolerance, 5),
        "passed": error <= tolerance and len(near_ties) == len(differing),
        "merged_scores": score(merged_answers, examples, checkable=all(e.get("task") for e in examples)),
        "wall_s": round(time.time() - t0, 2),
    }


# --------------------------------------------------------------------------- the hub
def stage_for_hub(stage: Stage, adapter: Path, staging: Path) -> Path:
    """A copy of the adapter fit to publish: without ``training_args.bin`` (a pickle of the Trainer's
    settings, unsafe to load and not needed), and naming the base model by its hub id when the run
    loaded it from a local or Kaggle path, so ``AutoPeftModelForCausalLM.from_pretrained(repo)`` finds it."""
    import json
    import shutil

    out = staging / "adapter"
    shutil.copytree(adapter, out, ignore=shutil.ignore_patterns("training_args.bin"))
    cfg = stage.cfg
    name = cfg.model.name
    if "/" in name and not Path(name).expanduser().exists() and not name.endswith(".gguf"):
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
    if stage.cfg.eval.push_to_hub.strip():
        hub_token_for(stage.cfg.eval.push_to_hub.strip())  # a missing token fails now, not after the merge


def export_run(stage: Stage) -> dict[str, Any]:
    """Everything notebook 04 exports: checks the adapter, merges and verifies (eval.export_merged),
    pushes (eval.push_to_hub); writes RUN_DIR/export/metrics.json and returns it."""
    check_before_export(stage)
    merged = merge_adapter(stage) if stage.cfg.eval.export_merged else None
    return finish_export(stage, merged)


def finish_export(stage: Stage, merged: dict[str, Any] | None) -> dict[str, Any]:
    """After the merge (``merged``: what save_merged returned, or None): check the merged model against base +
    adapter, push the adapter if asked, and write RUN_DIR/export/metrics.json."""
    import json

    run_dir, adapter = stage.run_dir, adapter_dir(stage)
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    metrics: dict[str, Any] = {
        "adapter": {"path": "adapter", "bytes": _dir_bytes(adapter), "base_model": adapter_cfg.get("base_model_name_or_path"),
                    "r": adapter_cfg.get("r"), "lora_alpha": adapter_cfg.get("lora_alpha"),
                    "target_modules": _names(adapter_cfg.get("target_modules"))},
        "merged": merged, "verification": verify_merged(stage) if merged else None, "hub": None,
    }
    metrics["memory"] = memory_snapshot()
    write_json(run_dir / "export" / "metrics.json", metrics)  # kept even if the check or the push fails
    check = metrics["verification"]
    if check and not check["passed"]:
        raise ExportMismatch(f"the merged model does not reproduce base + adapter (max |logit diff| "
                             f"{check['max_abs_logit_diff']}, tolerance {check['tolerance']}; "
                             f"{len(check['differing_beyond_ties'])} answers differ beyond a near-tie): do not use "
                             f"{run_dir / MERGED_DIR}; details in {run_dir / 'export' / 'metrics.json'}")
    metrics["hub"] = push_adapter(stage)
    write_json(run_dir / "export" / "metrics.json", metrics)
    return metrics


def export_table(metrics: dict[str, Any]):
    """What was exported, where, and whether the merge was verified: a DataFrame for the notebook."""
    import pandas as pd

    merged, check, hub = metrics.get("merged"), metrics.get("verification"), metrics.get("hub")
    rows = [("adapter", metrics["adapter"]["path"], f"{metrics['adapter']['bytes'] / 2**20:.1f} MiB",
             "loads onto the unquantized base: PeftModel.from_pretrained(base, adapter)")]
    if merged:
        rows.append(("merged model", merged["path"], f"{merged['bytes'] / 2**20:.1f} MiB, {merged['dtype']}",
                     f"greedy answers identical on {check['greedy_identical']}/{check['prompts']} prompts; "
                     f"max |logit diff| {check['max_abs_logit_diff']:.3g} (adapter moves logits by up to "
                     f"{check['adapter_effect_max_abs_logit']:.3g}), compared in {check['compared_in']}"))
    else:
        rows.append(("merged model", "not exported (eval.export_merged=false)", "", ""))
    rows.append(("Hugging Face Hub", hub["url"] if hub else "not pushed (eval.push_to_hub is empty)", "", ""))
    return pd.DataFrame(rows, columns=["what", "where", "size", "notes"])
