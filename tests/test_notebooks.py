"""Promises about the committed notebooks themselves (nbmake executes them; see the Makefile)."""
import ast
import json

import pytest

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_notebooks_exist_and_are_numbered():
    names = [p.stem for p in NOTEBOOKS]
    assert names[:4] == ["01_data_preparation", "02_quantized_model_loading", "03_lora_training", "04_evaluation"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"


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
SHOWN = {"02_quantized_model_loading": ["from_pretrained(", "quantization_config=bnb_config", "get_peft_model(model, peft_config)"],
         "03_lora_training": ["Trainer(model=model, args=args", "trainer.train(resume_from_checkpoint="],
         "04_evaluation": ["merge_and_unload(", "PeftModel.from_pretrained(", "playground("]}


@pytest.mark.parametrize("name", sorted(SHOWN))
def test_the_key_library_calls_stand_in_the_notebooks_own_cells(name):
    code = "".join("".join(c["source"]) for c in json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())["cells"]
                   if c["cell_type"] == "code")
    for call in SHOWN[name]:
        assert call in code, f"{name}: {call} is not in a code cell"
