"""Command line: ``python -m qlora_helpers run|check-data|inspect-model ...``."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_helpers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the numbered notebooks in order with papermill")
    run.add_argument("--profile", default="embedded")
    run.add_argument("--run-dir", default="")
    run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. -p lora.r=8 (repeatable)")
    run.add_argument("--kernel", default="python3")
    sub.add_parser("profiles", help="list the profiles and every key with its value")
    args = parser.parse_args(argv)

    from .config import ConfigError, build_config, parse_overrides, PROFILES

    try:
        if args.command == "profiles":
            for name in PROFILES:
                print(f"[{name}]")
                for k, v in build_config(name).flat().items():
                    print(f"  {k} = {v!r}")
            return 0
        if args.command == "run":
            overrides = parse_overrides(args.param)
            cfg = build_config(args.profile, overrides)  # fail here, in a second, not in a notebook
            from .pipeline import StageFailed, run_pipeline
            from .runs import default_run_dir

            run_dir = args.run_dir or str(default_run_dir())
            try:
                out = run_pipeline(cfg, overrides, run_dir, kernel=args.kernel)
            except StageFailed as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(f"[qlora] run finished: {out}/report.md, {out}/summary.json")
            return 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
