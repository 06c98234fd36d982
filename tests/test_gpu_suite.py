"""benchmarks/gpu_suite.sh, checked on the CPU before a GPU is ever lent to it.

The GPU machine runs one command of at most 600 s, so the suite must be right the first
time: its plan must fit 480 s with the kill grace (``--plan``), its sections must come in
the order that puts fastdiff's numbers before the baselines and the slow tests, and a dry
run must leave results.md in $OUT without a GPU, with every skipped section saying why.
"""
import json
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")
# The required order: install before anything imports the extension; the smoke checks
# before any benchmark; kernel benchmarks; the train step with fastdiff before its
# baselines; the slow remaining GPU tests and the quickstart last; the final report.
ORDER = ["env", "install", "build_ext", "smoke", "bench_group_norm_silu", "bench_attention",
         "bench_adam_ema", "train_step_fastdiff", "train_step_stock_pytorch",
         "train_step_gd_way", "gpu_tests", "quickstart", "report"]
MAX_TOTAL_S = 480
GRACE_S = 3
# The dry run below: a pytest section of each kind (tests, benchmarks, a benchmark node id),
# each skipped mode; ~30 s on one CPU core (the CPU benchmarks would take
# minutes: the full dry run is `OUT=/tmp/out bash benchmarks/gpu_suite.sh --dry-run`).
# No final `report` section: results.md must then come from the report after each section.
DRY_RUN_SECTIONS = ["env", "install", "build_ext", "smoke", "bench_group_norm_silu",
                    "train_step_gd_way", "quickstart"]
# What the device tool brings back: at most 8 files, named in letters, digits, . _ -.
RETURNED_FILES = {"suite.log", "install.log", "quickstart.log", "quickstart_grid.png",
                  "bench.json", "results.md", "speedups.png"}


def run_suite(*args, timeout=60, **env):
    full_env = {k: v for k, v in os.environ.items()
                if k != "OUT" and k != "SECTIONS" and not k.endswith("_LIMIT_S")}
    full_env.update(env)
    return subprocess.run(["bash", SUITE, *args], capture_output=True, text=True, cwd=ROOT,
                          env=full_env, timeout=timeout)


def plan_rows(stdout):
    """[(section, limit)] from --plan's table, and the kill-grace seconds."""
    rows = re.findall(r"^  (\S+) +(\d+) s  ", stdout, flags=re.MULTILINE)
    grace = int(re.search(r"^  kill grace +(\d+) s  ", stdout, flags=re.MULTILINE).group(1))
    return [(name, int(limit)) for name, limit in rows], grace


def test_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", SUITE], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_plan_lists_sections_in_order_within_480_s():
    proc = run_suite("--plan")
    assert proc.returncode == 0, proc.stderr
    rows, grace = plan_rows(proc.stdout)
    assert [name for name, _ in rows] == ORDER
    assert all(limit > 0 for _, limit in rows)
    assert grace == GRACE_S * len(rows)
    total = sum(limit for _, limit in rows) + grace
    assert proc.stdout.splitlines()[-1] == f"total limit: {total} s"
    assert total <= MAX_TOTAL_S
    assert proc.stderr == ""  # no over-budget warning


def test_plan_follows_limit_overrides_and_section_selection():
    base, _ = plan_rows(run_suite("--plan").stdout)
    limits = dict(base)
    proc = run_suite("--plan", SMOKE_LIMIT_S="300")
    rows, _ = plan_rows(proc.stdout)
    assert dict(rows)["smoke"] == 300
    total = sum(limits.values()) - limits["smoke"] + 300 + GRACE_S * len(ORDER)
    assert proc.stdout.splitlines()[-1] == f"total limit: {total} s"
    assert "exceeds 480 s" in proc.stderr

    proc = run_suite("--plan", SECTIONS="report smoke")
    rows, grace = plan_rows(proc.stdout)
    assert [name for name, _ in rows] == ["smoke", "report"]  # plan order, not SECTIONS'
    assert proc.stdout.splitlines()[-1] == (
        f"total limit: {limits['smoke'] + limits['report'] + 2 * GRACE_S} s")

    proc = run_suite("--plan", SECTIONS="smoke benchmarks")
    assert proc.returncode == 2 and "unknown section 'benchmarks'" in proc.stderr


def test_usage_errors():
    assert run_suite("--frobnicate").returncode == 2
    proc = run_suite("--dry-run")  # no OUT
    assert proc.returncode != 0 and "OUT" in proc.stderr


def section_table(results_md):
    """{section: (status, note)} and the order, from results.md's section table."""
    rows = re.findall(r"^\| (\S+) \| ([^|]+) \| \d+ \| \d+ \| (.*) \|$", results_md,
                      flags=re.MULTILINE)
    return [name for name, _, _ in rows], {name: (status, note) for name, status, note in rows}


def seed_part(out):
    """A section's benchmark JSON as a killed run would have left it in $OUT/parts: the
    first report must merge it into bench.json (no CPU benchmark is fast enough to run
    here for that) and remove it."""
    (out / "parts").mkdir()
    row = {"name": "test_seeded", "fullname": "benchmarks/bench_x.py::test_seeded",
           "group": None, "params": None, "param": None, "stats": {"median": 0.5},
           "extra_info": {"speedup_vs_eager": 1.25}}
    (out / "parts" / "bench_x.json").write_text(json.dumps(
        {"machine_info": {}, "commit_info": {}, "datetime": "2026-01-02T03:04:05",
         "benchmarks": [row]}))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    seed_part(out)
    proc = run_suite("--dry-run", timeout=300, OUT=str(out), SECTIONS=" ".join(DRY_RUN_SECTIONS),
                     OMP_NUM_THREADS="1")
    return proc, out


def test_dry_run_leaves_results_md_with_every_section(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    results = (out / "results.md").read_text()
    order, table = section_table(results)
    assert order == DRY_RUN_SECTIONS  # the last one too: a report follows every section
    for name in ("env", "smoke", "bench_group_norm_silu", "train_step_gd_way"):
        assert table[name][0] == "ok", (name, table[name])
    for name in ("install", "build_ext", "quickstart"):
        status, note = table[name]
        assert status == "skipped" and note.startswith("dry run:"), (name, table[name])
    assert "GPU none visible to torch" in table["env"][1]  # the env section's summary line
    assert "skipped" in table["smoke"][1]  # pytest's result line: the GPU tests skip here
    # The seeded part was merged into bench.json and shows in the tables.
    assert [b["name"] for b in json.loads((out / "bench.json").read_text())["benchmarks"]] == [
        "test_seeded"]
    assert "| test_seeded | 500 ms |" in results and "| test_seeded | 1.25× |" in results


def test_dry_run_keeps_out_within_what_the_device_tool_returns(dry_run):
    proc, out = dry_run
    names = {p.name for p in out.iterdir()}
    # No parts/ left (merged, or empty because every benchmark skipped), no temporary files.
    assert names <= RETURNED_FILES, names - RETURNED_FILES
    assert len(names) <= 8
    log = (out / "suite.log").read_text()
    assert log == proc.stdout  # all output kept, none lost to the pipe
    starts = [log.index(f"=== {name}") for name in DRY_RUN_SECTIONS]
    assert starts == sorted(starts)
    assert log.rstrip().endswith((out / "results.md").read_text().rstrip())  # printed last
