"""`check-data` and the strict checks on a person's own data files (qlora_helpers.datasource.check_source)."""
import json
import os
import shutil

import pytest

from qlora_helpers import build_config
from qlora_helpers.__main__ import main
from qlora_helpers import Stage
from qlora_helpers.data import prepare_data
from qlora_helpers.datafiles import DataError
from qlora_helpers.datasource import check_source

from conftest import REPO, SHARED_DATA, run_cli

FIXTURES = REPO / "tests" / "fixtures" / "data"
PAIRS = ["-p", "data.prompt_column=question", "-p", "data.response_column=answer"]


def check(capfd, *args):
    """Run check-data in this process; (exit code, stdout, stderr) with the file descriptors captured, so
    anything a library logs on its own also counts as output."""
    code = main(["check-data", *map(str, args)])
    out, err = capfd.readouterr()
    return code, out, err


def source_of(path, **overrides):
    return check_source(build_config("test", {"data.source": str(path), **overrides}))


# --------------------------------------------------------------------------- the real sample
def test_check_data_on_the_real_alpaca_sample():
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data/alpaca_small.json is not beside this checkout")
    result = run_cli("check-data", str(SHARED_DATA), "--max-seq-len", "256")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "rows read: 2,000" in out and "alpaca format" in out
    kept = int(out.split("rows kept: ")[1].split("\n")[0].replace(",", ""))
    dropped = int(out.split("rows dropped: ")[1].split("\n")[0].replace(",", ""))
    assert kept + dropped == 2000 and kept > 1800
    for reason in ("missing_field", "not_a_string", "bad_messages", "needs_chat_template", "empty_response", "duplicate", "too_long"):
        assert f"  {reason}: " in out
    assert "p50" in out and "p95" in out and "tokens that carry the loss" in out
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- malformed input: one line, no traceback
MALFORMED = [
    # (fixture, extra arguments, what the one line must say)
    ("broken_line.jsonl", [], ["broken_line.jsonl: line 3:", "not valid JSON", "near field 'output'"]),
    ("number_in_output.jsonl", [], ["number_in_output.jsonl: line 3:", "field 'output' is a number (4), expected text"]),
    ("number_in_output.json", [], ["number_in_output.json: index 2:", "field 'output' is a number (4)"]),
    ("numbers_only.jsonl", ["--format", "pairs", *PAIRS], ["numbers_only.jsonl: line 1:", "field 'answer' is a number (4)"]),
    ("missing_column.csv", [], ["missing_column.csv: row 1 (the header):", "no field 'output'"]),
    ("empty.jsonl", [], ["empty.jsonl: the file is empty"]),
    ("not_utf8.csv", [], ["not_utf8.csv: row 3:", "field 'instruction' is not UTF-8", "byte 0xe9 on line 3"]),
    ("unquoted_comma.csv", [], ["unquoted_comma.csv: row 3:", "4 values but the header has 3 columns"]),
    ("bad_role.jsonl", [], ["bad_role.jsonl: line 2:", "field 'messages[1].role' is 'bot'"]),
]


