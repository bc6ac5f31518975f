import pytest
import torch

from qlora_helpers import ConfigError, build_config
from qlora_helpers.model import (attach_lora, choose_compute_dtype, count_parameters, linear_module_names,
                                 load_base_model, lora_coverage, resolve_targets)

TINY = dict(vocab_size=256, pad_token_id=0, eos_token_id=1, bos_token_id=1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
PHI3_MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
SEED_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def tiny(kind, **over):
    from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config

    torch.manual_seed(0)
    config = (Phi3Config if kind == "phi3" else LlamaConfig)(**{**TINY, **over})
    return AutoModelForCausalLM.from_config(config)


def test_phi3_fuses_projections_and_llama_splits_them():
    assert sorted(linear_module_names(tiny("phi3"))) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert sorted(linear_module_names(tiny("llama"))) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_a_target_that_matches_nothing_is_an_error_listing_the_real_names():
    cfg = build_config("test", {"lora.target_modules": SEED_TARGETS})
    with pytest.raises(ConfigError) as err:
        resolve_targets(cfg, tiny("phi3"))
    msg = str(err.value)
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        assert name in msg.split(" match no")[0]
    assert "qkv_proj" in msg and "gate_up_proj" in msg
    assert resolve_targets(cfg, tiny("llama")) == SEED_TARGETS.split(",")


def _meta_phi3_mini(targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Phi3Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Phi3Config(**PHI3_MINI))
    return get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=targets))


def test_phi3_mini_lora_parameter_counts_match_a_hand_computation():
    # per layer at r=32: qkv 32*(3072+9216) + o 32*(3072+3072) + gate_up 32*(3072+16384) + down 32*(8192+3072)
    full = _meta_phi3_mini(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    assert count_parameters(full)["trainable"] == 32 * 32 * (12288 + 6144 + 19456 + 11264) == 50_331_648
    assert sum(r["lora_params"] for r in lora_coverage(full)) == 50_331_648
    seed = _meta_phi3_mini(["o_proj", "down_proj"])  # what the seed's Llama list really matched
    assert count_parameters(seed)["trainable"] == 17_825_792
    assert 3.7e9 < count_parameters(full)["total"] - 50_331_648 < 3.9e9


def test_packed_4bit_weights_count_as_the_parameters_they_hold(tmp_path):
    model = tiny("llama")
    expected = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path)
    cfg = build_config("test", {"model.name": str(tmp_path), "quant.compute_dtype": "float32"})
    quantized = load_base_model(cfg)
    assert type(quantized.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert sum(p.numel() for p in quantized.parameters()) < expected  # naive numel halves packed layers
    assert count_parameters(quantized)["total"] == expected
    peft_model = attach_lora(cfg, quantized)
    counts = count_parameters(peft_model)
    assert counts["trainable"] == sum(r["lora_params"] for r in lora_coverage(peft_model)) > 0
    assert counts["total"] == expected + counts["trainable"]


T4 = {"device": "cuda", "name": "Tesla T4", "capability": "7.5", "bf16": False}
H200 = {"device": "cuda", "name": "NVIDIA H200", "capability": "9.0", "bf16": True}


def test_compute_dtype_follows_the_hardware():
    assert choose_compute_dtype("auto", T4) == "float16"
    assert choose_compute_dtype("auto", H200) == "bfloat16"
    assert choose_compute_dtype("float16", H200) == "float16"
    assert choose_compute_dtype("auto", {"device": "cpu", "name": "CPU", "capability": None, "bf16": False}) == "float32"


def test_bf16_on_a_t4_is_refused_before_loading():
    with pytest.raises(ConfigError, match=r"Tesla T4 \(compute capability 7.5\) has no bf16 support; set quant.compute_dtype=float16"):
        choose_compute_dtype("bfloat16", T4)
