"""The Kaggle kernel notebook, built from the five stage notebooks: the whole tutorial in the one notebook a Kaggle
kernel runs, so a reader who opens it (or copies it and presses Run All) sees every stage's prose, tables and
plots. `make kaggle-kernel` writes it; kaggle_kernel/qlora_pipeline.ipynb is its committed copy, and
tests/test_kaggle.py fails when that copy differs from what this builds.

What merging five notebooks into one kernel takes:
* one parameters cell (PROFILE defaults to kaggle-t4 here) instead of five, and each stage's own intro no longer
  says a parameters cell follows it; every stage's `start_stage` cell stays, reading those parameters;
* an install cell (Kaggle only) that runs the helper dataset's installer (tools/kaggle_install.py);
* between two stages, a cell that keeps the run directory the first stage chose and deletes every name the
  stage before defined (model, tokenizer, trainer, ...), then frees the GPU memory they held (gc.collect,
  torch.cuda.empty_cache), so each stage starts as in a fresh kernel: with two GPUs, notebook 03 launches one
  training process per GPU, and the kernel must hold no model on them then.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

KERNEL_FILE = "qlora_pipeline.ipynb"
# The sentence each stage notebook's intro opens its paragraph about its own parameters cell with.
PARAMETERS_PARAGRAPH = "The next cell holds the parameters"
KEEP = {"PROFILE", "OVERRIDES", "RUN_DIR"}

INTRO = """\
# QLoRA fine-tuning on Kaggle's GPU T4 x2: the whole tutorial in one kernel

This kernel is the project's five notebooks one after another: **01** the data, **02** the quantized model and its \
LoRA adapters, **03** training, **04** evaluation and export, **05** the report. It is built from them by \
`tools/kaggle_build.py` (`make kaggle-kernel`), so it reads as they do; change those, not this. It is committed \
without outputs: the same cells with the outputs of a real run (the embedded profile on a CPU) are in the \
repository's `notebooks/01..05`; here, the outputs are your run's.

**To run it** (docs/kaggle.md walks through every step): *Settings > Accelerator > GPU T4 x2*; *Add Input* the \
helper dataset `qlora-helpers` (the helper package and its installer) and the model *Phi-3 > Transformers > \
phi-3-mini-4k-instruct*; *Settings > Internet* on, unless the helper dataset holds its wheels (built with \
`make kaggle-dataset WHEELS=1`) and the training data is attached too. Then *Run All*, or *Save Version*.

**What runs.** The install cell adds to Kaggle's image only what it lacks or has too old (bitsandbytes, gguf, \
rouge-score, liger-kernel, and the transformers, peft and accelerate versions this project is tested with); it never \
touches torch, pyarrow or the Jupyter packages the kernel runs on. Then each stage, as in its own notebook. Between \
two stages, the names the stage before defined are deleted and the GPU memory they held is freed: the stages share \
only the run directory, `/kaggle/working/runs/<time>/`, which is the kernel's output.

**Two GPUs.** On *GPU T4 x2* notebook 03 trains on both T4s: it starts one process per GPU, and each runs stage \
03's own cells (the stage notebook, which the helper dataset's wheel carries) with its own 4-bit copy of the model \
(two processes are tested on the CPU; on two T4s this has not been measured). The training length \
does not change: `train.epochs` passes over the data, in half the steps. `OVERRIDES = {"train.num_processes": 1}` \
trains on one GPU.

**Time.** A Kaggle session ends after 12 hours. `train.max_minutes` (690 in `kaggle-t4`) is the budget of the whole \
run, counted from the first stage: training stops early, with a checkpoint, when what is left is what evaluation, \
export and the report are estimated to need, and the report says how much training was cut.

**Continuing in a new version.** A new version starts with an empty `/kaggle/working`. Attach this notebook's own \
output (*Add Input > Your Work > Notebooks*) and run again: the first stage copies the earlier run from \
`/kaggle/input` to `/kaggle/working/runs/` and training continues from its newest complete checkpoint."""

PARAMETERS = """\
PROFILE = "kaggle-t4"  # a profile (kaggle-t4, kaggle-t4-seed, gpu-fast, low-memory, embedded, test) or your recipe .yaml
OVERRIDES = {}  # dotted config keys on top of the profile, for example {"train.num_processes": 1, "train.epochs": 2}
RUN_DIR = ""  # the run directory; empty: the earlier run attached as an input, continued, or else a new one"""

INSTALL = """\
# Kaggle only: install what Kaggle's image lacks from the attached helper dataset, with its installer
# (tools/kaggle_install.py), which holds every other package at the image's version. Elsewhere: make setup.
import os, runpy
from pathlib import Path

if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or os.environ.get("QLORA_ON_KAGGLE"):
    kaggle_input = Path(os.environ.get("QLORA_KAGGLE_ROOT") or "/kaggle") / "input"
    installers = sorted(kaggle_input.glob("*/kaggle_install.py")) + sorted(kaggle_input.glob("*/*/*/kaggle_install.py"))
    if not installers:
        raise SystemExit("attach the helper dataset (Add Input > Datasets > qlora-helpers; docs/kaggle.md says how to "
                         "make one): it holds the helper package and its installer")
    runpy.run_path(str(installers[0]))["main"](["--expect-version", "{version}"])"""

BETWEEN_TEXT = """\
---
*Stage {before} is done. Before stage {after} starts, the names stage {before} defined are deleted and the memory \
they held is freed (`gc.collect()`, then `torch.cuda.empty_cache()` hands the GPU memory back), so stage {after} \
starts as it would in a fresh kernel and reads only the run directory.{widget}*"""
WIDGET_NOTE = (" A model still counted below is held by the playground above, which keeps the fine-tuned model for you "
               "to try; stage {after} loads none.")

