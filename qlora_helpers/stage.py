"""What every stage starts from: the validated config, the run directory, and the facts of this machine
(device, compute dtype) and of the model (where it loads from), each resolved once and passed on.

``start_stage`` is the first call of every notebook; the command line builds the same ``Stage``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .adopt import continue_attached_run, writable_run_dir
from .budget import begin_session
from .config import Config, ConfigError, UserError, config_from_params, same_settings, shorten
from .datasource import check_files_unchanged
from .hardware import check_machine, choose_compute_dtype, device_of, hardware
from .runlock import writing
from .runs import (CONFIG_FILE, check_run_dir, claim_run_dir, default_run_dir, latest_run_dir, link_latest, load_config,
                   read_json, require_run_dir, save_config)
from .secrets import HOW_TO_PROVIDE, hf_token
from .sources import ModelSource, check_sources, model_fingerprint, model_source, resolve_paths

# Keys a later session may change on an existing run directory without making it another run: how long to
# train (a resumed run trains further) and what evaluation and export do.
MAY_CHANGE = ("train.max_steps", "train.epochs", "train.max_minutes", "eval.")


@dataclass
class Stage:
    """One stage's view of a run: ``cfg``, ``run_dir``, and the facts resolved from them once, on first use."""
    cfg: Config
    run_dir: Path | None = None

    @cached_property
    def hw(self) -> dict[str, Any]:
        """The device this process uses: GPU name, capability, free memory, bf16 support (or the CPU)."""
        return hardware()

    @cached_property
    def compute_dtype(self) -> str:
        """quant.compute_dtype checked against the hardware (bf16 on a T4 is refused here)."""
        return choose_compute_dtype(self.cfg.quant.compute_dtype, self.hw)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.compute_dtype)

    @property
    def device(self) -> str:
        return device_of(self.hw)

    @cached_property
    def model(self) -> ModelSource:
        """Where the base model loads from (embedded, local, Kaggle input or hub)."""
        return model_source(self.cfg)

    def path(self, *parts: str) -> Path:
        if self.run_dir is None:
            raise UserError("this step needs a run directory (RUN_DIR / --run-dir)")
        return self.run_dir.joinpath(*parts)


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    """RUN_DIR as given (relative to the working directory), else runs/latest (made by the last run), else on
    Kaggle an earlier session's run attached as an input, else a new one. A run directory under /kaggle/input
    (read-only) is first copied to /kaggle/working/runs (qlora_helpers.adopt)."""
    if run_dir:
        return writable_run_dir(Path(run_dir).expanduser().resolve())
    return latest_run_dir() or continue_attached_run() or default_run_dir()


def check_same_run(cfg: Config, run_dir: Path) -> None:
    """A run directory belongs to one set of settings; only how long to train, evaluation and export may change.
    (Whose folder it is was checked first, check_run_dir: a model folder's config.json is not a run's.)"""
    saved = run_dir / CONFIG_FILE
    if not saved.exists():
        return
    changed = same_settings(cfg, load_config(saved))
    fixed = [k for k in changed if not k.startswith(MAY_CHANGE)]
    if fixed:
        raise UserError(f"run directory {run_dir} was made with other settings ({', '.join(fixed)}); "
                        "use a new RUN_DIR or the same profile and overrides")


def steps_done(run_dir: Path) -> int:
    """The step of the newest checkpoint-N folder (its contents are checked when training resumes)."""
    folder = run_dir / "train" / "checkpoints"
    steps = [int(p.name.rsplit("-", 1)[1]) for p in folder.glob("checkpoint-*")
             if p.name.rsplit("-", 1)[1].isdigit()] if folder.is_dir() else []
    return max(steps, default=0)


def check_steps(cfg: Config, run_dir: Path) -> None:
    """train.max_steps may grow on an existing run (it trains further), not fall below the steps trained, and not
    grow past a decaying learning-rate schedule that has ended (at 0; checkpoints.check_schedule_goes_on checks
    train.epochs the same way once the number of steps is known)."""
    done = steps_done(run_dir)
    if cfg.train.max_steps and done > cfg.train.max_steps:
        raise UserError(f"train.max_steps={cfg.train.max_steps}, but run directory {run_dir} has trained {done} "
                        f"steps already (checkpoint-{done}); raise train.max_steps to train further, or use a new RUN_DIR")
    if cfg.train.max_steps > done > 0 and cfg.train.lr_scheduler in ("cosine", "linear"):
        state = read_json(run_dir / "train" / "checkpoints" / f"checkpoint-{done}" / "trainer_state.json", {}) or {}
        if state.get("global_step") == done and state.get("max_steps") == done:
            raise UserError(f"train.max_steps={cfg.train.max_steps}, but run directory {run_dir} finished its "
                            f"{cfg.train.lr_scheduler} learning-rate schedule at step {done} with a learning rate of 0 "
                            f"(checkpoint-{done}); trained further, it would take its next step at a learning rate of 0. "
                            f"To train longer, start a new run with train.max_steps={cfg.train.max_steps} (another "
                            "RUN_DIR), or keep train.max_steps as it was")


def training_started(run_dir: Path) -> str | None:
    """What shows that this run has trained (a checkpoint it can resume from, or a saved adapter), or None."""
    folder = run_dir / "train" / "checkpoints"
    if folder.is_dir() and any(p.name.startswith("checkpoint-") for p in folder.iterdir()):
        return "train/checkpoints"
    return "adapter/" if (run_dir / "adapter").is_dir() else None


