"""Kaggle packaging: the kernel metadata and helper dataset pass the official CLI's own checks, and the install
cell is the same guarded cell everywhere."""
import ast
import json
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO
from qlora_helpers import build_config, pipeline
from qlora_helpers.config import UserError

sys.path.insert(0, str(REPO / "tools"))
import kaggle_build as kaggle  # noqa: E402

METADATA = json.loads((REPO / "kaggle-metadata.json").read_text())
DRIVER = REPO / METADATA["code_file"]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")) + [DRIVER]
USER = "qlora-tester"


# --------------------------------------------------------------------------- kaggle-metadata.json
def test_kaggle_metadata_has_every_field_a_t4_run_needs():
    for key in ("id", "title", "code_file", "language", "kernel_type"):  # what `kernels push` refuses without
        assert METADATA[key], key
    assert DRIVER.is_file(), f"code_file {METADATA['code_file']} does not exist"
    assert METADATA["language"] == "python" and METADATA["kernel_type"] == "notebook"
    assert METADATA["enable_gpu"] is True and METADATA["machine_shape"] == "NvidiaTeslaT4"
    assert isinstance(METADATA["is_private"], bool) and isinstance(METADATA["enable_internet"], bool)
    owner, slug = METADATA["id"].split("/")
    assert owner == kaggle.USERNAME_PLACEHOLDER and METADATA["title"].lower().replace(" ", "-") == slug
    assert METADATA["dataset_sources"] == [f"{kaggle.USERNAME_PLACEHOLDER}/{kaggle.HELPER_DATASET}"]
    (model,) = METADATA["model_sources"]
    owner, model_slug, framework, variation, version = model.split("/")  # the documented 5-part handle
    assert (owner, model_slug, framework) == ("microsoft", "phi-3", "transformers") and version.isdigit()
    assert variation == build_config("kaggle-t4").model.name.split("/")[-1].lower()  # what model.py matches


@contextmanager
def _captured(requests):
    """Stands in for the Kaggle API client: records the request instead of sending it."""
    record = lambda request: requests.append(request) or SimpleNamespace(error=None)  # noqa: E731
    yield SimpleNamespace(kernels=SimpleNamespace(kernels_api_client=SimpleNamespace(save_kernel=record)),
                          datasets=SimpleNamespace(dataset_api_client=SimpleNamespace(create_dataset=record)))


@pytest.fixture
def kaggle_api(tmp_path, monkeypatch):
    """The official CLI's API object, with no credentials and no network."""
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    (tmp_path / "kaggle-config").mkdir()
    extended = pytest.importorskip("kaggle.api.kaggle_api_extended")
    api = extended.KaggleApi()
    api.config_values = {"username": USER}
    requests = []
    monkeypatch.setattr(api, "build_kaggle_client", lambda: _captured(requests))
    return api, requests, extended


def test_the_staged_kernel_passes_the_official_push_validation(tmp_path, kaggle_api):
    api, requests, _ = kaggle_api
    folder = kaggle.build_kernel(tmp_path / "kernel", USER)
    api.kernels_push(str(folder))  # validates ids, sources, language, type, code file; then "sends"
    (request,) = requests
    assert request.slug == f"{USER}/qlora-phi-3-t4-pipeline" and request.new_title == METADATA["title"]
    assert request.enable_gpu and request.enable_internet and request.machine_shape == "NvidiaTeslaT4"
    assert request.dataset_data_sources == [f"{USER}/{kaggle.HELPER_DATASET}"]
    assert request.model_data_sources == METADATA["model_sources"]
    cells = json.loads(request.text)["cells"]
    assert any("run_all_stages" in c["source"] for c in cells)


