"""A quantized model with random weights, built in GPU memory: for benchmarks on a GPU that cannot download the
real weights (speed and memory do not depend on them; loss does).

``build_random_model(stage, config)`` returns what ``qlora_helpers.model.load_base_model`` would, quantized as
configured, but built on the meta device and then made real one module at a time directly on the device:
random init from the model's own ``_init_weights`` in the compute dtype, and each linear layer's 16-bit weight
quantized at once with transformers' own bitsandbytes quantizer, so the peak is the quantized model plus one
layer in 16-bit. It relies on transformers' quantizer internals (preprocess_model, the Params4bit arguments),
which is acceptable for a benchmark and why it is not part of the package.
"""
from __future__ import annotations

from typing import Any

from qlora_helpers.inspect_model import meta_model
from qlora_helpers.inspect_model import profile_quantization_config
from qlora_helpers.model import load_model_config
from qlora_helpers.stage import Stage


def build_random_model(stage: Stage, config_or_path=None, device: str | None = None, seed: int = 0):
    """The model load_base_model would return, with random weights and nothing downloaded or written to disk.
    ``config_or_path``: a transformers config, or a folder holding config.json; default: model.name's config."""
    import torch
    from transformers import PretrainedConfig

    if isinstance(config_or_path, PretrainedConfig):
        model_config = config_or_path
    else:
        model_config = load_model_config(stage, str(config_or_path) if config_or_path else None)
    model = meta_model(stage, model_config)
    torch.manual_seed(seed)
    _place_and_quantize(model, stage, device or stage.device)
    model.config.use_cache = False
    return model.eval()


def _bnb_quantizer(stage: Stage, device):
    """transformers' own bitsandbytes quantizer for the config (None for quant.mode=none), so in-memory
    quantization swaps exactly the layers from_pretrained would, with the same settings."""
    from transformers.quantizers import AutoHfQuantizer

    qconfig = profile_quantization_config(stage)
    if qconfig is None:
        return None
    quantizer = AutoHfQuantizer.from_config(qconfig, pre_quantized=False)
    quantizer.validate_environment(device_map={"": str(device)}, weights_only=True)
    return quantizer


def _is_bnb_linear(module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _quantize_weight(module, value, template, device) -> None:
    """Replace a bitsandbytes layer's weight with `value` quantized on `device`, the way transformers'
    Bnb4bitQuantize / Bnb8bitQuantize loading ops do (template: the layer's unquantized placeholder)."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    if issubclass(getattr(module, "source_cls", object), Conv1D):
        value = value.T
    if type(module).__name__ == "Linear4bit":
        module._parameters["weight"] = bnb.nn.Params4bit(value, requires_grad=False, **template.__dict__).to(device)
    else:  # Int8Params quantizes when moved off the CPU (or onto it from the CPU)
        kwargs = {k: v for k, v in template.__dict__.items() if k != "SCB"}
        module._parameters["weight"] = bnb.nn.Int8Params(value.to("cpu"), requires_grad=False, **kwargs).to(device)


def _place_and_quantize(model, stage: Stage, device) -> None:
    """Give every tensor of `model` a home on `device`, one module at a time, quantizing the linear layers
    as from_pretrained would. Tensors on the meta device get random values from the model's own
    initialisation; real ones (a dequantized GGUF) are moved. Tied weights stay tied."""
    import torch
    from transformers import PreTrainedModel
    from transformers import initialization as init
    from transformers.pytorch_utils import Conv1D

    quantizer = _bnb_quantizer(stage, device)
    originals: dict[str, Any] = {}  # layer name -> the linear layer before the bitsandbytes swap (its weight and bias)
    if quantizer is not None:
        originals = {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
        quantizer.preprocess_model(model=model, dtype=stage.torch_dtype, device_map={"": str(device)},
                                   checkpoint_files=None, use_kernels=False)
    placed: dict[int, tuple[Any, Any]] = {}  # id(old tensor) -> (old, new); old is kept so ids are never reused

    def place(module, name: str, owner) -> None:
        for child_name, child in module.named_children():
            place(child, f"{name}.{child_name}" if name else child_name,
                  child if isinstance(child, PreTrainedModel) else owner)
        original = originals.pop(name, None) if _is_bnb_linear(module) else None
        quantized = original is not None
        template = module._parameters["weight"] if quantized else None
        initialise = False
        for store in (module._parameters, module._buffers):
            for key, old in list(store.items()):
                if old is None:
                    continue
                source = getattr(original, key) if quantized else old
                if id(source) in placed:
                    store[key] = placed[id(source)][1]
                    continue
                new = torch.empty_like(source, device=device) if source.is_meta else source.to(device)
                initialise |= source.is_meta
                if store is module._parameters:
                    new = torch.nn.Parameter(new, requires_grad=source.requires_grad)
                store[key] = new
                if not (quantized and key == "weight"):  # a 16-bit weight must not outlive its quantization
                    placed[id(source)] = (source, new)
        if initialise:
            owner._init_weights(module)
        if quantized:
            _quantize_weight(module, module._parameters["weight"].data, template, device)

    with torch.no_grad(), init.guard_torch_init_functions():
        place(model, "", model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {', '.join(left[:5])}")
    if quantizer is not None:
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)
