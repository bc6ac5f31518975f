"""Stage 1: read, check, clean, format, tokenize and split the instruction data.

Why this module is careful: the silent failures of instruction tuning live here. Loss on
prompt tokens, a missing end-of-turn token (the model never learns to stop), and a pad token
equal to the end token (masking it out of the loss) all produce a model that trains fine and
answers badly. Labels are built explicitly: -100 on the prompt, the response and its
end-of-turn token carry the loss.
"""
from __future__ import annotations

import csv
import io
import json
import random
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

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
@dataclass
class Source:
    """The rows of data.source, checked before any model is loaded, with where they came from and their shape."""
    rows: list[dict[str, Any]]
    origin: str
    format: str

    def describe(self) -> str:
        return f"{self.origin}: {len(self.rows):,} rows, {self.format} format"


def check_source(cfg: Config) -> Source:
    """Read data.source and check its shape; notebook 01 and ``check-data`` call this before loading a tokenizer.

    A person's own file (or folder) is validated strictly as it is read (see :func:`validate_rows`): a broken
    line, a missing column or a number where text belongs stops here with the file, row and field, so it costs
    a second and not a model load. Hub and embedded data are taken as published: bad rows are dropped and
    counted by reason when cleaning.
    """
    rows, origin = load_raw(cfg)
    if not rows:
        raise DataError(f"data.source '{cfg.data.source}': no rows")
    fmt = detect_format(rows, cfg)
    require_fields(rows, fmt, cfg, origin)
    return Source(rows, origin, fmt)


def load_raw(cfg: Config) -> tuple[list[dict[str, Any]], str]:
    """Rows as dicts plus a label saying where they came from."""
    source = cfg.data.source
    if source == "embedded":
        return generate_embedded(cfg.data.embedded_size, cfg.data.seed), "embedded (generated, seed %d)" % cfg.data.seed
    path = Path(source).expanduser()
    if path.exists():
        files = data_files(path)
        label = f"local folder {path} ({len(files)} files)" if path.is_dir() else f"local file {path}"
        return load_local(files, cfg), label
    if path.suffix.lower() in _BUILDERS or source.startswith(("/", ".", "~")):
        raise DataError(f"data.source '{source}': no such file or folder")
    from .kaggle import attached_dataset

    attached = attached_dataset(source)  # on Kaggle, a copy attached under /kaggle/input beats the hub
    if attached:
        return load_local(data_files(attached), cfg), f"Kaggle input {attached} (in place of hub dataset {source})"
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


def data_files(path: Path) -> list[Path]:
    """The file itself, or every .json/.jsonl/.csv/.parquet file under a folder (a mounted Kaggle dataset),
    skipping hidden ones such as .ipynb_checkpoints."""
    if not path.is_dir():
        if path.suffix.lower() not in _BUILDERS:
            raise DataError(f"{path}: unsupported file type '{path.suffix}' (use .json, .jsonl, .csv or .parquet)")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _BUILDERS
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path}: no .json, .jsonl, .csv or .parquet files found")
    return files


def load_local(files: list[Path], cfg: Config) -> list[dict[str, Any]]:
    """Read each file with `datasets` and validate it strictly; the first file decides the format."""
    rows: list[dict[str, Any]] = []
    fmt = None
    for f in files:
        part = read_file(f, cfg)
        fmt = fmt or detect_format(part, cfg, str(f))
        validate_rows(part, fmt, cfg, RowNamer(f))
        rows.extend(part)
    return rows


class RowNamer:
    """Names row i of a file the way a person finds it in an editor: the line of a JSONL file, the index in a
    JSON array or a Parquet file, the row of a CSV file counting the header as row 1 (as a spreadsheet does)."""

    def __init__(self, path: Path):
        self.path = path
        suffix = path.suffix.lower()
        if suffix in (".csv", ".parquet"):
            self.kind = suffix[1:]
        else:
            with open(path, "rb") as f:
                head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
            self.kind = "array" if head.startswith(b"[") else "lines"
        self._line_numbers: list[int] | None = None

    def row(self, i: int) -> str:
        if self.kind == "lines":
            if self._line_numbers is None:  # only on an error: blank lines hold no row
                with open(self.path, "rb") as f:
                    self._line_numbers = [n for n, line in enumerate(f, 1) if line.strip()]
            return f"line {self._line_numbers[i]}"
        if self.kind == "csv":
            return f"row {i + 2}"
        return f"index {i}"

    def __call__(self, i: int) -> str:
        return f"{self.path}: {self.row(i)}"

    def columns(self) -> str:
        """Where the column names are: the header of a CSV file, else the first row."""
        return f"{self.path}: row 1 (the header)" if self.kind == "csv" else self(0)


