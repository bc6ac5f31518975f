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
def test_kaggle_only_cells_are_guarded_and_skipped_by_nbmake(path):
    nb = json.loads(path.read_text())
    for c in nb["cells"]:
        src = "".join(c["source"])
        if "pip" in src and "install" in src:
            assert "KAGGLE_KERNEL_RUN_TYPE" in src
            assert "skip-execution" in c["metadata"].get("tags", [])
            assert "torch==" not in src and "install torch" not in src and "requirements.txt" not in src
