
import pytest

from qlora_helpers import build_config
from qlora_helpers import Stage
from qlora_helpers.data import (IGNORE_INDEX, Formatter, clean_and_tokenize, keep_pad_off_end_token, prepare_data,
                                split_examples, load_split)
from qlora_helpers.datasource import generate_embedded, to_turns

from conftest import SHARED_DATA


def test_embedded_data_is_deterministic_checkable_and_unique():
    a, b = generate_embedded(500, seed=7), generate_embedded(500, seed=7)
    assert a == b and a != generate_embedded(500, seed=8)
    assert len({(r["instruction"], r["input"]) for r in a}) == len(a)
    assert {r["task"] for r in a} == {"add", "parity", "next_letter", "uppercase", "larger"}
    for r in a:
        if r["task"] == "add":
            x, y = r["instruction"].split("?")[0].removeprefix("What is ").split(" + ")
            assert int(r["output"]) == int(x) + int(y)


def _labels_view(tok, enc):
    return [(tok.decode([t]), l != IGNORE_INDEX) for t, l in zip(enc["input_ids"], enc["labels"])]


def test_chat_template_mask_token_by_token(smol_tokenizer):
    tok = smol_tokenizer
    fmt = Formatter(tok, "chat")
    enc, _ = fmt.encode([{"role": "user", "content": "What is 2 + 3?"}], "5")
    view = _labels_view(tok, enc)
    trained = [t for t, on in view if on]
    # Only the answer, the end-of-turn token and the newline the template puts after it carry loss.
    assert trained == ["5", "<|im_end|>", "\n"]
    # The prompt, including the assistant header, is masked.
    prompt = "".join(t for t, on in view if not on)
    assert prompt.endswith("<|im_start|>assistant\n") and "What is 2 + 3?" in prompt
    assert fmt.end_token == "<|im_end|>" and tok.pad_token_id != fmt.end_token_id


def test_alpaca_template_mask_token_by_token(smol_tokenizer):
    tok = smol_tokenizer
    fmt = Formatter(tok, "alpaca")
    enc, _ = fmt.encode([{"role": "user", "content": "Say hi"}], "hi", alpaca_key="Say hi\x00")
    view = _labels_view(tok, enc)
    assert [t for t, on in view if on] == ["hi", tok.eos_token]
    assert "".join(t for t, on in view if not on).endswith("### Response:\n")


def test_alpaca_template_with_input_masks_the_input_block(smol_tokenizer):
    tok = smol_tokenizer
    cfg = build_config("test")
    turns, response, key = to_turns({"instruction": "Reverse the word.", "input": "cat", "output": "tac"}, "alpaca", cfg)
    enc, _ = Formatter(tok, "alpaca").encode(turns, response, key)
    view = _labels_view(tok, enc)
    prompt = "".join(t for t, on in view if not on)
    assert "### Instruction:\nReverse the word.\n\n### Input:\ncat\n\n### Response:\n" in prompt
    assert "".join(t for t, on in view if on) == "tac" + tok.eos_token and view[-1] == (tok.eos_token, True)


def test_pairs_rows_use_the_configured_columns(smol_tokenizer):
    cfg = build_config("test", {"data.prompt_column": "question", "data.response_column": "answer"})
    turns, response, _ = to_turns({"question": "What is 2 + 5?", "answer": "7"}, "pairs", cfg)
    assert turns == [{"role": "user", "content": "What is 2 + 5?"}] and response == "7"
    enc, _ = Formatter(smol_tokenizer, "chat").encode(turns, response)
    assert [t for t, on in _labels_view(smol_tokenizer, enc) if on] == ["7", "<|im_end|>", "\n"]


def test_multi_turn_chat_trains_only_the_last_answer(smol_tokenizer):
    tok = smol_tokenizer
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
                        {"role": "assistant", "content": "4"}, {"role": "user", "content": "Times 3?"},
                        {"role": "assistant", "content": "12"}]}
    turns, response, _ = to_turns(row, "chat", build_config("test"))
    assert response == "12" and [m["role"] for m in turns] == ["system", "user", "assistant", "user"]
    # data.system_prompt does not stack a second system message on the conversation's own.
    fmt = Formatter(tok, "chat", system_prompt="Ignored here.")
    enc, _ = fmt.encode(turns, response)
    view = _labels_view(tok, enc)
    assert "".join(t for t, on in view if on) == "12<|im_end|>\n"
    prompt = "".join(t for t, on in view if not on)
    assert "Be brief." in prompt and "Ignored here." not in prompt and prompt.count("<|im_end|>") == 4


