"""Padding-free packing must be exact: the same loss as running the examples one by one, and no
token attending across an example boundary, whether the micro-batch is one row or several rows that end
in padding (train.packing_row_tokens)."""
import pytest
import torch

from qlora_helpers import Stage, build_config
from qlora_helpers.data import IGNORE_INDEX
from qlora_helpers.packing import make_collator


def examples():
    g = torch.Generator().manual_seed(1)
    out = []
    for n, prompt in ((9, 4), (14, 6), (6, 2)):
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def tiny_llama(attn):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation=attn)).eval()
    # transformers only detects packed rows when no KV cache is made; load_base_model turns the cache off.
    model.config.use_cache = False
    return model


def assert_exact(model, batch, exs, places):
    """places[i] = (row, offset) of example i in the batch: its logits there equal its logits alone, and the
    batch loss equals the token-weighted mean of the examples' losses alone."""
    with torch.no_grad():
        packed = model(**batch)
        total, count = 0.0, 0
        for e, (row, offset) in zip(exs, places):
            ids = torch.tensor([e["input_ids"]])
            alone = model(input_ids=ids, labels=torch.tensor([e["labels"]]))
            n_loss = sum(1 for l in e["labels"][1:] if l != IGNORE_INDEX)
            total, count = total + alone.loss.item() * n_loss, count + n_loss
            # Same logits inside the packed row: nothing leaked in from the examples before it.
            n = ids.shape[1]
            torch.testing.assert_close(packed.logits[row, offset: offset + n], alone.logits[0], atol=1e-4, rtol=1e-4)
    assert packed.loss.item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_equals_examples_one_by_one(attn):
    model, exs = tiny_llama(attn), examples()
    batch = make_collator(Stage(build_config("test", {"train.packing": True})), tokenizer=None)(exs)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == [i for e in exs for i in range(len(e["input_ids"]))]
    offsets = [sum(len(e["input_ids"]) for e in exs[:i]) for i in range(len(exs))]
    assert_exact(model, batch, exs, [(0, o) for o in offsets])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_with_padding_equal_examples_one_by_one(attn):
    from types import SimpleNamespace

    model, exs = tiny_llama(attn), examples()  # 9, 14 and 6 tokens
    collator = make_collator(Stage(build_config("test", {"train.packing": True, "train.packing_row_tokens": 16})),
                             tokenizer=SimpleNamespace(pad_token_id=0))
    batch = collator(exs)
    # First fit by decreasing length: [14] and [9, 6]; the first row is padded by one token to 15.
    assert collator.rows([9, 14, 6]) == [[1], [0, 2]]
    assert batch["input_ids"].shape == (2, 15) and "attention_mask" not in batch
    assert batch["input_ids"][0, 14].item() == 0 and batch["labels"][0, 14].item() == IGNORE_INDEX
    assert batch["position_ids"][1].tolist() == list(range(9)) + list(range(6))
    assert_exact(model, batch, exs, [(1, 0), (0, 0), (1, 9)])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_token_budget_groups_equal_examples_one_by_one(attn):
    from qlora_helpers.packing import group_by_tokens

    model, exs = tiny_llama(attn), examples()  # 9, 14 and 6 tokens
    stage = Stage(build_config("test", {"train.micro_batch_tokens": 16, "data.max_seq_len": 16,
                                       "train.micro_batch_size": 1}))
    groups = group_by_tokens(exs, 16)
    # Best fit by decreasing length: 14 alone, then 9 and 6 together (kept in their original order).
    assert [len(g["input_ids"]) for g in groups] == [14, 15]
    assert groups[1]["position_ids"] == list(range(9)) + list(range(6))
    collator = make_collator(stage, tokenizer=None)
    batch = collator([groups[1]])
    assert batch["input_ids"].shape == (1, 15) and "attention_mask" not in batch
    assert_exact(model, batch, [exs[0], exs[2]], [(0, 0), (0, 9)])
    # A plain example (the validation split is not grouped) is a group of one.
    assert_exact(model, collator([exs[1]]), [exs[1]], [(0, 0)])


def test_token_budget_groups_hold_every_example_once_and_stay_under_budget():
    import random

    from qlora_helpers.packing import group_by_tokens

    rng = random.Random(0)
    exs = [{"input_ids": [rng.randrange(3, 99)] * n, "labels": [IGNORE_INDEX] + [5] * (n - 1)}
           for n in (rng.randint(20, 512) for _ in range(3000))]
    groups = group_by_tokens(exs, 512)
    assert all(len(g["input_ids"]) <= 512 for g in groups)
    assert sum(len(g["input_ids"]) for g in groups) == sum(len(e["input_ids"]) for e in exs)
    assert sum(p == 0 for g in groups for p in g["position_ids"]) == len(exs)
    # Best fit leaves little room: on these lengths the groups are over 95% full on average.
    assert sum(len(g["input_ids"]) for g in groups) / (512 * len(groups)) > 0.95
