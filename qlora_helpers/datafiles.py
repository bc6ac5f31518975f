"""Stage 1, how one file is read: a person's .json (an array), .jsonl, .csv or .parquet file, or every such file in
a folder, read directly (Python's json and csv, pyarrow for Parquet; never through the `datasets` cache, so nothing
is written and a file rewritten in place is never served stale), and anything that does not parse named by file,
line or row (and field) in one line before any model is loaded.

Where the path comes from and what the rows become are qlora_helpers.datasource's; this module only reads.
Only regular files are read: a FIFO, a device or a socket (reading one waits for a writer, or never ends) is
refused by name.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any, NoReturn

from .config import UserError, shorten
from .runs import file_sha256, not_a_regular_file


class DataError(UserError):
    """A problem with the user's data, named by file, row and field; printed as one line."""


_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def data_files(path: Path) -> list[Path]:
    """The file itself, or every .json/.jsonl/.csv/.parquet file under a folder (a mounted Kaggle dataset),
    skipping hidden ones such as .ipynb_checkpoints. Each must be a regular file (or a link to one)."""
    if not path.is_dir():
        if path.suffix.lower() not in _BUILDERS:
            raise DataError(f"{path}: unsupported file type '{shorten(path.suffix, 20)}' (use .json, .jsonl, .csv or .parquet)")
        return [regular(path)]
    files = []
    for dirpath, dirnames, filenames in os.walk(path):  # hidden folders and more than 5 levels down are not read
        here = Path(dirpath)
        dirnames[:] = [] if len(here.relative_to(path).parts) >= 5 else [d for d in dirnames if not d.startswith(".")]
        files += [here / f for f in filenames if Path(f).suffix.lower() in _BUILDERS and not f.startswith(".")]
    files.sort()
    if not files:
        raise DataError(f"{path}: no .json, .jsonl, .csv or .parquet files found")
    return [regular(f) for f in files]


def regular(path: Path) -> Path:
    """``path`` when it is a regular file (or a link to one); a FIFO, a device or a socket is refused by name,
    before anything opens it (opening a FIFO waits for a writer; a device may never end)."""
    kind = not_a_regular_file(path)
    if kind:
        raise DataError(f"{path}: is {kind}, not a data file; point data.source at a file or a folder of files")
    return path


def file_fingerprint(path: Path) -> dict[str, Any]:
    """A file's size and SHA-256: what stage 1 records, to tell later whether the data changed."""
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


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


def read_file(path: Path) -> list[dict[str, Any]]:
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


def check_one_type_per_field(rows: list[dict[str, Any]], namer: RowNamer) -> None:
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


