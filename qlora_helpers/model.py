"""Stage 2: the objects that make QLoRA, built from the config and checked, for the notebook to show and use.

* ``quantization_config``: the ``BitsAndBytesConfig`` (NF4, double quantization, the compute dtype the
  hardware allows);
* ``load_base_model``: ``from_pretrained(..., quantization_config=...)`` onto this process's GPU (the
  notebook makes the same call in plain sight; the command line and evaluation use this one);
* ``lora_config``: PEFT's ``LoraConfig`` on target names checked against the model's real layers (Phi-3
  fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``; a Llama list would match only two);
* counts that do not halve 4-bit weights, the LoRA coverage table, and the metrics notebook 02 saves.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from .config import ConfigError, UserError
from .runs import memory_snapshot, write_json
from .stage import Stage

GIB = 2**30


# --------------------------------------------------------------------------- quantization and loading
def quantization_config(stage: Stage):
    """The BitsAndBytesConfig for quant.*: NF4 (or FP4) 4-bit with optional double quantization, int8, or
    None for quant.mode=none. The compute dtype is the one the hardware allows (fp16 on a T4)."""
    from transformers import BitsAndBytesConfig

    mode = stage.cfg.quant.mode
    if mode == "none":
        return None
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode,
                              bnb_4bit_use_double_quant=stage.cfg.quant.double_quant,
                              bnb_4bit_compute_dtype=stage.torch_dtype)


def describe_quantization(stage: Stage) -> str:
    q = stage.cfg.quant
    if q.mode == "none":
        return "none"
    return q.mode + (" + double quant" if q.double_quant and q.mode in ("nf4", "fp4") else "")


def device_map(stage: Stage) -> dict[str, Any] | str:
    """The whole model on this process's own GPU (each data-parallel process holds its own copy), or the CPU."""
    from .hardware import local_process_index

    return {"": local_process_index()} if stage.hw["device"] == "cuda" else "cpu"


def _holds_weights(folder: str) -> bool:
    if not Path(folder).is_dir():
        return True  # a hub id: from_pretrained says what is missing
    return any(f.endswith(".safetensors") or (f.startswith("pytorch_model") and f.endswith(".bin"))
               for f in os.listdir(folder))


def load_base_model(stage: Stage, quantization=True, location: str | None = None, dtype: str | None = None):
    """The base model as notebook 02 loads it: quantized as configured (``quantization=False``: unquantized,
    in ``dtype``, default the compute dtype), on this process's GPU if there is one, the KV cache off for training.
    No prepare_model_for_kbit_training: it would upcast every non-quantized weight (embeddings, output
    head, norms) to fp32, about 0.4 GB more on Phi-3-mini for nothing."""
    import torch
    from transformers import AutoModelForCausalLM

    source = stage.model
    location = location or source.location
    if not _holds_weights(location):
        raise ConfigError(f"model.name '{location}': holds no weights (no *.safetensors or pytorch_model*.bin); "
                          f"to look at it without weights: python -m qlora_helpers inspect-model --model {location} --random-weights")
    kwargs = dict(source.kwargs) if location == source.location else {"trust_remote_code": stage.cfg.model.trust_remote_code}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, quantization_config=quantization_config(stage) if quantization else None,
            dtype=getattr(torch, dtype) if dtype else stage.torch_dtype, device_map=device_map(stage),
            attn_implementation=stage.cfg.model.attn_implementation, **kwargs)
    except OSError as exc:
        raise UserError(f"model.name '{stage.cfg.model.name}': cannot load ({str(exc).strip().splitlines()[0][:200]})") from None
    except pickle.UnpicklingError:
        raise UserError(f"model.name '{stage.cfg.model.name}': its weights are a pickle (pytorch_model*.bin) holding more "
                        "than tensors, which torch refuses to load because unpickling can run code; use a copy of the "
                        "model in safetensors format") from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise UserError(f"model.name '{stage.cfg.model.name}': a weights file cannot be read ({str(exc)[:200]}); "
                        "it may have been cut short: download it again") from None
    model.config.use_cache = False
    keep_cpu_4bit_layers_trainable(model)
    return model