def check_apart(cfg: Config, run_dir: Path) -> None:
    """The run directory and the folders the run reads (data.source, model.name) do not overlap: a run reading its
    own output as data would train on its tokenized rows, and a run directory inside a data folder would be read
    as data by the next session."""
    run_dir = run_dir.resolve()
    for key in ("data.source", "model.name"):
        value = cfg.flat()[key]
        if value == "embedded" or not Path(value).expanduser().exists():
            continue
        path = Path(value).expanduser().resolve()
        if path.is_relative_to(run_dir) or run_dir.is_relative_to(path):
            where = "inside the run directory" if path.is_relative_to(run_dir) else "a folder holding the run directory"
            raise UserError(f"config key '{key}': {shorten(str(path), 200)} is {where} {run_dir}; what a run reads "
                            "and what it writes must be apart: choose another RUN_DIR (--run-dir)")


def check_directory(cfg: Config, run_dir: Path) -> None:
    """Everything a run directory must allow before a stage (or the pipeline) writes into it: a folder this tool
    may write into, apart from what the run reads, the same settings as before, no fewer steps than trained, the
    same data files."""
    check_run_dir(run_dir)
    check_apart(cfg, run_dir)
    check_same_run(cfg, run_dir)
    check_steps(cfg, run_dir)
    started = training_started(run_dir)
    check_files_unchanged(cfg, run_dir, started)
    check_model_unchanged(cfg, run_dir, started)


def check_model_unchanged(cfg: Config, run_dir: Path, started: str | None) -> None:
    """A run that has trained goes on from the same base model it started on: another model behind the same
    model.name (a local folder replaced, a newer version attached on Kaggle, the hub's branch moved on) is refused."""
    recorded = (read_json(run_dir / "data" / "fingerprint.json", {}) or {}).get("model")
    if not started or not recorded:
        return
    now = model_fingerprint(model_source(cfg))
    if now != recorded:
        raise UserError(f"model.name '{shorten(cfg.model.name, 200)}': the base model is not the one this run started on "
                        f"({shorten(recorded.get('location'), 120)} then, {shorten(now.get('location'), 120)} now, or its "
                        f"files changed), and run directory {run_dir} has trained on it ({started}); an adapter goes on "
                        "only on its own base. Point model.name at the model it started on, or start a new run")


def training_done(cfg: Config, run_dir: Path) -> bool:
    metrics = read_json(run_dir / "train" / "metrics.json", {}) or {}
    if not isinstance(metrics.get("steps"), int):
        return False
    if cfg.train.max_steps:
        return metrics["steps"] >= cfg.train.max_steps
    return (metrics.get("epochs") or 0) >= cfg.train.epochs - 1e-9


def check_run(stage: "Stage") -> None:
    """What a run directory and this machine must allow before any stage works: a folder this tool may write into,
    the same settings as before, no fewer steps than trained, the same data, and (while training is still to come)
    settings this machine can train with."""
    check_directory(stage.cfg, stage.run_dir)
    if not training_done(stage.cfg, stage.run_dir):
        check_machine(stage.cfg, stage.hw)
    if stage.cfg.eval.push_to_hub.strip() and hf_token() is None:  # notebook 04 would refuse to push
        raise ConfigError(f"config key 'eval.push_to_hub': pushing needs a Hugging Face token: {HOW_TO_PROVIDE}")


def quiet_libraries() -> None:
    """bitsandbytes warns on every CPU load that an optional kernels package is missing: noise for a reader. Run
    unattended (papermill, nbmake, Kaggle's Save Version), the libraries' progress bars are turned off too: in a
    saved notebook a bar is a widget frozen at 0%, since nothing records its updates."""
    import logging

    from .places import in_notebook, interactive

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if in_notebook() and not interactive():
        import functools

        import datasets
        import huggingface_hub.utils
        import tqdm.auto
        import transformers.utils.logging
        from transformers import modeling_gguf_pytorch_utils as gguf_reader

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
        datasets.disable_progress_bars()
        # transformers' GGUF reader (GGUF scoring in stage 04) has a tqdm of its own that the line above misses
        gguf_reader.tqdm = functools.partial(tqdm.auto.tqdm, disable=True)


def start_stage(profile: str, overrides: dict | str | None, run_dir: str | None) -> Stage:
    """Build the validated config from a notebook's parameters cell and find the run directory.

    Relative paths (data.source, model.name, RUN_DIR) mean relative to the working directory: in a notebook
    opened by hand, the folder Jupyter runs it in; under ``python -m qlora_helpers run`` they were made
    absolute already, relative to where the command was typed. The first stage of a run writes
    ``config.json``; later stages check their own parameters against it, so a notebook opened alone behaves
    exactly as in the pipeline.
    """
    quiet_libraries()
    cfg = resolve_paths(config_from_params(profile, overrides))
    check_sources(cfg)  # no internet and nothing attached: stop here, saying what to do
    path = resolve_run_dir(run_dir)
    stage = Stage(cfg, path)
    check_run(stage)  # before anything is written: a refused run changes nothing
    claim_run_dir(path)  # the marker first, then the lock and the config
    with writing(path, "a notebook run by hand"):  # a no-op under the pipeline, which holds the lock already
        check_run(stage)  # again, now that no other run can change the directory
        save_config(cfg, path)
    link_latest(path)
    begin_session(path)  # the time budget counts from the first stage of this session
    return stage


def stage_from_run_dir(run_dir: str | Path) -> Stage:
    """The stage for a run directory an earlier stage made (what ``python -m qlora_helpers train`` uses); a folder
    this tool did not make is refused before anything is read from it."""
    run_dir = require_run_dir(Path(run_dir).resolve())
    return Stage(load_config(run_dir), run_dir)
