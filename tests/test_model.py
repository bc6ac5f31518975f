import json
import math
from pathlib import Path

import pytest
import torch

from qlora_helpers import ConfigError, Stage, build_config
from qlora_helpers.__main__ import main
from qlora_helpers.data import load_tokenizer
from qlora_helpers.hardware import choose_compute_dtype, hardware
from qlora_helpers.inspect_model import estimate_weight_bytes
from qlora_helpers.model import (count_parameters, linear_module_names, lora_coverage, lora_targets, parameter_dtypes,
                                 weight_bytes, write_model_metrics)
from qlora_helpers.sources import kaggle_input_model, model_source

from conftest import run_cli
from recipe import attach_lora, load_base  # notebook 02's objects for a profile, outside a notebook


def S(overrides=None, run_dir=None, profile="test"):
    """The Stage a notebook would get for the test profile with these overrides."""
    return Stage(build_config(profile, overrides or {}), run_dir)

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
    cfg = S({"lora.target_modules": SEED_TARGETS})
    with pytest.raises(ConfigError) as err:
        lora_targets(cfg, tiny("phi3"))
    msg = str(err.value)
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        assert name in msg.split(" match no")[0]
    assert "qkv_proj" in msg and "gate_up_proj" in msg
    assert lora_targets(cfg, tiny("llama")) == SEED_TARGETS.split(",")


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
    cfg = S({"model.name": str(tmp_path), "quant.compute_dtype": "float32"})
    quantized = load_base(cfg)
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
    # a CPU with bf16 instructions computes in fp32 too (reproducible sums), unless bf16 is asked for
    amx = {"device": "cpu", "name": "CPU", "capability": None, "bf16": True}
    assert choose_compute_dtype("auto", amx) == "float32" and choose_compute_dtype("bfloat16", amx) == "bfloat16"


def test_bf16_on_a_t4_is_refused_before_loading():
    with pytest.raises(ConfigError, match=r"Tesla T4 \(compute capability 7.5\) has no bf16 support; set quant.compute_dtype=float16"):
        choose_compute_dtype("bfloat16", T4)


def test_bf16_on_a_t4_stops_load_base_model_before_any_download(monkeypatch):
    import transformers

    monkeypatch.setattr("qlora_helpers.stage.hardware", lambda: T4)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ConfigError, match="set quant.compute_dtype=float16"):
        load_base(S({"model.name": "microsoft/Phi-3-mini-4k-instruct", "quant.compute_dtype": "bfloat16"}))


# --------------------------------------------------------------------------- where the weights come from
def _fake_model_folder(folder, weights="model.safetensors"):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if weights:
        (folder / weights).write_bytes(b"")
    return folder


def test_a_model_attached_under_kaggle_input_is_found_by_its_words(tmp_path):
    root = tmp_path / "input"
    _fake_model_folder(root / "phi-3/transformers/phi-3-mini-4k-instruct/1")
    newest = _fake_model_folder(root / "phi-3/transformers/phi-3-mini-4k-instruct/2")
    long_context = _fake_model_folder(root / "phi-3/transformers/phi-3-mini-128k-instruct/3")
    _fake_model_folder(root / "phi-3-mini-4k-instruct-onnx/onnx/cpu/1", weights="model.onnx")  # no HF weights
    qwen = _fake_model_folder(root / "qwen2.5/transformers/0.5b-instruct/1/Qwen2.5-0.5B-Instruct")
    (root / "alpaca/data").mkdir(parents=True)
    (root / "alpaca/data/train.json").write_text("[]")

    assert kaggle_input_model("microsoft/Phi-3-mini-4k-instruct", root) == newest
    assert kaggle_input_model("microsoft/Phi-3-mini-128k-instruct", root) == long_context
    assert kaggle_input_model("Qwen/Qwen2.5-0.5B-Instruct", root) == qwen
    assert kaggle_input_model("meta-llama/Llama-3.2-1B", root) is None
    assert kaggle_input_model("microsoft/Phi-3-mini-4k-instruct", tmp_path / "no-such-root") is None