def test_truncated_response_keeps_the_prompt_and_drops_the_end_token(smol_tokenizer):
    tok = smol_tokenizer
    fmt = Formatter(tok, "chat")
    enc, truncated = fmt.encode([{"role": "user", "content": "Count."}], "one two three four five six seven", max_len=36, truncate=True)
    full, _ = fmt.encode([{"role": "user", "content": "Count."}], "one two three four five six seven")
    assert truncated and len(enc["input_ids"]) == 36 and enc["input_ids"] == full["input_ids"][:36]
    assert enc["labels"][: enc["prompt_len"]] == [IGNORE_INDEX] * enc["prompt_len"]
    assert fmt.end_token_id not in enc["labels"] and fmt.end_token_id in full["labels"]


def test_pad_token_never_equals_the_end_of_turn_token(smol_tokenizer):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.pad_token, tok.padding_side = "<|im_end|>", "left"  # what a careless "pad = eos" gives with ChatML
    end = Formatter(tok, "chat").end_token_id
    keep_pad_off_end_token(tok, end)
    assert tok.pad_token_id is not None and tok.pad_token_id != end and tok.padding_side == "right"


def test_embedded_tokenizer_eos_is_the_end_of_turn_token(smol_tokenizer):
    # The GGUF metadata says EOS is <|im_start|>; the conversion corrects it.
    assert smol_tokenizer.eos_token == "<|im_end|>"
    assert smol_tokenizer.pad_token not in ("<|im_end|>", "<|im_start|>")


def test_every_cleaning_reason_is_counted(smol_tokenizer):
    cfg = build_config("test", {"data.max_seq_len": 64})
    rows = [
        {"instruction": "Say hi", "input": "", "output": "hi"},        # kept
        {"instruction": "Say hi", "input": "", "output": "hi"},        # duplicate
        {"instruction": "Say yo", "input": ""},                        # missing_field (output)
        {"instruction": "Count", "input": "", "output": 3},            # not_a_string
        {"instruction": "Nothing", "input": "", "output": "   "},      # empty_response
        {"instruction": "Long", "input": "", "output": "word " * 200},  # too_long
    ]
    kept, counts = clean_and_tokenize(rows, "alpaca", Formatter(smol_tokenizer, "chat"), cfg)
    assert len(kept) == 1
    assert dict(counts) == {"duplicate": 1, "missing_field": 1, "not_a_string": 1, "empty_response": 1, "too_long": 1}
    chats = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},  # kept
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]},        # bad_messages
        {"messages": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hi"}]},  # bad_messages
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 5}]},        # not_a_string
        {"messages": []},                                                                              # missing_field
    ]
    kept, counts = clean_and_tokenize(chats, "chat", Formatter(smol_tokenizer, "chat"), cfg)
    assert len(kept) == 1 and dict(counts) == {"bad_messages": 2, "not_a_string": 1, "missing_field": 1}
    cfg = build_config("test", {"data.max_seq_len": 64, "data.too_long": "truncate"})
    kept, counts = clean_and_tokenize(rows[-1:], "alpaca", Formatter(smol_tokenizer, "chat"), cfg)
    assert len(kept) == 1 and counts["truncated"] == 1 and len(kept[0]["input_ids"]) == 64


def test_split_is_deterministic_and_disjoint():
    cfg = build_config("test", {"data.train_size": 50, "data.val_size": 20})
    examples = [{"input_ids": [i], "labels": [i]} for i in range(300)]
    t1, v1 = split_examples(examples, cfg)
    t2, v2 = split_examples(examples, cfg)
    assert (t1, v1) == (t2, v2) and len(t1) == 50 and len(v1) == 20
    assert not {e["input_ids"][0] for e in t1} & {e["input_ids"][0] for e in v1}
    t3, _ = split_examples(examples, build_config("test", {"data.train_size": 50, "data.val_size": 20, "data.seed": 1}))
    assert t3 != t1


def test_prepare_data_on_the_real_alpaca_sample(smol_tokenizer, tmp_path):
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data/alpaca_small.json is not beside this checkout")
    cfg = build_config("test", {"data.source": str(SHARED_DATA), "data.max_seq_len": 256,
                                "data.train_size": 300, "data.val_size": 50})
    m = prepare_data(Stage(cfg, tmp_path), smol_tokenizer)
    assert m["rows_read"] == 2000 and m["format"] == "alpaca"
    assert m["rows_kept"] + m["rows_dropped"] == 2000 and m["train_examples"] == 300 and m["val_examples"] == 50
    train = load_split(tmp_path, "train")
    for e in train:
        assert e["labels"][: e["prompt_len"]] == [IGNORE_INDEX] * e["prompt_len"]
        assert smol_tokenizer.convert_tokens_to_ids("<|im_end|>") in e["labels"]
        assert len(e["input_ids"]) <= 256
    assert 0 < m["train_lengths"]["response_token_share"] < 1
