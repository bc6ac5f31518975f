"""Where the model and data come from: attached copies under /kaggle/input beat the hub, and no internet stops a
stage at once, saying what to do."""
import json

import pytest

from qlora_helpers import build_config, sources
from qlora_helpers.config import UserError


def _touch(path, text="[]"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_an_attached_dataset_is_found_by_the_words_of_the_hub_name(tmp_path):
    _touch(tmp_path / "qlora-helpers" / "dataset-metadata.json", "{}")
    assert sources.kaggle_input_dataset("yahma/alpaca-cleaned", tmp_path) is None
    wanted = _touch(tmp_path / "my-copy" / "alpaca_data_cleaned.json")
    assert sources.kaggle_input_dataset("yahma/alpaca-cleaned", tmp_path) == wanted
    folder = tmp_path / "datasets" / "someone" / "dolly-15k"
    _touch(folder / "data" / "train.parquet")
    assert sources.kaggle_input_dataset("databricks/dolly-15k", tmp_path) == folder / "data"
    assert sources.kaggle_input_dataset("yahma/alpaca-cleaned", tmp_path / "missing") is None


def test_stage_one_reads_the_attached_copy_and_says_so(tmp_path, monkeypatch):
    from qlora_helpers.datasource import load_raw

    rows = [{"instruction": "Say hi.", "input": "", "output": "hi"}]
    copy = _touch(tmp_path / "input" / "alpaca-cleaned" / "alpaca_data_cleaned.json", json.dumps(rows))
    monkeypatch.setenv("QLORA_KAGGLE_ROOT", str(tmp_path))
    loaded, label = load_raw(build_config("kaggle-t4"))
    assert loaded == rows and str(copy) in label and "Kaggle input" in label


@pytest.fixture
def offline(monkeypatch):
    """No hub. check_sources then switches the libraries to their caches (environment and module flags): all
    of it is put back after the test."""
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(sources, "hub_reachable", lambda: False)
    monkeypatch.setattr(sources, "in_hub_cache", lambda repo_id, repo_type: False)
    monkeypatch.setattr(sources, "kaggle_input_model", lambda name: None)
    monkeypatch.setattr(sources, "kaggle_input_dataset", lambda source: None)


def test_without_internet_and_nothing_attached_the_first_cell_says_what_to_do(offline, tmp_path, monkeypatch):
    from qlora_helpers.stage import start_stage

    with pytest.raises(sources.HubUnreachable) as err:
        start_stage("kaggle-t4", {}, str(tmp_path / "run"))
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, UserError)
    assert "model.name 'microsoft/Phi-3-mini-4k-instruct'" in message and "data.source 'yahma/alpaca-cleaned'" in message
    assert "Add Input > Models" in message and "Settings > Internet" in message
    assert not (tmp_path / "run" / "config.json").exists()


def test_attached_or_local_sources_need_no_hub(offline, monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "kaggle_input_model", lambda name: tmp_path)
    cfg = build_config("kaggle-t4")
    assert sources.hub_sources(cfg) == ["data.source"]
    monkeypatch.setattr(sources, "kaggle_input_dataset", lambda source: tmp_path)
    sources.check_sources(cfg)
    # a missing local file is stage 1's own error (DataError naming the file), not "no internet"
    sources.check_sources(build_config("test", {"data.source": str(tmp_path / "missing.jsonl")}))


def test_embedded_sources_never_touch_the_network(monkeypatch):
    monkeypatch.setattr(sources, "hub_reachable", lambda: pytest.fail("checked the network"))
    sources.check_sources(build_config("test"))


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
    sources.hub_reachable.cache_clear()
    assert sources.hub_reachable() is False and tried == [(("huggingface.co", 443), 3.0)]
    sources.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sources.hub_reachable() is False and len(tried) == 1
    sources.hub_reachable.cache_clear()
