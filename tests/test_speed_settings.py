"""The speed settings of issue 16 reach transformers as intended: compiled decoder layers through the Trainer's own
torch_compile (accelerate's regional compilation), and micro-batches bounded by tokens (train.micro_batch_tokens)
from the training split to the Trainer, the step count and the memory preflight."""
import json
import os

from qlora_helpers import Stage, build_config
from qlora_helpers.preflight import tokens_per_micro_batch
from qlora_helpers.train import total_steps, training_datasets
from recipe import training_arguments  # notebook 03's TrainingArguments cell, argument for argument

DYNAMO = ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_DYNAMO_MODE", "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION")


def test_torch_compile_compiles_each_decoder_layer_and_leaves_liger_only_the_cross_entropy(tmp_path, monkeypatch):
    for key in DYNAMO:  # restored after the test: a compiled config must not leak into the suite's other Trainers
        monkeypatch.delenv(key, raising=False)
    stage = Stage(build_config("test", {"train.torch_compile": True, "train.use_liger": True}), tmp_path)
    args = training_arguments(stage, 64)
    assert args.torch_compile and args.torch_compile_backend == "inductor"
    assert os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] == "1"
    assert args.liger_kernel_config == {"rms_norm": False, "swiglu": False, "rope": False}  # fused CE stays on
    # The next config without compiling gets an uncompiled Trainer, whatever the process did before.
    plain = training_arguments(Stage(build_config("test", {"train.use_liger": True}), tmp_path), 64)
    assert not plain.torch_compile and plain.liger_kernel_config is None
    assert not any(key in os.environ for key in DYNAMO)


def test_micro_batches_bounded_by_tokens_hold_every_training_example_once(tmp_path):
    lengths = [500, 20, 300, 180, 90, 400, 60, 120, 33, 512]
    (tmp_path / "data").mkdir()
    for split, part in (("train", lengths), ("val", lengths[:3])):
        rows = [{"input_ids": [7] * n, "labels": [-100] * (n // 2) + [7] * (n - n // 2), "prompt_len": n // 2} for n in part]
        (tmp_path / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage = Stage(build_config("low-memory", {"train.micro_batch_tokens": 640}), tmp_path)
    train, val = training_datasets(stage)
    assert len(val) == 3 and "position_ids" not in val[0]  # validation stays one example per item
    assert all(len(g["input_ids"]) <= 640 for g in train) and len(train) == 4  # 2,215 tokens in 4 groups of 640
    assert sum(p == 0 for g in train for p in g["position_ids"]) == len(lengths)
    # one epoch is every group once: 4 groups at 1 group x 8 accumulation per step is one step
    assert total_steps(stage, len(train), world=1) == 1
    # the preflight counts the budget, not micro_batch_size x the longest example
    assert tokens_per_micro_batch(stage.cfg, {"mean": 221.5, "p50": 150, "p90": 500, "max": 512}) == 640
