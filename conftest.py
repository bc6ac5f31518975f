"""Root conftest: nbmake runs every notebook in notebooks/ on the fast `test` profile, in file order, each in a
fresh kernel, sharing one throwaway run directory. The notebooks themselves stay as committed: each is copied,
with papermill's own parameter injection (PROFILE="test", RUN_DIR=the shared folder) after its parameters
cell, and nbmake executes the copy. nbmake's kernels talk over local sockets, as the pipeline's do
(qlora_helpers/kernels.py)."""
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ["QLORA_BATCH"] = "1"  # the notebooks run unattended here: no widgets waiting for input

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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(session, config, items):
    run_together(items)
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


def run_together(items):
    """What must share one process under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`), as an
    xdist_group: the notebooks (in order, on one run directory), and each test module (its module-scoped fixtures
    are made once); a group a test names itself (`embedded`: the tests of the suite's one embedded run) stays. The
    longest group, `embedded`, goes first, so that it does not start last and run alone."""
    for item in items:
        if not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group("notebooks" if getattr(item, "nbmake", False)
                                                    else item.nodeid.split("::")[0]))
    items.sort(key=lambda item: _group(item) != "embedded")


def _group(item):
    mark = item.get_closest_marker("xdist_group")
    return mark.args[0] if mark.args else mark.kwargs.get("name")
