"""Preflight: will this run fit the GPU? Answered before any weight is downloaded.

A T4 has about 14.7 GiB (Kaggle's T4 x2 has two, each training its own copy); a QLoRA run that does not fit fails with an out-of-memory error minutes
into loading and compiling, or hours later on the longest batch. The estimate below needs only the
model's config.json (layers, hidden size, intermediate size, vocabulary, heads) and the run's config,
and adds up what training keeps in GPU memory at its peak:

* weights: 4-bit linears at 0.5 byte per parameter plus their quantization state; embeddings and the
  output head in the compute dtype;
* LoRA: fp32 adapters, their fp32 gradients and the optimizer's state (2 bytes per parameter for an
  8-bit Adam, 8 for a 32-bit one);
* activations per token: every decoder layer's saved tensors without gradient checkpointing; with it,
  each layer's input plus one layer recomputed during the backward pass;
* logits: tokens x vocabulary, in the compute dtype and again in fp32 for the loss and its gradient;
* attention terms that grow with the square of the tokens (``attention_quadratic_bytes``);
* what the CUDA caching allocator reserves beyond the live tensors.

The per-token figures come from counting what autograd saves (see ``layer_activation_bytes``) and
were checked against peaks measured on an H200 (README, "Will it fit?"; benchmarks/preflight_memory.py):
most within 10%, all but one older recipe within 30%.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from .config import Config
from .stage import Stage

GIB = 2**30
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
# Optimizer state bytes per trainable parameter.
OPTIMIZER_BYTES = {"8bit": 2, "32bit": 8, "sgd": 0, "adafactor": 4}
# The CUDA caching allocator reserves more than the tensors alive at the peak: blocks are rounded up and
# batches of varying length fragment its cache (measured: 3-30% over the activations), plus workspaces.
FRAGMENTATION = 0.15
WORKSPACE_BYTES = 0.1 * GIB
# Leave this share of the free memory unused: the estimate is an estimate.
HEADROOM = 0.10


def bytes_per_quantized_param(cfg: Config, dtype_bytes: int) -> float:
    """Packed weights plus quantization state: 4-bit keeps one fp32 absmax per 64 weights, or with double
    quantization an 8-bit one plus one fp32 per 256 blocks; int8 keeps one scale per row (negligible)."""
    if cfg.quant.mode == "none":
        return dtype_bytes
    if cfg.quant.mode == "int8":
        return 1.0
    return 0.5 + (1 / 64 + 4 / (64 * 256) if cfg.quant.double_quant else 4 / 64)


# --------------------------------------------------------------------------- the model's shape
def model_shape(model_config: Any) -> dict[str, Any]:
    """Sizes from a transformers config (or config.json as a dict) that the estimate needs, and the linear layers of
    one decoder layer as the architecture itself defines them (``decoder_linears``)."""
    if isinstance(model_config, dict):
        from transformers import AutoConfig

        model_config = AutoConfig.for_model(**model_config)
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    get = lambda k, d=None: getattr(model_config, k, d)  # noqa: E731
    heads = get("num_attention_heads")
    hidden = get("hidden_size")
    return {"model_type": get("model_type", ""), "layers": get("num_hidden_layers"), "hidden": hidden,
            "intermediate": get("intermediate_size"), "vocab": get("vocab_size"), "heads": heads,
            "kv_heads": get("num_key_value_heads") or heads, "head_dim": get("head_dim") or hidden // heads,
            "tied_embeddings": bool(get("tie_word_embeddings", False)),
            "linears": decoder_linears(model_config.to_json_string())}


@lru_cache(maxsize=8)
def decoder_linears(config_json: str) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of one decoder layer, by its LoRA target name, read off the
    architecture built from config.json on the meta device (no memory, no weights): Phi-3's fused ``qkv_proj`` and
    ``gate_up_proj``, Llama's split projections, or whatever another architecture has."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads(config_json)
    config = AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    out: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            out.setdefault(name.split(".")[-1], (module.in_features, module.out_features))
    return out


def linear_shapes(shape: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of one decoder layer, by its LoRA target name."""
    return dict(shape["linears"])


def fused_qkv(shape: dict[str, Any]) -> bool:
    """Whether one linear layer computes q, k and v together (Phi-3's qkv_proj): then v is a view of its output and
    keeps all of it alive for the backward pass."""
    q, kv = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    return any(out == q + 2 * kv for _, out in shape["linears"].values())


