"""Kaggle packaging: the kernel notebook is the five stage notebooks as the builder makes them; the kernel and
dataset pass the official CLI's own checks; the installer adds to Kaggle's image only what requirements-kaggle.txt
names, from PyPI or from the dataset's own wheels with no index, and leaves torch, pyarrow and the Jupyter
machinery as the image has them."""
import ast
import json
import os
import re
import subprocess
import sys
import venv
import zipfile
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from conftest import REPO
from qlora_helpers import __version__, build_config
from qlora_helpers.config import UserError

sys.path.insert(0, str(REPO / "tools"))
import kaggle_build as kaggle  # noqa: E402
import kaggle_install  # noqa: E402
from kaggle_kernel import without_parameters_paragraph  # noqa: E402

METADATA = json.loads((REPO / "kaggle-metadata.json").read_text())
KERNEL = REPO / METADATA["code_file"]
STAGES = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
USER = "qlora-tester"
# The packages the kernel installs (requirements-kaggle.txt and requirements-gpu.txt pin them) and its own.
DELIBERATE = {**kaggle_install.pins(kaggle_install.requirements(REPO / "requirements-kaggle.txt")),
              **kaggle_install.pins(kaggle_install.requirements(REPO / "requirements-gpu.txt")),
              "qlora-helpers": __version__}


# --------------------------------------------------------------------------- the kernel notebook
def _cells(path):
    return json.loads(path.read_text())["cells"]


def _code(cell):
    return "".join(cell["source"])


def test_the_committed_kernel_notebook_is_what_the_builder_makes(tmp_path):
    built = kaggle.build_kernel_notebook(tmp_path / "kernel.ipynb")
    assert built.read_text() == KERNEL.read_text(), "kaggle_kernel/ is stale: run `make kaggle-notebook` and commit it"


def test_the_kernel_holds_every_stage_cell_in_order_and_one_parameters_cell():
    kernel = _cells(KERNEL)
    texts = [_code(c) for c in kernel]
    at = 0
    for notebook in STAGES:
        for cell in _cells(notebook):
            if "parameters" in cell["metadata"].get("tags", []):
                continue
            text = without_parameters_paragraph(_code(cell)) if cell["cell_type"] == "markdown" else _code(cell)
            at = texts.index(text, at) + 1  # raises if a stage cell is missing or out of order
    assert "The next cell holds the parameters" not in "".join(texts)
    assert not [c for c in kernel if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])]
    (params,) = [c for c in kernel if "parameters" in c["metadata"].get("tags", [])]
    values = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(_code(params)).body}
    assert values == {"PROFILE": "kaggle-t4", "OVERRIDES": {}, "RUN_DIR": ""}  # on Kaggle, kaggle-t4
    starts = [t for t in texts if "stage = start_stage(PROFILE, OVERRIDES, RUN_DIR)" in t]
    assert len(starts) == len(STAGES)  # every stage's own start_stage cell


def test_between_stages_the_kernel_deletes_what_the_stage_before_defined_and_frees_the_gpu():
    kernel = _cells(KERNEL)
    frees = [c for c in kernel if c["id"].startswith("kaggle-free-")]
    assert [c["id"] for c in frees] == ["kaggle-free-01-02", "kaggle-free-02-03", "kaggle-free-03-04", "kaggle-free-04-05"]
    for cell in frees:
        code = _code(cell)
        assert "RUN_DIR = str(stage.run_dir)" in code and "torch.cuda.empty_cache()" in code and "gc.collect()" in code
        names = ast.literal_eval(code[code.index("for name in ") + len("for name in "):code.index(":\n")])
        assert "stage" in names and not {"PROFILE", "OVERRIDES", "RUN_DIR"} & set(names)
    before_training = _code(frees[1])
    assert "'model'" in before_training  # notebook 02's model: the two-GPU launch in 03 needs the GPUs empty
    assert "'trainer'" in _code(frees[2]) and "'model'" in _code(frees[2])


def test_papermill_finds_the_kernels_three_parameters():
    from papermill.inspection import inspect_notebook

    assert sorted(inspect_notebook(str(KERNEL))) == ["OVERRIDES", "PROFILE", "RUN_DIR"]


def test_the_install_cell_runs_the_datasets_installer_on_kaggle_only_and_never_torch():
    (install,) = [c for c in _cells(KERNEL) if "kaggle-only" in c["metadata"].get("tags", [])]
    src = _code(install)
    assert 'os.environ.get("KAGGLE_KERNEL_RUN_TYPE")' in src and "kaggle_install.py" in src
    assert f'"--expect-version", "{__version__}"' in src
    assert "pip" not in src and "torch" not in src


