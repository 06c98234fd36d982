"""python -m fastdiff.plot: a PNG from a run's metrics, clear errors otherwise."""
import csv
import json
import math
import subprocess
import sys

import pytest
from PIL import Image

from fastdiff import plot


def write_jsonl(log_dir, rows):
    with open(log_dir / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def synthetic_rows(n=30, mfu=True):
    rows = []
    for i in range(1, n + 1):
        row = {"step": 10 * i, "loss": 0.05 + 1 / math.sqrt(i), "images_per_sec": 90 + i % 7,
               "lr": 1e-4, "peak_mem_gib": 1.5, "data_wait_frac": 0.01}
        if mfu:
            row["mfu"] = 0.3 + 0.001 * i
        rows.append(row)
    return rows


def assert_png(path, min_side=300):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= min_side
        # Not a blank canvas: curves, labels and anti-aliasing put many colours on it.
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colors) > 10


def test_writes_png_from_metrics_jsonl(tmp_path, capsys):
    import matplotlib  # noqa: F401  (an install requirement: no skip)
    write_jsonl(tmp_path, synthetic_rows())
    assert plot.main([str(tmp_path)]) == 0
    assert_png(tmp_path / "metrics.png")
    assert capsys.readouterr().out.strip() == str(tmp_path / "metrics.png")
    out = tmp_path / "elsewhere.png"
    assert plot.main([str(tmp_path), "--out", str(out)]) == 0
    assert_png(out)
    assert not list(tmp_path.glob("*.tmp.*"))  # the temporary file was renamed


def test_falls_back_to_progress_csv_without_mfu(tmp_path):
    import matplotlib  # noqa: F401  (an install requirement: no skip)
    rows = synthetic_rows(mfu=False)
    rows[0]["loss"] = ""  # an empty cell (a key that appeared later) is skipped
    with open(tmp_path / "progress.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[1]))
        writer.writeheader()
        writer.writerows(rows)
    parsed = plot.read_metrics(str(tmp_path))
    assert "loss" not in parsed[0] and parsed[1]["loss"] == pytest.approx(rows[1]["loss"])
    assert plot.main([str(tmp_path)]) == 0
    assert_png(tmp_path / "metrics.png")


@pytest.mark.parametrize("setup, message", [
    ("missing", "log dir not found"),
    ("empty", "no metrics.jsonl or progress.csv"),
    ("blank", "no metrics logged yet"),
])
def test_bad_log_dir_exits_2_with_one_line(tmp_path, capsys, setup, message):
    log_dir = tmp_path / "run"
    if setup != "missing":
        log_dir.mkdir()
    if setup == "blank":
        (log_dir / "metrics.jsonl").write_text("\n")
    assert plot.main([str(log_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_matplotlib_names_the_install(tmp_path, capsys, monkeypatch):
    write_jsonl(tmp_path, synthetic_rows(3))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert plot.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err and err.count("\n") == 1


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastdiff.plot", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "log dir not found" in proc.stderr
