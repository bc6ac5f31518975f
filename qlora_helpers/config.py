"""One typed, validated config object for every stage of the pipeline.

A run is described by a recipe (a YAML file: one of the profiles shipped in ``qlora_helpers/recipes/``
or your own copy of one) plus ``key=value`` overrides with dotted keys (``lora.r=16``,
``train.epochs=2``). Every key has a type and a range (pydantic checks them as they are set), so a
typo or an impossible value costs a second, not the ten minutes it takes to load a model, and the
error names the key (and the file) in one line.
"""
from __future__ import annotations

import json
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
DEFAULT_PROFILE = "embedded"


class UserError(ValueError):
    """A user's mistake (config, data, model choice): the CLI prints it as one line, never a traceback."""


class ConfigError(UserError):
    """A configuration mistake, naming the key."""


ECHO_LIMIT = 80  # characters of a user's value an error message repeats


def _known_keys(full_key: str) -> str:
    """What to say after an unknown key: the closest known keys, and the section's keys (or the sections), so the
    line stays short whatever the key."""
    import difflib

    keys = [k for k in Config().flat() if k != "profile"]
    close = difflib.get_close_matches(full_key[:100], keys, n=1, cutoff=0.75)
    section = full_key.partition(".")[0]
    mine = [k for k in keys if k.startswith(section + ".")]
    said = f"did you mean {', '.join(close)}? " if close else ""
    return said + (f"known keys of {section}: {', '.join(k.partition('.')[2] for k in mine)}" if mine
                   else f"known sections: {', '.join(SECTIONS)}")


def shorten(value: Any, limit: int = ECHO_LIMIT) -> str:
    """``value`` as an error message may echo it: its repr (a string as text), cut to ``limit`` characters with the
    full length said. A value that is a container is described, never expanded (a few hundred bytes of YAML can
    hold a structure whose repr is gigabytes)."""
    if isinstance(value, (list, tuple, dict, set)):
        return f"a {type(value).__name__} of {len(value)} items"
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class _Section(BaseModel):
    # Unknown keys are errors, every assignment is validated, NaN and inf are refused for every float.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    source: str = Field("embedded", min_length=1, pattern=r"\S")  # "embedded", a hub dataset id, a local file or folder
    split: str = "train"              # split of a hub dataset
    revision: str = ""                # hub dataset revision ("" = default branch)
    format: Literal["auto", "alpaca", "pairs", "chat"] = "auto"
    prompt_column: str = "prompt"     # for format=pairs
    response_column: str = "response" # for format=pairs
    template: Literal["chat", "alpaca"] = "chat"  # the model's own chat template, or the Alpaca prompt
    system_prompt: str = ""           # optional system message for chat templates
    max_seq_len: int = Field(256, gt=0, le=131072)
    too_long: Literal["drop", "truncate"] = "drop"  # truncate cuts the response
    train_size: int = Field(1000, gt=0, le=10**8)
    val_size: int = Field(100, gt=0, le=10**7)
    embedded_size: int = Field(1600, ge=10, le=13000)  # examples generated for source=embedded (13,587 distinct exist)
    seed: int = Field(42, ge=0, le=2**32 - 1)


class ModelConfig(_Section):
    name: str = Field("embedded", min_length=1, pattern=r"\S")  # "embedded", a hub id, a local folder, or a .gguf file
    revision: str = ""
    trust_remote_code: bool = False
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = "sdpa"
    gguf_file: str = ""               # file inside `name` when it is a GGUF repo/folder


