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
# Under pytest-xdist (`make test`: two workers) each worker gets its share of the cores. Otherwise torch, in every
# worker and in everything a test starts (CLI runs, notebook kernels), starts a thread per core of the machine, and
# two workers' threads spinning on two cores run several times slower than one thread each.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(share))

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


# Heaviest first (after `embedded`, the default profile's run, about 10 minutes on its own): with
# --no-loadscope-reorder, pytest-xdist hands the groups out in this order, so that no long one starts last and runs
# alone. Measured with --durations on a 2-core machine; a module not named here comes after these, in file order.
HEAVY_FIRST = ["embedded", "notebooks", "tests/test_kaggle_kernel.py", "tests/test_faults_cli.py", "tests/test_faults.py",
               "tests/test_train.py", "tests/test_faults_rundir.py", "tests/test_gguf.py", "tests/test_benchmarks.py",
               "tests/test_distributed.py", "tests/test_pipeline.py", "tests/test_export.py"]


def run_together(items):
    """What must share one process under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`), as an
    xdist_group: the notebooks (in order, on one run directory), and each test module (its module-scoped fixtures
    are made once); a group a test names itself (`embedded`: the tests of the suite's one embedded run) stays. The
    groups go in HEAVY_FIRST's order (a stable sort keeps each group's own order)."""
    for item in items:
        if not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group("notebooks" if getattr(item, "nbmake", False)
                                                    else item.nodeid.split("::")[0]))
    rank = {group: i for i, group in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))


def _group(item):
    mark = item.get_closest_marker("xdist_group")
    return mark.args[0] if mark.args else mark.kwargs.get("name")


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """Under `--dist loadgroup` every test must carry its group in its id (pytest-xdist appends `@group`): if a
    pytest release stops honouring that, the notebooks would run apart on two run directories, so say so at once."""
    if getattr(session.config.option, "loadgroup", False) and os.environ.get("PYTEST_XDIST_WORKER"):
        lost = [item.nodeid for item in session.items if "@" not in item.nodeid.rsplit("]", 1)[-1]]
        if lost:
            raise pytest.UsageError(f"pytest-xdist did not group {lost[0]} (and {len(lost) - 1} more); pin the pytest "
                                    "of requirements-dev.txt")
