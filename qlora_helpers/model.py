"""Stage 2: the checks and the plumbing around the objects that make QLoRA, which notebook 02 builds in its own cells.

How the pieces are shared (the same on the CPU, one GPU, two GPUs and under ``python -m qlora_helpers run``):

* Notebook 02 constructs ``BitsAndBytesConfig(...)`` and ``LoraConfig(...)`` in plain sight, every argument from the
  config object with its reason; ``check_quantization_config`` and ``check_lora_config`` guard what the cell built
  (the compute dtype the hardware has, target names that match real layers, values that agree with config.json);
  ``save_model_configs`` writes both into the run directory in the libraries' own formats.
* Notebooks 03 and 04 read them back (``load_quantization_config``, ``load_lora_config``) and make the library calls
  (``from_pretrained``, ``get_peft_model``, ``PeftModel.from_pretrained``) in their cells. Notebook 03 builds
  ``TrainingArguments(...)`` and the ``Trainer`` in its cells; on two GPUs each process runs notebook 03 itself
  (qlora_helpers.distributed), so no twin of these cells exists in the package.
* The export's checks reload the base model with ``load_base_model``: the same ``from_pretrained`` with the saved
  quantization config. ``inspect-model`` and the benchmarks, which work before any run directory exists, build
  the profile's objects with ``qlora_helpers.inspect_model.profile_configs`` (tests check it agrees with notebook 02).

Also here: counts that do not halve 4-bit weights, the LoRA coverage table, and the metrics notebook 02 saves.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .config import ConfigError, UserError
from .runs import memory_snapshot, write_json
from .stage import Stage

GIB = 2**30


# --------------------------------------------------------------------------- the quantization config
QUANTIZATION_FILE = Path("model") / "quantization_config.json"
LORA_DIR = Path("model") / "lora"


def check_quantization_config(stage: Stage, bnb_config) -> None:
    """Notebook 02's BitsAndBytesConfig against the config and this machine: the quantization quant.mode asks for,
    and a compute dtype the hardware has (stage.compute_dtype refuses bf16 on a T4)."""
    q = stage.cfg.quant
    stage.compute_dtype  # noqa: B018 - bf16 asked for on a GPU without it: refused here, whatever the cell built
    if q.mode == "none":
        if bnb_config is not None:
            raise ConfigError("quant.mode=none, but the cell built a BitsAndBytesConfig; build none (bnb_config = None)")
        return
    if bnb_config is None:
        raise ConfigError(f"quant.mode={q.mode}, but the cell built no BitsAndBytesConfig")
    got = ("int8" if bnb_config.load_in_8bit else bnb_config.bnb_4bit_quant_type if bnb_config.load_in_4bit else "none")
    if got != q.mode:
        raise ConfigError(f"quant.mode={q.mode}, but the BitsAndBytesConfig quantizes to {got}")
    if bnb_config.load_in_4bit:
        dtype = str(bnb_config.bnb_4bit_compute_dtype).removeprefix("torch.")
        if dtype != stage.compute_dtype:
            raise ConfigError(f"the BitsAndBytesConfig computes in {dtype}, but this machine and quant.compute_dtype "
                              f"call for {stage.compute_dtype}")
        if bool(bnb_config.bnb_4bit_use_double_quant) != q.double_quant:
            raise ConfigError(f"quant.double_quant={q.double_quant}, but the BitsAndBytesConfig says "
                              f"{bnb_config.bnb_4bit_use_double_quant}")


def describe_quantization(stage: Stage) -> str:
    q = stage.cfg.quant
    if q.mode == "none":
        return "none"
    return q.mode + (" + double quant" if q.double_quant and q.mode in ("nf4", "fp4") else "")


def device_map(stage: Stage) -> dict[str, Any] | str:
    """The whole model on this process's own GPU (each data-parallel process holds its own copy), or the CPU."""
    from .hardware import local_process_index

    return {"": local_process_index()} if stage.hw["device"] == "cuda" else "cpu"


