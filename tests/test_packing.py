"""Padding-free packing must be exact: the same loss as running the examples one by one, and no
token attending across an example boundary."""
import pytest
import torch

from qlora_helpers import build_config
from qlora_helpers.data import IGNORE_INDEX
from qlora_helpers.train import make_collator


def examples():
    g = torch.Generator().manual_seed(1)
    out = []
    for n, prompt in ((9, 4), (14, 6), (6, 2)):
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_equals_examples_one_by_one(attn):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation=attn)).eval()
    # transformers only detects packed rows when no KV cache is made; build_trainer turns the cache off.
    model.config.use_cache = False
    exs = examples()
    batch = make_collator(build_config("test", {"train.packing": True}), tokenizer=None)(exs)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == [i for e in exs for i in range(len(e["input_ids"]))]
    with torch.no_grad():
        packed = model(**batch)
        total, count, offset = 0.0, 0, 0
        for e in exs:
            ids = torch.tensor([e["input_ids"]])
            alone = model(input_ids=ids, labels=torch.tensor([e["labels"]]))
            n_loss = sum(1 for l in e["labels"][1:] if l != IGNORE_INDEX)
            total, count = total + alone.loss.item() * n_loss, count + n_loss
            # Same logits inside the packed row: nothing leaked in from the examples before it.
            n = ids.shape[1]
            torch.testing.assert_close(packed.logits[0, offset: offset + n], alone.logits[0], atol=1e-4, rtol=1e-4)
            offset += n
    assert packed.loss.item() == pytest.approx(total / count, rel=1e-5)
