"""Stage 4: what did fine-tuning change? The same validation data, formatting and masking for the
base model and the fine-tuned one; greedy answers side by side; whether the model stops.

Base and fine-tuned share one loaded model: the adapter is switched off for the base numbers
(``disable_adapter``), so nothing but the adapter differs between the two columns. The validation loss is
the Trainer's own ``evaluate()`` with training's collator and masking, so the fine-tuned number is the
one training reported for its best checkpoint.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from .config import UserError
from .data import Formatter, load_split
from .runlock import writing
from .runs import memory_snapshot, read_json, write_json, write_text
from .stage import Stage


def evaluation_arguments(stage: Stage):
    """The TrainingArguments notebook 03 trained with (train/training_args.json), for an evaluation pass: the same
    micro-batch and precision, so the fine-tuned loss is the one training reported; no progress table (an
    evaluation-only Trainer's would read "Training Loss: No log") and no compiling for a single pass."""
    from transformers import TrainingArguments

    saved = read_json(stage.path("train", "training_args.json"))
    if not saved:
        raise UserError(f"{stage.path('train', 'training_args.json')}: no such file; run notebook 03_lora_training "
                        "on this run directory first")
    return TrainingArguments(**{**saved, "disable_tqdm": True, "torch_compile": False})


def validation_loss(stage: Stage, model, tokenizer, examples: list[dict[str, Any]]) -> dict[str, float]:
    """The Trainer's eval_loss on `examples` (response tokens only, training's collator) and its perplexity."""
    from transformers import PrinterCallback, Trainer

    from .packing import make_collator

    data = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    trainer = Trainer(model=model, args=evaluation_arguments(stage), eval_dataset=data,
                      data_collator=make_collator(stage, tokenizer), processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # without progress bars it would print the metrics dict: returned instead
    loss = trainer.evaluate()["eval_loss"]
    return {"loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50)), 3)}


def generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int, stop_ids: list[int]):
    """Greedy answers to prompts given as token ids (a person's text in them tokenized as text, as in training);
    for each, whether it ended with an end-of-turn token within the budget, and the generated token ids (up to and
    including that token) so two models' answers can be compared exactly. Batches are padded on the left."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    results, new_tokens, seconds = [], 0, 0.0
    for i in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[i: i + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        t0 = time.perf_counter()
        with torch.no_grad():
            # use_cache: the shared loader turns the KV cache off for training; generation wants it.
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stop_ids, pad_token_id=pad, use_cache=True)
        seconds += time.perf_counter() - t0
        for row in out[:, width:].tolist():
            stop_at = next((k for k, t in enumerate(row) if t in stop_ids), None)
            # Rows that stopped early are padded after the stop token; rows that did not stop are never padded.
            token_ids = row[: stop_at + 1] if stop_at is not None else row
            kept = token_ids[:-1] if stop_at is not None else token_ids
            new_tokens += len(token_ids)
            results.append({"answer": tokenizer.decode(kept, skip_special_tokens=True).strip(),
                            "stopped": stop_at is not None, "new_tokens": len(kept), "token_ids": token_ids})
    return results, {"new_tokens": new_tokens, "seconds": round(seconds, 2),
                     "tokens_per_s": round(new_tokens / seconds, 2) if seconds else None}


# Tasks whose answer *is* the letter case: compared case-sensitively, or "apple" would pass for "APPLE".
CASE_SENSITIVE_TASKS = {"uppercase"}


def normalize(text: str, keep_case: bool = False) -> str:
    """Forgive what does not change the answer: surrounding spaces, a final full stop, and (unless the
    task is about case) letter case."""
    text = text.strip().rstrip(".").strip()
    return text if keep_case else text.lower()


def is_exact(answer: str, reference: str, task: str = "") -> bool:
    keep_case = task in CASE_SENSITIVE_TASKS
    return normalize(answer, keep_case) == normalize(reference, keep_case)


def rouge_l(answers: list[str], references: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references)]
    return round(sum(scores) / max(1, len(scores)), 4)


def score(answers: list[dict], examples: list[dict], checkable: bool) -> dict[str, Any]:
    """ROUGE-L and stop rate always; exact match overall and per task where every example has a task
    (the embedded set), since only there is one exact answer right."""
    texts = [a["answer"] for a in answers]
    out = {"rouge_l": rouge_l(texts, [e["response"] for e in examples]),
           "stop_rate": round(sum(a["stopped"] for a in answers) / max(1, len(answers)), 4),
           "exact_match": None, "exact_match_by_task": None}
    if checkable:
        by_task: dict[str, list] = {}
        for a, e in zip(texts, examples):
            by_task.setdefault(e["task"], []).append(is_exact(a, e["response"], e["task"]))
        out["exact_match"] = round(sum(sum(v) for v in by_task.values()) / max(1, len(texts)), 4)
        out["exact_match_by_task"] = {t: round(sum(v) / len(v), 4) for t, v in sorted(by_task.items())}
    return out


def held_out_prompts(stage: Stage, tokenizer) -> tuple[list[dict], list[list[int]], list[int]]:
    """The fixed held-out prompts (the first eval.num_prompts validation examples) as token ids, formatted and
    tokenized exactly as in training (a person's text as text, never as control tokens), and the token ids that
    end a turn. Evaluation, the playground, the export's checks and every form's scores use these."""
    cfg = stage.cfg
    examples = load_split(stage.run_dir, "val")[: cfg.eval.num_prompts]
    formatter = Formatter(tokenizer, cfg.data.template, cfg.data.system_prompt)
    prompts = [formatter.prompt_ids(json.loads(e["prompt_messages"]), e["alpaca_key"]) for e in examples]
    return examples, prompts, sorted({formatter.end_token_id, tokenizer.eos_token_id} - {None})


def held_out_texts(stage: Stage, tokenizer, examples: list[dict]) -> list[str]:
    """The same prompts as text, as a person types them into another runtime (llama.cpp tokenizes them itself)."""
    formatter = Formatter(tokenizer, stage.cfg.data.template, stage.cfg.data.system_prompt)
    return [formatter.prompt_text(json.loads(e["prompt_messages"]), e["alpaca_key"]) for e in examples]


def evaluate_run(stage: Stage, model, tokenizer) -> dict[str, Any]:
    """Base vs fine-tuned on the validation split; writes eval/metrics.json and eval/generations.jsonl."""
    cfg, run_dir = stage.cfg, stage.run_dir
    val = load_split(run_dir, "val")
    loss_set = val[: cfg.eval.max_val_examples] if cfg.eval.max_val_examples else val
    prompts_set, prompts, stop_ids = held_out_prompts(stage, tokenizer)
    checkable = all(e.get("task") for e in prompts_set)
    results: dict[str, Any] = {}
    for label in ("base", "finetuned"):
        ctx = model.disable_adapter() if label == "base" else nullcontext()
        with ctx:
            loss = validation_loss(stage, model, tokenizer, loss_set)
            answers, speed = generate(model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size, stop_ids)
        results[label] = {"val_loss": loss["loss"], "perplexity": loss["perplexity"], "generation": speed,
                          **score(answers, prompts_set, checkable), "answers": answers}
    out = run_dir / "eval"
    lines = []
    for i, e in enumerate(prompts_set):
        row = {"prompt": json.loads(e["prompt_messages"])[-1]["content"], "reference": e["response"], "task": e["task"] or None}
        for label in ("base", "finetuned"):
            a = results[label]["answers"][i]
            row.update({label: a["answer"], f"{label}_stopped": a["stopped"],
                        f"{label}_exact": is_exact(a["answer"], e["response"], e["task"]) if checkable else None})
        lines.append(json.dumps(row) + "\n")
    with writing(run_dir, "stage 4 (evaluation)"):
        write_text(out / "generations.jsonl", "".join(lines))
    metrics = {"val_examples": len(loss_set), "prompts": len(prompts_set), "max_new_tokens": cfg.eval.max_new_tokens,
               "batch_size": cfg.eval.batch_size, "checkable": checkable,
               **{label: {k: v for k, v in r.items() if k != "answers"} for label, r in results.items()},
               "memory": memory_snapshot()}
    with writing(run_dir, "stage 4 (evaluation)"):
        write_json(out / "metrics.json", metrics)
    return metrics


def before_after_table(metrics: dict[str, Any]):
    """eval/metrics.json's headline numbers, base against fine-tuned, as a table for notebook 04."""
    import pandas as pd

    def pct(v):
        return "not measured" if v is None else f"{100 * v:.1f}%"

    rows = {}
    for label in ("base", "finetuned"):
        m = metrics[label]
        rows["base" if label == "base" else "fine-tuned"] = {
            "validation loss": f"{m['val_loss']:.4f}", "perplexity": f"{m['perplexity']:,.2f}",
            "exact match": pct(m["exact_match"]), "ROUGE-L": f"{m['rouge_l']:.3f}", "stop rate": pct(m["stop_rate"]),
            "generation tokens/s": f"{m['generation']['tokens_per_s']:,.1f}" if m["generation"]["tokens_per_s"] else "not measured"}
    return pd.DataFrame(rows)


def read_generations(run_dir: str | Path) -> list[dict[str, Any]]:
    from .runs import CorruptFile

    path = Path(run_dir) / "eval" / "generations.jsonl"
    try:
        return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CorruptFile(f"{path}: cannot be read back; run notebook 04 again") from None


def marked(row: dict[str, Any], label: str) -> str:
    """One model's answer as people see it: "…" where it ran into the token budget without stopping,
    "✓" where it is exactly the reference."""
    return row[label] + ("" if row[f"{label}_stopped"] else " …") + (" ✓" if row.get(f"{label}_exact") else "")


SIDE_BY_SIDE_LEGEND = "Greedy decoding, the same token budget for both; … = cut at the budget without stopping, ✓ = exact match."


def side_by_side(run_dir: str | Path, limit: int = 10):
    """The generations as a table (pandas DataFrame) for the notebook."""
    import pandas as pd

    rows = read_generations(run_dir)[:limit]
    return pd.DataFrame([{"prompt": r["prompt"], "reference": r["reference"], "base": marked(r, "base"),
                          "fine-tuned": marked(r, "finetuned")} for r in rows])
