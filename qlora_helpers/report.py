"""Stage 5: gather what every stage measured into summary.json and report.md, with plots.

Only measured numbers: a figure a stage did not write shows as "not measured", never a guess.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .artifacts import FORMS, forms_rows, logit_check_sentence
from .data import plot_lengths
from .evaluate import SIDE_BY_SIDE_LEGEND, marked, read_generations
from .runlock import writing
from .runs import atomic_path, environment, load_config, read_json, write_json, write_text
from .callbacks import loss_figure, loss_points

NM = "not measured"


def _max(*values):
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def plot_loss(run_dir: Path) -> dict[str, str]:
    """Training and validation loss on one figure: PNG (matplotlib) and interactive HTML (plotly)."""
    import plotly.graph_objects as go

    train, val = loss_points(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "loss.png") as tmp:
        loss_figure(train, val, size=(7, 4)).savefig(tmp, dpi=120)
    pfig = go.Figure()
    if train:
        pfig.add_scatter(x=[s for s, _ in train], y=[l for _, l in train], name="training loss")
    if val:
        pfig.add_scatter(x=[s for s, _ in val], y=[l for _, l in val], name="validation loss", mode="lines+markers")
    pfig.update_layout(xaxis_title="optimizer step", yaxis_title="loss")
    with atomic_path(out / "loss.html") as tmp:
        pfig.write_html(tmp, include_plotlyjs="cdn")
    return {"loss_plot": "report/loss.png", "loss_plot_html": "report/loss.html"}


def build_summary(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.json")
    data = read_json(run_dir / "data" / "metrics.json", {})
    model = read_json(run_dir / "model" / "metrics.json", {})
    train = read_json(run_dir / "train" / "metrics.json", {})
    ev = read_json(run_dir / "eval" / "metrics.json", {})
    export = read_json(run_dir / "export" / "metrics.json", {})
    mems = [m.get("memory", {}) for m in (model, train, ev, export)]
    base, tuned = ev.get("base", {}), ev.get("finetuned", {})
    merged, check, hub = export.get("merged"), export.get("verification"), export.get("hub")
    artifacts = {"config": "config.json", "data_metrics": "data/metrics.json", "model_metrics": "model/metrics.json",
                 "metrics": "train/metrics.jsonl", "train_metrics": "train/metrics.json", "adapter": "adapter",
                 "eval_metrics": "eval/metrics.json", "generations": "eval/generations.jsonl",
                 "export_metrics": "export/metrics.json", "merged_model": (merged or {}).get("path", "export/merged"),
                 "report": "report.md", "summary": "summary.json"}
    artifacts.update(plot_loss(run_dir))
    artifacts.update(plot_lengths(run_dir))
    artifacts = {k: v for k, v in artifacts.items() if (run_dir / v).exists() or k in ("report", "summary")}
    return {
        "profile": cfg.profile,
        "model": model.get("source"),
        "data": data.get("source"),
        "params": model.get("params", {"total": None, "trainable": None}),
        "memory": {"peak_gpu_reserved_gib": _max(*(m.get("peak_gpu_reserved_gib") for m in mems)),
                   "peak_rss_gib": _max(*(m.get("peak_rss_gib") for m in mems))},
        "train": {k: train.get(k) for k in ("steps", "max_steps", "processes", "examples_seen", "examples_planned",
                                            "tokens_seen", "wall_s", "epochs", "tokens_per_s", "resumed_from_step",
                                            "best_eval_loss", "stopped_by_time_budget")},
        "eval": {"prompts": ev.get("prompts"),
                 "val_loss_before": base.get("val_loss"), "val_loss_after": tuned.get("val_loss"),
                 "perplexity_before": base.get("perplexity"), "perplexity_after": tuned.get("perplexity"),
                 "exact_match_before": base.get("exact_match"), "exact_match_after": tuned.get("exact_match"),
                 "rouge_l_before": base.get("rouge_l"), "rouge_l_after": tuned.get("rouge_l"),
                 "stop_rate_before": base.get("stop_rate"), "stop_rate_after": tuned.get("stop_rate"),
                 "generation_tokens_per_s": tuned.get("generation", {}).get("tokens_per_s")},
        "export": {"adapter": "adapter" if export.get("adapter") else None,
                   "merged": merged["path"] if merged else None, "merged_dtype": merged["dtype"] if merged else None,
                   "merged_into": merged.get("merged_into") if merged else None,
                   "merge_verified": check["passed"] if check else None, "hub_url": hub["url"] if hub else None},
        "shipped": _shipped(export.get("forms")),
        "forms": (export.get("forms") or {}).get("scores"),
        "artifacts": artifacts,
    }


def _shipped(forms: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the user takes away and what it scored on the held-out prompts (export/metrics.json's forms)."""
    if not forms or forms["shipped"] not in forms["scores"]:
        return None
    s = forms["scores"][forms["shipped"]]
    return {"form": forms["shipped"], "what": FORMS[forms["shipped"]],
            **{k: s.get(k) for k in ("exact_match", "rouge_l", "stop_rate", "same_answer_as_evaluated")}}


