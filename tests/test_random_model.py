"""benchmarks/random_model.py: the benchmarks' random-weights model is the model from_pretrained would load,
quantized for real, only with random weights."""
import sys

import pytest
import torch

from conftest import REPO
from qlora_helpers.model import weight_bytes
from recipe import attach_lora, load_base
from test_model import S, bf16, tiny, tiny_llama_dir  # noqa: F401,F811 (fixtures)

sys.path.insert(0, str(REPO / "benchmarks"))
from random_model import build_random_model  # noqa: E402


def test_random_model_is_what_from_pretrained_would_load(tiny_llama_dir, bf16):
    cfg = S({"model.name": str(tiny_llama_dir), "quant.compute_dtype": bf16})
    loaded, built = load_base(cfg), build_random_model(cfg)
    assert built.config.quantization_config.to_dict() == loaded.config.quantization_config.to_dict()
    assert (built.is_loaded_in_4bit, type(built.hf_quantizer)) == (True, type(loaded.hf_quantizer))
    built_params = dict(built.named_parameters())
    for name, p in loaded.named_parameters():
        q = built_params[name]
        assert (type(q), q.dtype, q.shape, q.device) == (type(p), p.dtype, p.shape, p.device), name
        if hasattr(p, "quant_state"):
            a, b = p.quant_state, q.quant_state
            assert (a.quant_type, a.blocksize, a.nested, a.dtype, a.shape) == (b.quant_type, b.blocksize, b.nested, b.dtype, b.shape)
    assert weight_bytes(built) == weight_bytes(loaded)
    assert torch.equal(built.model.rotary_emb.inv_freq, loaded.model.rotary_emb.inv_freq)
    assert built.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.2)  # the model's own init


def test_random_model_forward_and_one_lora_step_on_cpu_with_tied_embeddings(bf16):
    cfg = S({"quant.compute_dtype": bf16, "lora.r": 4})
    model = build_random_model(cfg, tiny("llama", tie_word_embeddings=True).config, "cpu", seed=1)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    peft_model = attach_lora(cfg, model)
    ids = torch.randint(2, 256, (2, 8))
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)


def test_random_model_accepts_a_folder_with_only_config_json(tmp_path, bf16):
    tiny("phi3").config.save_pretrained(tmp_path)
    cfg = S({"quant.compute_dtype": bf16, "quant.mode": "int8"})
    model = build_random_model(cfg, tmp_path)
    assert type(model.model.layers[0].self_attn.qkv_proj).__name__ == "Linear8bitLt"
    assert not any(p.is_meta for p in model.parameters())
