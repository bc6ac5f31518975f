"""Stage 1: read, check, clean, format, tokenize and split the instruction data.

Why this module is careful: the silent failures of instruction tuning live here. Loss on
prompt tokens, a missing end-of-turn token (the model never learns to stop), and a pad token
equal to the end token (masking it out of the loss) all produce a model that trains fine and
answers badly. Labels are built explicitly: -100 on the prompt, the response and its
end-of-turn token carry the loss.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, UserError
from .runs import write_json

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


class DataError(UserError):
    """A problem with the user's data, named by file, row and field; printed as one line."""


# --------------------------------------------------------------------------- embedded data
_WORDS = ("apple river stone cloud garden window yellow planet silver forest candle bridge orange music "
          "winter pencil rabbit castle dragon ocean butter copper desert engine feather guitar hammer island "
          "jacket kettle ladder mirror needle pillow rocket saddle tunnel violin wallet zebra anchor basket "
          "carpet dinner falcon ginger helmet insect jungle lemon marble noodle parrot quartz rubber spider "
          "tomato velvet walnut harbor meadow").split()
TASKS = ("add", "parity", "next_letter", "uppercase", "larger")


def _embedded_row(kind: str, rng: random.Random) -> dict[str, str]:
    if kind == "add":
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return {"instruction": f"What is {a} + {b}? Answer with the number only.", "input": "", "output": str(a + b)}
    if kind == "parity":
        k = rng.randint(0, 999)
        return {"instruction": "Is the number even or odd? Answer with one word.", "input": str(k),
                "output": "even" if k % 2 == 0 else "odd"}
    if kind == "next_letter":
        c = chr(ord("a") + rng.randint(0, 24))
        return {"instruction": f"Which letter comes right after '{c}' in the alphabet? Answer with the letter only.",
                "input": "", "output": chr(ord(c) + 1)}
    if kind == "uppercase":
        w = rng.choice(_WORDS)
        return {"instruction": "Write the word in capital letters.", "input": w, "output": w.upper()}
    a, b = rng.sample(range(0, 100), 2)
    return {"instruction": f"Which number is larger, {a} or {b}? Answer with the number only.",
            "input": "", "output": str(max(a, b))}


def generate_embedded(n: int, seed: int) -> list[dict[str, str]]:
    """A deterministic Alpaca-schema set of tasks whose answers can be checked exactly, without duplicates.

    A small model gets the gist of these from its pre-training but answers in prose; fine-tuning
    teaches it the task and the terse answer, which exact-match accuracy measures. Tasks with few
    distinct questions (25 letters) run out early; the others fill the set.
    """
    rng = random.Random(seed)
    rows, seen, attempts = [], set(), 0
    while len(rows) < n and attempts < 50 * n:
        kind = TASKS[attempts % len(TASKS)]
        attempts += 1
        row = _embedded_row(kind, rng)
        key = (row["instruction"], row["input"])
        if key in seen:
            continue
        seen.add(key)
        rows.append({**row, "task": kind})
    return rows


