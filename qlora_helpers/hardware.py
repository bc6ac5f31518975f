"""The machine a stage runs on: which device, how much memory, whether it has bf16, and so which compute
dtype to use. Resolved once per stage (``Stage.hw``, ``Stage.compute_dtype``) and passed on."""
from __future__ import annotations

import os
from typing import Any

from .config import ConfigError


def local_process_index() -> int:
    """This process's GPU: 0, or under a distributed launcher (accelerate launch, torchrun and notebook_launcher
    all set LOCAL_RANK) the one it owns, so that each data-parallel process holds its own whole copy of the
    model there instead of all of them crowding GPU 0."""
    return max(0, int(os.environ.get("LOCAL_RANK") or 0))


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), read from the flags Linux reports;
    elsewhere False (fp32, which is always right)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def hardware() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        gpu = local_process_index()  # querying GPU 0 from every process would put a CUDA context on it
        major, minor = torch.cuda.get_device_capability(gpu)
        free, total = torch.cuda.mem_get_info(gpu)
        return {"device": "cuda", "name": torch.cuda.get_device_name(gpu), "capability": f"{major}.{minor}",
                "bf16": major >= 8, "free_gib": round(free / 2**30, 2), "total_gib": round(total / 2**30, 2),
                "gpu_count": torch.cuda.device_count()}
    return {"device": "cpu", "name": "CPU", "capability": None, "bf16": cpu_has_bf16(), "free_gib": None,
            "total_gib": None, "gpu_count": 0}


def device_of(hw: dict[str, Any]) -> str:
    """Where this process puts the model: its own GPU, or the CPU."""
    return f"cuda:{local_process_index()}" if hw["device"] == "cuda" else "cpu"


def choose_compute_dtype(requested: str, hw: dict[str, Any]) -> str:
    """auto: bf16 on a GPU that has it (compute capability 8.0+), fp16 on other GPUs, fp32 on a CPU, even one
    with AVX512-BF16/AMX. Measured there (embedded profile, 2-core Xeon with AMX, 2026-12-02): bf16 trained 6%
    faster (292 s against 309-314 s) but the model it evaluated is not the one a merged export reproduces in
    fp32: the two agreed on 54 of 60 held-out answers (57 the day before), against 60 of 60 in two fp32 runs;
    fp32 also peaked at 2.4-2.5 GiB of RAM against 3.1. So a CPU run evaluates what ships, on any CPU.
    An explicit bf16 request on hardware without it is an error, not a slow surprise."""
    if requested == "bfloat16" and not hw["bf16"]:
        where = f"GPU {hw['name']} (compute capability {hw['capability']})" if hw["device"] == "cuda" else "this CPU"
        raise ConfigError(f"quant.compute_dtype=bfloat16: {where} has no bf16 support; "
                          "set quant.compute_dtype=float16 (or auto)")
    if requested != "auto":
        return requested
    if hw["device"] != "cuda":
        return "float32"
    return "bfloat16" if hw["bf16"] else "float16"


def resolve_optim(optim: str, device: str) -> str:
    """train.optim, where auto means paged 8-bit AdamW on a GPU (bitsandbytes) and plain AdamW on a CPU."""
    if optim != "auto":
        return optim
    return "paged_adamw_8bit" if device == "cuda" else "adamw_torch"


# --------------------------------------------------------------------------- settings this machine cannot train with
def check_liger(use_liger: bool, hw: dict[str, Any]) -> None:
    """Liger's kernels are Triton kernels: CUDA only, and a separate package."""
    import importlib.util

    if not use_liger:
        return
    if hw["device"] != "cuda":
        raise ConfigError("train.use_liger=true needs a CUDA GPU (Liger's kernels are Triton kernels); "
                          "set train.use_liger=false on this machine")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("train.use_liger=true needs the liger-kernel package: pip install --no-deps liger-kernel==0.8.5")


def check_processes(wanted: int, hw: dict[str, Any]) -> int:
    """How many processes train: train.num_processes GPUs (0 = every visible one), or 1 without two GPUs."""
    gpus = hw.get("gpu_count", 0)
    if wanted > max(gpus, 1):
        raise ConfigError(f"config key 'train.num_processes': {wanted} processes, but this machine has {gpus} GPUs "
                          "(one process per GPU); set 0 for all of them or 1")
    return wanted or max(gpus, 1)


def check_machine(cfg, hw: dict[str, Any]) -> None:
    """Every setting that training on this machine would refuse, checked when a run starts (no model loaded):
    bf16 without bf16 hardware, Liger without CUDA, more processes than GPUs, FlexAttention on the CPU."""
    choose_compute_dtype(cfg.quant.compute_dtype, hw)
    check_liger(cfg.train.use_liger, hw)
    check_processes(cfg.train.num_processes, hw)
    if cfg.model.attn_implementation == "flex_attention" and hw["device"] != "cuda":
        raise ConfigError("config key 'model.attn_implementation': flex_attention has no backward pass on the CPU "
                          "(torch refuses to train with it); use sdpa on this machine")