# --------------------------------------------------------------------------- what notebook 02 hands on
def save_model_configs(stage: Stage, bnb_config, peft_config) -> None:
    """The two objects notebook 02 built, in the libraries' own formats, for every later stage and process to read
    back instead of building its own: model/quantization_config.json (BitsAndBytesConfig.to_dict) and
    model/lora/adapter_config.json (LoraConfig.save_pretrained)."""
    import json
    import shutil
    import tempfile

    from .runs import replace_dir, write_text

    write_text(stage.path(str(QUANTIZATION_FILE)),
               json.dumps(bnb_config.to_dict() if bnb_config is not None else None, indent=2, default=str) + "\n")
    tmp = Path(tempfile.mkdtemp(prefix=".lora.", dir=stage.path("model")))
    try:
        peft_config.save_pretrained(str(tmp))
        replace_dir(tmp, stage.path(str(LORA_DIR)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_quantization_config(stage: Stage):
    """The BitsAndBytesConfig notebook 02 built (None for quant.mode=none)."""
    from transformers import BitsAndBytesConfig

    from .runs import read_json

    path = stage.path(str(QUANTIZATION_FILE))
    if not path.exists():
        raise UserError(f"{path}: no such file; run notebook 02_quantized_model_loading on this run directory first")
    saved = read_json(path)
    return BitsAndBytesConfig.from_dict(saved) if saved else None


def load_lora_config(stage: Stage):
    """The LoraConfig notebook 02 built."""
    from peft import LoraConfig

    path = stage.path(str(LORA_DIR))
    if not (path / "adapter_config.json").exists():
        raise UserError(f"{path}: no adapter_config.json; run notebook 02_quantized_model_loading on this run directory first")
    return LoraConfig.from_pretrained(str(path))


# --------------------------------------------------------------------------- loading
def load_base_model(stage: Stage, quantization: Any = True, location: str | None = None, dtype: str | None = None):
    """The base model loaded as notebooks 02-04 load it in their cells, for the export's checks: quantized with the
    BitsAndBytesConfig notebook 02 saved (``quantization=False``: unquantized, in ``dtype``, default the compute
    dtype; a BitsAndBytesConfig: that one), on this process's GPU if there is one, the KV cache off."""
    import torch
    from transformers import AutoModelForCausalLM

    source = stage.model
    location = location or source.location
    kwargs = dict(source.kwargs) if location == source.location else {"trust_remote_code": stage.cfg.model.trust_remote_code}
    with loading_errors(stage, location):
        model = AutoModelForCausalLM.from_pretrained(
            location, quantization_config=(load_quantization_config(stage) if quantization is True else quantization or None),
            dtype=getattr(torch, dtype) if dtype else stage.torch_dtype, device_map=device_map(stage),
            attn_implementation=stage.cfg.model.attn_implementation, **kwargs)
    model.config.use_cache = False
    keep_cpu_4bit_layers_trainable(model)
    return model


@contextmanager
def loading_errors(stage: Stage, location: str | None = None) -> Iterator[None]:
    """Around ``from_pretrained``: a folder without weights, a pickle torch refuses, a cut-short file, each as one
    line naming model.name."""
    import pickle

    from .sources import holds_weights

    location = location or stage.model.location
    if Path(location).is_dir() and not holds_weights(os.listdir(location)):
        raise ConfigError(f"model.name '{location}': holds no weights (no *.safetensors or pytorch_model*.bin); "
                          f"to look at it without weights: python -m qlora_helpers inspect-model --model {location} --random-weights")
    try:
        yield
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


def lora_targets(stage: Stage, model) -> list[str]:
    """lora.target_modules checked against the model: every name must match some linear layer. PEFT only fails
    when nothing matches; a half-matching list trains a fraction of what was meant. ``all-linear`` becomes the
    model's own names. The output head counts only when named explicitly (all-linear leaves it out, as PEFT does)."""
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


def lora_modules_to_save(stage: Stage, model) -> list[str] | None:
    """lora.modules_to_save, checked like the targets (PEFT silently trains nothing for a name that matches
    nothing); None when empty, as LoraConfig wants it."""
    wanted = _names_list(stage.cfg.lora.modules_to_save)
    names = [full for full, _ in model.named_modules() if full]
    missing = [m for m in wanted if not any(_matches(full, m) for full in names)]
    if missing:
        holders = sorted({full.split(".")[-1] for full, module in model.named_modules()
                          if full and next(module.parameters(recurse=False), None) is not None and not full.split(".")[-1].isdigit()})
        raise ConfigError(f"lora.modules_to_save: {', '.join(missing)} match no module of this model; "
                          f"modules with weights: {', '.join(holders)}")
    return wanted or None


def check_lora_config(stage: Stage, model, peft_config) -> None:
    """Notebook 02's LoraConfig against the config (so config.json and the report say what was trained) and the
    model (every target name matches a layer): a value typed into the cell by hand is caught here, not after
    hours of training something else."""
    lo = stage.cfg.lora
    expected = {"r": lo.r, "lora_alpha": lo.alpha, "lora_dropout": lo.dropout, "use_rslora": lo.use_rslora,
                "use_dora": lo.use_dora, "task_type": "CAUSAL_LM"}
    for key, want in expected.items():
        got = getattr(peft_config, key)
        got = getattr(got, "value", got)
        if got != want:
            raise ConfigError(f"the LoraConfig has {key}={got!r}, but the config says {want!r} (lora.*); change the "
                              "config (OVERRIDES / -p) rather than the cell, so the run records what it trained")
    targets = peft_config.target_modules
    names = [targets] if isinstance(targets, str) else sorted(targets or [])
    linear = list(linear_modules(model))
    head = model.get_output_embeddings()
    candidates = linear + [full for full, m in model.named_modules() if head is not None and m is head]
    missing = [t for t in names if t != "all-linear" and not any(_matches(full, t) for full in candidates)]
    if missing or not names:
        raise ConfigError(f"LoraConfig target_modules: {', '.join(missing) or 'none given'} match no linear layer of "
                          f"this model; its linear layers are: {', '.join(sorted(linear_module_names(model)))}")


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
