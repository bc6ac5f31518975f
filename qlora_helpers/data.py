"""Stage 1, how rows become examples: format, tokenize, clean and split the rows qlora_helpers.datasource read
(data.source -> datasource -> datafiles -> here), and write them into the run directory with a fingerprint.

Why this module is careful: the silent failures of instruction tuning live here. Loss on
prompt tokens, a missing end-of-turn token (the model never learns to stop), and a pad token
equal to the end token (masking it out of the loss) all produce a model that trains fine and
answers badly. Labels are built explicitly: -100 on the prompt, the response and its
end-of-turn token carry the loss. A person's text is tokenized as text: a special token's string inside it
(``<|im_end|>``, ``<|endoftext|>``) stays characters, never a turn boundary, an end-of-turn or a pad token.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, UserError, shorten
from .datafiles import DataError
from .datasource import FINGERPRINT, DataChanged, RowProblem, Source, check_source, same_data, to_turns
from .runlock import writing
from .runs import atomic_path, file_sha256, read_json, write_json, write_text
from .sources import model_fingerprint
from .stage import Stage, training_started

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


# --------------------------------------------------------------------------- formatting
def alpaca_parts(alpaca_key: str) -> tuple[str, str]:
    """(instruction, input) from an example's alpaca_key: JSON, or instruction NUL input (run directories made
    before the key was JSON)."""
    if "\x00" in alpaca_key:
        instruction, _, inp = alpaca_key.partition("\x00")
        return instruction, inp
    instruction, inp = json.loads(alpaca_key)
    return instruction, inp


@dataclass
class Formatter:
    """Turns (prompt messages, response) into input_ids and labels for one tokenizer and template."""
    tokenizer: Any
    template: str
    system_prompt: str = ""

    def prompt_text(self, turns: list[dict[str, str]], alpaca_key: str = "") -> str:
        if self.template == "alpaca":
            return self._alpaca_prompt(*(alpaca_parts(alpaca_key) if alpaca_key else (turns[-1]["content"], "")))
        return self.tokenizer.apply_chat_template(self._messages(turns), add_generation_prompt=True, tokenize=False)

    @staticmethod
    def _alpaca_prompt(instruction: str, inp: str) -> str:
        return ALPACA_PROMPT.format(with_input=", paired with an input that provides further context" if inp.strip() else "",
                                    instruction=instruction, input_block=f"### Input:\n{inp}\n\n" if inp.strip() else "")

    def _messages(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        """data.system_prompt first, unless the conversation brings its own system message."""
        if self.system_prompt and not (turns and turns[0]["role"] == "system"):
            return [{"role": "system", "content": self.system_prompt}] + turns
        return turns

    def completion_text(self, turns: list[dict[str, str]], response: str) -> str:
        """The response plus whatever the template puts after it (the end-of-turn token)."""
        if self.template == "alpaca":
            return response + self.tokenizer.eos_token
        msgs = self._messages(turns)
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

    # ----------------------------------------------------------------------- a person's text stays text
    @cached_property
    def control_tokens(self) -> list[str]:
        """The strings the tokenizer turns into control tokens: its special tokens, and added tokens the chat
        template uses (``<|im_end|>``, ``<|user|>``, ``<|endoftext|>``, ``</s>``), longest first."""
        template = str(getattr(self.tokenizer, "chat_template", None) or "")
        found = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special or t.content in template}
        return sorted({t for t in found | set(self.tokenizer.all_special_tokens) if t}, key=len, reverse=True)

    @cached_property
    def control_strings(self) -> re.Pattern | None:
        return re.compile("|".join(map(re.escape, self.control_tokens))) if self.control_tokens else None

    @cached_property
    def control_ids(self) -> set[int]:
        return set(self.tokenizer.convert_tokens_to_ids(self.control_tokens)) - {None}

    def holds_control_text(self, texts) -> bool:
        """Whether any of these texts holds a control token's string."""
        return self.control_strings is not None and any(self.control_strings.search(t) for t in texts if t)

    def user_texts(self, turns, response: str, alpaca_key: str = "") -> list[str]:
        texts = [t["content"] for t in turns] + [response, self.system_prompt]
        return texts + (list(alpaca_parts(alpaca_key)) if alpaca_key and self.template == "alpaca" else [])

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _split_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []

    def _text_ids(self, text: str) -> list[int]:
        """A person's text as text: a special token's string becomes its characters' tokens. Some tokenizers match
        their added tokens even when told not to; there each such string is tokenized as two halves, which match
        nothing."""
        ids = self._split_ids(text)
        if not self.control_ids & set(ids):
            return ids
        ids, pos = [], 0
        for found in self.control_strings.finditer(text):
            half = (found.start() + found.end()) // 2
            ids += self._split_ids(text[pos:found.start()]) + self._split_ids(text[found.start():half])
            pos = half
        ids += self._split_ids(text[pos:])
        if self.control_ids & set(ids):
            raise DataError(f"this tokenizer turns the text {shorten(text, 60)!r} into control tokens whatever is done; "
                            "remove the special token's string from the data")
        return ids

    def token_ids(self, turns, response, alpaca_key: str = "") -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids), each tokenized whole, exactly as at inference, unless a person's text in it
        holds a control token's string (rare): then the template's own pieces are tokenized as they are and the
        person's text between them as text."""
        in_prompt = self.holds_control_text(self.user_texts(turns, "", alpaca_key))
        in_answer = self.holds_control_text([response])
        pieces = self._pieces(turns, response, alpaca_key) if in_prompt or in_answer else None
        return (pieces[0] if in_prompt else self._ids(self.prompt_text(turns, alpaca_key)),
                pieces[1] if in_answer else self._ids(self.completion_text(turns, response)))

    def prompt_ids(self, turns, alpaca_key: str = "") -> list[int]:
        """The prompt's token ids, a person's text tokenized as text (what generation should be given)."""
        return self.token_ids(turns, "", alpaca_key)[0]

    def _pieces(self, turns, response, alpaca_key) -> tuple[list[int], list[int]]:
        nonce = secrets.token_hex(6)
        holes: dict[str, str] = {}

        def hole(text: str) -> str:
            key = f"\ue000{nonce}.{len(holes)}\ue001"
            holes[key] = text
            return key

        if self.template == "alpaca":
            instruction, inp = alpaca_parts(alpaca_key) if alpaca_key else (turns[-1]["content"], "")
            prompt = self._alpaca_prompt(hole(instruction), hole(inp) if inp.strip() else "")
            return self._fill(prompt, holes, nonce), self._text_ids(response) + [self.tokenizer.eos_token_id]
        msgs = [{**m, "content": hole(m["content"])} for m in self._messages(turns)]
        prompt = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        full = self.tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": hole(response)}], tokenize=False)
        if not full.startswith(prompt):
            raise DataError("the chat template renders the prompt differently once an answer follows it, so a "
                            "special token's string in the data cannot be kept as text; use data.template=alpaca")
        return self._fill(prompt, holes, nonce), self._fill(full[len(prompt):], holes, nonce)

    def _fill(self, rendered: str, holes: dict[str, str], nonce: str) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(re.split("(" + "|".join(map(re.escape, holes)) + ")", rendered)):
            if i % 2:
                ids += self._text_ids(holes[piece])
            elif nonce in piece:
                raise DataError("the chat template changes the text of a message, so a special token's string in "
                                "the data cannot be kept as text; use data.template=alpaca")
            elif piece:
                ids += self._ids(piece)
        return ids

    def encode(self, turns, response, alpaca_key="", max_len: int | None = None, truncate: bool = False):
        prompt_ids, completion_ids = self.token_ids(turns, response, alpaca_key)
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
DROP_REASONS = ("missing_field", "not_a_string", "bad_messages", "needs_chat_template", "empty_response", "duplicate",
                "too_long")


