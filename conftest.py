"""Root conftest: nbmake runs every notebook in notebooks/ on the fast `test` profile, in file order, each in a
fresh kernel, sharing one throwaway run directory. The notebooks themselves stay as committed: each is copied,
with papermill's own parameter injection (PROFILE="test", RUN_DIR=the shared folder) after its parameters
cell, and nbmake executes the copy."""
import os
import tempfile
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ["QLORA_BATCH"] = "1"  # the notebooks run unattended here: no widgets waiting for input

NBMAKE_PARAMETERS = {"PROFILE": "test", "OVERRIDES": {}}


def pytest_collection_modifyitems(session, config, items):
    notebooks = [item for item in items if getattr(item, "nbmake", False)]
    if not notebooks:
        return
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    work = Path(tempfile.mkdtemp(prefix="qlora-nbmake-"))
    params = {**NBMAKE_PARAMETERS, "RUN_DIR": str(work / "run")}
    for item in notebooks:
        source = Path(item.filename)
        nb = parameterize_notebook(load_notebook_node(str(source)), params)
        copy = work / source.parent.name / source.name
        copy.parent.mkdir(exist_ok=True)
        nbformat.write(nb, copy)
        item.filename = str(copy)
