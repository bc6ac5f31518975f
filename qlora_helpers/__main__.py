"""Command line: ``python -m qlora_helpers run|profiles|check-data|inspect-model|train ...``.

Every user mistake (a bad key, a bad file, a target name that matches nothing) ends as one line on
stderr and a non-zero exit, never a traceback. Relative paths mean relative to where the command is typed.
"""
from __future__ import annotations

import argparse
import os
import sys


def _param_option(p, example: str) -> None:
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key, e.g. -p {example} (repeatable)")


def _recipe_options(p) -> None:
    p.add_argument("--profile", default="embedded", help="a shipped profile (see `profiles`)")
    p.add_argument("--config", default="", metavar="FILE.yaml", help="your own recipe file (instead of --profile)")


def _profile(args) -> str:
    return args.config or args.profile


def add_run(sub) -> None:
    def run(args) -> int:
        from .config import parse_overrides
        from .pipeline import resolve_run_request, run_pipeline

        cfg, _, overrides, run_dir = resolve_run_request(_profile(args), parse_overrides(args.param), args.run_dir)
        try:
            out = run_pipeline(cfg, overrides, run_dir, kernel=args.kernel)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"to resume, run the same command with --run-dir {run_dir}") from None
        print(f"[qlora] run finished: {out}/report.md, {out}/summary.json")
        return 0

    p = sub.add_parser("run", help="run the numbered notebooks in order with papermill")
    _recipe_options(p)
    p.add_argument("--run-dir", default="", help="where the run's files go (default: a new folder under runs/)")
    _param_option(p, "lora.r=8")
    p.add_argument("--kernel", default="python3")
    p.set_defaults(func=run)


def add_profiles(sub) -> None:
    def profiles(args) -> int:
        from .config import build_config, keys_table, profile_names, recipe_path

        if args.markdown:
            print(keys_table())
            return 0
        for name in profile_names():
            print(f"[{name}]  ({recipe_path(name)})")
            for k, v in build_config(name).flat().items():
                print(f"  {k} = {v!r}")
        return 0

    p = sub.add_parser("profiles", help="list the profiles and every key with its value")
    p.add_argument("--markdown", action="store_true", help="print the table of every key in every profile (docs/)")
    p.set_defaults(func=profiles)


def add_check_data(sub) -> None:
    """``check-data PATH``: read, validate, clean and tokenize a data set without training, to trust it first."""
    def check_data(args) -> int:
        from .config import build_config, parse_overrides
        from .data import check_data, load_tokenizer
        from .datasource import check_source
        from .sources import check_sources, resolve_paths
        from .stage import Stage

        overrides = {**parse_overrides(args.param), "data.source": args.path, "model.name": args.model}
        if args.format:
            overrides["data.format"] = args.format
        if args.max_seq_len:
            overrides["data.max_seq_len"] = args.max_seq_len
        stage = Stage(resolve_paths(build_config("embedded", overrides)))
        check_sources(stage.cfg)  # offline: one line in seconds, not a minute of retries
        source = check_source(stage.cfg)  # a malformed file fails here, before a tokenizer is loaded
        print(check_data_text(check_data(source, stage.cfg, load_tokenizer(stage))))
        return 0

    p = sub.add_parser("check-data", help="check a data file or folder: rows read, kept, dropped by reason, token lengths")
    p.add_argument("path", help="a .json/.jsonl/.csv/.parquet file, a folder of them, a hub dataset id, or 'embedded'")
    p.add_argument("--format", choices=("alpaca", "pairs", "chat"), default="", help="default: detected from the columns")
    p.add_argument("--model", default="embedded", help="whose tokenizer and chat template to use (default: the embedded model)")
    p.add_argument("--max-seq-len", type=int, default=0, help="longest example in tokens (default: data.max_seq_len)")
    _param_option(p, "data.prompt_column=question")
    p.set_defaults(func=check_data)


def check_data_text(metrics: dict) -> str:
    """The ``check-data`` report for a terminal."""
    lengths = metrics["lengths"]
    share = lengths["response_token_share"]
    lines = [f"source: {metrics['source']} ({metrics['format']} format, {metrics['template']} template, "
             f"end-of-turn token {metrics['end_token']!r} trained on)",
             f"rows read: {metrics['rows_read']:,}",
             f"rows kept: {metrics['rows_kept']:,}",
             f"rows dropped: {metrics['rows_dropped']:,}",
             *[f"  {reason}: {n:,}" for reason, n in metrics["dropped_by_reason"].items()],
             f"responses truncated: {metrics['truncated']:,} (data.too_long={metrics['too_long']})",
             f"rows holding a special token's text (kept, tokenized as text): {metrics['rows_with_special_token_text']:,}",
             f"tokens per example (max_seq_len {metrics['max_seq_len']}): min {lengths['min']}, "
             + ", ".join(f"{p} {lengths[p]}" for p in ("p50", "p90", "p95", "p99")) + f", max {lengths['max']}",
             f"tokens that carry the loss: {share:.1%} response, {1 - share:.1%} prompt "
             f"({lengths['response_tokens']:,} / {lengths['prompt_tokens']:,})"]
    return "\n".join(lines)