def keep_cpu_4bit_layers_trainable(model) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit layer's weights for a faster bf16 kernel the
    first time the layer runs in eval mode without gradients (evaluation, generation), and that kernel has no
    backward: from then on no gradient flows through the frozen layer, so the LoRA adapters below it stop
    learning, silently. Training evaluates every train.eval_steps, so the repack is turned off here: evaluation
    takes the exact dequantize-and-matmul path. (tests/test_model.py checks the gradients are unchanged.)"""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_model_config(stage: Stage, location: str | None = None):
    """The model's transformers config from config.json alone: no weights are downloaded."""
    from transformers import AutoConfig

    location = location or stage.model.location
    kwargs = stage.model.kwargs if location == stage.model.location else {}
    try:
        return AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ConfigError(f"model.name '{location}': cannot read its config ({first_line})") from None


# --------------------------------------------------------------------------- LoRA targets
def linear_modules(model) -> dict[str, Any]:
    """Every linear layer (plain or bitsandbytes) except the output head and LoRA's own: full name -> module."""
    import torch

    output_head = model.get_output_embeddings()
    return {full: module for full, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not output_head and "lora_" not in full}


def linear_module_names(model) -> dict[str, list]:
    """Leaf names of every linear layer except the output head: name -> modules."""
    out: dict[str, list] = {}
    for full, module in linear_modules(model).items():
        out.setdefault(full.split(".")[-1], []).append(module)
    return out


def _matches(full_name: str, wanted: str) -> bool:
    """PEFT's rule for a name in a list: the module's full name, or its dotted suffix."""
    return full_name == wanted or full_name.endswith("." + wanted)


def _names_list(spec: str) -> list[str]:
    return [t.strip() for t in spec.split(",") if t.strip()]


def resolve_targets(stage: Stage, model) -> list[str]:
    """The LoRA target names, checked against the model: every name must match some linear layer.
    PEFT only fails when nothing matches; a half-matching list trains a fraction of what was meant.
    The output head counts only when named explicitly (all-linear leaves it out, as PEFT does)."""
    linear = linear_modules(model)
    spec = stage.cfg.lora.target_modules.strip()
    if spec == "all-linear":
        return sorted({full.split(".")[-1] for full in linear})
    head = model.get_output_embeddings()
    candidates = list(linear) + [full for full, m in model.named_modules() if head is not None and m is head]
    wanted = _names_list(spec)
    missing = [t for t in wanted if not any(_matches(full, t) for full in candidates)]
    if missing:
        raise ConfigError(f"lora.target_modules: {', '.join(missing)} match no linear layer of this model; "
                          f"its linear layers are: {', '.join(sorted(linear_module_names(model)))}")
    return wanted


def resolve_modules_to_save(stage: Stage, model) -> list[str]:
    """lora.modules_to_save, checked like the targets: PEFT silently trains nothing for a name that matches nothing."""
    wanted = _names_list(stage.cfg.lora.modules_to_save)
    names = [full for full, _ in model.named_modules() if full]
    missing = [m for m in wanted if not any(_matches(full, m) for full in names)]
    if missing:
        holders = sorted({full.split(".")[-1] for full, module in model.named_modules()
                          if full and next(module.parameters(recurse=False), None) is not None and not full.split(".")[-1].isdigit()})
        raise ConfigError(f"lora.modules_to_save: {', '.join(missing)} match no module of this model; "
                          f"modules with weights: {', '.join(holders)}")
    return wanted


def lora_config(stage: Stage, model):
    """PEFT's LoraConfig for lora.*, on target names checked against `model`."""
    from peft import LoraConfig

    lo = stage.cfg.lora
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=resolve_targets(stage, model),
                      use_rslora=lo.use_rslora, use_dora=lo.use_dora,
                      modules_to_save=resolve_modules_to_save(stage, model) or None, bias="none", task_type="CAUSAL_LM")