# --------------------------------------------------------------------------- the helper dataset
@pytest.fixture(scope="module")
def dataset_folder(tmp_path_factory):
    """What `make kaggle-dataset` builds (the same command line), once for this module."""
    out = tmp_path_factory.mktemp("kaggle") / "dataset"
    proc = subprocess.run([sys.executable, "tools/kaggle_build.py", "dataset", str(out), "--user", USER],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_the_dataset_holds_a_wheel_of_the_whole_package(dataset_folder):
    (wheel,) = dataset_folder.glob("qlora_helpers-*.whl")  # the name the install cell looks for
    with zipfile.ZipFile(wheel) as zf:
        packaged = {n for n in zf.namelist() if n.startswith("qlora_helpers/")}
    modules = {f"qlora_helpers/{p.name}" for p in (REPO / "qlora_helpers").glob("*.py")}
    assert modules <= packaged and "qlora_helpers/recipes/kaggle-t4.yaml" in packaged
    assert sorted(p.name for p in dataset_folder.glob("*.ipynb")) == [p.name for p in NOTEBOOKS[:-1]]
    shipped = (dataset_folder / "requirements-kaggle.txt").read_text()
    assert shipped == (REPO / "requirements-kaggle.txt").read_text() + (REPO / "requirements-gpu.txt").read_text()
    assert "liger-kernel==" in shipped  # the kaggle-t4 profile trains with Liger


@pytest.mark.parametrize("name", ["requirements-kaggle.txt", "requirements-gpu.txt"])
def test_requirements_kaggle_never_names_torch(name):
    names = [line.split("#")[0].strip() for line in (REPO / name).read_text().splitlines()]
    names = [n.split(";")[0].split("[")[0] for n in names if n]
    for op in ("==", ">=", "<=", "~=", "!=", ">", "<"):
        names = [n.split(op)[0].strip() for n in names]
    assert not [n for n in names if n.lower() in ("torch", "torchvision", "torchaudio") or n.startswith("-r")]


def test_the_dataset_metadata_passes_the_official_create_validation(dataset_folder, kaggle_api, monkeypatch):
    api, requests, extended = kaggle_api

    def not_found(ref):  # "the slug is free"
        raise extended.HTTPError("404")

    monkeypatch.setattr(api, "dataset_status", not_found)
    monkeypatch.setattr(api, "upload_files", lambda *a, **k: None)
    api.dataset_create_new(str(dataset_folder), quiet=True)  # title, slug, license and subtitle checks
    (request,) = requests
    assert (request.owner_slug, request.slug) == (USER, kaggle.HELPER_DATASET) and request.is_private


def test_staging_without_a_username_says_how_to_give_one(tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match="KAGGLE_USER="):
        kaggle.kaggle_username()
    (tmp_path / "kaggle.json").write_text(json.dumps({"username": "from-file", "key": "x"}))
    assert kaggle.kaggle_username() == "from-file"


# --------------------------------------------------------------------------- the notebooks
def _cells(path):
    return json.loads(path.read_text())["cells"]


def test_one_install_cell_in_the_kernel_guarded_skipped_and_never_torch():
    sources = set()
    for path in [DRIVER]:
        install = [c for c in _cells(path) if "kaggle-only" in c["metadata"].get("tags", [])]
        assert len(install) == 1, f"{path.name}: {len(install)} install cells"
        src = "".join(install[0]["source"])
        assert "skip-execution" in install[0]["metadata"]["tags"] and 'os.environ.get("KAGGLE_KERNEL_RUN_TYPE")' in src
        assert "requirements-kaggle.txt" in src and "requirements.txt" not in src.replace("requirements-kaggle.txt", "")
        assert "torch==" not in src and "install torch" not in src and '"-c"' in src  # torch pinned to Kaggle's own
        sources.add(src)
    assert len(sources) == 1, "the install cell differs between notebooks"


def test_the_driver_notebook_is_thin_with_one_parameters_cell_and_no_outputs():
    cells = _cells(DRIVER)
    assert not [c for c in cells if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    (params,) = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    values = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse("".join(params["source"])).body}
    assert values == {"PROFILE": "kaggle-t4", "OVERRIDES": {}, "RUN_DIR": ""}
    code = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "run_all_stages(PROFILE, OVERRIDES, RUN_DIR)" in code


def test_the_driver_finds_the_stage_notebooks_in_the_attached_dataset(tmp_path, monkeypatch):
    assert pipeline.stage_notebook_dir(tmp_path) == pipeline.NOTEBOOK_DIR  # in a checkout: its own
    monkeypatch.setattr(pipeline, "NOTEBOOK_DIR", tmp_path / "not-installed")
    mounted = tmp_path / "input" / "datasets" / USER / "qlora-helpers"
    mounted.mkdir(parents=True)
    with pytest.raises(UserError, match="make kaggle-dataset"):
        pipeline.stage_notebook_dir(tmp_path / "input")
    (mounted / pipeline.STAGE_NOTEBOOK).write_text("{}")
    assert pipeline.stage_notebook_dir(tmp_path / "input") == mounted

    seen = {}
    monkeypatch.setenv("QLORA_KAGGLE_ROOT", str(tmp_path))
    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg, overrides, run_dir, **kw: seen.update(
        profile=cfg.profile, overrides=overrides, run_dir=str(run_dir), **kw) or Path(run_dir))
    pipeline.run_all_stages("test", '{"train.max_steps": 2}', str(tmp_path / "run"))
    assert seen == {"profile": "test", "overrides": {"train.max_steps": 2}, "run_dir": str(tmp_path / "run"),
                    "notebook_dir": mounted}
