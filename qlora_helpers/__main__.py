"""Command line: ``python -m qlora_helpers run|profiles|check-data|inspect-model ...``.

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
    from .config import PROFILES, build_config

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
    sub.add_parser("profiles", help="list the profiles and every key with its value").set_defaults(func=cmd_profiles)


# Each subcommand registers itself here; keep one add_* function per command.
COMMANDS = [add_run, add_profiles]


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
