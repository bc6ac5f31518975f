"""``inspect-model``: what LoRA will cover and how big the model is, before a long load.

With ``--random-weights`` only config.json is read: the architecture is built on the meta device, so
nothing is downloaded but config.json and nothing is allocated. Otherwise the real weights are loaded
and quantized, and the measured bytes are reported next to the estimate from the shapes.
"""
from __future__ import annotations

import copy
import math
from typing import Any

from .model import (GIB, count_parameters, describe_quantization, linear_module_names, load_base_model,
                    load_model_config, lora_coverage, lora_modules_to_save, lora_targets, weight_bytes)
from .stage import Stage


def meta_model(stage: Stage, model_config):
    """The architecture on the meta device: shapes and module names, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(model_config), dtype=stage.torch_dtype,
                                                attn_implementation=stage.cfg.model.attn_implementation,
                                                trust_remote_code=stage.cfg.model.trust_remote_code)


# inspect-model and the benchmarks look before any run directory exists, so they cannot read the configs notebook 02
# saved: these build from the profile what notebook 02's cells build (tests/test_model.py checks the two agree).
def profile_quantization_config(stage: Stage):
    """The BitsAndBytesConfig notebook 02 builds for this profile (None for quant.mode=none)."""
    from transformers import BitsAndBytesConfig

    q = stage.cfg.quant
    return None if q.mode == "none" else BitsAndBytesConfig(
        load_in_4bit=q.mode in ("nf4", "fp4"), load_in_8bit=q.mode == "int8",
        bnb_4bit_quant_type=q.mode if q.mode in ("nf4", "fp4") else "nf4", bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=stage.torch_dtype)


def profile_lora_config(stage: Stage, model):
    """The LoraConfig notebook 02 builds for this profile on `model`."""
    from peft import LoraConfig

    lo = stage.cfg.lora
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lora_targets(stage, model),
                      use_rslora=lo.use_rslora, use_dora=lo.use_dora,
                      modules_to_save=lora_modules_to_save(stage, model), bias="none", task_type="CAUSAL_LM")


def _is_bnb_linear(module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _4bit_bytes(numel: int, double_quant: bool, blocksize: int = 64) -> int:
    """Packed weights (two per byte) + a 16-entry fp32 code + one absmax per block: fp32, or with double
    quantization one byte, plus an fp32 offset, an fp32 absmax per 256 blocks and a 256-entry fp32 code."""
    blocks = math.ceil(numel / blocksize)
    size = math.ceil(numel / 2) + 16 * 4
    if double_quant:
        return size + blocks + 4 + math.ceil(blocks / 256) * 4 + 256 * 4
    return size + blocks * 4


def quantized_layer_names(model, stage: Stage) -> set[str]:
    """The linear layers bitsandbytes quantizes under cfg (or already has): the ones transformers' quantizer
    does not skip (it keeps the output head, tied weights and fp32-pinned modules unquantized)."""
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    if stage.cfg.quant.mode == "none":
        return set()
    skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    return {name for name, m in model.named_modules()
            if _is_bnb_linear(m) or ((type(m) is torch.nn.Linear or isinstance(m, Conv1D)) and should_convert_module(name, skip))}


def estimate_weight_bytes(model, stage: Stage) -> dict[str, int]:
    """What the base model's weights take once loaded as configured, from shapes alone (works on the meta
    device, before LoRA is attached): quantized linear layers at 0.5 byte per parameter (nf4/fp4) plus
    their quantization state, or 1 byte plus an fp32 scale per row (int8); everything else in the compute dtype."""
    import torch

    cfg = stage.cfg
    element = torch.empty(0, dtype=stage.torch_dtype).element_size()
    modules = dict(model.named_modules())
    quantized_names = quantized_layer_names(model, stage)
    out = {"quantized_params": 0, "quantized_bytes": 0, "other_params": 0, "other_bytes": 0}
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if owner in quantized_names and leaf == "weight":
            module = modules[owner]
            numel = module.in_features * module.out_features
            out["quantized_params"] += numel
            out["quantized_bytes"] += (_4bit_bytes(numel, cfg.quant.double_quant) if cfg.quant.mode in ("nf4", "fp4")
                                       else numel + module.out_features * 4)
        else:
            out["other_params"] += p.numel()
            out["other_bytes"] += p.numel() * element
    out["total_bytes"] = out["quantized_bytes"] + out["other_bytes"]
    return out


def inspect_model(stage: Stage, random_weights: bool = True) -> dict[str, Any]:
    """Linear layer names, LoRA coverage, parameters and weight memory for cfg's model and LoRA settings.

    random_weights=True needs only the config (config.json, or a GGUF's metadata): the model is built on
    the meta device, nothing is downloaded but config.json and nothing is allocated. Otherwise the real
    weights are loaded and quantized, and the measured bytes are reported next to the estimate.
    A target name that matches nothing raises ConfigError, naming it and listing the real names.
    """
    cfg, source = stage.cfg, stage.model.description
    from peft import get_peft_model

    if random_weights:
        model = meta_model(stage, load_model_config(stage))
        source += " (config only, random weights on the meta device)"
    else:
        model = load_base_model(stage, quantization=profile_quantization_config(stage))
    base = count_parameters(model)
    estimate = estimate_weight_bytes(model, stage)
    measured = None if random_weights else weight_bytes(model)
    linear_names = sorted(linear_module_names(model))
    head = model.get_output_embeddings()
    head_name = next((full for full, m in model.named_modules() if head is not None and m is head), None)
    peft_model = get_peft_model(model, profile_lora_config(stage, model))
    counts = count_parameters(peft_model)
    return {
        "source": source, "architecture": type(model).__name__, "quantization": describe_quantization(stage),
        "compute_dtype": stage.compute_dtype, "linear_names": linear_names, "output_head": head_name,
        "targets": sorted({r["module"] for r in lora_coverage(peft_model)}), "coverage": lora_coverage(peft_model),
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "use_rslora": cfg.lora.use_rslora, "use_dora": cfg.lora.use_dora},
        "params": {"base": base["total"], "total": counts["total"], "trainable": counts["trainable"]},
        "weight_bytes_estimate": estimate, "weight_bytes_measured": measured,
        # LoRA weights are fp32 (PEFT upcasts them); a modules_to_save copy keeps the compute dtype
        "trainable_bytes": sum(p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad),
    }


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}" if unit == "B" else f"{n / size:.1f}{unit}"
    return str(int(n))


def inspect_model_text(report: dict[str, Any]) -> str:
    """The preflight as a few readable lines and the LoRA coverage table."""
    params, est = report["params"], report["weight_bytes_estimate"]
    lines = [f"model: {report['source']}",
             f"architecture: {report['architecture']}; quantization {report['quantization']}, compute dtype {report['compute_dtype']}",
             f"linear layers: {', '.join(report['linear_names'])} (output head {report['output_head']} not counted)",
             f"LoRA r={report['lora']['r']} alpha={report['lora']['alpha']}"
             + (" rsLoRA" if report["lora"]["use_rslora"] else "") + (" DoRA" if report["lora"]["use_dora"] else "")
             + f" on {', '.join(report['targets'])}", ""]
    header = ("module", "layers", "in", "out", "LoRA params")
    rows = [(r["module"], r["layers"], r["in_features"], r["out_features"], f"{r['lora_params']:,}") for r in report["coverage"]]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        lines.append("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths))))
    lines += ["",
              f"parameters: {params['base']:,} base ({_human(params['base'])}), {params['total']:,} with the adapters "
              f"({_human(params['total'])}), trainable {params['trainable']:,} "
              f"({_human(params['trainable'])}, {100 * params['trainable'] / params['total']:.2f}%)",
              f"weights in memory: {est['total_bytes'] / GIB:.2f} GiB estimated ({_human(est['quantized_params'])} "
              f"parameters quantized: {est['quantized_bytes'] / GIB:.2f} GiB; {_human(est['other_params'])} in "
              f"{report['compute_dtype']}: {est['other_bytes'] / GIB:.2f} GiB)"
              + (f", {report['weight_bytes_measured'] / GIB:.2f} GiB measured" if report["weight_bytes_measured"] else "")
              + f"; trainable parameters {report['trainable_bytes'] / GIB:.2f} GiB"]
    return "\n".join(lines)