# --------------------------------------------------------------------------- kaggle-metadata.json and the CLI
def test_kaggle_metadata_has_every_field_a_t4_x2_run_needs():
    for key in ("id", "title", "code_file", "language", "kernel_type"):  # what `kernels push` refuses without
        assert METADATA[key], key
    assert METADATA["language"] == "python" and METADATA["kernel_type"] == "notebook"
    assert METADATA["enable_gpu"] is True and METADATA["machine_shape"] == "NvidiaTeslaT4"  # GPU T4 x2
    assert isinstance(METADATA["is_private"], bool) and METADATA["enable_internet"] is True  # the CLI's default is True
    owner, slug = METADATA["id"].split("/")
    assert owner == kaggle.USERNAME_PLACEHOLDER and METADATA["title"].lower().replace(" ", "-") == slug
    assert METADATA["dataset_sources"] == [f"{kaggle.USERNAME_PLACEHOLDER}/{kaggle.HELPER_DATASET}"]
    (model,) = METADATA["model_sources"]
    owner, model_slug, framework, variation, version = model.split("/")  # the documented 5-part handle
    assert (owner, model_slug, framework) == ("microsoft", "phi-3", "transformers") and version.isdigit()
    assert variation == build_config("kaggle-t4").model.name.split("/")[-1].lower()  # what sources.py matches


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


@pytest.mark.parametrize("resume", [False, True])
def test_the_staged_kernel_passes_the_official_push_validation(tmp_path, kaggle_api, resume):
    api, requests, _ = kaggle_api
    folder = kaggle.build_kernel(tmp_path / "kernel", USER, resume=resume)
    api.kernels_push(str(folder))  # validates ids, sources, language, type, code file; then "sends"
    (request,) = requests
    assert request.slug == f"{USER}/qlora-phi-3-t4-pipeline" and request.new_title == METADATA["title"]
    assert request.enable_gpu and request.enable_internet and request.machine_shape == "NvidiaTeslaT4"
    assert request.dataset_data_sources == [f"{USER}/{kaggle.HELPER_DATASET}"]
    assert request.model_data_sources == METADATA["model_sources"]
    assert request.kernel_data_sources == ([f"{USER}/qlora-phi-3-t4-pipeline"] if resume else [])
    pushed = [c["source"] for c in json.loads(request.text)["cells"]]
    assert pushed == [_code(c) for c in _cells(KERNEL)]


def test_staging_without_a_username_says_how_to_give_one(tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match="KAGGLE_USER="):
        kaggle.kaggle_username()
    (tmp_path / "kaggle.json").write_text(json.dumps({"username": "from-file", "key": "x"}))
    assert kaggle.kaggle_username() == "from-file"


# --------------------------------------------------------------------------- the helper dataset
@pytest.fixture(scope="module")
def offline_dataset(tmp_path_factory):
    """What `make kaggle-dataset WHEELS=1` builds, with the wheels for this interpreter instead of Kaggle's
    Python 3.12 (the same code path; only pip's target differs). pip's cache keeps the downloads to once."""
    out = tmp_path_factory.mktemp("kaggle") / "dataset"
    return kaggle.build_dataset(out, USER, wheels=True, kaggle=False)