class QuantConfig(_Section):
    mode: Literal["nf4", "fp4", "int8", "none"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"


class LoraConfig(_Section):
    r: int = Field(16, gt=0, le=4096)
    alpha: int = Field(32, gt=0, le=65536)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str = "all-linear"  # "all-linear" or a comma-separated list of names
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: str = ""         # comma-separated, e.g. "lm_head"


class TrainConfig(_Section):
    epochs: float = Field(1.0, ge=0.0, le=1000.0)  # passes over the training split; steps follow from the batch
    max_steps: int = Field(0, ge=0, le=10**7)   # > 0: exactly this many optimizer steps, whatever train.epochs says
    micro_batch_size: int = Field(8, gt=0, le=4096)
    grad_accum: int = Field(1, gt=0, le=65536)
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    optim: str = "auto"               # auto = paged_adamw_8bit on CUDA, adamw_torch on CPU; else a transformers name
    packing: bool = True              # padding-free packing: examples side by side, each attending only to itself
    packing_row_tokens: int = Field(0, ge=0, le=131072)  # packed rows of at most this many tokens (0 = one row per micro-batch)
    micro_batch_tokens: int = Field(0, ge=0, le=131072)  # > 0: a micro-batch is whole examples up to this many tokens
    torch_compile: bool = False       # compile each decoder layer once (torch.compile, regional); ~1 min at the start
    gradient_checkpointing: bool = False
    use_liger: bool = False           # Liger's fused kernels (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE); CUDA only
    logging_steps: int = Field(5, gt=0, le=10**7)
    eval_steps: int = Field(25, gt=0, le=10**7)
    save_steps: int = Field(25, gt=0, le=10**7)
    save_total_limit: int = Field(2, gt=0, le=1000)
    max_minutes: float = Field(0.0, ge=0.0, le=43200.0)  # the whole run's time budget (0 = none); training stops early enough
    num_processes: int = Field(0, ge=0, le=1024)  # GPUs to train on, one process each; 0 = every visible GPU, 1 = one
    seed: int = Field(42, ge=0, le=2**32 - 1)


class EvalConfig(_Section):
    max_new_tokens: int = Field(32, gt=0, le=32768)
    num_prompts: int = Field(60, gt=0, le=10**6)  # held-out prompts answered by the base and the fine-tuned model
    batch_size: int = Field(16, gt=0, le=4096)
    max_val_examples: int = Field(100, ge=0, le=10**7)  # validation examples for the loss (0 = all)
    export_merged: bool = True        # also save the adapter merged into a 16-bit base (RUN_DIR/export/merged)
    export_dtype: Literal["float16", "bfloat16"] = "float16"  # the merged model's dtype
    # the weights the adapter is merged into: "dequantized" = the NF4 weights it was trained against, in 16-bit
    # (scores what evaluation measured); "original" = the exact 16-bit base weights (it never saw them)
    merge_into: Literal["dequantized", "original"] = "dequantized"
    push_to_hub: str = ""             # hub repo "owner/name" to push the adapter to ("" = no push; token: HF_TOKEN)
    # GGUF files of the merged model for llama.cpp and Ollama, e.g. [f16, q8_0, q4_k_m] or "f16,q8_0" ([] = none):
    # RUN_DIR/export/gguf/<name>-<type>.gguf, each scored on the held-out prompts (qlora_helpers.gguf_export)
    export_gguf: list[str] = Field(default_factory=list)

    @field_validator("export_gguf", mode="before")
    @classmethod
    def _gguf_types(cls, value: Any) -> Any:
        """A comma-separated string or a list, each a GGUF type this project makes (qlora_helpers.gguf_export)."""
        from .gguf_export import GGUF_TYPES

        if isinstance(value, str):
            value = [] if value.strip() in ("", "[]") else value.strip().strip("[]").split(",")
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            return value  # pydantic refuses it as not a list of text
        types = list(dict.fromkeys(v.strip().strip("'\"").lower() for v in value if v.strip()))
        unknown = [t for t in types if t not in GGUF_TYPES]
        if unknown:
            raise PydanticCustomError("gguf_type", "{got} is not a GGUF type this project makes ({known})",
                                      {"got": repr(unknown[0]), "known": ", ".join(GGUF_TYPES)})
        return types


SECTIONS = ("data", "model", "quant", "lora", "train", "eval")
# Keys whose value names a file or folder on this machine (or a hub id): resolved against the caller's
# working directory before a run starts (qlora_helpers.sources.resolve_paths).
PATH_KEYS = ("data.source", "model.name")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    profile: str = DEFAULT_PROFILE    # the recipe's name, or the path of the recipe file it came from
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def flat(self) -> dict[str, Any]:
        """Every key as ``section.key`` -> value (what the README and overrides use)."""
        out: dict[str, Any] = {"profile": self.profile}
        for section in SECTIONS:
            for k, v in getattr(self, section).model_dump().items():
                out[f"{section}.{k}"] = v
        return out

    def copy_with(self, changes: dict[str, Any]) -> "Config":
        """A validated copy with some dotted keys changed (the original is untouched)."""
        new = self.model_copy(deep=True)
        for key, value in changes.items():
            set_value(new, key, value)
        return validate(new)


# --------------------------------------------------------------------------- recipes
def profile_names() -> list[str]:
    """The recipes shipped with the package, default first."""
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    return [DEFAULT_PROFILE] + [n for n in names if n != DEFAULT_PROFILE]


def recipe_path(profile: str) -> Path:
    """A shipped recipe's file, or the user's own ``.yaml`` file."""
    if profile.endswith((".yaml", ".yml")) or "/" in profile or "\\" in profile:
        path = Path(profile).expanduser()
        if not path.is_file():
            what = "not a regular file" if path.exists() else "no such file"
            raise ConfigError(f"recipe file '{shorten(profile, 200)}': {what}")
        return path
    path = RECIPE_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown profile '{shorten(profile)}' (profiles: {', '.join(profile_names())}; "
                          "or give the path of your own recipe .yaml)")
    return path


RECIPE_MAX_BYTES = 1_000_000  # a recipe is a few dozen lines


def _recipe_loader(path: Path):
    """yaml's SafeLoader, refusing an alias (``*name``) of a list or mapping: every recipe key holds one value, and
    aliases nested in aliases make a few hundred bytes stand for a structure of billions of items."""
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                node = self.anchors.get(event.anchor)
                if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
                    raise ConfigError(f"{path}: line {event.start_mark.line + 1}: the alias *{shorten(event.anchor, 40)} "
                                      "stands for a list or mapping; recipe values are single values (to build on "
                                      "another recipe, use base:)")
            return super().compose_node(parent, index)

    return RecipeLoader


def read_recipe(profile: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A recipe's settings as flat dotted keys, after those of the recipe it names as ``base``."""
    import yaml

    path = recipe_path(profile)
    try:
        with open(path, "rb") as f:
            data = f.read(RECIPE_MAX_BYTES + 1)
        if len(data) > RECIPE_MAX_BYTES:
            raise ConfigError(f"{path}: larger than {RECIPE_MAX_BYTES:,} bytes; a recipe is a few dozen lines")
        raw = yaml.load(data.decode("utf-8"), Loader=_recipe_loader(path)) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({shorten(getattr(exc, 'problem', None) or exc, 200)})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a recipe (sections of key: value lines)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({shorten(str(exc), 200)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (data:, model:, lora:, ...), got {type(raw).__name__}")
    flat: dict[str, Any] = {}
    base = raw.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base:' names a profile or a recipe file, got {shorten(base)}")
        if base in _seen:
            raise ConfigError(f"{path}: 'base: {shorten(base)}' makes a loop of recipes")
        flat.update(read_recipe(str(base), _seen + (profile,)))
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section '{shorten(section, 40)}' (sections: base, {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section '{section}' must hold key: value lines, got {shorten(values)}")
        for key, value in values.items():
            flat[f"{section}.{key}"] = (value, path)
    return {k: v for k, v in flat.items()}


# --------------------------------------------------------------------------- setting keys
def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``["lora.r=8", "train.epochs=2"]`` -> ``{"lora.r": "8", ...}``."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override '{shorten(item)}': expected key=value, e.g. lora.r=16")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


_BOUNDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
           "less_than_equal": ("<=", "le")}


def _explain(error: dict[str, Any], annotation: Any) -> str:
    """pydantic's error for one key, in the words this project's messages use."""
    kind, value = error["type"], error.get("input")
    shown = repr(shorten(value)) if isinstance(value, str) else shorten(value)
    if kind == "literal_error":
        return f"{shown} is not one of {', '.join(map(str, typing.get_args(annotation)))}"
    if kind in _BOUNDS:
        op, name = _BOUNDS[kind]
        return f"must be {op} {error['ctx'][name]}, got {shown}"
    if kind == "finite_number":
        return f"must be a finite number, got {shown}"
    if kind == "gguf_type":
        return error["msg"]
    if kind in ("string_too_short", "string_pattern_mismatch"):
        return "must not be empty or blank"
    names = {"int": "int", "bool": "bool (true/false)", "float": "float", "string": "text"}
    stem = kind.split("_")[0]
    if stem in names:
        return f"expected {names[stem]}, got {shown}"
    return f"{error['msg']} (got {shown})"


def set_value(cfg: Config, full_key: str, value: Any, origin: Path | str | None = None) -> None:
    """Set one dotted key, checking that it exists and that the value has the right type and range."""
    where = f" in {origin}" if origin else ""
    full_key = str(full_key)
    if full_key == "profile":
        raise ConfigError(f"config key 'profile'{where}: choose the profile with --profile / PROFILE, not an override")
    section, _, key = full_key.partition(".")
    if section not in SECTIONS or key not in type(getattr(cfg, section)).model_fields:
        raise ConfigError(f"unknown config key '{shorten(full_key, 60)}'{where} ({_known_keys(full_key)})")
    owner = getattr(cfg, section)
    if isinstance(value, str) and type(owner).model_fields[key].annotation is not str:
        value = value.strip()
    try:
        setattr(owner, key, value)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"config key '{full_key}'{where}: {_explain(err, type(owner).model_fields[key].annotation)}") from None


def validate(cfg: Config) -> Config:
    """Checks across keys, and those that need a library's list of names; all before any stage runs."""
    t = cfg.train
    if t.epochs <= 0 and t.max_steps <= 0:
        raise ConfigError("config keys 'train.epochs' and 'train.max_steps': set one of them above 0 "
                          "(how long to train: passes over the data, or optimizer steps)")
    if t.packing_row_tokens and cfg.model.attn_implementation == "flex_attention":
        raise ConfigError("config keys 'train.packing_row_tokens' and 'model.attn_implementation=flex_attention': "
                          "flex_attention already skips the masked-out blocks of one packed row, and rows of varying "
                          "shape make it recompile (4.4x slower on an H200); set train.packing_row_tokens=0")
    if t.micro_batch_tokens:
        keys = "config keys 'train.micro_batch_tokens'"
        if not t.packing or t.packing_row_tokens or t.micro_batch_size != 1:
            raise ConfigError(f"{keys}, 'train.packing', 'train.packing_row_tokens' and 'train.micro_batch_size': a "
                              "micro-batch of up to train.micro_batch_tokens tokens is one packed row; set "
                              "train.packing=true, train.packing_row_tokens=0 and train.micro_batch_size=1")
        if t.micro_batch_tokens < cfg.data.max_seq_len:
            raise ConfigError(f"{keys}={t.micro_batch_tokens} and 'data.max_seq_len'={cfg.data.max_seq_len}: every "
                              "example must fit in one micro-batch; set train.micro_batch_tokens >= data.max_seq_len")
    if t.packing_row_tokens and not t.packing:
        raise ConfigError("config keys 'train.packing_row_tokens' and 'train.packing=false': rows are a way of packing; "
                          "set train.packing=true or train.packing_row_tokens=0")
    if cfg.data.system_prompt.strip() and cfg.data.template == "alpaca":
        raise ConfigError("config keys 'data.system_prompt' and 'data.template=alpaca': the Alpaca prompt has no place "
                          "for a system message, so it would be dropped; use data.template=chat or leave "
                          "data.system_prompt empty")
    if cfg.data.prompt_column == cfg.data.response_column:
        raise ConfigError(f"config keys 'data.prompt_column' and 'data.response_column': both are "
                          f"{shorten(cfg.data.prompt_column)!r}; the prompt and the response must be different columns")
    if t.save_steps % t.eval_steps:
        raise ConfigError(f"config keys 'train.save_steps'={t.save_steps} and 'train.eval_steps'={t.eval_steps}: "
                          "save_steps must be a multiple of eval_steps (the best checkpoint is chosen by validation loss)")
    if cfg.lora.use_dora and cfg.quant.mode == "int8":
        raise ConfigError("config key 'lora.use_dora': DoRA is not supported on 8-bit weights; use quant.mode=nf4")
    if not [n for n in cfg.lora.target_modules.split(",") if n.strip()]:
        raise ConfigError("config key 'lora.target_modules': no names in it; use all-linear or a comma-separated list")
    if t.optim != "auto":
        from transformers.training_args import OptimizerNames

        known = sorted(o.value for o in OptimizerNames)
        if t.optim not in known:
            raise ConfigError(f"config key 'train.optim': {shorten(t.optim)!r} is not an optimizer transformers knows "
                              f"(auto, {', '.join(known)})")
    if cfg.eval.export_gguf and not cfg.eval.export_merged:
        raise ConfigError(f"config keys 'eval.export_gguf'={','.join(cfg.eval.export_gguf)} and 'eval.export_merged=false': "
                          "GGUF files are made from the merged model; set eval.export_merged=true or eval.export_gguf=[]")
    repo = cfg.eval.push_to_hub.strip()
    if repo and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo):
        raise ConfigError(f"config key 'eval.push_to_hub': {shorten(repo)!r} is not a hub repository id like 'your-name/my-adapter'")
    return cfg


def build_config(profile: str = DEFAULT_PROFILE, overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """The one way to make a Config: the recipe (and the recipes it builds on), then overrides, then checks.
    ``profile`` is a shipped profile's name or the path of a recipe ``.yaml`` file."""
    settings = read_recipe(profile)
    cfg = Config(profile=profile)
    for key, (value, origin) in settings.items():
        set_value(cfg, key, value, origin)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        set_value(cfg, key, value)
    return validate(cfg)


def config_from_params(profile: str, overrides: dict[str, Any] | str | None) -> Config:
    """Build from a notebook's parameters cell: PROFILE and OVERRIDES (a dict or a JSON string)."""
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides) if overrides.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"OVERRIDES: not a JSON object ({exc.msg})") from None
    if not isinstance(overrides or {}, dict):
        raise ConfigError(f"OVERRIDES: expected a dict of dotted keys, got {type(overrides).__name__}")
    return build_config(profile, overrides or {})


def config_from_dict(raw: Any, origin: str | Path) -> Config:
    """A Config from a saved ``config.json`` (see runs.save_config), every key checked again."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a JSON object of config sections")
    cfg = Config(profile=str(raw.get("profile", DEFAULT_PROFILE)))
    for section in SECTIONS:
        for key, value in (raw.get(section) or {}).items():
            set_value(cfg, f"{section}.{key}", value, origin)
    return validate(cfg)


def same_settings(a: Config, b: Config) -> list[str]:
    """The keys whose values differ (floats compared with a tolerance, so a JSON round trip is equal)."""
    fa, fb = a.flat(), b.flat()
    differ = []
    for key in fa:
        x, y = fa[key], fb.get(key)
        if isinstance(x, float) and isinstance(y, (int, float)):
            if not math.isclose(x, y, rel_tol=1e-12, abs_tol=0.0):
                differ.append(key)
        elif x != y:
            differ.append(key)
    return differ


def keys_table() -> str:
    """Markdown table of every key's value in every profile (`·` = the default's); docs/configuration.md embeds it."""
    flats = {name: build_config(name).flat() for name in profile_names()}
    default = flats[DEFAULT_PROFILE]

    def cell(v: Any) -> str:
        return f"`{v}`" if isinstance(v, str) and v else ('`""`' if isinstance(v, str) else f"`{v!r}`")

    lines = ["| key | " + " | ".join(n + (" (default)" if n == DEFAULT_PROFILE else "") for n in flats) + " |",
             "|---" * (len(flats) + 1) + "|"]
    for key in default:
        if key == "profile":
            continue
        row = [cell(default[key])] + [cell(f[key]) if f[key] != default[key] else "·"
                                      for n, f in flats.items() if n != DEFAULT_PROFILE]
        lines.append(f"| `{key}` | " + " | ".join(row) + " |")
    return "\n".join(lines)
