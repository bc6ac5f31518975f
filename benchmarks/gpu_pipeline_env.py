"""What benchmarks/gpu_pipeline.py sets up before it measures anything, on the lent GPU machine (or, in its smoke
mode, here): the carried wheels staged and installed, a Jupyter kernel like Kaggle's, a /kaggle folder like a Kaggle
session's (the helper dataset, the attached model, the attached data), and the model itself: Phi-3-mini's exact shape
with random weights and a Phi-3-like tokenizer, written as a local folder.

Installing (install_groups): the machine's own packages are never replaced. Each carried wheel goes into a folder of
its own group (site/image, site/pins), put on the path of the processes that need it, when its distribution is
missing on the machine, or (group refused) when a carried package refuses the version the machine has, or (group
pins) when the machine has another version than the project pins.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from gpu_wheels import normalize, sha256, wheel_name  # noqa: E402

HOOKS = HERE / "pipeline_hooks"
# Phi-3-mini-4k-instruct: its config (device.md), its special tokens at their ids, its chat template (tokenizer_config.json)
PHI3_MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
PHI3_TINY = dict(PHI3_MINI, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4)
PHI3_SPECIAL = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
                "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]  # 32000..32010
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif "
    "message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
# Byte-level BPE merges learnt from the Alpaca sample: 14,000 tokens give about as many tokens for its texts as the
# SmolLM2 tokenizer that benchmarks/alpaca_lengths.py uses as Phi-3's stand-in (measured here: 8,000 -> 1.08x,
# 16,000 -> 0.98x of its 154,460 tokens); ids 14,000..31,999 are never produced, as unused ids of a real vocabulary.
BPE_MERGED_VOCAB = 14000
KAGGLE_MODEL = Path("phi-3") / "transformers" / "phi-3-mini-4k-instruct" / "1"  # as Kaggle mounts the Model
KAGGLE_DATA = Path("alpaca-cleaned") / "alpaca_data_cleaned.json"  # an attached dataset standing in for the hub one
DATASET_USER = "qlora-bench"


# --------------------------------------------------------------------------- the wheels
def stage_parts(parts_dir: Path, staging: Path) -> dict:
    """Copy every carried part (parts_dir/part*, normally .dev/gpu-wheels) into ``staging`` (which outlives the call
    while the machine is warm) and join the pieces of a cut wheel once all are there. Returns the manifest and what
    is missing."""
    staging.mkdir(parents=True, exist_ok=True)
    manifest = None
    for part in sorted(parts_dir.glob("part*")):
        for f in part.iterdir():
            if f.name == "manifest.json":
                manifest = json.loads(f.read_text())
            elif not (staging / f.name).exists() or (staging / f.name).stat().st_size != f.stat().st_size:
                shutil.copy(f, staging / f".{f.name}.tmp")
                os.replace(staging / f".{f.name}.tmp", staging / f.name)
        shutil.copy(part / "manifest.json", staging / "manifest.json")
    if manifest is None and (staging / "manifest.json").is_file():
        manifest = json.loads((staging / "manifest.json").read_text())
    if manifest is None:
        return {"manifest": None, "missing": ["manifest.json (part1)"]}
    missing = [f"{name} ({f['part']})" for name, f in manifest["files"].items()
               if not (staging / name).is_file() or (staging / name).stat().st_size != f["bytes"]]
    for name, whole in manifest["pieces"].items():
        target = staging / name
        if target.is_file() and target.stat().st_size == whole["bytes"]:
            continue
        absent = [p for p in whole["pieces"] if not (staging / p["file"]).is_file()
                  or (staging / p["file"]).stat().st_size != p["bytes"]]
        if absent:
            missing += [f"{p['file']} ({p['part']})" for p in absent]
            continue
        with open(staging / f".{name}.tmp", "wb") as out:  # cat piece1 piece2 > wheel
            for p in whole["pieces"]:
                out.write((staging / p["file"]).read_bytes())
        if sha256(staging / f".{name}.tmp") != whole["sha256"]:
            missing.append(f"{name} (joined, but its sha256 differs: a piece is damaged)")
            continue
        os.replace(staging / f".{name}.tmp", target)
    return {"manifest": manifest, "missing": missing}


def machine_packages(python: str) -> dict[str, str]:
    """{normalized name: version} of what ``python`` sees without any PYTHONPATH: the machine's own packages."""
    code = ("import importlib.metadata as m, json; d = {}\n"
            "for x in m.distributions():\n  n = x.metadata['Name']\n  n and d.setdefault(n, x.version)\n"
            "print(json.dumps(d))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    return {normalize(k): v for k, v in json.loads(out).items()}


def wheel_requirements(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def select(wheels: dict[str, dict], present: dict[str, str], requirements: dict[str, list[str]],
           environment: dict[str, str] | None = None) -> dict[str, str]:
    """Which carried wheels to install, and why: {name: reason}. ``wheels``: {name: {"version", "group"}};
    ``present``: the machine's {name: version}; ``requirements``: each carried wheel's Requires-Dist lines.
    image: when missing there; pins: when missing or at another version; refused: when a wheel being installed
    (or the machine's own copy of a carried package) refuses the version there; embedded: when missing."""
    from packaging.requirements import Requirement

    chosen: dict[str, str] = {}
    for name, w in wheels.items():
        have = present.get(name)
        if have is None and w["group"] != "refused":
            chosen[name] = "missing there"
        elif w["group"] == "pins" and have != w["version"]:
            chosen[name] = f"the machine has {have}, the project pins {w['version']}"
    changed = True
    while changed:
        changed = False
        for name in list(chosen):
            for line in requirements.get(name, []):
                req = Requirement(line)
                dep = normalize(req.name)
                if dep in chosen or dep not in wheels or dep not in present:
                    continue
                if req.marker and not req.marker.evaluate({**(environment or {}), "extra": ""}):
                    continue
                if not req.specifier.contains(present[dep], prereleases=True):
                    chosen[dep] = f"{name} needs {dep}{req.specifier}, the machine has {present[dep]}"
                    changed = True
    return chosen


def install_groups(staging: Path, site: Path, python: str, manifest: dict) -> dict:
    """Install what the machine lacks into site/<group> (image and refused share site/image). A wheel installed by an
    earlier call on the same machine is not installed again; one not staged yet (the embedded model's, before its
    last piece came) is left for a later call."""
    done = site / "installed.json"
    earlier = json.loads(done.read_text()) if done.is_file() else {}
    present = machine_packages(python)
    wheels, files, reqs = {}, {}, {}
    for name, f in {**manifest["files"], **manifest["pieces"]}.items():
        if not name.endswith(".whl") or not (staging / name).is_file():
            continue
        dist, version = wheel_name(name)
        wheels[dist] = {"version": version, "group": f["group"]}
        files[dist] = staging / name
        reqs[dist] = wheel_requirements(staging / name)
    chosen = select(wheels, present, reqs)
    report = {"machine": {n: present.get(n) for n in sorted(wheels)}, "installed": earlier.get("installed", {}),
              "on_machine": {}, "conflicts_left": conflicts(wheels, chosen, present, reqs)}
    for name, version in manifest.get("on_machine", {}).items():
        report["on_machine"][name] = {"pinned": version, "there": present.get(name),
                                      "ok": present.get(name) == version}
    for group, folder in (("image", "image"), ("refused", "image"), ("pins", "pins"), ("embedded", "pins")):
        names = sorted(n for n in chosen if wheels[n]["group"] == group
                       and report["installed"].get(n, {}).get("version") != wheels[n]["version"])
        if not names:
            continue
        (site / folder).mkdir(parents=True, exist_ok=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "--upgrade", "--target", str(site / folder),
                        *[str(files[n]) for n in names]], check=True)
        for n in names:
            report["installed"][n] = {"version": wheels[n]["version"], "into": folder, "why": chosen[n]}
    done.write_text(json.dumps(report, indent=1))
    return report


def conflicts(wheels: dict, chosen: dict, present: dict, requirements: dict) -> list[str]:
    """Requirements of the wheels being installed that the machine's own packages fail and nothing carried fixes
    (pyarrow for datasets, say): said in the results, since they may explain a failure there."""
    from packaging.requirements import Requirement

    found = []
    for name in chosen:
        for line in requirements.get(name, []):
            req = Requirement(line)
            dep = normalize(req.name)
            if dep in chosen or dep not in present or (req.marker and not req.marker.evaluate({"extra": ""})):
                continue
            if not req.specifier.contains(present[dep], prereleases=True):
                found.append(f"{name} needs {dep}{req.specifier}, the machine has {present[dep]}")
    return found


# --------------------------------------------------------------------------- a kernel and a /kaggle like Kaggle's
def kernel_env(folder: Path, jupyter: Path, name: str, layers: list[str], site_dirs: list[str]) -> Path:
    """A virtual environment that sees, after its own site-packages, the folders ``layers`` and then the site
    directories ``site_dirs`` (with their own .pth files, as the interpreter they belong to sees them), through a
    .pth file, registered as the Jupyter kernel ``name`` under ``jupyter``: what tests/test_kaggle_kernel.py does
    (there with a plain folder, which leaves an editable install of qlora_helpers invisible), so the install cell
    installs into this environment and nothing else."""
    if not (folder / "bin" / "python").exists():
        venv.create(folder, with_pip=False, symlinks=True)
    site = next((folder / "lib").glob("python3*")) / "site-packages"
    lines = [f"{p}\n" for p in layers] + [f"import site; site.addsitedir({p!r})\n" for p in site_dirs]
    (site / "layers.pth").write_text("".join(lines))
    spec = jupyter / "kernels" / name
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(folder / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "GPU pipeline benchmark kernel", "language": "python"}))
    return folder / "bin" / "python"