@contextmanager
def _quiet_datasets():
    """`datasets` logs its own multi-line error and progress bars; the user gets one line from us instead."""
    import datasets
    from datasets.utils import logging as ds_logging

    level, bars = ds_logging.get_verbosity(), datasets.is_progress_bar_enabled()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def read_file(path: Path, cfg: Config) -> list[dict[str, Any]]:
    """One file through `datasets`; if that fails, find the line or row (and field) to name instead."""
    if path.stat().st_size == 0 or (path.suffix.lower() != ".parquet" and path.stat().st_size < 65536
                                     and not path.read_bytes().strip()):
        raise DataError(f"{path}: the file is empty")
    import datasets

    kwargs: dict[str, Any] = {}
    if path.suffix.lower() == ".csv":
        # A CSV has no types: read every cell as text ("007" stays "007"), an empty cell as "".
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                header = next(csv.reader(f), [])
        except (UnicodeDecodeError, csv.Error) as exc:
            _raise_read_error(path, cfg, exc)
        kwargs = {"features": datasets.Features({name: datasets.Value("string") for name in header}),
                  "keep_default_na": False}
    with _quiet_datasets():
        try:
            ds = datasets.load_dataset(_BUILDERS[path.suffix.lower()], data_files=str(path), split="train", **kwargs)
        except Exception as exc:  # whatever pyarrow/pandas raised, the user is told where and what
            _raise_read_error(path, cfg, exc)
    return ds.to_list()


def _raise_read_error(path: Path, cfg: Config, exc: Exception) -> NoReturn:
    """`datasets` (pyarrow) says 'changed from string to number in row 1' of some block; re-read the file in
    plain Python only to name the exact line/row and field, then raise that as one DataError."""
    namer = RowNamer(path)
    if namer.kind != "parquet":
        _check_utf8(path, namer)
        rows = _parse_rows(path, namer, path.read_text(encoding="utf-8-sig"))
        if not rows:
            raise DataError(f"{path}: no rows" + (", only a header" if namer.kind == "csv" else ""))
        if namer.kind != "csv":
            validate_rows(rows, detect_format(rows, cfg, str(path)), cfg, namer)
            _check_one_type_per_field(rows, namer)
    cause = exc.__cause__ or exc
    message = (str(cause).strip().splitlines() or [""])[0][:200]
    raise DataError(f"{path}: could not be read as {path.suffix[1:]} ({type(cause).__name__}: {message})") from None


def _check_utf8(path: Path, namer: RowNamer) -> None:
    """Name the first byte that is not UTF-8 by line, and by row and field where the rest of the file parses."""
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                column = err.start + 1  # `err` is unbound after the except clause
                break
        else:
            return
    where, field = f"{path}: line {line_number}", ""
    try:
        rows = _parse_rows(path, namer, path.read_bytes().decode("utf-8-sig", errors="replace"))
        i, field = next((i, k) for i, row in enumerate(rows) for k, v in row.items()
                        if "\ufffd" in (v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)))
        where = namer(i)
    except (DataError, StopIteration):
        pass
    raise DataError(f"{where}: {f'field {field!r} ' if field else ''}is not UTF-8 text (byte 0x{line[column - 1]:02x} "
                    f"on line {line_number}, column {column}); save the file with UTF-8 encoding")


def _parse_rows(path: Path, namer: RowNamer, text: str) -> list[dict[str, Any]]:
    """The rows of a text file parsed in plain Python, raising a DataError at the first line that does not parse."""
    if namer.kind == "csv":
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        rows: list[dict[str, Any]] = []
        try:
            header = next(reader, [])
            for values in reader:
                if not values:
                    continue
                if len(values) > len(header):
                    raise DataError(f"{path}: row {len(rows) + 2}: {len(values)} values but the header has {len(header)} "
                                    "columns (put a value that holds a comma in double quotes)")
                rows.append(dict(zip(header, values)))
        except csv.Error as err:
            raise DataError(f"{path}: row {len(rows) + 2}: not valid CSV ({err})") from None
        return rows
    if namer.kind == "array":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {err.lineno}, column {err.colno}: not valid JSON"
                            f"{_near_field(text, err.pos)} ({err.msg})") from None
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON array of objects, got {describe_value(items)}")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise DataError(f"{path}: index {i}: expected a JSON object, got {describe_value(item)}")
        return items
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 is valid inside a JSON string
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {number}: not valid JSON{_near_field(line, err.pos)} "
                            f"({err.msg} at column {err.colno})") from None
        if not isinstance(item, dict):
            raise DataError(f"{path}: line {number}: expected one JSON object per line, got {describe_value(item)}")
        rows.append(item)
    return rows


def _near_field(text: str, pos: int) -> str:
    """' near field 'output'' when a key precedes the position of a JSON syntax error."""
    keys = re.findall(r'"((?:[^"\\\n]|\\.)*)"\s*:', text[:pos])
    return f" near field '{keys[-1]}'" if keys else ""