@pytest.mark.parametrize("name, extra, expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_is_one_clear_line(capfd, name, extra, expected):
    code, out, err = check(capfd, FIXTURES / name, *extra)
    assert code != 0 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for part in expected:
        assert part in lines[0]
    assert "Traceback" not in err


def test_malformed_file_from_the_command_line_has_no_traceback():
    # In a real process: no traceback and none of the loader's own log lines, just the one error line.
    result = run_cli("check-data", str(FIXTURES / "number_in_output.jsonl"))
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.strip().splitlines() == [
        f"error: {FIXTURES / 'number_in_output.jsonl'}: line 3: field 'output' is a number (4), expected text"]


def test_a_missing_path_is_not_sent_to_the_hub(capfd):
    code, _, err = check(capfd, FIXTURES / "no_such_file.jsonl")
    assert code == 2 and "no such file or folder" in err


# --------------------------------------------------------------------------- shapes and sources
def test_pairs_csv_with_configured_columns_keeps_text_as_written(capfd):
    code, out, _ = check(capfd, FIXTURES / "pairs.csv", *PAIRS)
    assert code == 0 and "pairs format" in out and "rows read: 4" in out and "rows kept: 4" in out
    rows = source_of(FIXTURES / "pairs.csv", **{"data.prompt_column": "question", "data.response_column": "answer"}).rows
    # A CSV has no types: "7" and "007" stay text, a quoted comma stays inside its value.
    assert [r["answer"] for r in rows] == ["7", "Red, blue.", "007", "Paris."]


def test_pairs_without_the_column_names_says_how_to_set_them(capfd):
    code, _, err = check(capfd, FIXTURES / "pairs.csv", "--format", "pairs")
    assert code == 2 and "no field 'prompt'" in err and "data.prompt_column" in err


def test_chat_jsonl(capfd):
    code, out, _ = check(capfd, FIXTURES / "chat.jsonl")
    assert code == 0 and "chat format" in out and "rows kept: 3" in out


def test_every_cleaning_reason_of_a_local_file_is_counted(capfd):
    code, out, _ = check(capfd, FIXTURES / "cleaning.jsonl", "--max-seq-len", "128")
    assert code == 0
    for line in ("rows read: 8", "rows kept: 1", "rows dropped: 7", "  missing_field: 2", "  empty_response: 2",
                 "  duplicate: 2", "  too_long: 1", "  not_a_string: 0", "  bad_messages: 0"):
        assert line + "\n" in out
    code, out, _ = check(capfd, FIXTURES / "cleaning.jsonl", "--max-seq-len", "128", "-p", "data.too_long=truncate")
    assert code == 0 and "rows kept: 2" in out and "  too_long: 0" in out and "responses truncated: 1" in out


def _alpaca_rows():
    return [json.loads(line) for line in (FIXTURES / "alpaca.jsonl").read_text().splitlines()]


def test_parquet_and_csv_sources_read_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _alpaca_rows()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "alpaca.parquet")
    with open(tmp_path / "alpaca.csv", "w", newline="") as f:
        import csv

        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows)
    for name in ("alpaca.parquet", "alpaca.csv"):
        source = source_of(tmp_path / name)
        assert source.format == "alpaca" and source.rows == rows, name


def test_parquet_with_a_number_column_names_the_row_and_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"instruction": "2 + 2?", "output": 4}]), tmp_path / "numbers.parquet")
    with pytest.raises(DataError, match=r"numbers\.parquet: index 0: field 'output' is a number \(4\), expected text"):
        source_of(tmp_path / "numbers.parquet")


def test_a_folder_of_files_like_a_mounted_kaggle_dataset(tmp_path):
    folder = tmp_path / "input" / "my-data"
    (folder / "part2").mkdir(parents=True)
    (folder / ".ipynb_checkpoints").mkdir()
    shutil.copy(FIXTURES / "alpaca.jsonl", folder / "a.jsonl")
    (folder / "part2" / "b.json").write_text(json.dumps([{"instruction": "Say yes.", "output": "Yes."}]))
    (folder / ".ipynb_checkpoints" / "a-checkpoint.jsonl").write_text("not json at all")
    (folder / "README.md").write_text("ignored")
    source = source_of(folder)
    assert len(source.rows) == 4 and source.format == "alpaca" and source.origin.startswith("local folder")
    # A bad file inside the folder is named by its own path.
    (folder / "part2" / "c.jsonl").write_text('{"instruction": "Say no.", "output": false}\n')
    with pytest.raises(DataError, match=r"part2/c\.jsonl: line 1: field 'output' is a boolean \(false\)"):
        source_of(folder)


def test_hub_and_embedded_sources_count_instead_of_failing(smol_tokenizer, tmp_path):
    # Only a person's own file is validated strictly; the generated set goes through unchanged.
    source = check_source(build_config("test"))
    assert source.format == "alpaca" and len(source.rows) == 200
    m = prepare_data(Stage(build_config("test"), tmp_path), smol_tokenizer, source)
    assert m["rows_read"] == 200 and set(m["dropped_by_reason"]) == {
        "missing_field", "not_a_string", "bad_messages", "needs_chat_template", "empty_response", "duplicate", "too_long"}
    saved = json.loads((tmp_path / "data" / "metrics.json").read_text())
    assert saved["dropped_by_reason"] == m["dropped_by_reason"] and saved["pad_token"] != saved["end_token"]
    assert saved["train_lengths"]["prompt_tokens"] + saved["train_lengths"]["response_tokens"] == saved["train_lengths"]["tokens"]


