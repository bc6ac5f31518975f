"""How a micro-batch is laid out: padding-free packing, in one row or in rows of at most N tokens, or as many
whole examples as fit in N tokens (train.micro_batch_tokens).

Packed examples sit side by side with ``position_ids`` restarting at each one; transformers' sdpa, eager
and flex attention read those restarts and mask attention block by block, so no token sees another
example (tests/test_packing.py checks logits and loss against the examples one by one).
"""
from __future__ import annotations

from typing import Any

from .data import IGNORE_INDEX
from .stage import Stage


def packed_row(examples: list[dict[str, Any]]) -> tuple[list[int], list[int], list[int]]:
    """Examples side by side in one row: (input_ids, labels, position_ids), positions restarting at 0 at each example
    and each example's first label dropped (it would be predicted from the example before it), as
    DataCollatorWithFlattening does."""
    ids, labels, positions = [], [], []
    for e in examples:
        ids += e["input_ids"]
        labels += [IGNORE_INDEX] + list(e["labels"][1:])
        positions += range(len(e["input_ids"]))
    return ids, labels, positions


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the items in each bin of at most `capacity`: longest items first, each into the fullest bin it
    still fits (an item longer than `capacity` gets a bin of its own). O(n log n) through a sorted list of the
    bins' free space, so 50,000 examples take well under a second."""
    import bisect

    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            room, b = free.pop(at)
            bins[b].append(i)
        else:
            room, b = capacity, len(bins)
            bins.append([i])
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], b))
    return bins


def group_by_tokens(examples: list[dict[str, Any]], max_tokens: int) -> list[dict[str, list[int]]]:
    """The training examples as micro-batches of at most `max_tokens` tokens (train.micro_batch_tokens): each item
    is whole examples packed into one row, best fit by decreasing length, with position_ids restarting at each
    example and its first label dropped (as DataCollatorWithFlattening does). The Trainer then shuffles and
    counts these items instead of examples (one epoch is still every example once), and memory is bounded by
    `max_tokens` rather than by the longest examples that happen to share a micro-batch."""
    items = []
    for group in best_fit_decreasing([len(e["input_ids"]) for e in examples], max_tokens):
        ids, labels, positions = packed_row([examples[i] for i in sorted(group)])  # in their original order
        items.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return items


class PackedGroupsCollator:
    """Items of group_by_tokens (packed rows with their own position_ids) side by side in one row. A plain example
    (the validation split is not grouped) is a group of one: positions 0, 1, ... and its first label dropped."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids, labels, positions = [], [], []
        for f in features:
            row = (f["input_ids"], f["labels"], f["position_ids"]) if "position_ids" in f else packed_row([f])
            ids, labels, positions = ids + list(row[0]), labels + list(row[1]), positions + list(row[2])
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions])}


class PackedRowsCollator:
    """Padding-free packing into several rows of at most `row_tokens` tokens instead of one long row.

    Why: without flash-attention (a T4 has none, and sdpa is what runs there) the block-diagonal mask of a
    packed row is dense, so attention costs grow with the square of the row's length: one row of a 64-example
    micro-batch (~7,000 tokens) spends most of its time on masked-out blocks. Rows of ~1,000 tokens cut that
    ~7x. Examples go into rows best fit by decreasing length; each row ends in a padding segment with its own
    position_ids (0, 1, ...) and no labels, so it is one more "example" that nothing attends to or from, and
    padding never touches real tokens. The first label of every example is dropped, as in
    DataCollatorWithFlattening: it would be predicted from the example before it.

    Only for attention that reads packing from position_ids row by row (sdpa, eager; flex is refused for speed).
    transformers' flash-attention path recognises packing only in a batch of one row, so there rows would attend
    across examples; model.attn_implementation offers no flash choice, so that cannot happen here.
    """

    def __init__(self, row_tokens: int, pad_token_id: int):
        self.row_tokens = row_tokens
        self.pad_token_id = pad_token_id

    def rows(self, lengths: list[int]) -> list[list[int]]:
        """Indices of the examples in each row, best fit by decreasing length (an example longer than a row gets its own)."""
        return best_fit_decreasing(lengths, self.row_tokens)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        rows = self.rows(lengths)
        width = max(sum(lengths[i] for i in row) for row in rows)
        ids, labels, positions = [], [], []
        for row in rows:
            r_ids, r_labels, r_pos = packed_row([features[i] for i in row])
            pad = width - len(r_ids)
            ids.append(r_ids + [self.pad_token_id] * pad)
            labels.append(r_labels + [IGNORE_INDEX] * pad)
            positions.append(r_pos + list(range(pad)))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions)}


def make_collator(stage: Stage, tokenizer):
    """Padding-free packing by default: position_ids restart at each example and the attention (sdpa, flex,
    eager in transformers 5) is masked block-diagonally, so no token sees another example. The whole
    micro-batch is one row, or rows of train.packing_row_tokens, or (train.micro_batch_tokens) one item of
    group_by_tokens. Padded batches are the fallback."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    t = stage.cfg.train
    if t.micro_batch_tokens:
        return PackedGroupsCollator()
    if t.packing and t.packing_row_tokens:
        return PackedRowsCollator(t.packing_row_tokens, tokenizer.pad_token_id)
    if t.packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


def batch_table(batch: dict[str, Any], tokenizer, row: int = 0, limit: int | None = 60):
    """One row of a collated batch token by token (a pandas DataFrame): where each packed example starts (its
    position_ids restart at 0), which tokens carry the loss (label != -100), and the padding at a row's end."""
    import pandas as pd

    ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
    positions = batch["position_ids"][row].tolist() if "position_ids" in batch else list(range(len(ids)))
    example, rows = -1, []
    for i, (t, p, l) in enumerate(zip(ids, positions, labels)):
        example += p == 0
        rows.append({"token": tokenizer.decode([t]), "position_id": p, "example": example, "label": l,
                     "carries loss": l != IGNORE_INDEX})
    return pd.DataFrame(rows[:limit])