def clean_and_tokenize(rows: list[dict[str, Any]], fmt: str, formatter: Formatter, cfg: Config):
    """Drop bad rows (counted by reason), tokenize the rest. Returns (examples, counts)."""
    counts: Counter = Counter()
    seen: set[str] = set()
    kept = []
    for idx, row in enumerate(rows):
        try:
            turns, response, alpaca_key = to_turns(row, fmt, cfg)
        except RowProblem as problem:
            counts[problem.reason] += 1
            continue
        if not response.strip():
            counts["empty_response"] += 1
            continue
        key = json.dumps([turns, response, alpaca_key if formatter.template == "alpaca" else ""], sort_keys=True)
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
        if formatter.holds_control_text(formatter.user_texts(turns, response, alpaca_key)):
            counts["special_token_text"] += 1  # kept, tokenized as text
        enc.update(row_index=idx, prompt_messages=json.dumps(turns), alpaca_key=alpaca_key,
                   response=response, task=str(row.get("task", "")))
        kept.append(enc)
    return kept, counts


def keep_pad_off_end_token(tokenizer, end_token_id: int) -> None:
    """Right padding, and a pad token that is not the end-of-turn token.

    Labels here never depend on the pad id, but any code that masks padding by id (a collator, a loss, a
    generation loop) would mask the stop signal too if they were equal, and the model would never learn to
    stop. Phi-3 pads with its EOS, which is the end token under the Alpaca template: unk is used instead.
    """
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != end_token_id:
        return
    for candidate in (tokenizer.unk_token_id, *tokenizer.all_special_ids):
        if candidate is not None and candidate != end_token_id:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(candidate)
            return
    raise DataError(f"the tokenizer has no special token other than the end-of-turn token "
                    f"{tokenizer.convert_ids_to_tokens(end_token_id)!r} to pad with")


