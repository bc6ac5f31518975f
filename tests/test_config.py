import json

import pytest

from qlora_helpers.config import PROFILES, ConfigError, build_config, load_config

from conftest import REPO, run_cli


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_profile_builds_and_round_trips(profile, tmp_path):
    cfg = build_config(profile)
    cfg.save(tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg


def test_overrides_are_typed():
    cfg = build_config("embedded", ["lora.r=8", "train.packing=false", "train.learning_rate=1e-3", "data.source=x.json"])
    assert cfg.lora.r == 8 and cfg.train.packing is False and cfg.train.learning_rate == 1e-3
    assert cfg.data.source == "x.json"


@pytest.mark.parametrize("profile", ["kaggle-t4", "kaggle-t4-seed"])
def test_kaggle_profiles_target_phi3_fused_projections_in_fp16(profile):
    cfg = build_config(profile)
    assert cfg.model.name == "microsoft/Phi-3-mini-4k-instruct" and cfg.data.source == "yahma/alpaca-cleaned"
    assert cfg.lora.target_modules == "qkv_proj,o_proj,gate_up_proj,down_proj"
    assert cfg.quant.compute_dtype == "float16" and cfg.quant.mode == "nf4" and cfg.quant.double_quant
    assert (cfg.lora.r, cfg.lora.alpha) == (32, 64) and cfg.train.optim == "paged_adamw_8bit"
    assert (cfg.train.learning_rate, cfg.train.lr_scheduler) == (1e-4, "cosine")
    assert (cfg.data.train_size, cfg.data.val_size) == (4000, 1000)


def test_the_seed_recipe_profile_is_the_seed_report_with_corrected_targets():
    cfg = build_config("kaggle-t4-seed")
    assert cfg.lora.dropout == 0.1 and not cfg.train.packing
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.max_steps) == (1, 8, 120)


# The GPU benchmark's committed run (issue 9): each speed profile must be exactly the recipe measured there.
BENCH = REPO / "benchmarks" / "results" / "gpu_bench-h200-2026-11-29b.json"
# Keys the benchmark set for its own timing (steps, logging, evaluation, checkpoints), not the recipe.
BENCH_ONLY = ("train.max_steps", "train.logging_steps", "train.eval_steps", "train.save_steps", "train.max_minutes",
              "train.seed")


@pytest.mark.parametrize("profile, recipe", [("kaggle-t4", "t4-b64-rows1024"), ("gpu-fast", "fast-bf16"),
                                             ("low-memory", "low-memory")])
def test_speed_profiles_are_the_recipes_the_gpu_benchmark_measured(profile, recipe):
    measured = {r["recipe"]: r for r in json.loads(BENCH.read_text())["recipes"]}[recipe]
    flat = build_config(profile).flat()
    differ = {k: (flat[k], v) for k, v in measured["config"].items() if k not in BENCH_ONLY and flat[k] != v}
    assert not differ, f"{profile} differs from the measured {recipe} (profile, measured): {differ}"


def test_row_packing_with_flex_attention_is_refused():
    with pytest.raises(ConfigError, match="train.packing_row_tokens=0"):
        build_config("gpu-fast", {"train.packing_row_tokens": 1024})


@pytest.mark.parametrize("override, fragment", [
    ("lora.r=abc", "config key 'lora.r': expected int, got 'abc'"),
    ("no_such_key=1", "unknown config key 'no_such_key'"),
    ("lora.rank=4", "unknown config key 'lora.rank'"),
    ("train.packing=maybe", "config key 'train.packing': expected bool"),
    ("quant.mode=nf3", "config key 'quant.mode': 'nf3' is not one of"),
    ("lora.r=0", "config key 'lora.r': must be > 0"),
    ("noequals", "expected key=value"),
])
def test_bad_override_is_an_error_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        build_config("embedded", [override])
    assert fragment in str(err.value)


def test_save_steps_must_be_a_multiple_of_eval_steps():
    with pytest.raises(ConfigError, match="save_steps must be a multiple of eval_steps"):
        build_config("embedded", {"train.save_steps": 10, "train.eval_steps": 4})


@pytest.mark.parametrize("override, key", [("lora.r=abc", "lora.r"), ("no_such_key=1", "no_such_key")])
def test_cli_rejects_a_bad_override_at_once_in_one_line(override, key, tmp_path):
    proc = run_cli("run", "--run-dir", str(tmp_path / "run"), "-p", override, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_profile(tmp_path):
    proc = run_cli("run", "--profile", "nope", "--run-dir", str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "unknown profile 'nope'" in proc.stderr


def test_profiles_command_lists_every_key():
    proc = run_cli("profiles", timeout=60)
    assert proc.returncode == 0
    for key in build_config("embedded").flat():
        assert key in proc.stdout


def test_readme_keys_table_is_the_generated_one():
    from conftest import REPO
    from qlora_helpers.config import keys_table

    readme = (REPO / "README.md").read_text()
    assert keys_table() in readme, "README.md's keys table is stale: paste `python -m qlora_helpers profiles --markdown`"
    for key in build_config("embedded").flat():
        assert key == "profile" or f"`{key}`" in readme
