"""qlora_helpers: the thin package behind the numbered QLoRA notebooks.

One module per stage: ``data`` (01), ``model`` (02), ``train`` (03), ``evaluate`` (04) and
``report`` (05); ``config`` holds the one validated config object every helper takes, ``runs``
the run directory they share, ``pipeline`` the papermill runner behind ``python -m qlora_helpers``.
"""
from .config import Config, ConfigError, build_config
from .runs import start_stage

__all__ = ["Config", "ConfigError", "build_config", "start_stage"]
__version__ = "0.1.0"
