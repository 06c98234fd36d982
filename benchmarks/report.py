"""Turn pytest-benchmark JSON files into a markdown table and a bar chart of speedups.

    python benchmarks/report.py [bench.json more.json ...] [--md results.md]
        [--png speedups.png] [--merge-json merged.json [--remove-merged]]
        [--sections sections.tsv]

The markdown (printed, and written to --md) has one row per benchmark: its median time
(pytest-benchmark's, the fast path's own timed rounds) and the highlights of its
``extra_info`` (throughput, GB/s, fractions of the measured copy bandwidth / matmul rate,
TFLOP/s, peak memory, the optimizer used), then one column per baseline of the speedups
(``speedup_vs_<baseline>`` keys: baseline time / fastdiff time, so > 1 means fastdiff is
faster). --png draws those speedups as a bar chart; matplotlib is imported only then, and
a machine without it gets a message instead of the PNG (it is not a dependency).
--merge-json writes all inputs as one pytest-benchmark JSON (one per module is how
benchmarks/gpu_suite.sh runs them, so a module cut off by its time limit costs only its own
results); it may name one of the inputs: the suite merges each section's JSON into its
bench.json after every section. A benchmark seen again (same ``fullname``) replaces the
earlier row, so a rerun section updates its rows instead of doubling them.

Speedups across processes: the suite runs each path of one comparison in its own pytest
process (each under its own time limit), so no process sees both times. A row whose
``extra_info`` has ``compare_group``, ``compare_role`` and ``compare_seconds`` takes part
in its group's comparison: the group's ``fastdiff`` row gets ``speedup_vs_<role>`` = that
role's seconds / fastdiff's seconds for every other role present (recomputed at each merge).

--sections reads the suite's section log (tab-separated: name, status, seconds, limit,
note) and puts it first in the markdown, so results.md says what ran, what failed and
what was cut off, even before any benchmark has written a number. Files are written to a
temporary name and renamed: a kill never leaves half a file.
"""
import argparse
import json
import os
import sys

SPEEDUP_PREFIX = "speedup_vs_"
# extra_info keys of a cross-process comparison (see the module docstring).
COMPARE_GROUP, COMPARE_ROLE, COMPARE_SECONDS = "compare_group", "compare_role", "compare_seconds"
FAST_ROLE = "fastdiff"
SECTION_FIELDS = ("section", "status", "seconds", "limit", "note")
# extra_info keys (numbers) shown in the table when their name contains one of these.
HIGHLIGHT_MARKERS = ("img_per_s", "gbs", "frac", "tflops", "gflops", "peak_mem")
# extra_info keys (any value) shown in the table when their name is one of these.
HIGHLIGHT_KEYS = ("optimizer",)


def load_results(paths):
    """(merged pytest-benchmark dict, [problem messages]) from the JSON files ``paths``.

    Unreadable or malformed files are reported, not fatal: a suite section that failed
    must not hide the others' results.
    """
    merged, problems, _ = load_results_and_sources(paths)
    return merged, problems


def load_results_and_sources(paths):
    """load_results, plus the paths that were read and merged."""
    merged, problems, merged_paths = None, [], []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
            benchmarks = data["benchmarks"]
            if not isinstance(benchmarks, list):
                raise TypeError("'benchmarks' is not a list")
        except (OSError, ValueError, KeyError, TypeError) as err:
            problems.append(f"{path}: {type(err).__name__}: {err}")
            continue
        if merged is None:
            merged = {k: v for k, v in data.items() if k != "benchmarks"}
            merged["benchmarks"] = []
        add_replacing_reruns(merged["benchmarks"], benchmarks)
        merged_paths.append(path)
    if merged is not None:
        derive_cross_process_speedups(merged["benchmarks"])
    return merged, problems, merged_paths


