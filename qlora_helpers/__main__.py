"""Command line: ``python -m qlora_helpers run|profiles|check-data|inspect-model|train ...``.

Every user mistake (a bad key, a bad file, a target name that matches nothing) ends as one line on
stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import sys


def cmd_run(args) -> int:
    from .config import build_config, parse_overrides
    from .pipeline import StageFailed, run_pipeline
    from .runs import default_run_dir

    overrides = parse_overrides(args.param)
    cfg = build_config(args.profile, overrides)  # fail here, in a second, not inside a notebook
    run_dir = args.run_dir or str(default_run_dir())
    try:
        out = run_pipeline(cfg, overrides, run_dir, kernel=args.kernel)
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"[qlora] run finished: {out}/report.md, {out}/summary.json")
    return 0


def cmd_profiles(args) -> int:
    from .config import PROFILES, build_config, keys_table

    if args.markdown:
        print(keys_table())
        return 0
    for name in PROFILES:
        print(f"[{name}]")
        for k, v in build_config(name).flat().items():
            print(f"  {k} = {v!r}")
    return 0


def add_run(sub) -> None:
    p = sub.add_parser("run", help="run the numbered notebooks in order with papermill")
    p.add_argument("--profile", default="embedded")
    p.add_argument("--run-dir", default="")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. -p lora.r=8 (repeatable)")
    p.add_argument("--kernel", default="python3")
    p.set_defaults(func=cmd_run)


def add_profiles(sub) -> None:
    p = sub.add_parser("profiles", help="list the profiles and every key with its value")
    p.add_argument("--markdown", action="store_true", help="print the table of every key in every profile (the README's)")
    p.set_defaults(func=cmd_profiles)


def add_check_data(sub) -> None:
    """``check-data PATH``: read, validate, clean and tokenize a data set without training, to trust it first."""
    def run_check_data(args) -> int:
        from .config import ConfigError, build_config, parse_overrides
        from .data import check_data, check_data_text, check_source
        from .model import load_tokenizer

        overrides = {**parse_overrides(args.param), "data.source": args.path, "model.name": args.model}
        if args.format:
            overrides["data.format"] = args.format
        if args.max_seq_len:
            overrides["data.max_seq_len"] = args.max_seq_len
        cfg = build_config("embedded", overrides)
        source = check_source(cfg)  # a malformed file fails here, before a tokenizer is loaded
        try:
            tokenizer = load_tokenizer(cfg)
        except OSError as exc:
            raise ConfigError(f"--model '{args.model}': could not load its tokenizer ({str(exc).splitlines()[0][:200]})") from None
        print(check_data_text(check_data(source, cfg, tokenizer)))
        return 0

    p = sub.add_parser("check-data", help="check a data file or folder: rows read, kept, dropped by reason, token lengths")
    p.add_argument("path", help="a .json/.jsonl/.csv/.parquet file, a folder of them, a hub dataset id, or 'embedded'")
    p.add_argument("--format", choices=("alpaca", "pairs", "chat"), default="", help="default: detected from the columns")
    p.add_argument("--model", default="embedded", help="whose tokenizer and chat template to use (default: the embedded model)")
    p.add_argument("--max-seq-len", type=int, default=0, help="longest example in tokens (default: data.max_seq_len)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. -p data.prompt_column=question (repeatable)")
    p.set_defaults(func=run_check_data)


def add_inspect_model(sub) -> None:
    """``inspect-model --model SPEC``: linear layer names, LoRA coverage, parameters and weight memory,
    before a long load; with --random-weights only config.json is read (nothing else is downloaded)."""
    def inspect_model(args) -> int:
        import json
        import logging

        from .config import build_config, parse_overrides
        # bitsandbytes (imported by PEFT) warns on every bf16 CPU that an optional kernel package is missing
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        from .model import inspect_model, inspect_model_text

        overrides = {**parse_overrides(args.param), "model.name": args.model}
        for key, value in (("lora.target_modules", args.target_modules), ("lora.r", args.r), ("quant.mode", args.quant)):
            if value:
                overrides[key] = value
        report = inspect_model(build_config(args.profile, overrides), random_weights=args.random_weights)
        print(json.dumps(report, indent=2) if args.json else inspect_model_text(report))
        return 0

    p = sub.add_parser("inspect-model", help="a model's linear layers, LoRA coverage, parameters and weight memory")
    p.add_argument("--model", required=True, help="a hub id, a local folder (config.json alone will do with --random-weights), "
                                                  "a .gguf file, or 'embedded'")
    p.add_argument("--random-weights", action="store_true",
                   help="build the architecture from its config on the meta device: no weights downloaded or allocated")
    p.add_argument("--target-modules", default="", help="comma-separated LoRA targets (default: the profile's, all-linear)")
    p.add_argument("--r", type=int, default=0, help="LoRA rank (default: the profile's)")
    p.add_argument("--quant", choices=("nf4", "fp4", "int8", "none"), default="", help="quantization (default: the profile's, nf4)")
    p.add_argument("--profile", default="embedded", help="the profile whose LoRA and quantization settings to start from")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. -p lora.use_dora=true (repeatable)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=inspect_model)


def add_train(sub) -> None:
    """``train --run-dir DIR``: only the training stage, on a run directory notebooks 01 and 02 made; what
    ``accelerate launch --num_processes 2 -m qlora_helpers train --run-dir DIR`` runs on each GPU."""
    def run_train(args) -> int:
        import json

        from accelerate import PartialState

        from .train import train_stage

        metrics = train_stage(args.run_dir)
        if PartialState().is_main_process:  # the Trainer has set up the process group by now
            print(f"[qlora] training finished: {json.dumps({k: v for k, v in metrics.items() if k != 'memory'})}")
        return 0

    p = sub.add_parser("train", help="run only the training stage on an existing run directory (under accelerate launch: on every GPU)")
    p.add_argument("--run-dir", required=True, help="a run directory holding config.json and data/ (notebooks 01 and 02)")
    p.set_defaults(func=run_train)


# Each subcommand registers itself here; keep one add_* function per command.
COMMANDS = [add_run, add_profiles, add_check_data, add_inspect_model, add_train]


def main(argv: list[str] | None = None) -> int:
    from .config import UserError

    parser = argparse.ArgumentParser(prog="python -m qlora_helpers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
