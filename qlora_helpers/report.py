"""Stage 5: gather what every stage measured into summary.json and report.md, with plots.

Only measured numbers: a figure a stage did not write shows as "not measured", never a guess.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import load_config
from .runs import environment, read_json, write_json
from .train import read_metrics_log

NM = "not measured"


def _max(*values):
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def plot_loss(run_dir: Path) -> dict[str, str]:
    """Training and validation loss on one figure: PNG (matplotlib) and interactive HTML (plotly)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    log = read_metrics_log(run_dir)
    train = [(r["step"], r["loss"]) for r in log if r["kind"] == "train" and r.get("loss") is not None]
    val = [(r["step"], r["eval_loss"]) for r in log if r["kind"] == "eval"]
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="training loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    pfig = go.Figure()
    if train:
        pfig.add_scatter(x=[s for s, _ in train], y=[l for _, l in train], name="training loss")
    if val:
        pfig.add_scatter(x=[s for s, _ in val], y=[l for _, l in val], name="validation loss", mode="lines+markers")
    pfig.update_layout(xaxis_title="optimizer step", yaxis_title="loss")
    pfig.write_html(out / "loss.html", include_plotlyjs="cdn")
    return {"loss_plot": "report/loss.png", "loss_plot_html": "report/loss.html"}