def test_sources_in_order_local_then_kaggle_input_then_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_KAGGLE_ROOT", str(tmp_path))
    attached = _fake_model_folder(tmp_path / "input/phi-3/transformers/phi-3-mini-4k-instruct/1")
    phi3 = build_config("kaggle-t4")
    assert (model_source(phi3).location, model_source(phi3).description) == (str(attached), f"Kaggle input {attached}")
    hub = build_config("test", {"model.name": "HuggingFaceTB/SmolLM2-135M-Instruct", "model.revision": "main"})
    assert (model_source(hub).location, model_source(hub).description) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "Hugging Face Hub HuggingFaceTB/SmolLM2-135M-Instruct @ main")
    assert model_source(hub).kwargs["revision"] == "main"
    nested = _fake_model_folder(tmp_path / "mine/1/model")  # a Kaggle version folder holding the model one level down
    assert model_source(build_config("test", {"model.name": str(tmp_path / "mine")})).location == str(nested)
    with pytest.raises(ConfigError, match="no such file or folder"):
        model_source(build_config("test", {"model.name": str(tmp_path / "typo")}))
    with pytest.raises(ConfigError, match="holds no weights.*inspect-model"):
        load_base(S({"model.name": str(_fake_model_folder(tmp_path / "bare", weights=None))}))


def test_remote_code_runs_only_when_asked(monkeypatch):
    import transformers

    seen = []
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda path, **kw: seen.append(kw) or TINY)
    from qlora_helpers.model import load_model_config

    load_model_config(S({"model.name": "owner/model"}))
    load_model_config(S({"model.name": "owner/model", "model.trust_remote_code": True}))
    assert [kw["trust_remote_code"] for kw in seen] == [False, True]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny("llama").save_pretrained(path)
    return path


@pytest.fixture
def bf16():
    if not hardware()["bf16"]:
        pytest.skip("this CPU has no bf16")
    return "bfloat16"


@pytest.mark.parametrize("mode, double_quant, layer", [("nf4", True, "Linear4bit"), ("nf4", False, "Linear4bit"),
                                                       ("fp4", True, "Linear4bit"), ("int8", False, "Linear8bitLt"),
                                                       ("none", False, "Linear")])