BETWEEN_CODE = """\
import contextlib, gc, io
import torch
from transformers import PreTrainedModel

RUN_DIR = str(stage.run_dir)  # the later stages work in the run directory the first one chose
for name in {names}:
    globals().pop(name, None)
with contextlib.redirect_stdout(io.StringIO()):
    get_ipython().run_line_magic("reset", "-f out")  # IPython's output history could still hold one of them
gc.collect()
if torch.cuda.is_available():
    torch.cuda.empty_cache()
# Models left anywhere in this process (a model's backbone is a PreTrainedModel too: counted with its model).
# type(o), not isinstance: a dead weak reference proxy raises on isinstance.
found = [o for o in gc.get_objects() if issubclass(type(o), PreTrainedModel)]
inner = {id(m) for o in found for m in o.modules() if m is not o}
gpus = [f"GPU {i}: {torch.cuda.memory_allocated(i) / 2**30:.2f} GiB allocated" for i in range(torch.cuda.device_count())]
print(f"models still in memory: {sum(id(o) not in inner for o in found)}" + "".join(f"; {g}" for g in gpus))
del found, inner"""

OUTRO = """\
---
## Where the results are

Everything above is in the run directory under `/kaggle/working/runs/`, the kernel's output (the *Output* tab, or \
`kaggle kernels output <you>/<kernel> -p out/`): `report.md` and `summary.json`, the plots under `report/`, the \
trained adapter in `adapter/`, the merged 16-bit model in `export/merged/`, the checkpoints in `train/checkpoints/`. \
To train further in a new version, attach this notebook's output and run it again (see the top). The report's \
plots, embedded here (the report's Markdown above links to them as files, which a notebook viewer may not show):"""

SHOW_PLOTS = """\
from IPython.display import Image, display

for png in sorted(stage.path("report").glob("*.png")):
    display(Image(filename=str(png)))"""


def _source(text: str) -> list[str]:
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + [lines[-1]]


def _cell(kind: str, cell_id: str, text: str, tags: list[str] | None = None) -> dict:
    cell = {"cell_type": kind, "id": cell_id, "metadata": {"tags": tags} if tags else {}, "source": _source(text)}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def defined_names(cells: list[dict]) -> list[str]:
    """The global names a stage's code cells assign (also inside if/for/with/try blocks, not inside functions),
    imports and the parameters excepted: what the next stage must not find."""
    names = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda,
                             ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for cell in cells:
        if cell["cell_type"] == "code":
            visit(ast.parse("".join(cell["source"])))
    return sorted(names - KEEP)


def _names(names: list[str]) -> str:
    """A list literal of names, wrapped to lines of at most 100 characters."""
    import textwrap

    body = textwrap.wrap(", ".join(repr(n) for n in names), 100 - 4, break_long_words=False, break_on_hyphens=False)
    return "[\n" + "".join(f"    {line}\n" for line in body) + "]"


def without_parameters_paragraph(text: str) -> str:
    return "\n\n".join(p for p in text.split("\n\n") if not p.startswith(PARAMETERS_PARAGRAPH))


def stage_cells(notebook: Path) -> list[dict]:
    """A stage notebook's cells as they go into the kernel: without its parameters cell, without the paragraph
    that announces it, with ids prefixed by the stage's number (unique in the kernel), outputs cleared."""
    prefix = notebook.name[:2]
    out = []
    for i, cell in enumerate(json.loads(notebook.read_text())["cells"]):
        tags = cell.get("metadata", {}).get("tags", [])
        if "parameters" in tags:
            continue
        text = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            text = without_parameters_paragraph(text)
        out.append(_cell(cell["cell_type"], f"s{prefix}-{cell.get('id') or i}", text, tags))
    return out


def build_kernel_notebook(notebooks: list[Path], version: str) -> dict:
    """The kernel notebook (nbformat 4 as a dict) from the numbered stage notebooks, in order."""
    cells = [_cell("markdown", "kaggle-intro", INTRO),
             _cell("code", "kaggle-parameters", PARAMETERS, ["parameters"]),
             _cell("code", "kaggle-install", INSTALL.replace("{version}", version), ["kaggle-only"])]
    previous = None
    for notebook in notebooks:
        these = stage_cells(notebook)
        if previous is not None:
            before, after = previous[0], notebook.name[:2]
            widget = WIDGET_NOTE.format(after=after) if previous[2] else ""
            cells.append(_cell("markdown", f"kaggle-between-{before}-{after}",
                               BETWEEN_TEXT.format(before=before, after=after, widget=widget)))
            cells.append(_cell("code", f"kaggle-free-{before}-{after}", BETWEEN_CODE.replace("{names}", _names(previous[1]))))
        cells += these
        shows_widget = any("playground(" in "".join(c["source"]) for c in these if c["cell_type"] == "code")
        previous = (notebook.name[:2], defined_names(these), shows_widget)
    cells += [_cell("markdown", "kaggle-outro", OUTRO), _cell("code", "kaggle-plots", SHOW_PLOTS)]
    first = json.loads(notebooks[0].read_text())
    # The kernel's metadata: its kernel spec only. What an executed notebook adds (language_info, the record of
    # `make notebooks`' run under "qlora") describes outputs this notebook does not carry.
    metadata = {k: v for k, v in first["metadata"].items() if k == "kernelspec"}
    metadata["language_info"] = {"name": "python"}
    return {"cells": cells, "metadata": metadata, "nbformat": first["nbformat"],
            "nbformat_minor": first["nbformat_minor"]}


def write_kernel_notebook(path: Path, notebooks: list[Path], version: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(build_kernel_notebook(notebooks, version), indent=1, ensure_ascii=False) + "\n")
    return path