def plot_lengths(run_dir: Path) -> dict[str, str]:
    """Histogram of training example lengths in tokens (to choose data.max_seq_len)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    from .data import load_split

    lengths = [len(e["input_ids"]) for e in load_split(run_dir, "train")]
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(lengths, bins=40)
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    fig.tight_layout()
    fig.savefig(out / "lengths.png", dpi=120)
    plt.close(fig)
    go.Figure(go.Histogram(x=lengths, nbinsx=40)).update_layout(
        xaxis_title="tokens per example", yaxis_title="examples").write_html(out / "lengths.html", include_plotlyjs="cdn")
    return {"length_histogram": "report/lengths.png", "length_histogram_html": "report/lengths.html"}


def build_summary(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.json")
    data = read_json(run_dir / "data" / "metrics.json", {})
    model = read_json(run_dir / "model" / "metrics.json", {})
    train = read_json(run_dir / "train" / "metrics.json", {})
    ev = read_json(run_dir / "eval" / "metrics.json", {})
    mems = [m.get("memory", {}) for m in (model, train, ev)]
    base, tuned = ev.get("base", {}), ev.get("finetuned", {})
    artifacts = {"config": "config.json", "data_metrics": "data/metrics.json", "model_metrics": "model/metrics.json",
                 "metrics": "train/metrics.jsonl", "train_metrics": "train/metrics.json", "adapter": "adapter",
                 "eval_metrics": "eval/metrics.json", "generations": "eval/generations.jsonl", "report": "report.md",
                 "summary": "summary.json"}
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
        "train": {k: train.get(k) for k in ("steps", "examples_seen", "tokens_seen", "wall_s", "epochs",
                                            "tokens_per_s", "resumed_from_step", "best_eval_loss")},
        "eval": {"val_loss_before": base.get("val_loss"), "val_loss_after": tuned.get("val_loss"),
                 "perplexity_before": base.get("perplexity"), "perplexity_after": tuned.get("perplexity"),
                 "exact_match_before": base.get("exact_match"), "exact_match_after": tuned.get("exact_match"),
                 "rouge_l_before": base.get("rouge_l"), "rouge_l_after": tuned.get("rouge_l"),
                 "stop_rate_before": base.get("stop_rate"), "stop_rate_after": tuned.get("stop_rate"),
                 "generation_tokens_per_s": tuned.get("generation", {}).get("tokens_per_s")},
        "artifacts": artifacts,
    }


def _fmt(v: Any) -> str:
    if v is None:
        return NM
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c.replace("|", "\\|").replace("\n", " ") for c in r) + " |"
              for r in rows]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """Write summary.json and report.md at the run directory's root; return the summary."""
    run_dir = Path(run_dir)
    s = build_summary(run_dir)
    write_json(run_dir / "summary.json", s)
    cfg = read_json(run_dir / "config.json")
    data = read_json(run_dir / "data" / "metrics.json", {})
    model = read_json(run_dir / "model" / "metrics.json", {})
    train = read_json(run_dir / "train" / "metrics.json", {})
    ev = read_json(run_dir / "eval" / "metrics.json", {})
    env = environment()
    e, t = s["eval"], s["train"]
    gens = [json.loads(l) for l in (run_dir / "eval" / "generations.jsonl").read_text().splitlines()] \
        if (run_dir / "eval" / "generations.jsonl").exists() else []
    parts = [f"# QLoRA run report: {run_dir.name}", "",
             _table([("model", s["model"] or NM), ("data", s["data"] or NM), ("profile", s["profile"]),
                     ("steps", t["steps"]), ("epochs", t["epochs"]), ("examples seen", t["examples_seen"]),
                     ("tokens seen", t["tokens_seen"]), ("trainable / total parameters",
                      f"{_fmt(s['params']['trainable'])} / {_fmt(s['params']['total'])}"),
                     ("peak GPU reserved (GiB)", s["memory"]["peak_gpu_reserved_gib"] if s["memory"]["peak_gpu_reserved_gib"] is not None else "no GPU"),
                     ("peak RSS (GiB)", s["memory"]["peak_rss_gib"]), ("training wall time (s)", t["wall_s"]),
                     ("training tokens/s", t["tokens_per_s"]), ("resumed from step", t["resumed_from_step"] if t["resumed_from_step"] is not None else "not resumed")],
                    ("", "")), "",
             "## Before and after fine-tuning", "",
             _table([("validation loss", e["val_loss_before"], e["val_loss_after"]),
                     ("perplexity", e["perplexity_before"], e["perplexity_after"]),
                     ("exact match", e["exact_match_before"] if e["exact_match_before"] is not None else "no checkable answers",
                      e["exact_match_after"] if e["exact_match_after"] is not None else "no checkable answers"),
                     ("ROUGE-L", e["rouge_l_before"], e["rouge_l_after"]),
                     ("stops with end-of-turn", e["stop_rate_before"], e["stop_rate_after"]),
                     ("generation tokens/s", (ev.get("base", {}).get("generation") or {}).get("tokens_per_s"), e["generation_tokens_per_s"])],
                    ("metric", "base", "fine-tuned")), ""]
    by_task_b, by_task_a = ev.get("base", {}).get("exact_match_by_task"), ev.get("finetuned", {}).get("exact_match_by_task")
    if by_task_b and by_task_a:
        parts += ["Exact match by task:", "", _table([(k, by_task_b[k], by_task_a.get(k)) for k in by_task_b], ("task", "base", "fine-tuned")), ""]
    parts += ["## Loss", "", "![loss](report/loss.png)", "", "Interactive: [report/loss.html](report/loss.html)", ""]
    if data:
        dl = data.get("train_lengths", {})
        parts += ["## Data", "", _table([("source", data.get("source")), ("format / template", f"{data.get('format')} / {data.get('template')}"),
                                          ("end-of-turn token (trained on)", f"`{data.get('end_token')}`"),
                                          ("rows read", data.get("rows_read")), ("rows kept", data.get("rows_kept")),
                                          *[(f"dropped: {k}", v) for k, v in data.get("dropped_by_reason", {}).items()],
                                          ("truncated", data.get("truncated")),
                                          ("train / validation examples", f"{_fmt(data.get('train_examples'))} / {_fmt(data.get('val_examples'))}"),
                                          ("train tokens (p50 / p95 / max per example)", f"{dl.get('p50')} / {dl.get('p95')} / {dl.get('max')}"),
                                          ("share of tokens that carry the loss", dl.get("response_token_share"))], ("", "")),
                  "", "![lengths](report/lengths.png)", ""]
    if model:
        parts += ["## Model", "", _table([("source", model.get("source")), ("quantization", model.get("quantization")),
                                           ("compute dtype", model.get("compute_dtype")), ("LoRA targets", ", ".join(model.get("targets", []))),
                                           ("weights in memory (GiB)", model.get("weight_gib"))], ("", "")), "",
                  _table([(r["module"], r["layers"], r["in_features"], r["out_features"], r["lora_params"]) for r in model.get("coverage", [])],
                         ("module", "layers", "in", "out", "LoRA parameters")), ""]
    if gens:
        parts += ["## Answers side by side (greedy, same token budget)", "",
                  _table([(g["prompt"][:120], g["reference"][:80], g["base"][:120], g["finetuned"][:120]) for g in gens[:12]],
                         ("prompt", "reference", "base", "fine-tuned")), ""]
    parts += ["## Training", "", "```json", json.dumps({k: v for k, v in train.items() if k != "memory"}, indent=1), "```", "",
              "## Config", "", "```json", json.dumps(cfg, indent=1), "```", "",
              "## Environment", "", "```json", json.dumps(env, indent=1), "```", ""]
    (run_dir / "report.md").write_text("\n".join(parts))
    return s
