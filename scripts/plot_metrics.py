"""Draw a training run's loss and ponder curves from its metrics.jsonl into a PNG.

    python scripts/plot_metrics.py --metrics OUT_DIR/metrics.jsonl --out curves.png

Top panel: train loss (and validation loss where the run recorded one) vs optimizer step;
bottom panel: mean ponder steps vs step. Needs matplotlib (`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hierarchos.cli import OneLineParser  # noqa: E402
from hierarchos.errors import HierarchosError  # noqa: E402

ERR_NO_MATPLOTLIB = "plot_metrics needs matplotlib, which is not installed: pip install matplotlib"


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def read_metrics(path: Path) -> dict[str, list[tuple[float, float]]]:
    """(step, value) series for loss, val_loss and ponder; records without a step are skipped.
    A resumed run appends steps it already logged: the later record for a step wins."""
    if not path.is_file():
        raise HierarchosError(f"metrics file not found: {path}")
    series: dict[str, dict[float, float]] = {"loss": {}, "val_loss": {}, "ponder": {}}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line_no, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise HierarchosError(f"{path} line {line_no}: malformed JSON ({exc.msg})") from None
            if not isinstance(record, dict) or _number(record.get("step")) is None:
                continue
            step = _number(record["step"])
            for key, points in series.items():
                value = _number(record.get(key))
                if value is not None:
                    points[step] = value
    if not series["loss"] and not series["ponder"]:
        raise HierarchosError(f"{path}: no records with 'step' and 'loss' or 'ponder'; "
                              "pass the metrics.jsonl a training run wrote")
    return {key: sorted(points.items()) for key, points in series.items()}


def plot(series: dict[str, list[tuple[float, float]]], out: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise HierarchosError(ERR_NO_MATPLOTLIB) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axes, ponder_axes) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for key, label, style in (("loss", "train loss", "-"), ("val_loss", "val loss", "o-")):
        if series[key]:
            steps, values = zip(*series[key])
            loss_axes.plot(steps, values, style, label=label)
    loss_axes.set_ylabel("loss (nats/token)")
    loss_axes.legend()
    loss_axes.grid(alpha=0.3)
    loss_axes.set_title(title)
    if series["ponder"]:
        steps, values = zip(*series["ponder"])
        ponder_axes.plot(steps, values, color="tab:green", label="mean ponder steps")
        ponder_axes.legend()
    ponder_axes.set_ylabel("ponder steps")
    ponder_axes.set_xlabel("optimizer step")
    ponder_axes.grid(alpha=0.3)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", required=True, help="metrics.jsonl written by `train` in its --out-dir")
    parser.add_argument("--out", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    metrics = Path(args.metrics)
    series = read_metrics(metrics)
    out = Path(args.out)
    plot(series, out, title=str(metrics.parent.name or metrics))
    print(f"wrote {out} ({len(series['loss'])} loss points, {len(series['val_loss'])} val points, "
          f"{len(series['ponder'])} ponder points)")
    return 0


if __name__ == "__main__":
    from hierarchos.cli import script_entry

    script_entry(main)