def ipython_dir(folder: Path) -> Path:
    """An IPYTHONDIR whose startup runs pipeline_hooks/cell_stats.py (one line per executed cell)."""
    startup = folder / "profile_default" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    shutil.copy(HOOKS / "cell_stats.py", startup / "00-cell-stats.py")
    return folder


def helper_dataset(out: Path, staging: Path, manifest: dict | None, gpu: bool) -> Path:
    """The helper dataset as `make kaggle-dataset` builds it (tools/kaggle_build.py: the package's wheel built from
    this checkout, requirements-kaggle.txt, the installer), with the wheels of the pins the kernel must install here
    (group pins); without liger-kernel's requirement on a CPU. Returns the dataset folder."""
    sys.path.insert(0, str(REPO / "tools"))
    import kaggle_build

    folder = kaggle_build.build_dataset(out, DATASET_USER, wheels=False, gpu_extras=gpu)
    for name, f in (manifest or {}).get("files", {}).items():
        if f["group"] == "pins":
            shutil.copy(staging / name, folder / name)
    return folder


def phi3_tokenizer(texts: list[str]):
    """A Phi-3-like tokenizer: byte-level BPE learnt from ``texts`` (BPE_MERGED_VOCAB tokens, <unk> <s> </s> first),
    padded with unused tokens to 32,000 ids, then Phi-3's 11 special tokens at 32000..32010 and its chat template."""
    import json as _json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=BPE_MERGED_VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = _json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), 32000):
        vocab[f"<|unused{i}|>"] = i
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < 3]
    tok = Tokenizer.from_str(_json.dumps(spec))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": PHI3_SPECIAL})
    fast.chat_template = PHI3_CHAT_TEMPLATE
    ids = fast.convert_tokens_to_ids(PHI3_SPECIAL)
    if ids != list(range(32000, 32011)):
        raise RuntimeError(f"Phi-3's special tokens landed at {ids}, not 32000..32010")
    return fast


