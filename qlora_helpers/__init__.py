"""qlora_helpers: the thin package behind the numbered QLoRA notebooks.

One-way: ``config`` (the validated config, recipes) -> ``runs``/``places`` (the run directory, where things
live), ``budget`` (the whole run's time budget) and ``adopt`` (an earlier Kaggle session's run, continued) ->
``sources``/``hardware`` (where the model and data come from, the device and dtype) -> ``datafiles``/``datasource``
(stage 1's input: how a file is read; where data.source points, its rows and their fingerprint, which ``stage``
checks a resumed run against) -> ``stage`` (what every notebook starts from) -> one module per stage: ``data`` (01:
rows to examples), ``model``/``preflight``
(02), ``packing``/``train``/``distributed`` (03), ``evaluate``/``export`` (04), ``report`` (05) -> ``pipeline``
and the command line (``__main__``).
"""
from .config import Config, ConfigError, UserError, build_config
from .stage import Stage, start_stage

__all__ = ["Config", "ConfigError", "UserError", "Stage", "build_config", "start_stage"]
__version__ = "0.2.0"