def add_replacing_reruns(rows, new_rows):
    """Append ``new_rows`` to ``rows``; a row with an existing ``fullname`` replaces it in
    place (the newer measurement of the same benchmark wins)."""
    position = {row.get("fullname"): i for i, row in enumerate(rows) if row.get("fullname")}
    for row in new_rows:
        name = row.get("fullname")
        if name in position:
            rows[position[name]] = row
        else:
            if name:
                position[name] = len(rows)
            rows.append(row)


def derive_cross_process_speedups(rows):
    """Give each comparison group's fastdiff row ``speedup_vs_<role>`` for the other roles.

    Rows without the compare keys, or with a non-positive time, are left out."""
    groups = {}
    for row in rows:
        extra = row.get("extra_info") or {}
        seconds = extra.get(COMPARE_SECONDS)
        if (extra.get(COMPARE_GROUP) is None or extra.get(COMPARE_ROLE) is None
                or not isinstance(seconds, (int, float)) or seconds <= 0):
            continue
        groups.setdefault(extra[COMPARE_GROUP], {})[extra[COMPARE_ROLE]] = row
    for roles in groups.values():
        fast = roles.get(FAST_ROLE)
        if fast is None:
            continue
        fast_seconds = fast["extra_info"][COMPARE_SECONDS]
        for role, row in roles.items():
            if role != FAST_ROLE:
                fast["extra_info"][SPEEDUP_PREFIX + role] = (
                    row["extra_info"][COMPARE_SECONDS] / fast_seconds)


def load_sections(path):
    """The suite's section rows (dicts of SECTION_FIELDS) from a tab-separated file; a
    missing file is no sections yet, a short line leaves its last fields empty."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        if line.strip():
            cells = line.split("\t") + [""] * len(SECTION_FIELDS)
            rows.append(dict(zip(SECTION_FIELDS, cells)))
    return rows


def sections_markdown(rows):
    """The section log as a markdown table (``|`` in notes escaped)."""
    lines = ["## Suite sections", "", "| section | status | seconds | limit (s) | note |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        cells = [row[field].replace("|", "\\|") for field in SECTION_FIELDS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_seconds(seconds):
    """A duration with a unit that keeps 3 significant digits readable (s, ms or µs)."""
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def format_value(key, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if "frac" in key:
        return f"{value:.0%}"
    return f"{value:.3g}"


def speedups(bench):
    """{baseline: speedup} from a benchmark's ``speedup_vs_<baseline>`` extra_info keys."""
    extra = bench.get("extra_info") or {}
    return {k[len(SPEEDUP_PREFIX):]: float(v) for k, v in extra.items()
            if k.startswith(SPEEDUP_PREFIX) and isinstance(v, (int, float))}


def highlights(bench):
    """The extra_info entries worth a glance, as 'key value' strings, in recorded order."""
    out = []
    for key, value in (bench.get("extra_info") or {}).items():
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key in HIGHLIGHT_KEYS or (numeric and any(m in key for m in HIGHLIGHT_MARKERS)):
            out.append(f"{key} {format_value(key, value)}")
    return out


def environment_lines(results):
    """Date, machine and versions: from pytest-benchmark's machine_info and extra_info."""
    info = results.get("machine_info") or {}
    cpu = (info.get("cpu") or {}).get("brand_raw", "?")
    lines = [f"- date: {results.get('datetime', '?')}",
             f"- machine: {info.get('node', '?')}, CPU {cpu} ({(info.get('cpu') or {}).get('count', '?')} cores), "
             f"Python {info.get('python_version', '?')}"]
    versions = info.get("fastdiff_versions")
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    devices = sorted({str(b["extra_info"]["device"]) for b in results["benchmarks"]
                      if (b.get("extra_info") or {}).get("device")})
    if devices:
        lines.append("- device: " + ", ".join(devices))
    return lines


