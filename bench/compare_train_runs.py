"""Side by side: the `train` runs a device-tool script left in OUT as train_<MODE>_metrics.jsonl.

Per run, the logged steps and the median window rate after the first log (the first includes
start-up and any capture or compile); then the loss of each run at every logged step. With
--stalls (runs logged every step), the steps whose window rate fell under 0.6x the run's median
and the gaps between them: a periodic stall shows as a constant gap.

    python3 bench/compare_train_runs.py $OUT eager eager2 graphs
    python3 bench/compare_train_runs.py --stalls $OUT gc gc_frozen
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
    stalls = sys.argv[1] == "--stalls"
    out, modes = sys.argv[1 + stalls], sys.argv[2 + stalls:]
    runs = {mode: load(out, mode) for mode in modes}
    if stalls:
        for mode, rows in runs.items():
            rates = [r["tokens_per_s"] for r in rows[1:]]
            if not rates:
                print(mode, "no windows logged")
                continue
            med = statistics.median(rates)
            slow = [r["step"] for r in rows[1:] if r["tokens_per_s"] < 0.6 * med]
            print(f"{mode}: {len(rates)} windows, median {med:.0f} tokens/s, p10 "
                  f"{sorted(rates)[len(rates) // 10]:.0f}, min {min(rates):.0f}; windows under 0.6x median: "
                  f"{len(slow)} at steps {slow[:30]} gaps {[b - a for a, b in zip(slow, slow[1:])][:30]}")
        return
    for mode, rows in runs.items():
        rate = statistics.median(r["tokens_per_s"] for r in rows[1:]) if len(rows) > 1 else None
        print(mode, "steps", [r.get("step") for r in rows], "median tokens/s after the first log", rate)
    for records in zip(*runs.values()):
        losses = " ".join(f"{mode} {r['loss']:.5f}" for mode, r in zip(modes, records))
        print(f"step {records[0]['step']}: loss {losses}")


if __name__ == "__main__":
    main()
