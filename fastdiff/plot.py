"""``python -m fastdiff.plot LOG_DIR [--out PATH]``: a PNG of a run's loss and throughput.

Reads the metrics the trainer logs every --log_interval steps (LOG_DIR/metrics.jsonl, else
LOG_DIR/progress.csv) and draws two panels: loss against step on a log scale, and
images/s against step, with MFU on a second axis when the run logged it. matplotlib is an
install requirement of fastdiff.
"""
import argparse
import csv
import json
import math
import os
import sys


class PlotError(ValueError):
    """Bad input to the plot command, reported as one line."""


def read_metrics(log_dir):
    """The run's metric rows as a list of {key: float}, from metrics.jsonl or progress.csv.

    Values that are empty or not numbers (a CSV cell of a key that appeared later) are left
    out of their row.
    """
    if not os.path.isdir(log_dir):
        raise PlotError(f"log dir not found: {log_dir}")
    jsonl = os.path.join(log_dir, "metrics.jsonl")
    progress = os.path.join(log_dir, "progress.csv")
    if os.path.isfile(jsonl):
        with open(jsonl) as f:
            rows = [_numeric(json.loads(line)) for line in f if line.strip()]
    elif os.path.isfile(progress):
        with open(progress, newline="") as f:
            rows = [_numeric(row) for row in csv.DictReader(f)]
    else:
        raise PlotError(f"no metrics.jsonl or progress.csv in {log_dir}")
    rows = [row for row in rows if row]
    if not rows:
        raise PlotError(f"no metrics logged yet in {log_dir}")
    return rows


def _numeric(row):
    out = {}
    for key, value in row.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return out


def _series(rows, key, positive=False):
    """(steps, values) of ``key`` over the rows that have it (and a step)."""
    points = [(row["step"], row[key]) for row in rows
              if "step" in row and key in row and (row[key] > 0 or not positive)]
    return [p[0] for p in points], [p[1] for p in points]


def plot_metrics(log_dir, out=None):
    """Write the two-panel PNG for ``log_dir``; returns its path (default LOG_DIR/metrics.png)."""
    rows = read_metrics(log_dir)
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("fastdiff.plot needs matplotlib, which fastdiff's install brings: "
                        "pip install matplotlib") from None

    out = out or os.path.join(log_dir, "metrics.png")
    # A bare Figure renders with the Agg backend and leaves pyplot's global state alone.
    fig = Figure(figsize=(8, 7))
    loss_ax, speed_ax = fig.subplots(2, 1, sharex=True)
    steps, loss = _series(rows, "loss", positive=True)  # log axis: positive values only
    if steps:
        loss_ax.plot(steps, loss, color="tab:blue")
        loss_ax.set_yscale("log")
    else:
        loss_ax.text(0.5, 0.5, "no loss logged", ha="center", transform=loss_ax.transAxes)
    loss_ax.set_ylabel("loss")
    loss_ax.set_title(os.path.basename(os.path.abspath(log_dir)))
    loss_ax.grid(True, which="both", alpha=0.3)

    lines = []
    steps, speed = _series(rows, "images_per_sec")
    if steps:
        lines += speed_ax.plot(steps, speed, color="tab:green", label="images/s")
    speed_ax.set_ylabel("images / s")
    speed_ax.set_xlabel("step")
    speed_ax.grid(True, alpha=0.3)
    steps, mfu = _series(rows, "mfu")
    if steps:
        mfu_ax = speed_ax.twinx()
        lines += mfu_ax.plot(steps, mfu, color="tab:orange", linestyle="--", label="MFU")
        mfu_ax.set_ylabel("MFU")
    if lines:
        speed_ax.legend(handles=lines, loc="lower right")
    fig.tight_layout()
    # Written under a temporary name and renamed, so a reader never sees half a PNG.
    tmp = f"{out}.tmp.{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastdiff.plot",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("log_dir", help="a training run's folder (--log_dir of fastdiff.train)")
    parser.add_argument("--out", default="", help="PNG path (default: LOG_DIR/metrics.png)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = plot_metrics(args.log_dir, args.out or None)
    except (PlotError, OSError) as e:
        print(f"fastdiff.plot: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