def markdown(results, problems=(), sections=(), inputs_given=True):
    """The report as markdown text: the suite's sections (if any), then the benchmarks."""
    lines = ["# fastdiff benchmark results", ""]
    if sections:
        lines += sections_markdown(sections) + ["", "## Benchmarks", ""]
    if results is None and not inputs_given:
        lines.append("No benchmark results yet.")
    elif results is None:
        lines.append("No benchmark results could be read.")
    else:
        lines += environment_lines(results) + [""]
        benches = results["benchmarks"]
        if not benches:
            lines.append("No benchmarks ran (all skipped or deselected).")
        else:
            lines += ["| benchmark | median | highlights |", "| --- | --- | --- |"]
            for b in benches:
                lines.append(f"| {b['name']} | {format_seconds(b['stats']['median'])} "
                             f"| {'; '.join(highlights(b))} |")
            baselines = sorted({name for b in benches for name in speedups(b)})
            if baselines:
                lines += ["", "Speedup of fastdiff over each baseline (baseline time / fastdiff "
                              "time; > 1 = fastdiff faster):", "",
                          "| benchmark | " + " | ".join(baselines) + " |",
                          "| --- |" + " --- |" * len(baselines)]
                for b in benches:
                    s = speedups(b)
                    if s:
                        cells = [f"{s[n]:.2f}×" if n in s else "" for n in baselines]
                        lines.append(f"| {b['name']} | " + " | ".join(cells) + " |")
    if problems:
        lines += ["", "Inputs that could not be read:", ""]
        lines += [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def speedup_chart(results, path):
    """Write a horizontal bar chart of every speedup to ``path``; False if matplotlib is
    missing or there is nothing to draw (a message says which)."""
    rows = [(b["name"], speedups(b)) for b in (results or {}).get("benchmarks", [])]
    rows = [(name, s) for name, s in rows if s]
    if not rows:
        print(f"report: no speedup_vs_* results: {path} not written")
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"report: matplotlib is not installed: {path} not written")
        return False
    baselines = sorted({n for _, s in rows for n in s})
    bar = 0.8 / len(baselines)
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.35 * len(rows) * len(baselines)))
    for i, baseline in enumerate(baselines):
        ys = [r + i * bar for r in range(len(rows))]
        ax.barh(ys, [s.get(baseline, 0.0) for _, s in rows], height=bar, label=baseline)
    ax.set_yticks([r + 0.4 - bar / 2 for r in range(len(rows))])
    ax.set_yticklabels([name for name, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speedup of fastdiff (baseline time / fastdiff time)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_atomically(path, text):
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename,
    so that a reader (or a kill) sees the old file or the new one, never a part."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="*", help="pytest-benchmark JSON file(s)")
    parser.add_argument("--md", help="write the markdown table here")
    parser.add_argument("--png", help="write the bar chart of speedups here (needs matplotlib)")
    parser.add_argument("--merge-json", help="write all inputs merged into one JSON file here "
                                             "(it may be one of the inputs)")
    parser.add_argument("--remove-merged", action="store_true",
                        help="after writing --merge-json, delete the inputs it merged (not "
                             "the unreadable ones, which stay for a look)")
    parser.add_argument("--sections", help="the suite's section log (tab-separated), shown first")
    args = parser.parse_args(argv)
    if not args.json and not args.sections:
        parser.error("give JSON files, --sections, or both")
    if args.remove_merged and not args.merge_json:
        parser.error("--remove-merged needs --merge-json")

    results, problems, merged_paths = load_results_and_sources(args.json)
    sections = load_sections(args.sections) if args.sections else []
    text = markdown(results, problems, sections, inputs_given=bool(args.json))
    if args.md:
        write_atomically(args.md, text)
    if args.merge_json and results is not None:
        write_atomically(args.merge_json, json.dumps(results, indent=1))
        if args.remove_merged:
            target = os.path.abspath(args.merge_json)
            for path in merged_paths:
                if os.path.abspath(path) != target:
                    os.remove(path)
    if args.png:
        speedup_chart(results, args.png)
    sys.stdout.write(text)
    # No readable JSON is a failure only when JSON was given.
    return 1 if results is None and args.json else 0


if __name__ == "__main__":
    sys.exit(main())
