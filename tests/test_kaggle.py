"""Kaggle: the kernel metadata and helper dataset pass the official CLI's own checks, the install cell is the
same guarded cell everywhere, attached sources beat the hub, and no internet stops a stage at once."""
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
from qlora_helpers import build_config, kaggle
from qlora_helpers.config import UserError

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
    proc = subprocess.run([sys.executable, "-m", "qlora_helpers.kaggle", "dataset", str(out), "--user", USER],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_the_dataset_holds_a_wheel_of_the_whole_package(dataset_folder):
    (wheel,) = dataset_folder.glob("qlora_helpers-*.whl")  # the name the install cell looks for
    with zipfile.ZipFile(wheel) as zf:
        packaged = {n for n in zf.namelist() if n.startswith("qlora_helpers/")}
    modules = {f"qlora_helpers/{p.name}" for p in (REPO / "qlora_helpers").glob("*.py")}
    assert modules <= packaged and "qlora_helpers/kaggle.py" in packaged
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


def test_one_install_cell_everywhere_guarded_skipped_and_never_torch():
    sources = set()
    for path in NOTEBOOKS:
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
    from qlora_helpers import pipeline

    assert kaggle.stage_notebook_dir(tmp_path) == pipeline.NOTEBOOK_DIR  # in a checkout: its own
    monkeypatch.setattr(pipeline, "NOTEBOOK_DIR", tmp_path / "not-installed")
    mounted = tmp_path / "input" / "datasets" / USER / "qlora-helpers"
    mounted.mkdir(parents=True)
    with pytest.raises(UserError, match="make kaggle-dataset"):
        kaggle.stage_notebook_dir(tmp_path / "input")
    (mounted / kaggle.STAGE_NOTEBOOK).write_text("{}")
    assert kaggle.stage_notebook_dir(tmp_path / "input") == mounted

    seen = {}
    monkeypatch.setattr(kaggle, "KAGGLE_INPUT", tmp_path / "input")
    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg, overrides, run_dir, **kw: seen.update(
        profile=cfg.profile, overrides=overrides, run_dir=run_dir, **kw) or Path(run_dir))
    kaggle.run_all_stages("test", '{"train.max_steps": 2}', str(tmp_path / "run"))
    assert seen == {"profile": "test", "overrides": {"train.max_steps": 2}, "run_dir": str(tmp_path / "run"),
                    "notebook_dir": mounted}


# --------------------------------------------------------------------------- sources: attached, hub, offline
def _touch(path, text="[]"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_an_attached_dataset_is_found_by_the_words_of_the_hub_name(tmp_path):
    _touch(tmp_path / "qlora-helpers" / "dataset-metadata.json", "{}")
    assert kaggle.attached_dataset("yahma/alpaca-cleaned", tmp_path) is None
    wanted = _touch(tmp_path / "my-copy" / "alpaca_data_cleaned.json")
    assert kaggle.attached_dataset("yahma/alpaca-cleaned", tmp_path) == wanted
    folder = tmp_path / "datasets" / "someone" / "dolly-15k"
    _touch(folder / "data" / "train.parquet")
    assert kaggle.attached_dataset("databricks/dolly-15k", tmp_path) == folder / "data"
    assert kaggle.attached_dataset("yahma/alpaca-cleaned", tmp_path / "missing") is None


def test_stage_one_reads_the_attached_copy_and_says_so(tmp_path, monkeypatch):
    from qlora_helpers.data import load_raw

    rows = [{"instruction": "Say hi.", "input": "", "output": "hi"}]
    copy = _touch(tmp_path / "alpaca-cleaned" / "alpaca_data_cleaned.json", json.dumps(rows))
    monkeypatch.setattr(kaggle, "KAGGLE_INPUT", tmp_path)
    loaded, label = load_raw(build_config("kaggle-t4"))
    assert loaded == rows and str(copy) in label and "Kaggle input" in label


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(kaggle, "hub_reachable", lambda: False)
    monkeypatch.setattr(kaggle, "in_hub_cache", lambda repo_id, repo_type: False)
    monkeypatch.setattr(kaggle, "attached_model", lambda name: None)
    monkeypatch.setattr(kaggle, "attached_dataset", lambda source: None)


def test_without_internet_and_nothing_attached_the_first_cell_says_what_to_do(offline, tmp_path, monkeypatch):
    from qlora_helpers.runs import start_stage

    monkeypatch.delenv("QLORA_PROFILE", raising=False)  # the suite's default would replace the profile
    with pytest.raises(kaggle.HubUnreachable) as err:
        start_stage("kaggle-t4", {}, str(tmp_path / "run"))
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, UserError)
    assert "model.name 'microsoft/Phi-3-mini-4k-instruct'" in message and "data.source 'yahma/alpaca-cleaned'" in message
    assert "Add Input > Models" in message and "Settings > Internet" in message
    assert not (tmp_path / "run" / "config.json").exists()


def test_attached_or_local_sources_need_no_hub(offline, monkeypatch, tmp_path):
    monkeypatch.setattr(kaggle, "attached_model", lambda name: tmp_path)
    cfg = build_config("kaggle-t4")
    assert kaggle.hub_sources(cfg) == ["data.source"]
    monkeypatch.setattr(kaggle, "attached_dataset", lambda source: tmp_path)
    kaggle.check_sources(cfg)
    # a missing local file is stage 1's own error (DataError naming the file), not "no internet"
    kaggle.check_sources(build_config("test", {"data.source": str(tmp_path / "missing.jsonl")}))


def test_embedded_sources_never_touch_the_network(monkeypatch):
    monkeypatch.setattr(kaggle, "hub_reachable", lambda: pytest.fail("checked the network"))
    kaggle.check_sources(build_config("test"))


def test_hub_reachable_is_cheap_and_honours_offline_mode(monkeypatch):
    import socket

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    tried = []

    def refuse(address, timeout):
        tried.append((address, timeout))
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    kaggle.hub_reachable.cache_clear()
    assert kaggle.hub_reachable() is False and tried == [(("huggingface.co", 443), 3.0)]
    kaggle.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert kaggle.hub_reachable() is False and len(tried) == 1
    kaggle.hub_reachable.cache_clear()