def test_the_dataset_holds_the_package_the_installer_and_a_wheel_of_every_pin(offline_dataset):
    (wheel,) = offline_dataset.glob("qlora_helpers-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        packaged = {n for n in zf.namelist() if n.startswith("qlora_helpers/")}
    modules = {f"qlora_helpers/{p.name}" for p in (REPO / "qlora_helpers").glob("*.py")}
    assert modules <= packaged and "qlora_helpers/recipes/kaggle-t4.yaml" in packaged
    assert (offline_dataset / "kaggle_install.py").read_text() == (REPO / "tools" / "kaggle_install.py").read_text()
    shipped = (offline_dataset / "requirements-kaggle.txt").read_text()
    assert shipped == (REPO / "requirements-kaggle.txt").read_text() + (REPO / "requirements-gpu.txt").read_text()
    found = kaggle_install.wheels_for(offline_dataset, kaggle_install.pins(kaggle_install.requirements(
        offline_dataset / "requirements-kaggle.txt")))
    assert all(found.values()), {n: w for n, w in found.items() if w is None}
    assert found["rouge-score"].name == "rouge_score-0.1.2-py3-none-any.whl"  # built: PyPI has only its source
    assert not [p for p in offline_dataset.iterdir() if p.is_dir()]  # `datasets create` skips sub-folders


@pytest.mark.parametrize("name", ["requirements-kaggle.txt", "requirements-gpu.txt"])
def test_the_kaggle_requirements_never_name_torch_or_the_jupyter_machinery(name):
    named = set(kaggle_install.requirements(REPO / name))
    assert not named & set(kaggle_install.PROTECTED)


def test_the_dataset_metadata_passes_the_official_create_validation_private_or_public(tmp_path, kaggle_api, monkeypatch):
    api, requests, extended = kaggle_api
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "dataset-metadata.json").write_text(json.dumps({"id": f"{USER}/{kaggle.HELPER_DATASET}",
                                                               **kaggle.DATASET_METADATA}))

    def not_found(ref):  # "the slug is free"
        raise extended.HTTPError("404")

    monkeypatch.setattr(api, "dataset_status", not_found)
    monkeypatch.setattr(api, "upload_files", lambda *a, **k: None)
    api.dataset_create_new(str(folder), quiet=True)  # title, slug, license and subtitle checks
    api.dataset_create_new(str(folder), public=True, quiet=True)  # `kaggle datasets create --public`
    private, public = requests
    assert (private.owner_slug, private.slug) == (USER, kaggle.HELPER_DATASET)
    assert private.is_private and not public.is_private


# --------------------------------------------------------------------------- installing on top of Kaggle's image
def _image_packages():
    lines = (REPO / "tools" / "kaggle_image.txt").read_text().splitlines()
    return dict(line.split("#")[0].strip().split("==", 1) for line in lines if line and not line.startswith("#"))


def fake_image(folder):
    """A fresh virtual environment holding Kaggle's image as pip sees it: a dist-info (name and version, no
    files) for each package of tools/kaggle_image.txt, torch 2.10.0+cu128 included (torch itself cannot be
    installed cheaply here; pip's resolver only needs to see it installed). Its own pip comes from ensurepip."""
    venv.create(folder, with_pip=True, symlinks=True)
    site = next((folder / "lib").glob("python3*")) / "site-packages"
    own = {kaggle_install.normalize(p.name.split("-")[0]) for p in site.glob("*.dist-info")}
    for name, version in _image_packages().items():
        if kaggle_install.normalize(name) in own:
            continue
        info = site / f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("kaggle-image\n")
        (info / "RECORD").write_text("".join(f"{info.name}/{f},,\n" for f in ("METADATA", "INSTALLER", "RECORD")))
    return folder / "bin" / "python"


def _installed(python):
    code = ("import importlib.metadata as m, json, re; print(json.dumps("
            "{re.sub(r'[-_.]+', '-', d.metadata['Name']).lower(): d.version for d in m.distributions()}))")
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)


def _pip_env():
    """pip as on a plain machine: no config file of this one (find-links, extra indexes, constraints)."""
    env = {k: v for k, v in os.environ.items() if (not k.startswith("PIP_") or k == "PIP_CERT") and k != "PYTHONPATH"}
    return {**env, "PIP_CONFIG_FILE": os.devnull}


def test_the_installer_changes_only_what_requirements_kaggle_names_online_and_offline(offline_dataset, tmp_path):
    python = fake_image(tmp_path / "image")
    image = _installed(python)
    assert image["torch"] == "2.10.0+cu128" and image["pyarrow"] == "18.1.0" and image["ipykernel"] == "6.17.1"
    expected = {n: v for n, v in DELIBERATE.items() if image.get(n) != v}
    installer = [str(python), str(offline_dataset / "kaggle_install.py"), "--dataset", str(offline_dataset)]

    # With the internet (PyPI): pip's plan, without installing.
    report = tmp_path / "report.json"
    proc = subprocess.run(installer + ["--use-index", "--dry-run", str(report)], capture_output=True, text=True,
                          env=_pip_env(), timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    plan = {kaggle_install.normalize(i["metadata"]["name"]): i["metadata"]["version"]
            for i in json.loads(report.read_text())["install"]}
    assert plan == expected

    # Offline: every wheel from the dataset, no index; installed for real.
    proc = subprocess.run(installer, capture_output=True, text=True, env=_pip_env(), timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "from the dataset alone (offline)" in proc.stdout
    after = _installed(python)
    changed = {n: v for n, v in after.items() if image.get(n) != v}
    assert changed == expected, "the install changed something requirements-kaggle.txt does not name"
    for name in kaggle_install.PROTECTED:
        assert after.get(name) == image.get(name), name