def test_a_column_of_mixed_types_is_named_even_if_the_format_does_not_use_it(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text('{"id": 1, "instruction": "Hi", "output": "Hello"}\n{"id": "two", "instruction": "Yo", "output": "Hey"}\n')
    with pytest.raises(DataError, match=r"ids\.jsonl: line 2: field 'id' is text but line 1 has a number"):
        source_of(path)


# --------------------------------------------------------------------------- every source alike (issue 18)
def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_a_byte_order_mark_is_accepted_in_every_text_format(tmp_path):
    rows = [{"instruction": "Say yes.", "output": "Yes."}]
    bom = b"\xef\xbb\xbf"
    for name, body in (("a.json", json.dumps(rows).encode()), ("a.jsonl", json.dumps(rows[0]).encode() + b"\n"),
                       ("a.csv", b"instruction,output\r\nSay yes.,Yes.\r\n")):
        assert source_of(_write(tmp_path / name, bom + body)).rows == rows, name


RAGGED = [
    ("dup.csv", b"instruction,output,output\nHi,Hello,Hey\n", "row 1 (the header): column 'output' appears 2 times"),
    ("short.csv", b"instruction,input,output\nHi,Hello\n", "row 2: 2 values but the header has 3 columns"),
    ("long.csv", b"instruction,output\nHi,Hello,there\n", "row 2: 3 values but the header has 2 columns"),
    ("latin1.jsonl", b'{"instruction": "caf\xe9", "output": "ok"}\n', "line 1: field 'instruction' is not UTF-8"),
    ("latin1.json", b'[{"instruction": "caf\xe9", "output": "ok"}]', "field 'instruction' is not UTF-8"),
    ("object.json", b'{"data": [{"instruction": "Hi", "output": "Hello"}]}', "cannot tell the format from columns ['data']"),
    ("object2.json", b'{\n "data": [{"instruction": "Hi", "output": "Hello"}]\n}', "expected a JSON array of objects"),
    ("order.jsonl", json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Again"},
                                            {"role": "assistant", "content": "Hello"}]}).encode() + b"\n",
     "line 1: field 'messages[1].role' is 'user' after a 'user' message; turns must alternate"),
]


@pytest.mark.parametrize("name, data, message", RAGGED, ids=[r[0] for r in RAGGED])
def test_malformed_sources_are_one_error_each_whatever_the_format(tmp_path, name, data, message):
    with pytest.raises(DataError) as err:
        source_of(_write(tmp_path / name, data))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_turns_out_of_order_in_hub_data_are_a_counted_drop(smol_tokenizer):
    from qlora_helpers.data import build_examples
    from qlora_helpers.datasource import Source

    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hi"},
                          {"role": "user", "content": "?"}, {"role": "assistant", "content": "Hello"}]}]
    _, summary = build_examples(Source(rows, "hub dataset x", "chat"), build_config("test"), smol_tokenizer)
    assert summary["rows_kept"] == 1 and summary["dropped_by_reason"]["bad_messages"] == 1


def test_a_file_rewritten_with_the_same_size_and_time_is_read_again(tmp_path):
    path = _write(tmp_path / "qa.jsonl", json.dumps({"instruction": "2 + 2?", "output": "4"}).encode() + b"\n")
    stat = path.stat()
    assert source_of(path).rows[0]["output"] == "4"
    _write(path, json.dumps({"instruction": "2 + 3?", "output": "5"}).encode() + b"\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert source_of(path).rows[0]["output"] == "5"


def test_a_blank_source_is_refused(capfd):
    code, _, err = check(capfd, " ")
    assert code == 2 and "config key 'data.source': must not be empty or blank" in err