def test_each_quant_mode_loads_and_its_size_is_known_from_shapes(tiny_llama_dir, bf16, mode, double_quant, layer):
    # int8 runs on the CPU with bitsandbytes 0.50 (activations are cast to fp16 for the int8 matmul)
    cfg = S({"model.name": str(tiny_llama_dir), "quant.mode": mode,
             "quant.double_quant": double_quant, "quant.compute_dtype": bf16})
    model = load_base(cfg)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer
    if layer == "Linear4bit":
        assert (q_proj.weight.quant_state.quant_type, q_proj.weight.quant_state.nested) == (mode, double_quant)
        assert q_proj.compute_dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == torch.bfloat16
    assert count_parameters(model)["total"] == sum(p.numel() for p in tiny("llama").parameters())
    assert estimate_weight_bytes(model, cfg)["total_bytes"] == weight_bytes(model)
    ids = torch.randint(2, 256, (2, 8))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def _write_tiny_gguf(path):
    """A tiny random Llama as a GGUF file (f32 tensors, a byte-level llama tokenizer)."""
    import gguf

    model = tiny("llama")
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(c.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(c.vocab_size - 3)])
    writer.add_token_scores([0.0] * c.vocab_size)
    writer.add_token_types([2, 3, 3] + [6] * (c.vocab_size - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for key, value in model.state_dict().items():
        writer.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), value.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def test_a_gguf_file_loads_dequantized_then_quantized_as_configured(tmp_path, bf16):
    original = _write_tiny_gguf(tmp_path / "tiny.gguf")
    cfg = S({"model.name": str(tmp_path / "tiny.gguf"), "quant.compute_dtype": bf16})
    assert cfg.model.description.startswith(f"GGUF file {tmp_path / 'tiny.gguf'}")
    assert (Path(cfg.model.location) / "config.json").exists()  # dequantized once into the cache
    model = load_base(cfg)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert model.hf_quantizer.quantization_config.bnb_4bit_quant_type == "nf4"
    assert count_parameters(model)["total"] == sum(p.numel() for p in original.parameters())
    tokenizer = load_tokenizer(cfg)
    ids = torch.tensor([tokenizer("hello").input_ids])
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    plain = load_base(S({"model.name": str(tmp_path / "tiny.gguf"), "quant.mode": "none",
                               "quant.compute_dtype": "float32"}))
    # dequantized once into a bfloat16 folder: the original weights to bf16's precision (NF4 rounds far more)
    assert torch.allclose(plain.model.layers[0].mlp.down_proj.weight, original.model.layers[0].mlp.down_proj.weight,
                          rtol=2**-8, atol=0)


# --------------------------------------------------------------------------- 16-bit stays 16-bit, LoRA options
def test_16bit_compute_keeps_embeddings_and_head_16bit_and_lora_trains(tiny_llama_dir, bf16):
    cfg = S({"model.name": str(tiny_llama_dir), "quant.compute_dtype": bf16, "train.gradient_checkpointing": True})
    model = attach_lora(cfg, load_base(cfg))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as the Trainer does
    base = model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == base.lm_head.weight.dtype == base.model.norm.weight.dtype == torch.bfloat16
    dtypes = parameter_dtypes(model)
    assert set(dtypes) == {"4bit", "bfloat16", "float32"}
    assert dtypes["float32"] == count_parameters(model)["trainable"]  # only the adapters are fp32
    model.train()
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    before = lora_b.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(2, 256, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(lora_b, before)
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16 and base.model.embed_tokens.weight.grad is None


def test_rslora_dora_and_modules_to_save_reach_the_peft_model(tiny_llama_dir, bf16):
    cfg = S({"model.name": str(tiny_llama_dir), "quant.compute_dtype": bf16, "lora.r": 4, "lora.alpha": 8,
             "lora.use_rslora": True, "lora.use_dora": True, "lora.modules_to_save": "lm_head"})
    model = attach_lora(cfg, load_base(cfg))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r), not alpha / r
    assert "default" in q_proj.lora_magnitude_vector  # DoRA
    lm_head = model.base_model.model.lm_head
    assert type(lm_head).__name__ == "ModulesToSaveWrapper"
    assert all(p.requires_grad for p in lm_head.modules_to_save["default"].parameters())
    lora_only = sum(r["lora_params"] for r in lora_coverage(model))
    magnitudes = sum(p.numel() for n, p in model.named_parameters() if "lora_magnitude_vector" in n)
    assert count_parameters(model)["trainable"] == lora_only + 256 * 64  # + the trainable copy of lm_head
    assert magnitudes > 0
    ids = torch.randint(2, 256, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert q_proj.lora_magnitude_vector["default"].weight.grad is not None


def test_modules_to_save_that_matches_nothing_is_an_error():
    cfg = S({"lora.modules_to_save": "output_head"})
    with pytest.raises(ConfigError, match="lora.modules_to_save: output_head match no module.*lm_head"):
        attach_lora(cfg, tiny("llama"))


def test_targets_may_be_dotted_suffixes_or_the_output_head():
    model = tiny("llama")
    assert lora_targets(S({"lora.target_modules": "self_attn.q_proj,lm_head"}), model) == ["self_attn.q_proj", "lm_head"]
    assert "lm_head" not in lora_targets(S(), model)  # all-linear leaves the head out, as PEFT does
    with pytest.raises(ConfigError, match="mlp.q_proj match no linear layer"):
        lora_targets(S({"lora.target_modules": "mlp.q_proj"}), model)


# --------------------------------------------------------------------------- inspect-model and metrics
@pytest.fixture(scope="module")
def phi3_mini_config_dir(tmp_path_factory):
    from transformers import Phi3Config

    path = tmp_path_factory.mktemp("phi3-mini-config")
    Phi3Config(**PHI3_MINI).save_pretrained(path)
    return path


def test_inspect_model_names_unmatched_targets_in_one_line(phi3_mini_config_dir):
    proc = run_cli("inspect-model", "--model", str(phi3_mini_config_dir), "--random-weights", "--target-modules", SEED_TARGETS)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    unmatched, _, listed = lines[0].partition(" match no linear layer")
    assert all(name in unmatched for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    assert "qkv_proj" in listed and "gate_up_proj" in listed


def test_inspect_model_reports_phi3_mini_size_from_its_config_alone(phi3_mini_config_dir, capsys):
    assert main(["inspect-model", "--model", str(phi3_mini_config_dir), "--random-weights", "--r", "32",
                 "-p", "quant.compute_dtype=float16"]) == 0
    out = capsys.readouterr().out
    assert "3,821,079,552 base (3.82B)" in out and "trainable 50,331,648 (50.3M" in out
    assert "weights in memory: 2.11 GiB estimated" in out  # NF4 + double quant, embeddings and head in fp16
    assert "qkv_proj" in out and "gate_up_proj" in out
    assert main(["inspect-model", "--model", str(phi3_mini_config_dir), "--random-weights", "--r", "32", "--json",
                 "-p", "quant.compute_dtype=float16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"]["trainable"] == 50_331_648 and 3.8e9 < report["params"]["base"] < 3.85e9
    estimate = report["weight_bytes_estimate"]
    # ~3.62B parameters in NF4 + double quant (~0.516 byte each), embeddings and head in fp16
    assert estimate["quantized_params"] + estimate["other_params"] == report["params"]["base"]
    assert 2.0 < estimate["total_bytes"] / 2**30 < 2.2


def test_inspect_model_with_real_weights_measures_what_it_estimated(tiny_llama_dir, bf16, capsys):
    assert main(["inspect-model", "--model", str(tiny_llama_dir), "--json", "-p", f"quant.compute_dtype={bf16}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weight_bytes_measured"] == report["weight_bytes_estimate"]["total_bytes"]
    assert report["targets"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_model_metrics_record_weights_and_memory_after_loading(tiny_llama_dir, bf16, tmp_path):
    cfg = S({"model.name": str(tiny_llama_dir), "quant.compute_dtype": bf16}, tmp_path)
    model = attach_lora(cfg, load_base(cfg))
    metrics = write_model_metrics(cfg, model)
    assert json.loads((tmp_path / "model" / "metrics.json").read_text()) == json.loads(json.dumps(metrics, default=str))
    for key in ("source", "quantization", "compute_dtype", "attn_implementation", "hardware", "targets", "coverage",
                "params", "weight_gib", "memory"):
        assert key in metrics
    assert metrics["quantization"] == "nf4 + double quant" and metrics["weight_bytes"] == weight_bytes(model)
    memory = metrics["memory"]
    assert memory["rss_gib"] > 0 and memory["peak_rss_gib"] >= memory["rss_gib"] * 0.5
    assert memory["gpu_allocated_gib"] is None and memory["gpu_reserved_gib"] is None  # CPU here


def _lora_grads(model, ids):
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("guarded", [True, False])
def test_evaluation_between_training_steps_leaves_the_gradients_alone(tiny_llama_dir, bf16, guarded):
    """bitsandbytes 0.50 on an AVX512-BF16 CPU repacks a 4-bit layer on its first eval-mode no-grad forward into a
    kernel without a backward: after that, gradients stop at the frozen layer. load_base_model turns the repack off;
    unguarded (the library's default) the same gradients change, which is why the guard exists."""
    from qlora_helpers.model import keep_cpu_4bit_layers_trainable

    cfg = S({"model.name": str(tiny_llama_dir), "quant.compute_dtype": "float32", "lora.dropout": 0.0})
    model = attach_lora(cfg, load_base(cfg))
    if not guarded:
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on this CPU
    ids = torch.randint(2, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    before = _lora_grads(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # what trainer.evaluate() and generate() do between training steps
    after = _lora_grads(model, ids)
    changed = [n for n in before if after[n] is None or not torch.allclose(before[n], after[n], rtol=1e-4, atol=1e-7)]
    if guarded:
        assert not changed
    else:
        assert changed, "bitsandbytes no longer loses gradients after an eval pass: keep_cpu_4bit_layers_trainable can go"
    assert keep_cpu_4bit_layers_trainable  # the guard load_base_model applies


# --------------------------------------------------------------------------- the guards on what the notebooks' cells build
def test_the_quantization_config_a_cell_builds_is_checked_against_the_config_and_the_machine(monkeypatch):
    from transformers import BitsAndBytesConfig

    from qlora_helpers.inspect_model import profile_quantization_config
    from qlora_helpers.model import check_quantization_config

    stage = S()
    check_quantization_config(stage, profile_quantization_config(stage))  # what notebook 02 builds passes
    for wrong, message in ((BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.float32), "quantizes to fp4"),
                           (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.bfloat16), "computes in bfloat16"),
                           (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                                               bnb_4bit_compute_dtype=torch.float32), "double_quant=True"),
                           (None, "built no BitsAndBytesConfig")):
        with pytest.raises(ConfigError, match=message):
            check_quantization_config(stage, wrong)
    monkeypatch.setattr("qlora_helpers.stage.hardware", lambda: T4)  # a T4: the cell's bf16 is refused by the guard too
    with pytest.raises(ConfigError, match="has no bf16 support"):
        check_quantization_config(S({"quant.compute_dtype": "bfloat16"}), None)


def test_the_lora_config_a_cell_builds_is_checked_against_the_config_and_the_model():
    from peft import LoraConfig

    from qlora_helpers.inspect_model import profile_lora_config
    from qlora_helpers.model import check_lora_config

    stage, model = S(), tiny("phi3")
    check_lora_config(stage, model, profile_lora_config(stage, model))
    with pytest.raises(ConfigError, match=r"LoraConfig has r=8, but the config says 16"):
        check_lora_config(stage, model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["qkv_proj"],
                                                   task_type="CAUSAL_LM"))
    with pytest.raises(ConfigError, match=r"target_modules: q_proj, v_proj match no linear layer.*qkv_proj"):
        check_lora_config(stage, model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                   target_modules=["q_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(ConfigError, match="task_type"):
        check_lora_config(stage, model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["o_proj"]))


def test_the_training_arguments_a_cell_builds_are_checked_against_the_config(tmp_path):
    from qlora_helpers import UserError
    from qlora_helpers.train import check_training_arguments
    from recipe import training_arguments

    stage = S(run_dir=tmp_path)
    args = training_arguments(stage, 64, world=1)  # notebook 03's cell: checked, passes
    for change, message in (({"learning_rate": 1e-3}, r"learning_rate=0.001 \(the config says 0.0002\)"),
                            ({"output_dir": str(tmp_path.parent / "elsewhere")}, "output_dir="),
                            ({"report_to": ["wandb"]}, "report_to="),
                            ({"load_best_model_at_end": False}, "load_best_model_at_end=False")):
        wrong = args.__class__(**{**{k: v for k, v in args.to_dict().items() if k != "hub_token"}, **change})
        with pytest.raises(UserError, match=message):
            check_training_arguments(stage, wrong, 64, 1)
