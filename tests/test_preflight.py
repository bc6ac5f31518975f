"""The T4 preflight: parameter counts from config.json, a memory estimate held to measured peaks, and a
warning with a setting that fits when a run will not."""
import json

import pytest

from conftest import REPO
from qlora_helpers import Stage, build_config
from qlora_helpers.preflight import estimate_training_memory, parameter_counts, model_shape, preflight_report

T4 = {"device": "cuda", "name": "Tesla T4", "capability": "7.5", "bf16": False, "free_gib": 14.7, "total_gib": 14.7}
H200 = {**T4, "name": "NVIDIA H200", "capability": "9.0", "bf16": True, "free_gib": 139.0, "total_gib": 139.8}
# Alpaca-like lengths: median about 150 tokens, capped at 512 (the measured runs' conditions)
ALPACA_LENGTHS = {"mean": 175.0, "p50": 150, "p90": 325, "max": 512}
# The recipe every measurement below used (the kaggle-t4 profile may move on; these figures do not):
# NF4 + double quant, LoRA r=32 with dropout 0.1 on Phi-3's four projections, paged AdamW 8-bit, fp16, sdpa,
# batch 1 x 512 tokens with gradient checkpointing unless a test says otherwise.
MEASURED_RECIPE = {"quant.mode": "nf4", "quant.double_quant": True, "quant.compute_dtype": "float16",
                   "lora.r": 32, "lora.dropout": 0.1, "lora.target_modules": "qkv_proj,o_proj,gate_up_proj,down_proj",
                   "train.optim": "paged_adamw_8bit", "model.attn_implementation": "sdpa", "data.max_seq_len": 512,
                   "train.micro_batch_size": 1, "train.grad_accum": 8, "train.gradient_checkpointing": True,
                   "train.packing": True, "train.packing_row_tokens": 0}
if hasattr(build_config("kaggle-t4").train, "use_liger"):
    MEASURED_RECIPE["train.use_liger"] = False


@pytest.fixture(scope="module")
def phi3():
    from transformers import Phi3Config

    return Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def estimate(phi3, hw=T4, lengths=None, **overrides):
    return estimate_training_memory(build_config("kaggle-t4", {**MEASURED_RECIPE, **overrides}), phi3, hw, lengths)


def test_parameter_counts_come_from_the_config_alone(phi3):
    counts = parameter_counts(build_config("kaggle-t4", MEASURED_RECIPE), model_shape(phi3))
    assert round(counts["total"] / 1e9, 2) == 3.82  # Phi-3-mini is 3.8B, not the 2.0B numel() reports in 4 bit
    assert round(counts["lora"] / 1e6, 1) == 50.3   # r=32 on qkv_proj, o_proj, gate_up_proj, down_proj
    llama_names = build_config("kaggle-t4", {**MEASURED_RECIPE,
                                             "lora.target_modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"})
    assert round(parameter_counts(llama_names, model_shape(phi3))["lora"] / 1e6, 1) == 17.8  # only o and down match


def test_batch_1_at_512_tokens_with_checkpointing_fits_a_t4_with_room(phi3):
    est = estimate(phi3)
    assert est["compute_dtype"] == "float16" and est["tokens_per_micro_batch"] == 512
    assert est["fits"] is True and est["suggestion"] is None
    assert 2.5 < est["total_gib"] < 0.5 * T4["free_gib"]
    assert 2.0 < est["parts_gib"]["weights"] < 2.3  # NF4 + double quant linears, fp16 embeddings and head


# Stage 1's statistics of the real Alpaca sample at max_seq_len 512 (benchmarks/alpaca_lengths.py)
SAMPLE_LENGTHS_512 = {"mean": 105.0, "p50": 94, "p90": 180, "max": 512}


def test_the_kaggle_t4_profile_as_configured_fits_a_t4_on_alpaca_lengths(phi3):
    est = estimate_training_memory(build_config("kaggle-t4"), phi3, T4, SAMPLE_LENGTHS_512)
    assert est["fits"] is True, est["parts_gib"]
    # measured on an H200 under a 15 GiB cap with Alpaca-like lengths: 8.25 and 9.28 GiB reserved
    assert 5.0 < est["total_gib"] < 12.0


def test_the_kaggle_t4_profile_warns_when_every_example_is_512_tokens(phi3):
    est = estimate_training_memory(build_config("kaggle-t4"), phi3, T4)  # no statistics: the worst case
    assert est["fits"] is False and "train.micro_batch_size" in est["suggestion"]