def build_examples(source: Source, cfg: Config, tokenizer) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Clean, format and tokenize every row; returns the examples and what happened to the rows."""
    formatter = Formatter(tokenizer, cfg.data.template, cfg.data.system_prompt)
    keep_pad_off_end_token(tokenizer, formatter.end_token_id)
    examples, dropped = clean_and_tokenize(source.rows, source.format, formatter, cfg)
    truncated, control = dropped.pop("truncated", 0), dropped.pop("special_token_text", 0)
    summary = {
        "source": source.origin, "format": source.format, "template": cfg.data.template,
        "end_token": formatter.end_token, "end_token_id": formatter.end_token_id, "pad_token": tokenizer.pad_token,
        "max_seq_len": cfg.data.max_seq_len, "too_long": cfg.data.too_long,
        "rows_read": len(source.rows), "rows_kept": len(examples), "rows_dropped": sum(dropped.values()),
        "dropped_by_reason": {reason: dropped.get(reason, 0) for reason in DROP_REASONS},
        "truncated": truncated,
        "rows_with_special_token_text": control,  # a special token's string in a person's text, kept as text
    }
    if not examples:
        raise DataError(f"{source.origin}: every row was dropped ({summary['dropped_by_reason']})")
    return examples, summary


def split_examples(examples: list[dict], cfg: Config) -> tuple[list[dict], list[dict]]:
    """Deterministic, non-overlapping validation and training subsets drawn from one shuffle."""
    order = list(range(len(examples)))
    random.Random(cfg.data.seed).shuffle(order)
    val_n = min(cfg.data.val_size, max(1, len(order) // 5))
    val = [examples[i] for i in order[:val_n]]
    train = [examples[i] for i in order[val_n: val_n + cfg.data.train_size]]
    if not train:
        raise DataError(f"data.source '{shorten(cfg.data.source, 200)}': no training examples left after cleaning")
    return train, val


def length_stats(examples: list[dict]) -> dict[str, Any]:
    """Tokens per example (to choose data.max_seq_len) and how many carry the loss (response + end token)."""
    lengths = np.array([len(e["input_ids"]) for e in examples])
    total = int(lengths.sum())
    response = sum(sum(1 for l in e["labels"] if l != IGNORE_INDEX) for e in examples)
    pct = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 95, 99)}
    return {"count": len(examples), "tokens": total, "min": int(lengths.min()), **pct,
            "max": int(lengths.max()), "mean": round(float(lengths.mean()), 1),
            "prompt_tokens": total - response, "response_tokens": response,
            "response_token_share": round(response / max(1, total), 4)}


# --------------------------------------------------------------------------- the stage
def prepare_data(stage: Stage, tokenizer, source: Source | None = None) -> dict[str, Any]:
    """Everything notebook 01 does, written under ``RUN_DIR/data``; returns the stage metrics.

    ``source`` is what :func:`check_source` returned, so a file is read once; without it the source is read here.
    """
    cfg, out = stage.cfg, stage.path("data")
    source = source or check_source(cfg)
    examples, metrics = build_examples(source, cfg, tokenizer)
    train, val = split_examples(examples, cfg)
    metrics.update(train_examples=len(train), val_examples=len(val),
                   train_lengths=length_stats(train), val_lengths=length_stats(val))
    texts = {name: "".join(json.dumps(e) + "\n" for e in part) for name, part in (("train", train), ("val", val))}
    record = {"source": source.fingerprint, "model": model_fingerprint(stage.model), "split": {
        "seed": cfg.data.seed, "train_examples": len(train), "val_examples": len(val),
        **{f"{name}_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest() for name, text in texts.items()}}}
    with writing(stage.run_dir, "stage 1 (data)"):
        # Changed data is refused here once training has begun, before anything is written.
        if not same_data(out, cfg, record, training_started(stage.run_dir), stage.run_dir):
            write_json(out / FINGERPRINT, record)  # first: a kill before the splits are written leaves them unmatched
            for name, text in texts.items():
                write_text(out / f"{name}.jsonl", text)
        write_json(out / "metrics.json", metrics)
    return metrics


def check_data(source: Source, cfg: Config, tokenizer) -> dict[str, Any]:
    """What ``check-data`` reports: the cleaning counts and token lengths over every kept row, nothing written."""
    examples, metrics = build_examples(source, cfg, tokenizer)
    return {**metrics, "lengths": length_stats(examples)}


def load_split(run_dir: str | Path, name: str) -> list[dict[str, Any]]:
    """data/train.jsonl or data/val.jsonl, as stage 1 wrote them."""
    from .runs import CorruptFile

    path = Path(run_dir) / "data" / f"{name}.jsonl"
    if not path.exists():
        raise UserError(f"{path} is missing: run notebook 01_data_preparation on this run directory first")
    recorded = (read_json(path.parent / FINGERPRINT) or {}).get("split", {}).get(f"{name}_sha256")
    if recorded and file_sha256(path) != recorded:
        raise DataChanged(f"{path}: not the file stage 1 wrote (its SHA-256 differs from data/{FINGERPRINT}); it was "
                          "changed since: run notebook 01 again (before training), or start a new run")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise CorruptFile(f"{path}: line {number} cannot be read back; run notebook 01 again") from None
    return rows


def load_tokenizer(stage: Stage):
    """The base model's tokenizer, with right padding and a pad token that is not the end-of-turn token.
    Every stage loads its own, so the pad token is kept off the end-of-turn token here, once for all."""
    from transformers import AutoTokenizer

    source = stage.model  # a path that is no model is its own one-line error
    try:
        # No clean-up of spaces on decode: it deletes spaces before punctuation in BPE tokenizers' output.
        tok = AutoTokenizer.from_pretrained(source.location, clean_up_tokenization_spaces=False, **source.kwargs)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, and the tokenizers library's bare Exception
        raise UserError(f"model.name '{shorten(stage.cfg.model.name, 200)}': cannot load its tokenizer ({type(exc).__name__}: "
                        f"{shorten((str(exc).strip().splitlines() or [''])[0], 200)})") from None
    keep_pad_off_end_token(tok, end_of_turn_id(tok, stage.cfg.data.template))
    return tok


def lengths_table(metrics: dict[str, Any]):
    """data/metrics.json's token lengths of the two splits as a table for notebook 01: counts as whole numbers, the
    mean to one decimal, the response's share of the tokens as a percentage."""
    import pandas as pd

    def shown(key: str, value) -> str:
        if key.endswith("share"):
            return f"{value:.1%}"
        return f"{value:,.1f}" if key == "mean" else f"{int(value):,}"

    return pd.DataFrame({label: {k: shown(k, v) for k, v in metrics[f"{split}_lengths"].items()}
                         for split, label in (("train", "train"), ("val", "validation"))})