def write_random_phi3(folder: Path, data: Path, tiny: bool, device: str) -> dict:
    """Phi-3-mini's shape (PHI3_MINI; PHI3_TINY in the smoke mode) with random float16 weights and the Phi-3-like
    tokenizer, saved as a model folder as Kaggle mounts one (config.json, generation_config.json, safetensors,
    tokenizer files). Random weights train and run as fast as real ones; their loss and answers mean nothing."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Phi3Config

    t0 = time.time()
    rows = json.loads(data.read_text())
    texts = [r["instruction"] + ("\n" + r["input"] if r.get("input") else "") + "\n" + r["output"] for r in rows]
    tokenizer = phi3_tokenizer(texts)
    config = Phi3Config(**(PHI3_TINY if tiny else PHI3_MINI), bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    GenerationConfig(bos_token_id=1, eos_token_id=[32000, 32001, 32007], pad_token_id=32000).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    params = sum(p.numel() for p in model.parameters())
    del model
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    lengths = sorted(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return {"folder": str(folder), "shape": PHI3_TINY if tiny else PHI3_MINI, "parameters": params, "dtype": "float16",
            "bytes": sum(p.stat().st_size for p in folder.iterdir()), "write_s": round(time.time() - t0, 1),
            "tokenizer": {"bpe_tokens": BPE_MERGED_VOCAB, "ids": len(tokenizer), "special": PHI3_SPECIAL,
                          "sample_tokens_median": lengths[len(lengths) // 2], "sample_tokens_total": sum(lengths)}}


def kaggle_root(root: Path, data: Path) -> dict:
    """/kaggle as a session sees it, under ``root``: working/ empty, input/ with the attached data (the Alpaca sample
    under the name alpaca-cleaned's file has). The model and the helper dataset are put in by the caller."""
    shutil.rmtree(root / "working", ignore_errors=True)
    (root / "working").mkdir(parents=True)
    (root / "input" / KAGGLE_DATA.parent).mkdir(parents=True, exist_ok=True)
    shutil.copy(data, root / "input" / KAGGLE_DATA)
    return {"root": str(root), "data": str(root / "input" / KAGGLE_DATA), "model": str(root / "input" / KAGGLE_MODEL)}


def fingerprint(folder: Path) -> dict[str, list]:
    """Size and modification time of every file under ``folder`` (to show an attached input was not written to)."""
    return {str(p.relative_to(folder)): [p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(folder.rglob("*")) if p.is_file()}


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


if __name__ == "__main__":  # python benchmarks/gpu_pipeline_env.py write-model FOLDER DATA [--tiny] [--device cuda]
    args = sys.argv[1:]
    if args[:1] == ["write-model"]:
        info = write_random_phi3(Path(args[1]), Path(args[2]), "--tiny" in args,
                                 args[args.index("--device") + 1] if "--device" in args else "cpu")
        print(json.dumps(info))
    else:
        raise SystemExit(f"usage: python {Path(__file__).name} write-model FOLDER DATA [--tiny] [--device cuda]")
