"""Reading the data a person points data.source at, strictly: every local file read directly (never through the
`datasets` cache, so nothing is written and nothing is served stale), and any row,
field or byte that does not fit named by file and row in one line before any model is loaded.

A person's own file (or folder) is validated as it is read: a broken line, a missing column or a number
where text belongs stops here with the file, row and field, so it costs a second and not a model load.
Hub and embedded data are taken as published: their bad rows are dropped and counted by reason when
cleaning (qlora_helpers.data).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from .config import Config, UserError
from .sources import generate_embedded, kaggle_input_dataset, looks_like_a_path


class DataError(UserError):
    """A problem with the user's data, named by file, row and field; printed as one line."""


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
    if looks_like_a_path(source):
        raise DataError(f"data.source '{source}': no such file or folder")
    attached = kaggle_input_dataset(source)  # on Kaggle, a copy attached under /kaggle/input beats the hub
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
    files = []
    for dirpath, dirnames, filenames in os.walk(path):  # hidden folders and more than 5 levels down are not read
        here = Path(dirpath)
        dirnames[:] = [] if len(here.relative_to(path).parts) >= 5 else [d for d in dirnames if not d.startswith(".")]
        files += [here / f for f in filenames if Path(f).suffix.lower() in _BUILDERS and not f.startswith(".")]
    files.sort()
    if not files:
        raise DataError(f"{path}: no .json, .jsonl, .csv or .parquet files found")
    return files


def load_local(files: list[Path], cfg: Config) -> list[dict[str, Any]]:
    """Read each file and validate it strictly; the first file decides the format."""
    rows: list[dict[str, Any]] = []
    fmt = None
    for f in files:
        part = read_file(f, cfg)
        fmt = fmt or detect_format(part, cfg, str(f))
        namer = RowNamer(f)
        validate_rows(part, fmt, cfg, namer)
        if namer.kind in ("array", "lines"):
            _check_one_type_per_field(part, namer)  # as Parquet and the hub's Arrow tables insist
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


def read_file(path: Path, cfg: Config) -> list[dict[str, Any]]:
    """One file's rows, read directly (Python's json and csv, pyarrow for Parquet), never through the `datasets`
    cache: nothing is written, a file rewritten in place is never served stale, and whatever does not parse is
    named by line or row (and field). A UTF-8 byte-order mark is accepted in every text format."""
    try:
        size = path.stat().st_size
        if path.suffix.lower() == ".parquet":
            return _read_parquet(path) if size else _empty(path)
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not data.strip().lstrip(b"\xef\xbb\xbf").strip():
        _empty(path)
    namer = RowNamer(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        _check_utf8(path, namer)  # names the line, row and field
        raise DataError(f"{path}: is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); save the "
                        "file with UTF-8 encoding") from None
    rows = _parse_rows(path, namer, text)
    if not rows:
        raise DataError(f"{path}: no rows" + (", only a header" if namer.kind == "csv" else ""))
    return rows


def _empty(path: Path) -> NoReturn:
    raise DataError(f"{path}: the file is empty")


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as exc:
        message = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{path}: could not be read as parquet ({type(exc).__name__}: {message})") from None


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
        csv.field_size_limit(2**31 - 1)  # a long answer is one field; the default limit is 128 KiB
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        rows: list[dict[str, Any]] = []
        try:
            header = next(reader, [])
            twice = sorted({name for name in header if header.count(name) > 1})
            if twice:
                raise DataError(f"{path}: row 1 (the header): column {twice[0]!r} appears {header.count(twice[0])} "
                                "times; give every column its own name")
            for values in reader:
                if not values:
                    continue
                if len(values) != len(header):
                    hint = ("put a value that holds a comma in double quotes" if len(values) > len(header)
                            else "every row needs a value, empty or not, for every column")
                    raise DataError(f"{path}: row {len(rows) + 2}: {len(values)} values but the header has "
                                    f"{len(header)} columns ({hint})")
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
            _one_object(path, text)
            raise DataError(f"{path}: line {number}: not valid JSON{_near_field(line, err.pos)} "
                            f"({err.msg} at column {err.colno})") from None
        if not isinstance(item, dict):
            raise DataError(f"{path}: line {number}: expected one JSON object per line, got {describe_value(item)}")
        rows.append(item)
    return rows


def _one_object(path: Path, text: str) -> None:
    """A .json file that holds one object (of arrays, say) rather than rows: say so rather than 'line 2'."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return
    raise DataError(f"{path}: expected a JSON array of objects, or one object per line (JSON Lines); got "
                    f"{describe_value(whole)}" + (f" with keys {', '.join(list(whole)[:5])}" if isinstance(whole, dict) else ""))


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


def _check_turn_order(turns: list[dict[str, str]]) -> None:
    """A conversation alternates user and assistant, starting with the user (after one optional system message)
    and ending with the assistant's answer, which is what it trains on; chat templates assume this order."""
    start = 1 if turns[0]["role"] == "system" else 0
    for j, turn in enumerate(turns[start:], start):
        expected = "user" if (j - start) % 2 == 0 else "assistant"
        if turn["role"] != expected:
            after = f"after a '{turns[j - 1]['role']}' message" if j else "first"
            raise RowProblem("bad_messages", f"messages[{j}].role", f"is '{turn['role']}' {after}; turns must alternate "
                             "user, assistant (one system message may come first)")
    if len(turns) == start:
        raise RowProblem("bad_messages", "messages", "has no user message before the assistant's answer")
    if turns[-1]["role"] != "assistant":
        raise RowProblem("bad_messages", "messages", f"ends with a '{turns[-1]['role']}' message; the last one must be "
                         "the assistant's answer")


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
    _check_turn_order(turns)
    last_user = turns[-2]["content"]
    return turns[:-1], turns[-1]["content"], last_user + "\x00"
