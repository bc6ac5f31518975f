"""Token lengths (prompt, total) of the real Alpaca sample, for the GPU benchmark's random batches.

    .venv/bin/python benchmarks/alpaca_lengths.py ../shared/data/alpaca_small.json .dev/alpaca_lengths.json

The data stays out of the project: only the lengths are written, to an ignored folder that travels to
the GPU machine. Phi-3's tokenizer cannot be downloaded here, so the embedded model's tokenizer and chat
template stand in (both are ~32-49k-token BPE vocabularies; lengths agree to within a few percent).
"""
import json
import sys
from pathlib import Path

from qlora_helpers import Stage, build_config
from qlora_helpers.data import Formatter, load_tokenizer
from qlora_helpers.datasource import load_raw, to_turns


def main(src: str, dst: str) -> None:
    cfg = build_config("embedded", {"data.source": src})
    fmt = Formatter(load_tokenizer(Stage(cfg)), "chat")
    lengths = []
    rows, _ = load_raw(cfg)
    for row in rows:
        turns, response, key = to_turns(row, "alpaca", cfg)
        enc, _ = fmt.encode(turns, response, key)
        lengths.append([enc["prompt_len"], len(enc["input_ids"])])
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_text(json.dumps(lengths))
    totals = sorted(t for _, t in lengths)
    print(f"{len(lengths)} examples, median {totals[len(totals) // 2]} tokens, p95 {totals[int(0.95 * len(totals))]}, max {totals[-1]}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