def plot_lengths(run_dir: str | Path) -> dict[str, str]:
    """Histogram of training example lengths in tokens (to choose data.max_seq_len): PNG and interactive HTML."""
    import plotly.graph_objects as go
    from matplotlib.figure import Figure

    lengths = [len(e["input_ids"]) for e in load_split(run_dir, "train")]
    out = Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    ax.hist(lengths, bins=40)
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    fig.tight_layout()
    with atomic_path(out / "lengths.png") as tmp:
        fig.savefig(tmp, dpi=120)
    with atomic_path(out / "lengths.html") as tmp:
        go.Figure(go.Histogram(x=lengths, nbinsx=40)).update_layout(
            xaxis_title="tokens per example", yaxis_title="examples").write_html(tmp, include_plotlyjs="cdn")
    return {"length_histogram": "report/lengths.png", "length_histogram_html": "report/lengths.html"}


def loss_mask_view(tokenizer, example: dict[str, Any]) -> str:
    """HTML of one example's tokens: grey = prompt (no loss), green = trained on."""
    import html

    spans = []
    for tid, lab in zip(example["input_ids"], example["labels"]):
        tok = html.escape(tokenizer.decode([tid])).replace("\n", "\\n")
        style = "background:#c8f7c5" if lab != IGNORE_INDEX else "color:#888"
        spans.append(f'<span style="{style};border:1px solid #ddd;margin:1px;padding:0 2px">{tok}</span>')
    return "<div style='font-family:monospace;line-height:1.9'>" + "".join(spans) + "</div>"


def token_table(tokenizer, example: dict[str, Any], first: int = 0, last: int | None = None):
    """One example token by token (a pandas DataFrame): the token, its id, its label, and whether it carries the loss."""
    import pandas as pd

    rows = [{"token": tokenizer.decode([t]), "input_id": t, "label": l, "carries loss": l != IGNORE_INDEX}
            for t, l in zip(example["input_ids"], example["labels"])]
    return pd.DataFrame(rows[first:last], index=range(first, first + len(rows[first:last])))

