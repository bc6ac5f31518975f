"""Promises about the committed notebooks themselves (nbmake executes them; see the Makefile)."""
import ast
import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
from notebook_outputs import source_hash  # noqa: E402

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_notebooks_exist_and_are_numbered():
    names = [p.stem for p in NOTEBOOKS]
    assert names[:4] == ["01_data_preparation", "02_quantized_model_loading", "03_lora_training", "04_evaluation"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_committed_outputs_come_from_the_committed_cells(path):
    """Each notebook carries a real run's outputs (make notebooks): every code cell ran, and the cells are the ones
    that run executed (the hash of their sources it recorded), so a changed cell fails here until its outputs are
    made again."""
    nb = json.loads(path.read_text())
    recorded = nb["metadata"].get("qlora", {})
    assert recorded.get("source_sha256") == source_hash(nb["cells"]), \
        f"{path.name}: its cells changed since its outputs were made; run `make notebooks`"
    unrun = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and not c.get("execution_count")]
    assert not unrun, f"{path.name}: cells {unrun} did not run"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_committed_outputs_read_well_anywhere(path):
    """What GitHub shows: no machine's paths, no traceback, no progress bar or widget that a static page shows as
    a frozen bar or a repr, no stderr noise, and every figure an embedded image."""
    nb = json.loads(path.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    text = json.dumps(outputs)
    for needle in ("/tmp/", "/root/", "/home/", "Traceback", "0%|", "<Figure size", "VBox(", "No log",
                   "application/vnd.jupyter.widget-view+json"):
        assert needle not in text, f"{path.name}: its outputs hold {needle!r}"
    assert not [o for o in outputs if o.get("name") == "stderr"], f"{path.name}: stderr in its outputs"
    assert "widgets" not in nb["metadata"]


def test_the_committed_numbers_are_the_recorded_embedded_run():
    """The numbers the notebooks show are the embedded profile's, as tests/test_shipped_scores.py records them."""
    from test_shipped_scores import RECORDED, TOLERANCE

    numbers = [json.loads(p.read_text())["metadata"]["qlora"]["numbers"] for p in NOTEBOOKS]
    assert all(n == numbers[0] for n in numbers), "the notebooks' outputs come from different runs"
    n = numbers[0]
    assert n["exact_match_after"] == pytest.approx(RECORDED["4bit+adapter"], abs=TOLERANCE)
    assert n["shipped_exact_match"] == pytest.approx(RECORDED["merged-dequantized"], abs=TOLERANCE)
    assert n["val_loss_after"] < n["val_loss_before"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_one_parameters_cell_of_literals(path):
    nb = json.loads(path.read_text())
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters'"
    for node in ast.parse("".join(tagged[0]["source"])).body:
        assert isinstance(node, ast.Assign), f"{path.name}: the parameters cell holds only assignments"
        ast.literal_eval(node.value)  # raises if a value is not a literal
        assert all(t.id.isupper() for t in node.targets)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_finds_exactly_the_three_parameters_and_every_profile_is_named(path):
    """papermill warns "Passed unknown parameter" when its parser misses a parameter; here it must find all three."""
    from papermill.inspection import inspect_notebook

    from qlora_helpers.config import profile_names

    found = inspect_notebook(str(path))
    assert sorted(found) == ["OVERRIDES", "PROFILE", "RUN_DIR"]
    assert all(name in found["PROFILE"]["help"] for name in profile_names())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_stage_notebooks_install_nothing_and_pin_nothing(path):
    for c in json.loads(path.read_text())["cells"]:
        src = "".join(c["source"])
        assert not ("pip" in src and "install" in src), f"{path.name}: installs belong to the Kaggle kernel and requirements"


# What each stage notebook must show in its own cells (the lesson), not only through a helper.
SHOWN = {"02_quantized_model_loading": ["BitsAndBytesConfig(", "from_pretrained(", "quantization_config=bnb_config",
                                        "LoraConfig(", "get_peft_model(model, peft_config)"],
         "03_lora_training": ["get_peft_model(", "TrainingArguments(", "Trainer(model=model, args=args",
                              "trainer.train(resume_from_checkpoint="],
         "04_evaluation": ["merge_and_unload(", "PeftModel.from_pretrained(", "playground("]}


@pytest.mark.parametrize("name", sorted(SHOWN))
def test_the_key_library_calls_stand_in_the_notebooks_own_cells(name):
    code = "".join("".join(c["source"]) for c in json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())["cells"]
                   if c["cell_type"] == "code")
    for call in SHOWN[name]:
        assert call in code, f"{name}: {call} is not in a code cell"


# Every argument of the three configuration objects stands in the cell that builds them, each with its reason.
BUILT = {"02_quantized_model_loading": ("BitsAndBytesConfig", "LoraConfig"), "03_lora_training": ("TrainingArguments",)}


@pytest.mark.parametrize("name", sorted(BUILT))
def test_the_configuration_objects_are_built_in_a_cell_with_a_reason_per_argument(name):
    cells = ["".join(c["source"]) for c in json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())["cells"]
             if c["cell_type"] == "code"]
    for cls in BUILT[name]:
        cell = next(c for c in cells if f"{cls}(" in c and f"= {cls}(" in c)
        call = next(n for n in ast.walk(ast.parse(cell)) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == cls)
        assert len(call.keywords) >= 6, f"{name}: {cls} is built with few arguments"
        lines = cell.splitlines()
        for kw in call.keywords:
            beside = {kw.lineno, kw.value.lineno, kw.value.end_lineno}  # the argument's name, its value's first or last line
            assert any("#" in lines[n - 1] for n in beside), f"{name}: {cls}({kw.arg}=...) has no reason beside it"


@pytest.mark.parametrize("name", ["02_quantized_model_loading", "03_lora_training"])
def test_lora_starts_from_train_seed_in_the_cell_that_attaches_it(name):
    """LoRA's A matrices are drawn at get_peft_model: the cell seeds from train.seed right before it, with nothing
    random in between, so the same seed gives the same adapter (tests/test_faults.py checks it bit for bit)."""
    cells = ["".join(c["source"]) for c in json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())["cells"]
             if c["cell_type"] == "code"]
    cell = next(c for c in cells if "= get_peft_model(" in c)
    lines = [l.strip() for l in cell.splitlines() if l.strip() and not l.strip().startswith("#")]
    at = next(i for i, l in enumerate(lines) if "get_peft_model(" in l and "import" not in l)
    assert lines[at - 1].startswith("set_seed(cfg.train.seed)"), lines[at - 1]
