"""benchmarks/report.py on synthetic pytest-benchmark JSON: table, speedups, merge, chart."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks", "report.py")


def load_report_module():
    spec = importlib.util.spec_from_file_location("benchmark_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(name, median, extra):
    return {"group": None, "name": name, "fullname": f"benchmarks/x.py::{name}",
            "params": None, "param": None, "extra_info": extra,
            "stats": {"median": median, "min": median, "max": median, "rounds": 3}}


def results_file(path, benches, node="box"):
    data = {"machine_info": {"node": node, "python_version": "3.11.7",
                             "cpu": {"brand_raw": "Test CPU", "count": 2},
                             "fastdiff_versions": {"torch": "9.9", "triton": "8.8"}},
            "commit_info": {}, "datetime": "2026-01-02T03:04:05", "version": "5.2.3",
            "benchmarks": benches}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def two_files(tmp_path):
    train = bench("test_train_step", 0.4321, {
        "device": "Fake GPU", "optimizer": "fused", "img_per_s_fastdiff": 74.06,
        "peak_mem_gib_fastdiff": 12.345, "frac_matmul_fastdiff": 0.4567,
        "speedup_vs_gd_way": 2.6789, "speedup_vs_stock_pytorch": 1.3333,
        "parity_loss_rel_err": 1e-7})
    kernel = bench("test_norm[bf16]", 2.5e-5, {
        "fastdiff_gbs": 2410.0, "speedup_vs_eager": 1.75, "shape": [8, 256, 64, 64]})
    no_speedup = bench("test_plain", 3.0, {"note": "nothing to compare"})
    a = results_file(tmp_path / "a.json", [train, kernel])
    b = results_file(tmp_path / "b.json", [no_speedup], node="other")
    return a, b


def test_markdown_rows_highlights_and_speedups(two_files):
    report = load_report_module()
    results, problems = report.load_results([str(p) for p in two_files])
    assert problems == []
    assert [b["name"] for b in results["benchmarks"]] == [
        "test_train_step", "test_norm[bf16]", "test_plain"]
    text = report.markdown(results)
    lines = text.splitlines()
    # Environment from the first file: date, CPU, versions and the device in extra_info.
    assert "- date: 2026-01-02T03:04:05" in lines
    assert any("Test CPU (2 cores)" in line for line in lines)
    assert "- versions: torch 9.9, triton 8.8" in lines
    assert "- device: Fake GPU" in lines
    row = next(line for line in lines if line.startswith("| test_train_step |"))
    assert "| 432 ms |" in row
    for cell in ("optimizer fused", "img_per_s_fastdiff 74.1", "peak_mem_gib_fastdiff 12.3",
                 "frac_matmul_fastdiff 46%"):
        assert cell in row
    assert "parity_loss_rel_err" not in row  # not a highlight
    assert "| 25 µs |" in next(line for line in lines if line.startswith("| test_norm[bf16] |"))
    assert "| 3 s |" in next(line for line in lines if line.startswith("| test_plain |"))
    # Speedup table: baselines sorted, blanks where a benchmark has no such baseline.
    header = next(line for line in lines if line.startswith("| benchmark | eager"))
    assert header == "| benchmark | eager | gd_way | stock_pytorch |"
    assert "| test_train_step |  | 2.68× | 1.33× |" in lines
    assert "| test_norm[bf16] | 1.75× |  |  |" in lines
    assert not any(line.startswith("| test_plain |") and "×" in line for line in lines)


def test_cli_writes_markdown_and_merged_json_and_reports_bad_inputs(two_files, tmp_path):
    a, b = two_files
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    md, merged, png = tmp_path / "r.md", tmp_path / "m.json", tmp_path / "s.png"
    proc = subprocess.run(
        [sys.executable, REPORT, str(a), str(b), str(bad), str(tmp_path / "missing.json"),
         "--md", str(md), "--merge-json", str(merged), "--png", str(png)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = md.read_text()
    assert proc.stdout.endswith(text)  # the markdown is printed last
    assert "broken.json: JSONDecodeError" in text
    assert "missing.json: FileNotFoundError" in text
    data = json.loads(merged.read_text())
    assert len(data["benchmarks"]) == 3
    assert data["machine_info"]["node"] == "box"
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in proc.stdout
        assert not png.exists()
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_fails_when_nothing_is_readable(tmp_path):
    proc = subprocess.run([sys.executable, REPORT, str(tmp_path / "none.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "No benchmark results could be read." in proc.stdout


def test_format_seconds_units():
    report = load_report_module()
    assert report.format_seconds(2.0) == "2 s"
    assert report.format_seconds(0.0123) == "12.3 ms"
    assert report.format_seconds(4.56e-6) == "4.56 µs"


# ---- what benchmarks/gpu_suite.sh relies on -----------------------------------------------
def run_report(*args):
    return subprocess.run([sys.executable, REPORT, *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_sections_table_comes_first_and_needs_no_json(tmp_path):
    sections = tmp_path / "sections.tsv"
    sections.write_text("env\tok\t4\t10\tGPU NVIDIA H200; torch 2.11\n"
                        "smoke\tFAILED (exit 1)\t71\t80\t1 failed, 4 passed in 70s\n"
                        "quickstart\tskipped\t0\t40\tdry run: a|b\n")
    md = tmp_path / "results.md"
    proc = run_report("--sections", sections, "--md", md)
    assert proc.returncode == 0, proc.stderr  # no JSON given: not a failure
    lines = md.read_text().splitlines()
    start = lines.index("| section | status | seconds | limit (s) | note |")
    assert lines[start + 2:start + 5] == [
        "| env | ok | 4 | 10 | GPU NVIDIA H200; torch 2.11 |",
        "| smoke | FAILED (exit 1) | 71 | 80 | 1 failed, 4 passed in 70s |",
        "| quickstart | skipped | 0 | 40 | dry run: a\\|b |"]  # a '|' in a note is escaped
    assert start < lines.index("## Benchmarks") < lines.index("No benchmark results yet.")


def test_merge_in_place_replaces_reruns_and_removes_merged_parts(two_files, tmp_path):
    a, b = two_files
    merged = tmp_path / "bench.json"
    assert run_report(a, "--merge-json", merged).returncode == 0
    rerun = results_file(tmp_path / "rerun.json", [bench("test_norm[bf16]", 1e-5, {})])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    proc = run_report(merged, b, rerun, broken, "--merge-json", merged, "--remove-merged",
                      "--md", tmp_path / "r.md")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(merged.read_text())["benchmarks"]
    # The rerun replaced its row in place; the new module's row was appended.
    assert [(r["name"], r["stats"]["median"]) for r in rows] == [
        ("test_train_step", 0.4321), ("test_norm[bf16]", 1e-5), ("test_plain", 3.0)]
    assert merged.exists() and not b.exists() and not rerun.exists()
    assert broken.exists()  # unreadable: kept for a look, and named in the report
    assert "broken.json: JSONDecodeError" in (tmp_path / "r.md").read_text()
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temporary file, renamed


def test_speedups_are_derived_across_processes(tmp_path):
    def path_row(role, seconds):
        return bench(f"test_step[{role}]", seconds, {
            "compare_group": "step", "compare_role": role, "compare_seconds": seconds})

    # One file per process, as the suite runs them; fastdiff first.
    files = [results_file(tmp_path / f"{role}.json", [path_row(role, s)])
             for role, s in (("fastdiff", 0.1), ("stock_pytorch", 0.13), ("gd_way", 0.3))]
    report = load_report_module()
    results, _ = report.load_results([str(f) for f in files])
    fast = results["benchmarks"][0]["extra_info"]
    assert fast["speedup_vs_gd_way"] == pytest.approx(3.0)
    assert fast["speedup_vs_stock_pytorch"] == pytest.approx(1.3)
    assert "| test_step[fastdiff] | 3.00× | 1.30× |" in report.markdown(results).splitlines()
    # Without the fastdiff row (cut off by its limit) nothing is derived.
    results, _ = report.load_results([str(f) for f in files[1:]])
    assert not any(k.startswith("speedup_vs_") for r in results["benchmarks"]
                   for k in r["extra_info"])
