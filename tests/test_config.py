import json

import pytest

from qlora_helpers.config import ConfigError, build_config, profile_names
from qlora_helpers.runs import load_config, save_config

from conftest import REPO, run_cli


@pytest.mark.parametrize("profile", profile_names())
def test_every_profile_builds_and_round_trips(profile, tmp_path):
    cfg = build_config(profile)
    save_config(cfg, tmp_path)
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


# The GPU benchmark's committed runs (issue 16): each speed profile must be exactly the recipe measured there.
RESULTS = REPO / "benchmarks" / "results"
# Keys the benchmark set for its own timing (steps, logging, evaluation, checkpoints), not the recipe.
BENCH_ONLY = ("train.max_steps", "train.epochs", "train.logging_steps", "train.eval_steps", "train.save_steps",
              "train.max_minutes", "train.seed")


HEADLINE = "gpu_bench-h200-2026-12-02.json"  # one launch: every profile beside Unsloth's row of its kind


@pytest.mark.parametrize("profile", ["kaggle-t4", "gpu-fast", "low-memory"])
def test_speed_profiles_are_the_recipes_the_gpu_benchmark_measured(profile):
    measured = {r["recipe"]: r for r in json.loads((RESULTS / HEADLINE).read_text())["recipes"]}[profile]
    flat = build_config(profile).flat()
    differ = {k: (flat.get(k), v) for k, v in measured["config"].items()
              if k not in BENCH_ONLY and flat.get(k) != v}
    assert not differ, f"{profile} differs from the run measured in {HEADLINE} (profile, measured): {differ}"
    assert measured.get("peak_reserved_gib")


def test_the_headline_launch_holds_every_figure_the_readme_quotes():
    """Issue 16's targets, read from the one committed launch the README's GPU table comes from."""
    launch = json.loads((RESULTS / HEADLINE).read_text())
    rows = {r["recipe"]: r for r in launch["recipes"]}
    tps = {name: r["tokens_per_s"] for name, r in rows.items()}
    assert tps["kaggle-t4"] / tps["unsloth-t4"] >= 2.0
    assert rows["kaggle-t4"]["peak_reserved_gib"] <= 14.0 and rows["kaggle-t4"]["cap_gib"] == 15.0
    assert tps["gpu-fast"] / tps["unsloth-fast"] >= 2.0 and rows["gpu-fast"]["mfu"] >= 0.40
    assert rows["low-memory"]["peak_reserved_gib"] <= 3.3 and tps["low-memory"] >= 1000
    assert all(r["config"]["lora.target_modules"] == "qkv_proj,o_proj,gate_up_proj,down_proj"
               for name, r in rows.items() if not name.startswith("unsloth"))


@pytest.mark.parametrize("overrides, fragment", [
    ({"train.micro_batch_tokens": 640, "train.micro_batch_size": 4}, "train.micro_batch_size=1"),
    ({"train.micro_batch_tokens": 640, "train.micro_batch_size": 1, "train.packing": False}, "train.packing=true"),
    ({"train.micro_batch_tokens": 256, "train.micro_batch_size": 1, "train.packing_row_tokens": 0},
     "train.micro_batch_tokens >= data.max_seq_len"),
])
def test_a_token_budget_micro_batch_is_one_packed_row_that_holds_any_example(overrides, fragment):
    with pytest.raises(ConfigError, match="train.micro_batch_tokens") as err:
        build_config("kaggle-t4", overrides)
    assert fragment in str(err.value)


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
    ("train.learning_rate=nan", "config key 'train.learning_rate': must be a finite number"),
    ("train.weight_decay=nan", "config key 'train.weight_decay': must be a finite number"),
    ("train.max_minutes=inf", "config key 'train.max_minutes': must be a finite number"),
    ("train.warmup_ratio=5", "config key 'train.warmup_ratio': must be < 1"),
    ("train.optim=adamx", "config key 'train.optim': 'adamx' is not an optimizer transformers knows"),
    ("train.seed=-1", "config key 'train.seed': must be >= 0"),
    ("eval.num_prompts=0", "config key 'eval.num_prompts': must be > 0"),
    ("lora.target_modules=,", "config key 'lora.target_modules': no names in it"),
    ("data.source=", "config key 'data.source': must not be empty"),
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
    proc = run_cli("run", "--run-dir", str(tmp_path / "run"), "-p", override)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_profile(tmp_path):
    proc = run_cli("run", "--profile", "nope", "--run-dir", str(tmp_path))
    assert proc.returncode == 2 and "unknown profile 'nope'" in proc.stderr


def test_profiles_command_lists_every_key():
    proc = run_cli("profiles")
    assert proc.returncode == 0
    for key in build_config("embedded").flat():
        assert key in proc.stdout


def test_the_documented_keys_table_is_the_generated_one():
    from qlora_helpers.config import keys_table

    doc = (REPO / "docs" / "configuration.md").read_text()
    assert keys_table() in doc, "docs/configuration.md's keys table is stale: paste `python -m qlora_helpers profiles --markdown`"
    for key in build_config("embedded").flat():
        assert key == "profile" or f"`{key}`" in doc


def test_a_copied_recipe_file_runs_with_overrides_on_top(tmp_path):
    from qlora_helpers.config import RECIPE_DIR

    mine = tmp_path / "my.yaml"
    mine.write_text((RECIPE_DIR / "kaggle-t4.yaml").read_text().replace("r: 32", "r: 8"))
    cfg = build_config(str(mine), ["lora.alpha=16"])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.model.name) == (8, 16, "microsoft/Phi-3-mini-4k-instruct")
    assert cfg.profile == str(mine)
    based = tmp_path / "based.yaml"
    based.write_text("base: gpu-fast\ntrain:\n  epochs: 2\n")
    assert build_config(str(based)).train.epochs == 2 and build_config(str(based)).quant.compute_dtype == "bfloat16"


@pytest.mark.parametrize("text, fragment", [
    ("lora:\n  rank: 8\n", "unknown config key 'lora.rank' in"),
    ("lora:\n  r: eight\n", "config key 'lora.r' in"),
    ("loras:\n  r: 8\n", "unknown section 'loras'"),
    ("lora: [1, 2\n", "not valid YAML"),
    ("- just a list\n", "a recipe is a mapping"),
    ("base: no-such-profile\n", "unknown profile 'no-such-profile'"),
])
def test_a_bad_recipe_file_is_one_line_naming_the_file_and_key(tmp_path, text, fragment):
    mine = tmp_path / "my.yaml"
    mine.write_text(text)
    with pytest.raises(ConfigError) as err:
        build_config(str(mine))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_the_cli_takes_a_recipe_file(tmp_path):
    mine = tmp_path / "my.yaml"
    mine.write_text("base: test\nlora:\n  r: zero\n")
    proc = run_cli("run", "--config", str(mine), "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2 and "config key 'lora.r' in" in proc.stderr and str(mine) in proc.stderr