def _fmt(v: Any) -> str:
    if v is None:
        return NM
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _pct(v: float | None) -> str:
    return NM if v is None else f"{v:.0%}"


def _change(before: Any, after: Any, fmt=_fmt) -> str:
    """'before → after', or 'not measured' for the side that was not."""
    return f"{fmt(before)} → {fmt(after)}"


def _cell(c: Any) -> str:
    return c.replace("|", "\\|").replace("\n", " ") if isinstance(c, str) else _fmt(c)


def _table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows])


def _mib(n: int | None) -> str:
    return NM if n is None else f"{n / 2**20:,.1f} MiB"


def _time_budget_cut(t: dict[str, Any]) -> str:
    """What train.max_minutes left untrained, so that evaluation, export and the report fit the session."""
    if t.get("stopped_by_time_budget") is None:
        return NM
    if not t["stopped_by_time_budget"]:
        return "nothing"
    return (f"stopped at step {_fmt(t['steps'])} of {_fmt(t.get('max_steps'))}: {_fmt(t['examples_seen'])} of "
            f"{_fmt(t.get('examples_planned'))} planned examples trained on; running the kernel again on this run "
            "directory trains the rest")


def _summary_section(s: dict[str, Any], run_dir: Path) -> list[str]:
    """The table someone reads first: what was trained on what, what it cost, what changed, what was made."""
    e, t, params, mem = s["eval"], s["train"], s["params"], s["memory"]
    share = f" ({params['trainable'] / params['total']:.2%})" if params.get("trainable") and params.get("total") else ""
    gpu = "no GPU" if mem["peak_gpu_reserved_gib"] is None else f"{mem['peak_gpu_reserved_gib']} GiB GPU reserved"
    prompts = f" ({e['prompts']} held-out prompts)" if e.get("prompts") else ""
    exact = ("no checkable answers (free-form data: see ROUGE-L)" if e["exact_match_before"] is None and e["val_loss_before"] is not None
             else _change(e["exact_match_before"], e["exact_match_after"], _pct))
    ship = s.get("shipped")
    shipped = lambda key, fmt=_fmt: f"; shipped model: {fmt(ship[key])}" if ship else ""  # noqa: E731
    rows = [("model", s["model"] or NM), ("data", s["data"] or NM), ("profile", s["profile"]),
            ("steps / epochs", f"{_fmt(t['steps'])} / {_fmt(t['epochs'])}"),
            ("examples / tokens seen", f"{_fmt(t['examples_seen'])} / {_fmt(t['tokens_seen'])}"),
            ("training processes (GPUs)", _fmt(t.get("processes"))),
            ("cut by the time budget", _time_budget_cut(t)),
            ("trainable / total parameters", f"{_fmt(params.get('trainable'))} / {_fmt(params.get('total'))}{share}"),
            ("peak memory", f"{gpu}; process RSS {_fmt(mem['peak_rss_gib'])} GiB"),
            ("training wall time", NM if t["wall_s"] is None else f"{t['wall_s']:,.0f} s ({_fmt(t['tokens_per_s'])} tokens/s)"),
            ("resumed from step", t["resumed_from_step"] if t["resumed_from_step"] is not None else "not resumed"),
            ("validation loss, base → fine-tuned", _change(e["val_loss_before"], e["val_loss_after"])),
            (f"exact match{prompts}, base → fine-tuned", exact + (shipped("exact_match", _pct) if e["exact_match_after"] is not None else "")),
            ("ROUGE-L, base → fine-tuned", _change(e["rouge_l_before"], e["rouge_l_after"]) + shipped("rouge_l")),
            ("stops with end-of-turn, base → fine-tuned", _change(e["stop_rate_before"], e["stop_rate_after"], _pct) + shipped("stop_rate", _pct))]
    x = s["export"]
    rows += [("adapter", f"`{x['adapter']}/`" if x["adapter"] else NM),
             ("merged 16-bit model", f"`{x['merged']}/` ({x['merged_dtype']}, merged into the {x['merged_into']} "
                                     "base weights)" if x["merged"] else "not exported"),
             ("shipped model", f"{ship['form']}: {ship['what']}" if ship else NM),
             ("Hugging Face Hub", x["hub_url"] or "not pushed")]
    parts = ["## Summary", "", _table(rows, ("", "this run")), ""]
    if ship:
        parts += ["*fine-tuned* is the model the evaluation measured (the adapter on the 4-bit base); *shipped model* "
                  "is the one a user takes away, scored by the export on the same prompts (see Export).", ""]
    if any(NM in str(v) for _, v in rows):
        parts += [f"*{NM}*: no stage wrote that figure (the stage did not run, or cannot measure it here).", ""]
    return parts