def attach_lora(stage: Stage, model):
    """``get_peft_model(model, lora_config(stage, model))``: the frozen base wrapped with trainable adapters.
    Gradient checkpointing, when configured, is turned on by the Trainer (TrainingArguments).

    LoRA's A matrices start random (B starts at zero), drawn from torch's global generator: seeded here with
    train.seed, so the same seed gives the same adapter (the Trainer seeds only later, for dropout and order)."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(stage.cfg.train.seed)
    return get_peft_model(model, lora_config(stage, model))


# --------------------------------------------------------------------------- counting
def count_parameters(model) -> dict[str, int]:
    """Total and trainable parameters, a packed 4-bit weight counted as the parameters it holds (two per byte):
    PEFT's get_nb_trainable_parameters for a PeftModel, transformers' num_parameters otherwise."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return {"total": int(total), "trainable": int(trainable)}
    total = model.num_parameters() if hasattr(model, "num_parameters") else sum(p.numel() for p in model.parameters())
    return {"total": int(total), "trainable": int(sum(p.numel() for p in model.parameters() if p.requires_grad))}


def parameter_dtypes(model) -> dict[str, int]:
    """Parameters per storage dtype (packed 4-bit counted as the parameters they hold, PEFT's rule): shows at a
    glance that nothing was upcast to fp32 but the LoRA adapters."""
    out: dict[str, int] = {}
    for p in model.parameters():
        four_bit = type(p).__name__ == "Params4bit"
        key = "4bit" if four_bit else str(p.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + (p.numel() * 2 * p.element_size() if four_bit else p.numel())
    return out


def _quant_state_bytes(qs) -> int:
    """Every tensor of a bitsandbytes QuantState: absmax, the 4-bit code, and with double quantization the
    offset and the nested state (its absmax and 256-entry code)."""
    if qs is None:
        return 0
    size = sum(t.numel() * t.element_size() for t in (qs.absmax, qs.code, qs.offset) if t is not None)
    return size + _quant_state_bytes(getattr(qs, "state2", None))


def weight_bytes(model) -> int:
    """Bytes the parameters take in memory: packed 4-bit counted as stored, plus the quantization state (4-bit)
    or the per-row scales (int8). transformers' get_memory_footprint() counts parameters and buffers only, and
    bitsandbytes keeps the quantization state beside them: it reports NF4 weights about 3% light."""
    size = 0
    for p in model.parameters():
        size += p.numel() * p.element_size() + _quant_state_bytes(getattr(p, "quant_state", None))
        scales = getattr(p, "SCB", None)
        if scales is not None:
            size += scales.numel() * scales.element_size()
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


def memory_now() -> dict[str, Any]:
    """Memory in use right now (after loading), next to the peaks: process RSS, and the CUDA caching
    allocator's allocated and reserved bytes on a GPU."""
    import psutil
    import torch

    snap = {**memory_snapshot(), "rss_gib": round(psutil.Process().memory_info().rss / GIB, 3),
            "gpu_allocated_gib": None, "gpu_reserved_gib": None}
    if torch.cuda.is_available():
        snap["gpu_allocated_gib"] = round(torch.cuda.memory_allocated() / GIB, 3)
        snap["gpu_reserved_gib"] = round(torch.cuda.memory_reserved() / GIB, 3)
    return snap


def write_model_metrics(stage: Stage, peft_model) -> dict[str, Any]:
    """What notebook 02 shows, saved as RUN_DIR/model/metrics.json for the report."""
    coverage = lora_coverage(peft_model)
    size = weight_bytes(peft_model)
    metrics = {
        "source": stage.model.description,
        "quantization": describe_quantization(stage),
        "compute_dtype": stage.compute_dtype,
        "attn_implementation": stage.cfg.model.attn_implementation,
        "hardware": stage.hw,
        "targets": sorted({r["module"] for r in coverage}),
        "coverage": coverage,
        "params": count_parameters(peft_model),
        "weight_gib": round(size / GIB, 3),
        "weight_bytes": size,
        "dtypes": parameter_dtypes(peft_model),
        "memory": memory_now(),
    }
    write_json(stage.path("model", "metrics.json"), metrics)
    return metrics
