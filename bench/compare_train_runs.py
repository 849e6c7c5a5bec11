"""Side by side: the `train` runs a device-tool script left in OUT as train_<MODE>_metrics.jsonl.

Per run, the logged steps and the median window rate after the first log (the first includes
start-up and any capture or compile); then the loss of each run at every logged step.

    python3 bench/compare_train_runs.py $OUT eager eager2 graphs
"""

from __future__ import annotations

import json
import os
import statistics
import sys


def load(out: str, mode: str) -> list[dict]:
    path = os.path.join(out, f"train_{mode}_metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    return [r for r in rows if "loss" in r and "tokens_per_s" in r]  # training records, not validation


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: compare_train_runs.py OUT MODE [MODE ...]")
    out, modes = sys.argv[1], sys.argv[2:]
    runs = {mode: load(out, mode) for mode in modes}
    for mode, rows in runs.items():
        rate = statistics.median(r["tokens_per_s"] for r in rows[1:]) if len(rows) > 1 else None
        print(mode, "steps", [r.get("step") for r in rows], "median tokens/s after the first log", rate)
    for records in zip(*runs.values()):
        losses = " ".join(f"{mode} {r['loss']:.5f}" for mode, r in zip(modes, records))
        print(f"step {records[0]['step']}: loss {losses}")


if __name__ == "__main__":
    main()