def test_micro_batch_32_without_checkpointing_does_not_fit_and_says_what_to_change(phi3):
    est = estimate(phi3, **{"train.micro_batch_size": 32, "train.gradient_checkpointing": False})
    assert est["fits"] is False and est["total_gib"] > 2 * T4["free_gib"]
    assert "train.gradient_checkpointing=true" in est["suggestion"] or "train.micro_batch_size" in est["suggestion"]
    # the suggestion really fits
    changes = dict(kv.split("=") for kv in est["suggestion"].split(" (")[0].removeprefix("set ").split(", "))
    assert estimate(phi3, **{"train.micro_batch_size": 32, "train.gradient_checkpointing": False, **changes})["fits"]


def test_a_long_sequence_alone_can_need_a_shorter_max_seq_len(phi3):
    small_gpu = {**T4, "free_gib": 4.0}
    est = estimate(phi3, small_gpu, **{"data.max_seq_len": 4096})
    assert est["fits"] is False and "data.max_seq_len=" in est["suggestion"]


def test_stage_one_lengths_replace_the_worst_case(phi3):
    worst = estimate(phi3, **{"train.micro_batch_size": 8})
    typical = estimate(phi3, lengths=ALPACA_LENGTHS, **{"train.micro_batch_size": 8})
    assert worst["tokens_per_micro_batch"] == 8 * 512
    assert 512 + 7 * 175 <= typical["tokens_per_micro_batch"] < 8 * 512
    padded = estimate(phi3, lengths=ALPACA_LENGTHS, **{"train.micro_batch_size": 8, "train.packing": False})
    assert padded["tokens_per_micro_batch"] == 8 * 512  # every batch pads to its longest; one holds the longest