def _check_one_type_per_field(rows: list[dict[str, Any]], namer: RowNamer) -> None:
    """A column holds one type in every row (pyarrow insists), even one the format does not use."""
    first: dict[str, tuple[str, int]] = {}
    for i, row in enumerate(rows):
        for key, value in row.items():
            if value is None:
                continue
            kind = describe_value(value).split(" (")[0]
            seen = first.setdefault(key, (kind, i))
            if seen[0] != kind:
                raise DataError(f"{namer(i)}: field '{key}' is {describe_value(value)} but {namer.row(seen[1])} has "
                                f"{seen[0]}; a field must hold one type in every row")


def describe_value(value: Any) -> str:
    """What a person would call this JSON value, for error messages."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else type(value).__name__


# --------------------------------------------------------------------------- shapes
def required_fields(fmt: str, cfg: Config) -> tuple[str, ...]:
    return {"alpaca": ("instruction", "output"), "pairs": (cfg.data.prompt_column, cfg.data.response_column),
            "chat": ("messages",)}[fmt]


def detect_format(rows: list[dict[str, Any]], cfg: Config, where: str = "") -> str:
    """data.format, or the shape whose columns the first row has; a half-matching shape is chosen so that the
    missing column can be named (``require_fields``) rather than a vague 'unknown format'."""
    if cfg.data.format != "auto":
        return cfg.data.format
    keys = set(rows[0]) if rows else set()
    if "messages" in keys:
        return "chat"
    if keys & {"instruction", "output"}:
        return "alpaca"
    if keys & {cfg.data.prompt_column, cfg.data.response_column}:
        return "pairs"
    raise DataError(f"{where or 'data.source ' + repr(cfg.data.source)}: cannot tell the format from columns "
                    f"{sorted(keys)}; expected instruction/input/output (alpaca), messages (chat), or set "
                    "data.format=pairs with data.prompt_column and data.response_column")


def require_fields(rows: list[dict[str, Any]], fmt: str, cfg: Config, where: str) -> None:
    """Every column the format needs exists in some row (a missing column is a mistake, not a bad row)."""
    for name in required_fields(fmt, cfg):
        if not any(name in row for row in rows):
            found = sorted({k for row in rows[:100] for k in row})
            hint = " (set data.prompt_column / data.response_column)" if fmt == "pairs" else ""
            raise DataError(f"{where}: no field '{name}' in any row; the {fmt} format needs "
                            f"{', '.join(required_fields(fmt, cfg))}{hint}; found {', '.join(found) or 'no columns'}")


def validate_rows(rows: list[dict[str, Any]], fmt: str, cfg: Config, namer: RowNamer) -> None:
    """Strict checks for a person's own file, before any model is loaded.

    A missing column, a value of the wrong type (a number where text belongs) or a malformed chat message
    means the file or the column mapping is wrong, so it stops with the file, row and field instead of
    silently dropping rows. A null or absent value in one row is ordinary missing data: it is dropped and
    counted as ``missing_field`` when cleaning. The checks are :func:`to_turns`'s, the same that cleaning uses.
    """
    if not rows:
        raise DataError(f"{namer.path}: no rows")
    require_fields(rows, fmt, cfg, namer.columns())
    for i, row in enumerate(rows):
        try:
            to_turns(row, fmt, cfg)
        except RowProblem as problem:
            if problem.reason != "missing_field":
                raise DataError(f"{namer(i)}: field '{problem.field}' {problem.detail}") from None


class RowProblem(Exception):
    """Why one row cannot become an example: ``reason`` is its cleaning count, ``field`` the culprit."""

    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(f"field '{field}' {detail}")
        self.reason, self.field, self.detail = reason, field, detail


CHAT_ROLES = ("system", "user", "assistant")


def _text(mapping: dict[str, Any], key: str, field: str = "", optional: bool = False) -> str:
    value = mapping.get(key)
    if value is None:
        if optional:
            return ""
        raise RowProblem("missing_field", field or key, "is missing")
    if not isinstance(value, str):
        raise RowProblem("not_a_string", field or key, f"is {describe_value(value)}, expected text")
    return value


def to_turns(row: dict[str, Any], fmt: str, cfg: Config) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, response, instruction text for the Alpaca template), or raise RowProblem."""
    if fmt == "alpaca":
        instruction, inp, out = _text(row, "instruction"), _text(row, "input", optional=True), _text(row, "output")
        user = instruction + (f"\n\n{inp}" if inp.strip() else "")
        return [{"role": "user", "content": user}], out, instruction + "\x00" + inp
    if fmt == "pairs":
        prompt, out = _text(row, cfg.data.prompt_column), _text(row, cfg.data.response_column)
        return [{"role": "user", "content": prompt}], out, prompt + "\x00"
    msgs = row.get("messages")
    if msgs is None or (isinstance(msgs, list) and not msgs):
        raise RowProblem("missing_field", "messages", "is missing or empty")
    if not isinstance(msgs, list):
        raise RowProblem("bad_messages", "messages", f"is {describe_value(msgs)}, expected a list of {{role, content}} objects")
    turns = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RowProblem("bad_messages", f"messages[{j}]", f"is {describe_value(m)}, expected an object with role and content")
        if m.get("role") not in CHAT_ROLES:
            raise RowProblem("bad_messages", f"messages[{j}].role", f"is {m.get('role')!r}, expected one of {', '.join(CHAT_ROLES)}")
        turns.append({"role": m["role"], "content": _text(m, "content", f"messages[{j}].content")})
    if turns[-1]["role"] != "assistant":
        raise RowProblem("bad_messages", "messages", f"ends with a '{turns[-1]['role']}' message; the last one must be "
                         "the assistant's answer")
    last_user = next((m["content"] for m in reversed(turns[:-1]) if m["role"] == "user"), None)
    if last_user is None:
        raise RowProblem("bad_messages", "messages", "has no user message before the assistant's answer")
    return turns[:-1], turns[-1]["content"], last_user + "\x00"


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
        return self.tokenizer.apply_chat_template(self._messages(turns), add_generation_prompt=True, tokenize=False)

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
DROP_REASONS = ("missing_field", "not_a_string", "bad_messages", "empty_response", "duplicate", "too_long")


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
    truncated = dropped.pop("truncated", 0)
    summary = {
        "source": source.origin, "format": source.format, "template": cfg.data.template,
        "end_token": formatter.end_token, "end_token_id": formatter.end_token_id, "pad_token": tokenizer.pad_token,
        "max_seq_len": cfg.data.max_seq_len, "too_long": cfg.data.too_long,
        "rows_read": len(source.rows), "rows_kept": len(examples), "rows_dropped": sum(dropped.values()),
        "dropped_by_reason": {reason: dropped.get(reason, 0) for reason in DROP_REASONS},
        "truncated": truncated,
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
        raise DataError(f"data.source '{cfg.data.source}': no training examples left after cleaning")
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
def prepare_data(cfg: Config, run_dir: str | Path, tokenizer, source: Source | None = None) -> dict[str, Any]:
    """Everything notebook 01 does, written under ``run_dir/data``; returns the stage metrics.

    ``source`` is what :func:`check_source` returned, so a file is read once; without it the source is read here.
    """
    out = Path(run_dir) / "data"
    out.mkdir(parents=True, exist_ok=True)
    examples, metrics = build_examples(source or check_source(cfg), cfg, tokenizer)
    train, val = split_examples(examples, cfg)
    for name, part in (("train", train), ("val", val)):
        with open(out / f"{name}.jsonl", "w") as f:
            for e in part:
                f.write(json.dumps(e) + "\n")
    metrics.update(train_examples=len(train), val_examples=len(val),
                   train_lengths=length_stats(train), val_lengths=length_stats(val))
    write_json(out / "metrics.json", metrics)
    return metrics


def check_data(source: Source, cfg: Config, tokenizer) -> dict[str, Any]:
    """What ``check-data`` reports: the cleaning counts and token lengths over every kept row, nothing written."""
    examples, metrics = build_examples(source, cfg, tokenizer)
    return {**metrics, "lengths": length_stats(examples)}


def check_data_text(metrics: dict[str, Any]) -> str:
    """The ``check-data`` report for a terminal."""
    lengths = metrics["lengths"]
    share = lengths["response_token_share"]
    lines = [f"source: {metrics['source']} ({metrics['format']} format, {metrics['template']} template, "
             f"end-of-turn token {metrics['end_token']!r} trained on)",
             f"rows read: {metrics['rows_read']:,}",
             f"rows kept: {metrics['rows_kept']:,}",
             f"rows dropped: {metrics['rows_dropped']:,}",
             *[f"  {reason}: {n:,}" for reason, n in metrics["dropped_by_reason"].items()],
             f"responses truncated: {metrics['truncated']:,} (data.too_long={metrics['too_long']})",
             f"tokens per example (max_seq_len {metrics['max_seq_len']}): min {lengths['min']}, "
             + ", ".join(f"{p} {lengths[p]}" for p in ("p50", "p90", "p95", "p99")) + f", max {lengths['max']}",
             f"tokens that carry the loss: {share:.1%} response, {1 - share:.1%} prompt "
             f"({lengths['response_tokens']:,} / {lengths['prompt_tokens']:,})"]
    return "\n".join(lines)


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
