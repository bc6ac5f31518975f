"""Stage 1, where the data comes from: ``data.source`` followed from the config to rows of one shape.

The path of ``data.source`` through stage 1, in reading order:

1. where the value comes from: the recipe or an override, made absolute against the working directory by
   ``sources.resolve_paths`` before any notebook starts (relative paths mean where the command was typed);
2. what it names (``load_raw``): ``embedded`` (the generated set, below), a local file or folder (read by
   ``qlora_helpers.datafiles``, strictly), a hub id with a copy attached under /kaggle/input
   (``sources.kaggle_input_dataset`` finds it; read as a local folder), or a hub dataset (``datasets``);
3. the shape of the rows (``detect_format``: Alpaca, prompt/response pairs or chat) and every row's turns
   (``to_turns``), checked strictly for a person's own files; ``check_source`` returns them as a ``Source`` with
   a fingerprint of what was read (``fingerprint``), which stage 1 records so that a resumed run can tell when
   the data changed;
4. ``qlora_helpers.data`` turns the rows into examples (template, tokens, labels), cleans and splits them.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, UserError, shorten
from .datafiles import (DataError, RowNamer, check_one_type_per_field, data_files, describe_value, file_fingerprint,
                        read_file)
from .runs import file_sha256, read_json
from .sources import kaggle_input_dataset, looks_like_a_path


@dataclass
class Source:
    """The rows of data.source, checked before any model is loaded, with where they came from, their shape, and a
    fingerprint of their content."""
    rows: list[dict[str, Any]]
    origin: str
    format: str
    fingerprint: dict[str, Any] = field(default_factory=dict)

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
        raise DataError(f"data.source '{shorten(cfg.data.source, 200)}': no rows")
    fmt = detect_format(rows, cfg)
    require_fields(rows, fmt, cfg, origin)
    return Source(rows, origin, fmt, fingerprint(cfg, rows))


def local_files(cfg: Config) -> list[Path] | None:
    """The files data.source reads on this machine (a local file or folder, or the copy of a hub dataset attached
    under /kaggle/input); None for the embedded set and a hub dataset."""
    source = cfg.data.source
    if source == "embedded":
        return None
    path = Path(source).expanduser()
    if path.exists():
        return data_files(path)
    if looks_like_a_path(source):
        raise DataError(f"data.source '{shorten(source, 200)}': no such file or folder")
    attached = kaggle_input_dataset(source)  # on Kaggle, a copy attached under /kaggle/input beats the hub
    return data_files(attached) if attached else None


def load_raw(cfg: Config) -> tuple[list[dict[str, Any]], str]:
    """Rows as dicts plus a label saying where they came from."""
    source = cfg.data.source
    if source == "embedded":
        return generate_embedded(cfg.data.embedded_size, cfg.data.seed), "embedded (generated, seed %d)" % cfg.data.seed
    files = local_files(cfg)
    if files is not None:
        path = Path(source).expanduser()
        if not path.exists():
            return load_local(files, cfg), f"Kaggle input {kaggle_input_dataset(source)} (in place of hub dataset {source})"
        label = f"local folder {path} ({len(files)} files)" if path.is_dir() else f"local file {path}"
        return load_local(files, cfg), label
    import datasets  # deferred: importing datasets costs seconds

    kwargs = {"split": cfg.data.split}
    if cfg.data.revision:
        kwargs["revision"] = cfg.data.revision
    try:
        ds = datasets.load_dataset(source, **kwargs)
    except Exception as exc:  # the hub's errors are long; say what matters
        raise DataError(f"data.source '{shorten(source, 200)}': could not load from the hub or disk "
                        f"({type(exc).__name__}: {shorten(str(exc).splitlines()[0] if str(exc) else '', 200)})") from None
    return ds.to_list(), f"hub dataset {source} (split {cfg.data.split})"


def load_local(files: list[Path], cfg: Config) -> list[dict[str, Any]]:
    """Read each file and validate it strictly; the first file decides the format."""
    rows: list[dict[str, Any]] = []
    fmt = None
    for f in files:
        part = read_file(f)
        fmt = fmt or detect_format(part, cfg, str(f))
        namer = RowNamer(f)
        validate_rows(part, fmt, cfg, namer)
        if namer.kind in ("array", "lines"):
            check_one_type_per_field(part, namer)  # as Parquet and the hub's Arrow tables insist
        rows.extend(part)
    return rows


# --------------------------------------------------------------------------- what was read
def rows_sha256(rows: list[dict[str, Any]]) -> str:
    """SHA-256 of the rows as read, whatever they came from: the same rows, the same hash."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))
        digest.update(b"\n")
    return digest.hexdigest()


