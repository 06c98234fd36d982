"""Turn pytest-benchmark JSON files into a markdown table and a bar chart of speedups.

    python benchmarks/report.py bench.json [more.json ...] [--md results.md]
        [--png speedups.png] [--merge-json merged.json]

The markdown (printed, and written to --md) has one row per benchmark: its median time
(pytest-benchmark's, the fast path's own timed rounds) and the highlights of its
``extra_info`` (throughput, GB/s, fractions of the measured copy bandwidth / matmul rate,
TFLOP/s, peak memory, the optimizer used), then one column per baseline of the speedups
(``speedup_vs_<baseline>`` keys: baseline time / fastdiff time, so > 1 means fastdiff is
faster). --png draws those speedups as a bar chart; matplotlib is imported only then, and
a machine without it gets a message instead of the PNG (it is not a dependency).
--merge-json writes all inputs as one pytest-benchmark JSON (one per module is how
benchmarks/gpu_suite.sh runs them, so a module cut off by its time limit costs only its own
results).
"""
import argparse
import json
import sys

SPEEDUP_PREFIX = "speedup_vs_"
# extra_info keys (numbers) shown in the table when their name contains one of these.
HIGHLIGHT_MARKERS = ("img_per_s", "gbs", "frac", "tflops", "gflops", "peak_mem")
# extra_info keys (any value) shown in the table when their name is one of these.
HIGHLIGHT_KEYS = ("optimizer",)


def load_results(paths):
    """(merged pytest-benchmark dict, [problem messages]) from the JSON files ``paths``.

    Unreadable or malformed files are reported, not fatal: a suite section that failed
    must not hide the others' results.
    """
    merged, problems = None, []
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
        merged["benchmarks"].extend(benchmarks)
    return merged, problems


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


def markdown(results, problems=()):
    """The report as markdown text."""
    lines = ["# fastdiff benchmark results", ""]
    if results is None:
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s)")
    parser.add_argument("--md", help="write the markdown table here")
    parser.add_argument("--png", help="write the bar chart of speedups here (needs matplotlib)")
    parser.add_argument("--merge-json", help="write all inputs merged into one JSON file here")
    args = parser.parse_args(argv)

    results, problems = load_results(args.json)
    text = markdown(results, problems)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    if args.merge_json and results is not None:
        with open(args.merge_json, "w") as f:
            json.dump(results, f, indent=1)
    if args.png:
        speedup_chart(results, args.png)
    sys.stdout.write(text)
    return 1 if results is None else 0


if __name__ == "__main__":
    sys.exit(main())
