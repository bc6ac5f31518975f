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
from .config import Config, UserError, config_from_params, same_settings
from .hardware import choose_compute_dtype, device_of, hardware
from .runs import CONFIG_FILE, default_run_dir, latest_run_dir, link_latest, load_config, save_config
from .sources import ModelSource, check_sources, model_source, resolve_paths

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
    """A run directory belongs to one set of settings; only how long to train, evaluation and export may change."""
    saved = run_dir / CONFIG_FILE
    if not saved.exists():
        return
    changed = same_settings(cfg, load_config(saved))
    fixed = [k for k in changed if not k.startswith(MAY_CHANGE)]
    if fixed:
        raise UserError(f"run directory {run_dir} was made with other settings ({', '.join(fixed)}); "
                        "use a new RUN_DIR or the same profile and overrides")


def quiet_libraries() -> None:
    """bitsandbytes warns on every CPU load that an optional kernels package is missing: noise for a reader."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


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
    check_same_run(cfg, path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as exc:
        raise UserError(f"run directory {path}: cannot be created ({exc.strerror or exc})") from None
    save_config(cfg, path)
    link_latest(path)
    begin_session(path)  # the time budget counts from the first stage of this session
    return Stage(cfg, path)


def stage_from_run_dir(run_dir: str | Path) -> Stage:
    """The stage for a run directory an earlier stage made (what ``python -m qlora_helpers train`` uses)."""
    run_dir = Path(run_dir).resolve()
    return Stage(load_config(run_dir), run_dir)