def _before_after_section(ev: dict[str, Any]) -> list[str]:
    base, tuned = ev.get("base", {}), ev.get("finetuned", {})
    if not base:
        return ["## Before and after fine-tuning", "", f"{NM}: notebook 04 did not run on this run directory.", ""]
    speed = lambda m: (m.get("generation") or {}).get("tokens_per_s")  # noqa: E731
    exact = lambda m: _pct(m.get("exact_match")) if ev.get("checkable") else "no checkable answers"  # noqa: E731
    parts = ["## Before and after fine-tuning", "",
             f"The same {ev.get('val_examples')} validation examples (loss) and {ev.get('prompts')} held-out prompts "
             f"(greedy answers, at most {ev.get('max_new_tokens')} new tokens), same formatting and masking; "
             "the base column is the same loaded model with the adapter switched off.", "",
             _table([("validation loss (response tokens)", base.get("val_loss"), tuned.get("val_loss")),
                     ("perplexity", base.get("perplexity"), tuned.get("perplexity")),
                     ("exact match", exact(base), exact(tuned)),
                     ("ROUGE-L F1", base.get("rouge_l"), tuned.get("rouge_l")),
                     ("stops with end-of-turn within the budget", _pct(base.get("stop_rate")), _pct(tuned.get("stop_rate"))),
                     ("generation tokens/s" + (f" (batches of {ev['batch_size']})" if ev.get("batch_size") else ""), speed(base), speed(tuned))],
                    ("metric", "base", "fine-tuned")), ""]
    by_b, by_a = base.get("exact_match_by_task"), tuned.get("exact_match_by_task")
    if by_b and by_a:
        parts += ["Exact match by task:", "",
                  _table([(k, _pct(by_b[k]), _pct(by_a.get(k))) for k in by_b], ("task", "base", "fine-tuned")), ""]
    return parts


def _export_section(export: dict[str, Any], run_dir: Path) -> list[str]:
    if not export:
        return ["## Export", "", f"{NM}: the export step of notebook 04 did not run on this run directory.", ""]
    a, merged, check, hub = export["adapter"], export.get("merged"), export.get("verification"), export.get("hub")
    rows = [("adapter", "`adapter/`", _mib(a.get("bytes")),
             f"LoRA r={a.get('r')}, alpha={a.get('lora_alpha')} on {', '.join(a.get('target_modules', []))}")]
    if merged:
        verdict = "verified" if check["passed"] else "FAILED verification: do not use"
        ties = f", {len(check['near_ties'])} parting at a near-tie" if check["near_ties"] else ""
        rows.append((f"merged model, into the {merged.get('merged_into')} weights", f"`{merged['path']}/`",
                     f"{_mib(merged['bytes'])}, {merged['dtype']}",
                     f"{verdict}: greedy answers identical to {check.get('reference', 'base + adapter')} on {check['greedy_identical']}/"
                     f"{check['prompts']} prompts{ties}; {logit_check_sentence(check)} (compared in {check['compared_in']})"))
    else:
        rows.append(("merged model", "not exported (eval.export_merged=false)", "", ""))
    rows.append(("Hugging Face Hub", hub["url"] if hub else "not pushed (eval.push_to_hub is empty)",
                 "private repository" if hub else "", ""))
    parts = ["## Export", "", _table(rows, ("what", "where", "size", "notes")), ""]
    forms = export.get("forms")
    if forms:
        fr = forms_rows(forms["scores"], forms["shipped"], forms["prompts"])
        parts += [f"Every form of the fine-tuned model that can ship, on the same {forms['prompts']} held-out prompts "
                  f"(greedy, the evaluation's token budget; answered in {forms['compared_in']}). The adapter was trained "
                  "against the NF4-rounded base weights, so the forms that put it next to other weights can answer "
                  "differently; *same answer as evaluated* counts the prompts where a form answers exactly as the "
                  "4-bit model did.", "",
                  _table([tuple(r.values()) for r in fr], tuple(fr[0])) if fr else "", ""]
    base_model = a.get("base_model") or "<base model>"
    parts += ["Load the adapter onto the ordinary, unquantized base, or the merged model alone:", "", "```python",
              "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
              f'base = AutoModelForCausalLM.from_pretrained("{base_model}", dtype="auto")',
              f'model = PeftModel.from_pretrained(base, "{run_dir / "adapter"}")']
    if merged:
        parts += [f'merged = AutoModelForCausalLM.from_pretrained("{run_dir / merged["path"]}", dtype="auto")']
    return parts + ["```", ""]