MEASURED = [json.loads(line) for line in (REPO / "benchmarks" / "preflight_memory.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", MEASURED, ids=lambda c: c["case"])
def test_the_estimate_is_within_30_percent_of_this_pipelines_measured_peaks(phi3, case):
    """Peak reserved memory of this pipeline's own loading and Trainer on an H200 (Phi-3-mini shape)."""
    est = estimate(phi3, H200, case["length_stats"], **case["overrides"])
    assert est["total_gib"] == pytest.approx(case["peak_reserved_gib"], rel=0.30), est["parts_gib"]


@pytest.mark.parametrize("overrides, measured_gib", [
    ({"train.micro_batch_size": 8}, 4.83),  # fp16, sdpa, grad ckpt
    ({"train.micro_batch_size": 16, "train.gradient_checkpointing": False, "model.attn_implementation": "flex_attention",
      "quant.compute_dtype": "bfloat16"}, 39.2),
    ({"train.micro_batch_size": 32, "train.gradient_checkpointing": False, "model.attn_implementation": "flex_attention",
      "quant.compute_dtype": "bfloat16"}, 56.4),
    ({"train.micro_batch_size": 64, "model.attn_implementation": "flex_attention", "quant.compute_dtype": "bfloat16"}, 25.0),
], ids=["b8-sdpa-ckpt", "b16-flex-no-ckpt", "b32-flex-no-ckpt", "b64-flex-ckpt"])
def test_the_estimate_is_within_30_percent_of_the_readmes_padding_free_measurements(phi3, overrides, measured_gib):
    est = estimate(phi3, H200, ALPACA_LENGTHS, **overrides)
    assert est["total_gib"] == pytest.approx(measured_gib, rel=0.30), est["parts_gib"]


@pytest.mark.parametrize("overrides, measured_gib", [
    ({"train.micro_batch_size": 64, "train.packing_row_tokens": 0}, 8.23),
    ({"train.micro_batch_size": 64}, 6.19),
    ({"train.micro_batch_size": 64, "train.packing_row_tokens": 2048}, 5.85),
    ({}, 9.28),
    ({}, 8.25),
    ({"train.packing_row_tokens": 512}, 11.36),
], ids=["b64-one-row", "b64-rows1024", "b64-rows2048", "b128-rows1024", "b128-rows1024-again", "b128-rows512"])
def test_the_estimate_is_within_30_percent_of_the_kaggle_t4_row_packing_measurements(phi3, overrides, measured_gib):
    """benchmarks/results/gpu_bench-h200-2026-11-29b.json (micro-batches of 64, and 128 in rows of 1,024: 9.28 GiB),
    gpu_bench-h200-2026-12-01b.json (the profile as committed: 9.28 GiB again) and gpu_explore-h200-2026-12-01.json
    (8.25 GiB; rows of 512: 11.36): the kaggle-t4 profile under a 15 GiB cap, lengths of the real Alpaca sample."""
    est = estimate_training_memory(build_config("kaggle-t4", overrides), phi3, T4, SAMPLE_LENGTHS_512)
    assert est["total_gib"] == pytest.approx(measured_gib, rel=0.30), est["parts_gib"]


@pytest.mark.parametrize("profile, overrides, measured_gib", [
    # gpu_bench-h200-2026-12-01b.json, sanity-low-memory: groups of up to 640 tokens, two per step
    ("low-memory", {}, 3.05),
    # gpu_bench-h200-2026-12-01a.json: groups of up to 512 tokens with compiled layers (which keep more)
    ("low-memory", {"train.micro_batch_tokens": 512, "train.torch_compile": True}, 3.89),
    # gpu_explore-h200-2026-12-01.json, fast-b64-compile
    ("gpu-fast", {}, 36.8),
    # gpu_bench-h200-2026-12-01a.json: the same recipe in the next launch reserved 66.27 GiB (30.48 allocated)
    pytest.param("gpu-fast", {}, 66.27, marks=pytest.mark.xfail(strict=True, reason=(
        "the same recipe reserved 36.8 GiB in the launch before: with compiled layers and a new row length every "
        "step the allocator's caching varies by launch (30.5 GiB allocated here, 28.1 there); the estimate is 39.5"))),
], ids=["low-memory", "low-memory-512-compiled", "gpu-fast", "gpu-fast-second-launch"])
def test_the_estimate_is_within_30_percent_of_the_issue_16_measurements(phi3, profile, overrides, measured_gib):
    hw = H200 if profile == "gpu-fast" else T4
    est = estimate_training_memory(build_config(profile, overrides), phi3, hw, SAMPLE_LENGTHS_512)
    assert est["total_gib"] == pytest.approx(measured_gib, rel=0.30), est["parts_gib"]


def test_the_gpu_report_warns_and_suggests(tmp_path, phi3, capsys):
    phi3.save_pretrained(tmp_path / "phi3")  # config.json only: the report never loads weights
    cfg = build_config("kaggle-t4", {**MEASURED_RECIPE, "train.micro_batch_size": 32, "train.gradient_checkpointing": False,
                                     "model.name": str(tmp_path / "phi3")})
    stage = Stage(cfg, tmp_path / "run")
    stage.hw = T4  # what a Kaggle T4 reports
    est = preflight_report(stage)
    out = capsys.readouterr().out
    assert "GPU: Tesla T4, compute capability 7.5, 14.7 of 14.7 GiB free, bf16: no" in out
    assert "compute dtype: float16, attention: sdpa" in out
    assert "32 layers, hidden 3072, intermediate 8192, vocabulary 32064, 32 heads" in out
    assert "WARNING: this run will likely NOT fit" in out and est["suggestion"] in out
    saved = json.loads((tmp_path / "run" / "model" / "preflight.json").read_text())
    assert saved["fits"] is False and saved["hardware"]["name"] == "Tesla T4"


def test_on_cpu_the_report_says_there_is_no_gpu(tmp_path, smol_tokenizer, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "data" / "metrics.json").write_text(json.dumps({"train_lengths": {"mean": 40.0, "p50": 38, "p90": 55, "max": 90}}))
    cfg = build_config("test")
    est = preflight_report(Stage(cfg, run_dir))
    out = capsys.readouterr().out
    assert out.startswith("No GPU: training runs on the CPU") and "GiB available" in out
    assert est["fits"] is None and est["tokens_per_micro_batch"] < cfg.train.micro_batch_size * cfg.data.max_seq_len
    assert "the longest batch of stage 1's data" in out


def test_liger_fused_cross_entropy_never_holds_all_the_logits(phi3):
    if not hasattr(build_config("kaggle-t4").train, "use_liger"):
        pytest.skip("no train.use_liger key")
    plain = estimate(phi3, H200, ALPACA_LENGTHS, **{"train.micro_batch_size": 32, "train.use_liger": False})
    fused = estimate(phi3, H200, ALPACA_LENGTHS, **{"train.micro_batch_size": 32, "train.use_liger": True})
    assert fused["parts_gib"]["logits"] < plain["parts_gib"]["logits"] / 4