# --------------------------------------------------------------------------- loading
def load_raw(cfg: Config) -> tuple[list[dict[str, Any]], str]:
    """Rows as dicts plus a label saying where they came from."""
    source = cfg.data.source
    if source == "embedded":
        return generate_embedded(cfg.data.embedded_size, cfg.data.seed), "embedded (generated, seed %d)" % cfg.data.seed
    path = Path(source).expanduser()
    if path.exists():
        return load_local(path), f"local file {path}"
    import datasets  # deferred: importing datasets costs seconds

    kwargs = {"split": cfg.data.split}
    if cfg.data.revision:
        kwargs["revision"] = cfg.data.revision
    try:
        ds = datasets.load_dataset(source, **kwargs)
    except Exception as exc:  # the hub's errors are long; say what matters
        raise DataError(f"data.source '{source}': could not load from the hub or disk "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return ds.to_list(), f"hub dataset {source} (split {cfg.data.split})"


_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_local(path: Path) -> list[dict[str, Any]]:
    """A .json/.jsonl/.csv/.parquet file, or a folder of them, read with `datasets`."""
    files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no .json, .jsonl, .csv or .parquet files found")
    rows: list[dict[str, Any]] = []
    for f in files:
        if f.suffix not in _BUILDERS:
            raise DataError(f"{f}: unsupported file type '{f.suffix}' (use .json, .jsonl, .csv or .parquet)")
        if f.stat().st_size == 0:
            raise DataError(f"{f}: the file is empty")
        import datasets

        try:
            ds = datasets.load_dataset(_BUILDERS[f.suffix], data_files=str(f), split="train")
        except Exception as exc:
            raise DataError(f"{f}: could not be read as {f.suffix[1:]} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        rows.extend(ds.to_list())
    return rows


# --------------------------------------------------------------------------- shapes
def detect_format(rows: list[dict[str, Any]], cfg: Config) -> str:
    if cfg.data.format != "auto":
        return cfg.data.format
    keys = set(rows[0]) if rows else set()
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {cfg.data.prompt_column, cfg.data.response_column} <= keys:
        return "pairs"
    raise DataError(f"data.source '{cfg.data.source}': cannot tell the format from columns {sorted(keys)}; "
                    "expected instruction/input/output (alpaca), messages (chat), or set data.format=pairs "
                    "with data.prompt_column and data.response_column")


def to_turns(row: dict[str, Any], fmt: str, cfg: Config) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, response, instruction text for the Alpaca template) or raise KeyError/TypeError."""
    def text(key: str, optional: bool = False) -> str:
        if key not in row or row[key] is None:
            if optional:
                return ""
            raise KeyError(key)
        if not isinstance(row[key], str):
            raise TypeError(key)
        return row[key]

    if fmt == "alpaca":
        instruction, inp, out = text("instruction"), text("input", optional=True), text("output")
        user = instruction + (f"\n\n{inp}" if inp.strip() else "")
        return [{"role": "user", "content": user}], out, instruction + "\x00" + inp
    if fmt == "pairs":
        prompt, out = text(cfg.data.prompt_column), text(cfg.data.response_column)
        return [{"role": "user", "content": prompt}], out, prompt + "\x00"
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise KeyError("messages")
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
            raise TypeError("messages")
    if msgs[-1]["role"] != "assistant":
        raise TypeError("messages")
    prompt = [dict(role=m["role"], content=m["content"]) for m in msgs[:-1]]
    last_user = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    return prompt, msgs[-1]["content"], last_user + "\x00"


# --------------------------------------------------------------------------- formatting
@dataclass
class Formatter:
    """Turns (prompt messages, response) into input_ids and labels for one tokenizer and template."""
    tokenizer: Any
    template: str
    system_prompt: str = ""

    def prompt_text(self, turns: list[dict[str, str]], alpaca_key: str = "") -> str:
        if self.template == "alpaca":
            instruction, _, inp = (alpaca_key or turns[-1]["content"] + "\x00").partition("\x00")
            return ALPACA_PROMPT.format(
                with_input=", paired with an input that provides further context" if inp.strip() else "",
                instruction=instruction,
                input_block=f"### Input:\n{inp}\n\n" if inp.strip() else "")
        msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + turns
        return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def completion_text(self, turns: list[dict[str, str]], response: str) -> str:
        """The response plus whatever the template puts after it (the end-of-turn token)."""
        if self.template == "alpaca":
            return response + self.tokenizer.eos_token
        msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + turns
        prompt = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        full = self.tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(prompt) and response in full[len(prompt):]:
            return full[len(prompt):]
        return response + self.end_token

    @property
    def end_token(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.end_token_id)

    @property
    def end_token_id(self) -> int:
        return end_of_turn_id(self.tokenizer, self.template)

    def encode(self, turns, response, alpaca_key="", max_len: int | None = None, truncate: bool = False):
        prompt_ids = self.tokenizer(self.prompt_text(turns, alpaca_key), add_special_tokens=False)["input_ids"]
        completion_ids = self.tokenizer(self.completion_text(turns, response), add_special_tokens=False)["input_ids"]
        truncated = False
        if max_len is not None and len(prompt_ids) + len(completion_ids) > max_len:
            if not truncate or len(prompt_ids) >= max_len - 1:
                return None, False
            # Keep the prompt whole, cut the response: no end token, so the model is not taught to stop mid-sentence.
            completion_ids = completion_ids[: max_len - len(prompt_ids)]
            truncated = True
        return {"input_ids": prompt_ids + completion_ids,
                "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
                "prompt_len": len(prompt_ids)}, truncated


def end_of_turn_id(tokenizer, template: str) -> int:
    """The token that closes the assistant's turn: the first special token the chat template
    puts after a response (``<|im_end|>`` for ChatML, ``<|end|>`` for Phi-3), else EOS."""
    if template == "chat" and getattr(tokenizer, "chat_template", None):
        probe = "PROBE_RESPONSE"
        msgs = [{"role": "user", "content": "hi"}]
        prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": probe}], tokenize=False)
        tail = full[len(prompt):].split(probe, 1)[-1]
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        for tid in tokenizer(tail, add_special_tokens=False)["input_ids"]:
            if tid in special:
                return tid
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token and the chat template no end-of-turn token")
    return tokenizer.eos_token_id


# --------------------------------------------------------------------------- cleaning and splitting
def clean_and_tokenize(rows: list[dict[str, Any]], fmt: str, formatter: Formatter, cfg: Config):
    """Drop bad rows (counted by reason), tokenize the rest. Returns (examples, counts)."""
    counts: Counter = Counter()
    seen: set[str] = set()
    kept = []
    for idx, row in enumerate(rows):
        try:
            turns, response, alpaca_key = to_turns(row, fmt, cfg)
        except KeyError:
            counts["missing_field"] += 1
            continue
        except TypeError:
            counts["not_a_string"] += 1
            continue
        if not response.strip():
            counts["empty_response"] += 1
            continue
        key = json.dumps([turns, response], sort_keys=True)
        if key in seen:
            counts["duplicate"] += 1
            continue
        seen.add(key)
        enc, truncated = formatter.encode(turns, response, alpaca_key, cfg.data.max_seq_len, cfg.data.too_long == "truncate")
        if enc is None:
            counts["too_long"] += 1
            continue
        if truncated:
            counts["truncated"] += 1
        enc.update(row_index=idx, prompt_messages=json.dumps(turns), alpaca_key=alpaca_key,
                   response=response, task=str(row.get("task", "")))
        kept.append(enc)
    return kept, counts


def split_examples(examples: list[dict], cfg: Config) -> tuple[list[dict], list[dict]]:
    """Deterministic, non-overlapping validation and training subsets drawn from one shuffle."""
    order = list(range(len(examples)))
    random.Random(cfg.data.seed).shuffle(order)
    val_n = min(cfg.data.val_size, max(1, len(order) // 5))
    val = [examples[i] for i in order[:val_n]]
    train = [examples[i] for i in order[val_n: val_n + cfg.data.train_size]]
    if not train:
        raise DataError(f"data.source '{cfg.data.source}': no training examples left after cleaning")
    return train, val


def length_stats(examples: list[dict]) -> dict[str, Any]:
    lengths = np.array([len(e["input_ids"]) for e in examples])
    response = sum(sum(1 for l in e["labels"] if l != IGNORE_INDEX) for e in examples)
    pct = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 95, 99)}
    return {"count": len(examples), "tokens": int(lengths.sum()), "min": int(lengths.min()), **pct,
            "max": int(lengths.max()), "mean": round(float(lengths.mean()), 1),
            "response_token_share": round(response / max(1, int(lengths.sum())), 4)}


# --------------------------------------------------------------------------- the stage
def prepare_data(cfg: Config, run_dir: str | Path, tokenizer) -> dict[str, Any]:
    """Everything notebook 01 does, written under ``run_dir/data``; returns the stage metrics."""
    out = Path(run_dir) / "data"
    out.mkdir(parents=True, exist_ok=True)
    rows, origin = load_raw(cfg)
    if not rows:
        raise DataError(f"data.source '{cfg.data.source}': no rows")
    fmt = detect_format(rows, cfg)
    formatter = Formatter(tokenizer, cfg.data.template, cfg.data.system_prompt)
    examples, dropped = clean_and_tokenize(rows, fmt, formatter, cfg)
    if not examples:
        raise DataError(f"data.source '{cfg.data.source}': every row was dropped ({dict(dropped)})")
    train, val = split_examples(examples, cfg)
    for name, part in (("train", train), ("val", val)):
        with open(out / f"{name}.jsonl", "w") as f:
            for e in part:
                f.write(json.dumps(e) + "\n")
    truncated = dropped.pop("truncated", 0)
    metrics = {
        "source": origin, "format": fmt, "template": cfg.data.template,
        "end_token": formatter.end_token, "end_token_id": formatter.end_token_id,
        "rows_read": len(rows), "rows_kept": len(examples), "rows_dropped": sum(dropped.values()),
        "dropped_by_reason": {r: dropped.get(r, 0) for r in ("missing_field", "not_a_string", "empty_response", "duplicate", "too_long")},
        "truncated": truncated,
        "train_examples": len(train), "val_examples": len(val),
        "train_lengths": length_stats(train), "val_lengths": length_stats(val),
    }
    write_json(out / "metrics.json", metrics)
    return metrics


def load_split(run_dir: str | Path, name: str) -> list[dict[str, Any]]:
    path = Path(run_dir) / "data" / f"{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run notebook 01_data_preparation on this run directory first")
    with open(path) as f:
        return [json.loads(line) for line in f]


def loss_mask_view(tokenizer, example: dict[str, Any]) -> str:
    """HTML of one example's tokens: grey = prompt (no loss), green = trained on."""
    import html

    spans = []
    for tid, lab in zip(example["input_ids"], example["labels"]):
        tok = html.escape(tokenizer.decode([tid])).replace("\n", "\\n")
        style = "background:#c8f7c5" if lab != IGNORE_INDEX else "color:#888"
        spans.append(f'<span style="{style};border:1px solid #ddd;margin:1px;padding:0 2px">{tok}</span>')
    return "<div style='font-family:monospace;line-height:1.9'>" + "".join(spans) + "</div>"


def loss_mask_text(tokenizer, example: dict[str, Any]) -> str:
    """The same view for a terminal: trained-on tokens in [brackets]."""
    return "".join(f"[{tokenizer.decode([t])}]" if l != IGNORE_INDEX else tokenizer.decode([t])
                   for t, l in zip(example["input_ids"], example["labels"]))