def hub_revision(repo: str, revision: str) -> str | None:
    """The commit a hub dataset's revision resolves to now (None offline, or when the hub does not say)."""
    from .sources import hub_reachable

    if not hub_reachable():
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo, revision=revision or None, timeout=10).sha
    except Exception:  # noqa: BLE001 - only a record: the rows' own hash is what is compared
        return None


def fingerprint(cfg: Config, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What stage 1 records of the data it read: the rows' hash (any source), each local file's size and hash, and
    for a hub dataset the revision asked for and the commit it resolved to."""
    files = local_files(cfg)
    out: dict[str, Any] = {"source": cfg.data.source, "rows": len(rows), "rows_sha256": rows_sha256(rows),
                           "files": [file_fingerprint(f) for f in files] if files is not None else None}
    if files is None and cfg.data.source != "embedded":
        out.update(split=cfg.data.split, revision=cfg.data.revision or None,
                   hub_commit=hub_revision(cfg.data.source, cfg.data.revision))
    return out


# --------------------------------------------------------------------------- the same data in every session
FINGERPRINT = "fingerprint.json"


class DataChanged(UserError):
    """The data of a run that has trained on it already is not the data stage 1 read then."""


def same_data(out: Path, cfg: Config, record: dict[str, Any], started: str | None, run_dir: Path) -> bool:
    """Whether stage 1 would write exactly the splits it wrote before (True: nothing to write again). Different
    data is written only while no training has begun; after that it is refused in one line: a resumed run would
    train on two data sets and choose its best checkpoint by losses measured on two validation sets."""
    old = read_json(out / FINGERPRINT)
    if old is None:  # the first stage 1, or a run directory made before fingerprints: its splits are the record
        files = {name: out / f"{name}.jsonl" for name in ("train", "val")}
        if not all(p.is_file() for p in files.values()):
            return False
        old = {"source": {}, "split": {f"{name}_sha256": file_sha256(p) for name, p in files.items()}}
    split_keys = ("train_sha256", "val_sha256")
    same_split = all(old.get("split", {}).get(k) == record["split"][k] for k in split_keys)
    same_rows = old.get("source", {}).get("rows_sha256") in (None, record["source"].get("rows_sha256"))
    if same_split and same_rows:
        return (out / FINGERPRINT).is_file()
    what = data_change(old, record)
    if not started:
        print(f"[qlora] {what}; nothing is trained yet, so stage 1 writes the new data and split", flush=True)
        return False
    raise DataChanged(f"data.source '{shorten(cfg.data.source, 200)}': {what}, and run directory {run_dir} "
                      f"has trained on the old data already ({started}); resuming would mix two data sets. Put the old "
                      "data back, or start a new run for the new data (another RUN_DIR / --run-dir)")


def data_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What changed since stage 1 last read the data, in a few words."""
    before, now = old.get("source") or {}, new["source"]
    if before.get("rows_sha256") and before["rows_sha256"] != now.get("rows_sha256"):
        changed = [f["path"] for f, g in zip(before.get("files") or [], now.get("files") or []) if f != g]
        where = f" ({shorten(changed[0], 120)} differs)" if changed else ""
        return f"the data changed since this run's stage 1 read it: {before.get('rows', '?'):,} rows then, " \
               f"{now.get('rows', 0):,} now{where}" if isinstance(before.get("rows"), int) else "the data changed"
    return "the examples stage 1 makes from the data differ from the ones it wrote before (data/*.jsonl)"


def check_files_unchanged(cfg: Config, run_dir: Path, started: str | None) -> None:
    """Before any stage writes: a run that has trained already, on local files that differ now from the ones stage 1
    recorded, is refused at once (hub data is compared when stage 1 reads it again)."""
    recorded = ((read_json(run_dir / "data" / FINGERPRINT) or {}).get("source") or {}).get("files")
    if not started or recorded is None:
        return
    now = [file_fingerprint(f) for f in local_files(cfg) or []]
    if now != recorded:
        changed = next((f["path"] for f, g in zip(recorded, now) if f != g), None) or \
            f"{len(recorded)} file(s) then, {len(now)} now"
        raise DataChanged(f"data.source '{shorten(cfg.data.source, 200)}': the data changed since this run's stage 1 "
                          f"read it ({shorten(changed, 120)} differs), and run directory {run_dir} has trained on the old "
                          f"data already ({started}); resuming would mix two data sets. Put the old data back, or start "
                          "a new run for the new data (another RUN_DIR / --run-dir)")


# --------------------------------------------------------------------------- the embedded set
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


# --------------------------------------------------------------------------- shapes: rows to turns
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
    columns = ", ".join(repr(shorten(k, 40)) for k in sorted(map(str, keys))[:10]) + (" ..." if len(keys) > 10 else "")
    raise DataError(f"{where or 'data.source ' + repr(shorten(cfg.data.source, 200))}: cannot tell the format from columns "
                    f"[{columns}]; expected instruction/input/output (alpaca), messages (chat), or set "
                    "data.format=pairs with data.prompt_column and data.response_column")


def require_fields(rows: list[dict[str, Any]], fmt: str, cfg: Config, where: str) -> None:
    """Every column the format needs exists in some row (a missing column is a mistake, not a bad row)."""
    for name in required_fields(fmt, cfg):
        if not any(name in row for row in rows):
            found = [shorten(k, 40) for k in sorted({str(k) for row in rows[:100] for k in row})]
            found = found[:10] + ([f"and {len(found) - 10} more"] if len(found) > 10 else [])
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


def alpaca_key(instruction: str, inp: str = "") -> str:
    """What the Alpaca template needs of a row, kept with each example: its instruction and input, as JSON (text
    of any kind, a NUL character included, stays where it was)."""
    return json.dumps([instruction, inp], ensure_ascii=False)


def to_turns(row: dict[str, Any], fmt: str, cfg: Config) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, response, the instruction and input for the Alpaca template), or raise RowProblem.

    Under data.template=alpaca a row must fit the Alpaca prompt (one instruction, an optional input, one
    response): a conversation of several turns, or one with a system message, is refused
    (``needs_chat_template``), never cut to its last turn."""
    if fmt == "alpaca":
        instruction, inp, out = _text(row, "instruction"), _text(row, "input", optional=True), _text(row, "output")
        user = instruction + (f"\n\n{inp}" if inp.strip() else "")
        return [{"role": "user", "content": user}], out, alpaca_key(instruction, inp)
    if fmt == "pairs":
        prompt, out = _text(row, cfg.data.prompt_column), _text(row, cfg.data.response_column)
        return [{"role": "user", "content": prompt}], out, alpaca_key(prompt)
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
            role = m.get("role")
            shown = repr(shorten(role, 40)) if isinstance(role, str) else shorten(role, 40)
            raise RowProblem("bad_messages", f"messages[{j}].role", f"is {shown}, expected one of {', '.join(CHAT_ROLES)}")
        turns.append({"role": m["role"], "content": _text(m, "content", f"messages[{j}].content")})
    _check_turn_order(turns)
    if cfg.data.template == "alpaca" and len(turns) > 2:
        what = "a system message" if turns[0]["role"] == "system" and len(turns) == 3 else f"{len(turns) - 1} messages before the answer"
        raise RowProblem("needs_chat_template", "messages", f"holds {what}; the alpaca template holds one instruction and "
                         "its response, and would drop the rest: use data.template=chat (the model's chat template)")
    return turns[:-1], turns[-1]["content"], alpaca_key(turns[-2]["content"])
