"""qlora_helpers: the thin package behind the numbered QLoRA notebooks.

One-way: ``config`` (the validated config, recipes) -> ``runs``/``places`` (the run directory, where things
live), ``budget`` (the whole run's time budget) and ``adopt`` (an earlier Kaggle session's run, continued) ->
``sources``/``hardware`` (where the model and data come from, the device and dtype) -> ``stage``
(what every notebook starts from) -> one module per stage: ``datafiles``/``data`` (01), ``model``/``preflight``
(02), ``packing``/``train``/``distributed`` (03), ``evaluate``/``export`` (04), ``report`` (05) -> ``pipeline``
and the command line (``__main__``).
"""
from .config import Config, ConfigError, UserError, build_config
from .stage import Stage, start_stage

__all__ = ["Config", "ConfigError", "UserError", "Stage", "build_config", "start_stage"]
__version__ = "0.2.0"
