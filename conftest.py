"""Root conftest: nbmake runs every notebook in notebooks/ on the fast `test` profile, in file order, each in a
fresh kernel, sharing one throwaway run directory. The notebooks themselves stay as committed: each is copied,
with papermill's own parameter injection (PROFILE="test", RUN_DIR=the shared folder) after its parameters
cell, and nbmake executes the copy. nbmake's kernels talk over local sockets, as the pipeline's do
(qlora_helpers/kernels.py)."""
import os
import tempfile
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

NBMAKE_PARAMETERS = {"PROFILE": "test", "OVERRIDES": {}}


def pytest_configure(config):
    """nbmake makes an nbclient NotebookClient for each notebook: here, one whose kernel uses the ipc transport."""
    try:
        from nbmake import nb_run
    except ImportError:  # nbmake not installed: nothing to set up
        return
    from nbclient import NotebookClient

    from qlora_helpers.kernels import LocalKernel

    assert nb_run.NotebookClient is NotebookClient, "nbmake no longer makes its client by this name"
    nb_run.NotebookClient = type("LocalNotebookClient", (LocalKernel, NotebookClient), {})


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