def add_inspect_model(sub) -> None:
    """``inspect-model --model SPEC``: linear layer names, LoRA coverage, parameters and weight memory,
    before a long load; with --random-weights only config.json is read (nothing else is downloaded)."""
    def inspect(args) -> int:
        import json

        from .config import build_config, parse_overrides
        from .inspect_model import inspect_model, inspect_model_text
        from .sources import check_sources, resolve_paths
        from .stage import Stage, quiet_libraries

        quiet_libraries()
        overrides = {**parse_overrides(args.param), "model.name": args.model}
        for key, value in (("lora.target_modules", args.target_modules), ("lora.r", args.r), ("quant.mode", args.quant)):
            if value:
                overrides[key] = value
        stage = Stage(resolve_paths(build_config(_profile(args), overrides)))
        check_sources(stage.cfg, data=False)  # offline: one line in seconds, not a minute of retries
        report = inspect_model(stage, random_weights=args.random_weights)
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
    _recipe_options(p)
    _param_option(p, "lora.use_dora=true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=inspect)


def add_train(sub) -> None:
    """``train --run-dir DIR``: notebook 03 alone, on a run directory notebooks 01 and 02 made; what each process
    of ``accelerate launch --num_processes 2 -m qlora_helpers train --run-dir DIR`` runs (qlora_helpers.distributed)."""
    def train(args) -> int:
        import json

        from .distributed import launched_processes, run_training_notebook

        metrics = run_training_notebook(args.run_dir, kernel=args.kernel)
        if int(os.environ.get("RANK") or 0) == 0:
            where = f" on {launched_processes()} processes" if launched_processes() else ""
            print(f"[qlora] training finished{where}: "
                  f"{json.dumps({k: v for k, v in metrics.items() if k not in ('memory', 'time_budget')})}")
        return 0

    p = sub.add_parser("train", help="run only notebook 03 (training) on an existing run directory "
                                     "(under accelerate launch: in every process)")
    p.add_argument("--run-dir", required=True, help="a run directory that notebooks 01 and 02 made")
    p.add_argument("--kernel", default="python3")
    p.set_defaults(func=train)


# Each subcommand registers itself here; keep one add_* function per command.
COMMANDS = [add_run, add_profiles, add_check_data, add_inspect_model, add_train]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_helpers", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (or set QLORA_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    for command in sub.choices.values():  # `--debug` after the command name works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return reporting_errors(lambda: args.func(args), args.command, args.debug)


def reporting_errors(work, command: str, debug: bool = False) -> int:
    """Run a command's work; every way out is one line on stderr and an exit status, unless --debug (or
    QLORA_DEBUG=1) asks for the traceback."""
    debug = debug or os.environ.get("QLORA_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return work()
    except BaseException as exc:  # noqa: BLE001 - every way out is one line, unless --debug asks for the traceback
        if debug or isinstance(exc, SystemExit):
            raise
        message, status = one_line(exc, command)
        close_progress_bars()
        # After Ctrl-C the terminal's cursor sits after "^C": the line starts afresh.
        print(("\n" if status == 130 else "") + f"error: {message}", file=sys.stderr)
        return status


def close_progress_bars() -> None:
    """A progress bar left open by the error (training's, evaluation's) would redraw itself after the error line
    when the process exits; closed first, the error is the last line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error
            pass


MESSAGE_LIMIT = 2000


def one_line(exc: BaseException, command: str) -> tuple[str, int]:
    """What the user reads when a command stops, and its exit status: 2 for a mistake they can fix (a setting,
    a file, the disk), 130 for Ctrl-C, 1 for anything else (a bug: --debug shows where)."""
    from .config import UserError, shorten
    from .runs import failed_write

    if isinstance(exc, KeyboardInterrupt):
        hint = exc.args[0] if exc.args else "run the same command again to resume" if command == "train" else ""
        return "interrupted (Ctrl-C)" + (f"; {hint} (training carries on from its last checkpoint)" if hint else ""), 130
    if isinstance(exc, UserError):  # each message bounds what it echoes; this bounds the line whatever slipped through
        return shorten(" ".join(str(exc).split("\n")), MESSAGE_LIMIT), 1 if type(exc).__name__ == "StageFailed" else 2
    if failed_write(exc) and not isinstance(exc, OSError):
        return f"a file could not be written ({str(exc).strip().splitlines()[0][:160]}): the disk is probably full", 2
    if isinstance(exc, OSError) and exc.errno is not None:  # a full disk, no permission, a missing file
        where = f"{shorten(str(exc.filename), 200)}: " if exc.filename else ""
        return f"{where}{exc.strerror} (errno {exc.errno}); run with --debug for the traceback", 2
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first} (unexpected: run with --debug for the traceback)", 1


if __name__ == "__main__":
    sys.exit(main())