def _data_section(data: dict[str, Any]) -> list[str]:
    if not data:
        return []
    dl = data.get("train_lengths", {})
    dropped = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in data.get("dropped_by_reason", {}).items() if v) or "none"
    rows = [("source", data.get("source")), ("format / template", f"{data.get('format')} / {data.get('template')}"),
            ("end-of-turn token (trained on)", f"`{data.get('end_token')}`"),
            ("rows read / kept", f"{_fmt(data.get('rows_read'))} / {_fmt(data.get('rows_kept'))}"),
            ("rows dropped, by reason", dropped), ("responses truncated", data.get("truncated")),
            ("train / validation examples", f"{_fmt(data.get('train_examples'))} / {_fmt(data.get('val_examples'))}"),
            ("tokens per training example (p50 / p95 / max)", f"{_fmt(dl.get('p50'))} / {_fmt(dl.get('p95'))} / {_fmt(dl.get('max'))}"),
            ("share of tokens that carry the loss", _pct(dl.get("response_token_share")))]
    return ["## Data", "", _table(rows, ("", "")), "", "![lengths](report/lengths.png)", "",
            "Interactive: [report/lengths.html](report/lengths.html)", ""]


def _model_section(model: dict[str, Any]) -> list[str]:
    if not model:
        return []
    return ["## Model", "", _table([("source", model.get("source")), ("quantization", model.get("quantization")),
                                     ("compute dtype", model.get("compute_dtype")), ("LoRA targets", ", ".join(model.get("targets", []))),
                                     ("weights in memory (GiB)", model.get("weight_gib"))], ("", "")), "",
            _table([(r["module"], r["layers"], r["in_features"], r["out_features"], r["lora_params"]) for r in model.get("coverage", [])],
                   ("module", "layers", "in", "out", "LoRA parameters")), ""]


def _answers_section(gens: list[dict[str, Any]], limit: int = 12) -> list[str]:
    if not gens:
        return []
    short = lambda text, n: text if len(text) <= n else text[: n - 1] + "…"  # noqa: E731
    return [f"## Answers side by side ({min(limit, len(gens))} of {len(gens)})", "", SIDE_BY_SIDE_LEGEND, "",
            _table([(short(g["prompt"], 120), short(g["reference"], 80), short(marked(g, "base"), 120),
                     short(marked(g, "finetuned"), 120)) for g in gens[:limit]],
                   ("prompt", "reference", "base", "fine-tuned")), ""]


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """Write summary.json, report.md and the plots, holding the run directory while it does; return the summary."""
    with writing(run_dir, "stage 5 (report)"):
        return _write_report(Path(run_dir))


def _write_report(run_dir: Path) -> dict[str, Any]:
    s = build_summary(run_dir)
    write_json(run_dir / "summary.json", s)
    train = read_json(run_dir / "train" / "metrics.json", {})
    ev = read_json(run_dir / "eval" / "metrics.json", {})
    parts = [f"# QLoRA run report: {run_dir.name}", "",
             *_summary_section(s, run_dir),
             *_before_after_section(ev),
             *_export_section(read_json(run_dir / "export" / "metrics.json", {}), run_dir),
             "## Loss", "", "![loss](report/loss.png)", "", "Interactive: [report/loss.html](report/loss.html)", "",
             *_answers_section(read_generations(run_dir)),
             *_data_section(read_json(run_dir / "data" / "metrics.json", {})),
             *_model_section(read_json(run_dir / "model" / "metrics.json", {})),
             "## Appendix: training metrics", "", "```json",
             json.dumps({k: v for k, v in train.items() if k != "memory"}, indent=1), "```", "",
             "## Appendix: config", "", "```json", json.dumps(read_json(run_dir / "config.json"), indent=1), "```", "",
             "## Appendix: environment", "", "```json", json.dumps(environment(), indent=1), "```", ""]
    write_text(run_dir / "report.md", "\n".join(parts))
    return s


def show_report(run_dir: str | Path) -> None:
    """report.md in a notebook: its Markdown, each plot it links embedded as an image, and links to the run's own
    files shown as paths (a link to a file of the run directory leads nowhere where the notebook is read)."""
    import re

    from IPython.display import Image, Markdown, display

    run_dir = Path(run_dir)
    text = (run_dir / "report.md").read_text(encoding="utf-8")
    text = re.sub(r"(?<!!)\[[^\]]*\]\(((?:report|export|adapter|eval|train|data|model)/[^)]*)\)", r"`RUN_DIR/\1`", text)
    for i, part in enumerate(re.split(r"!\[[^\]]*\]\((report/[^)]+\.png)\)", text)):
        if i % 2:
            display(Image(filename=str(run_dir / part)))
        elif part.strip():
            display(Markdown(part))