def lora_targets(cfg: Config, shape: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """The targeted linear layers that this estimate knows the shape of (others are left out)."""
    linears = linear_shapes(shape)
    spec = cfg.lora.target_modules.strip()
    if spec == "all-linear":
        return linears
    return {name: linears[name] for name in (t.strip() for t in spec.split(",")) if name in linears}


def parameter_counts(cfg: Config, shape: dict[str, Any]) -> dict[str, int]:
    per_layer = sum(a * b for a, b in linear_shapes(shape).values())
    embeddings = shape["vocab"] * shape["hidden"] * (1 if shape["tied_embeddings"] else 2)
    r = cfg.lora.r
    lora = shape["layers"] * sum(r * (a + b) for a, b in lora_targets(cfg, shape).values())
    return {"quantized": shape["layers"] * per_layer, "embeddings": embeddings, "lora": lora,
            "total": shape["layers"] * per_layer + embeddings}


# --------------------------------------------------------------------------- what autograd keeps
def layer_activation_bytes(cfg: Config, shape: dict[str, Any], dtype_bytes: int) -> int:
    """Bytes one decoder layer saves for the backward pass, per token (no gradient checkpointing).

    Counted from the Llama/Phi-3 forward: each RMSNorm keeps an fp32 copy of its input; attention keeps
    q and k after the rotary embedding, v (a view of the fused qkv output keeps all of it alive) and its
    output; the gated MLP keeps the gate and up projections and the activation; each LoRA adapter keeps
    its dropout mask and dropped-out input and its rank-r intermediate. The frozen 4-bit matmuls keep
    nothing but the (already resident) weights.
    """
    s, h, i = dtype_bytes, shape["hidden"], shape["intermediate"]
    q, kv = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    norms = 2 * 4 * h
    v_kept = q + 2 * kv if fused_qkv(shape) else kv
    attention = s * (v_kept + q + kv + q)
    mlp = s * 3 * i
    lora = 0
    for in_features, _ in lora_targets(cfg, shape).values():
        dropout = (1 + s) * in_features if cfg.lora.dropout > 0 else 0
        lora += dropout + s * cfg.lora.r
    return norms + attention + mlp + lora


def attention_quadratic_bytes(cfg: Config, shape: dict[str, Any], tokens: int, dtype_bytes: int,
                              layers_kept: int) -> int:
    """The parts of attention that grow with the square of the sequence.

    sdpa and eager attend a padding-free batch through a materialized tokens x tokens block-diagonal mask
    (bool), which every layer converts to the compute dtype and keeps for its backward pass; eager also
    keeps the attention probabilities (heads x length x length) of every layer it keeps. flex_attention
    needs no dense mask, but measured peaks show one layer's heads x tokens x tokens scores at a time.
    """
    b, attn, s = cfg.train.micro_batch_size, cfg.model.attn_implementation, dtype_bytes
    packed = cfg.train.packing and (b > 1 or cfg.train.micro_batch_tokens > 0)
    squares = tokens * tokens if packed else b * (tokens // b) ** 2
    rows = packed_rows(cfg, tokens)
    if rows:  # train.packing_row_tokens: a (rows x width x width) mask instead of one tokens x tokens
        squares = rows[0] * rows[1] ** 2
    if attn == "flex_attention":
        return shape["heads"] * squares * s
    mask = squares * (1 + s * layers_kept) if packed else 0
    return mask + (shape["heads"] * squares * 2 * s * layers_kept if attn == "eager" else 0)


def packed_rows(cfg: Config, tokens: int) -> tuple[int, int] | None:
    """(rows, width) of a micro-batch of `tokens` tokens packed into rows of train.packing_row_tokens (None when
    the micro-batch is one row). First-fit decreasing fills rows almost fully; 5% is allowed for the gaps, and
    an example longer than a row makes the row as wide as itself."""
    row = cfg.train.packing_row_tokens
    if not (cfg.train.packing and row and cfg.train.micro_batch_size > 1):
        return None
    if tokens <= row:
        return 1, tokens
    width = max(row, cfg.data.max_seq_len)
    return math.ceil(1.05 * tokens / width), width


def tokens_per_micro_batch(cfg: Config, lengths: dict[str, Any] | None = None) -> int:
    """Tokens in the heaviest micro-batch of the run.

    Without length statistics: micro_batch_size x max_seq_len (the worst case). With them (stage 1's
    ``train_lengths``): a padded batch is as long as its longest example times the batch size, and some
    batch holds the longest example; a padding-free batch holds the longest example plus, at worst,
    a sum of lengths three standard deviations above the mean. With train.micro_batch_tokens: that bound.
    """
    b, cap = cfg.train.micro_batch_size, cfg.data.max_seq_len
    if cfg.train.micro_batch_tokens:  # whole examples up to this many tokens, packed nearly full: the bound itself
        return b * cfg.train.micro_batch_tokens
    if not lengths:
        return b * cap
    longest = min(cap, int(lengths["max"]))
    if not cfg.train.packing:
        return b * longest
    mean = float(lengths["mean"])
    spread = max(0.0, (float(lengths.get("p90", mean)) - float(lengths.get("p50", mean))) / 1.2816)
    heavy = b * mean + 3 * math.sqrt(b) * spread
    return int(min(b * longest, max(longest + (b - 1) * mean, heavy)))


def optimizer_bytes_per_param(cfg: Config, device: str) -> int:
    from .hardware import resolve_optim

    name = resolve_optim(cfg.train.optim, device)
    if "8bit" in name:
        return OPTIMIZER_BYTES["8bit"]
    if name.startswith("sgd"):
        return OPTIMIZER_BYTES["sgd"]
    if "adafactor" in name:
        return OPTIMIZER_BYTES["adafactor"]
    return OPTIMIZER_BYTES["32bit"]


# --------------------------------------------------------------------------- the estimate
def estimate_training_memory(cfg: Config, model_config: Any, hw: dict[str, Any],
                             lengths: dict[str, Any] | None = None) -> dict[str, Any]:
    """Peak training memory (GiB, as the allocator reserves it) for this config on this hardware, by part,
    and whether it fits the free memory ``hw['free_gib']`` (GPU) with a suggestion when it does not."""
    from .hardware import choose_compute_dtype

    shape = model_shape(model_config)
    compute_dtype = choose_compute_dtype(cfg.quant.compute_dtype, hw)
    s = DTYPE_BYTES[compute_dtype]
    params = parameter_counts(cfg, shape)
    tokens = tokens_per_micro_batch(cfg, lengths)
    rows = packed_rows(cfg, tokens)
    padded = max(tokens, rows[0] * rows[1]) if rows else tokens  # the rows' padding goes through the model too
    L, h, i = shape["layers"], shape["hidden"], shape["intermediate"]

    weights = params["quantized"] * bytes_per_quantized_param(cfg, s) + params["embeddings"] * s
    lora = params["lora"] * (4 + 4 + optimizer_bytes_per_param(cfg, hw["device"]))
    per_layer = layer_activation_bytes(cfg, shape, s)
    if cfg.train.gradient_checkpointing:
        # each layer's input, plus one layer recomputed and its gradients during the backward pass
        per_token = L * s * h + per_layer + s * (2 * h + 2 * i)
        layers_kept = 1
    else:
        per_token = L * per_layer
        layers_kept = L
    # plus the final norm's fp32 copy of the last hidden state
    activations = padded * (per_token + 4 * h) + attention_quadratic_bytes(cfg, shape, tokens, s, layers_kept)
    # logits in the compute dtype and in fp32 for the loss (log-softmax, then its gradient, in place of the copy);
    # Liger's fused linear cross-entropy computes them a chunk of tokens at a time (chunk ~ tokens / (vocab/hidden))
    logit_tokens = tokens
    if getattr(cfg.train, "use_liger", False):
        logit_tokens = min(tokens, 2 * math.ceil(tokens / math.ceil(shape["vocab"] / h)))
    logits = logit_tokens * shape["vocab"] * (s + 4)
    allocator = (activations + logits) * FRAGMENTATION + WORKSPACE_BYTES
    parts = {"weights": weights, "lora_and_optimizer": lora, "activations": activations, "logits": logits,
             "allocator_and_workspace": allocator}
    total = sum(parts.values())
    result = {
        "shape": shape, "params": params, "compute_dtype": compute_dtype, "tokens_per_micro_batch": tokens,
        "micro_batch_size": cfg.train.micro_batch_size, "max_seq_len": cfg.data.max_seq_len,
        "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "parts_gib": {k: round(v / GIB, 3) for k, v in parts.items()},
        "total_gib": round(total / GIB, 2),
        "free_gib": hw.get("free_gib"),
    }
    result["fits"] = None if hw.get("free_gib") is None else bool(total / GIB <= hw["free_gib"] * (1 - HEADROOM))
    result["suggestion"] = suggest_fit(cfg, model_config, hw, lengths) if result["fits"] is False else None
    return result


def suggest_fit(cfg: Config, model_config: Any, hw: dict[str, Any], lengths: dict[str, Any] | None) -> str:
    """The first setting that fits, trying in order: gradient checkpointing, a smaller micro-batch (with
    more gradient accumulation, so the effective batch stays the same), then a shorter max_seq_len."""
    import copy

    def fits(changes: dict[str, Any]) -> bool:
        trial = copy.deepcopy(cfg)
        for key, value in changes.items():
            section, name = key.split(".")
            setattr(getattr(trial, section), name, value)
        return estimate_training_memory(trial, model_config, hw, lengths)["fits"]

    def describe(changes: dict[str, Any]) -> str:
        return ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items())

    changes: dict[str, Any] = {}
    if not cfg.train.gradient_checkpointing:
        changes["train.gradient_checkpointing"] = True
        if fits(changes):
            return f"set {describe(changes)}"
    batch, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    while batch > 1:
        batch, accum = batch // 2, accum * 2
        changes.update({"train.micro_batch_size": batch, "train.grad_accum": accum})
        if fits(changes):
            return f"set {describe(changes)} (the same effective batch)"
    seq = cfg.data.max_seq_len
    while seq > 128:
        seq //= 2
        changes["data.max_seq_len"] = seq
        if fits(changes):
            return f"set {describe(changes)} (longer examples are dropped in stage 1)"
    return (f"even {describe(changes)} does not fit {hw['free_gib']} GiB: use a smaller model "
            "or a GPU with more memory")


# --------------------------------------------------------------------------- what notebook 02 calls
def preflight_report(stage: Stage) -> dict[str, Any]:
    """Print the hardware, the chosen dtype and attention, and the memory estimate against the free
    memory, with a warning and a suggested setting when it will not fit; save it as model/preflight.json."""
    from .model import load_model_config
    from .runs import read_json, write_json

    cfg, hw, compute_dtype, run_dir = stage.cfg, stage.hw, stage.compute_dtype, stage.run_dir
    if hw["device"] == "cuda":
        print(f"GPU: {hw['name']}, compute capability {hw['capability']}, "
              f"{hw['free_gib']} of {hw['total_gib']} GiB free, bf16: {'yes' if hw['bf16'] else 'no'}")
        gpus, wanted = hw.get("gpu_count", 1), cfg.train.num_processes
        if gpus > 1:
            used = min(wanted or gpus, gpus)
            print(f"{gpus} GPUs: training will run {used} process(es), one per GPU (train.num_processes={wanted}), "
                  "each holding its own copy of the model and its own micro-batch: the estimate below is per GPU")
    else:
        print("No GPU: training runs on the CPU, slowly (bitsandbytes NF4 works there). The estimate below is "
              "what a GPU would need; on Kaggle choose Accelerator > GPU T4 x2. "
              f"CPU bf16 support: {'yes' if hw['bf16'] else 'no'}")
    why = "" if cfg.quant.compute_dtype != "auto" else (
        " (auto: bf16 needs compute capability 8.0+)" if hw["device"] == "cuda" else " (auto: fp32 on a CPU)")
    print(f"compute dtype: {compute_dtype}{why}, attention: {cfg.model.attn_implementation}")

    lengths = read_json(Path(run_dir) / "data" / "metrics.json", {}).get("train_lengths") if run_dir else None
    est = estimate_training_memory(cfg, load_model_config(stage), hw, lengths)
    sh = est["shape"]
    print(f"model shape (config.json only): {sh['layers']} layers, hidden {sh['hidden']}, intermediate "
          f"{sh['intermediate']}, vocabulary {sh['vocab']}, {sh['heads']} heads ({sh['kv_heads']} key/value); "
          f"{est['params']['total'] / 1e9:.2f}B parameters, LoRA {est['params']['lora'] / 1e6:.1f}M")
    basis = "the longest batch of stage 1's data" if lengths else "micro_batch_size x max_seq_len"
    print(f"estimated peak training memory: {est['total_gib']} GiB for {est['tokens_per_micro_batch']} tokens per "
          f"micro-batch ({basis}), gradient checkpointing {'on' if est['gradient_checkpointing'] else 'off'}")
    for part, gib in est["parts_gib"].items():
        print(f"  {part.replace('_', ' '):<26}{gib:7.2f} GiB")
    if est["fits"] is True:
        print(f"fits: {est['free_gib'] - est['total_gib']:.1f} GiB to spare of {est['free_gib']} GiB free")
    elif est["fits"] is False:
        print(f"WARNING: this run will likely NOT fit: about {est['total_gib']} GiB needed, {est['free_gib']} GiB free. "
              f"Suggestion: {est['suggestion']}.")
    else:
        import psutil

        print(f"on this CPU the same tensors live in RAM: {psutil.virtual_memory().available / GIB:.1f} GiB available")
    if run_dir:
        write_json(Path(run_dir) / "model" / "preflight.json", {"hardware": hw, **est})
    return est
