"""The README says what the code does: generated flag tables, the quickstart CI runs."""
import dataclasses
import pathlib
import re
import runpy
import sys

import pytest

from fastdiff import flags_table as ft

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
REGENERATE = "run `python -m fastdiff.flags_table --write README.md`"


@pytest.mark.parametrize("name", list(ft.ENTRY_POINTS))
def test_readme_holds_the_generated_flag_table(name):
    assert ft.extract_block(README, name) == ft.render_block(name), \
        f"the README's {name} flag table is stale: {REGENERATE}"


def _help_flags(module, capsys, monkeypatch):
    """The options ``python -m module --help`` lists, run in this process."""
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_info.value.code in (0, None)
    # argparse starts each option's entry on its own line, indented: "  --name VALUE".
    return set(re.findall(r"^\s+--(\w+)", capsys.readouterr().out, re.M)) - {"help"}


# runpy re-executes fastdiff.sample, which the test session has already imported.
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("name", list(ft.ENTRY_POINTS))
def test_table_lists_exactly_the_flags_of_the_entry_point(name, capsys, monkeypatch):
    in_table = {row["flag"].strip("`").removeprefix("--")
                for row in ft.table_rows(ft.entry_point(name))}
    assert in_table == _help_flags(ft.ENTRY_POINTS[name], capsys, monkeypatch)


@dataclasses.dataclass
class _Flags:
    same: int = dataclasses.field(default=3, metadata={"help": "a GD flag, GD's default"})
    changed: str = dataclasses.field(default="", metadata={"help": "a GD flag, other default"})
    ours: bool = dataclasses.field(default=True, metadata={"help": "a | b\nc"})


def test_rows_mark_gd_flags_changed_defaults_and_preset():
    ep = ft.EntryPoint((_Flags,), gd_defaults={"same": 3, "changed": "0.5"},
                       preset={"same": 7, "ours": True}, preset_name="digits preset")
    rows = {r["flag"]: r for r in ft.table_rows(ep)}
    assert list(rows) == ["`--same`", "`--changed`", "`--ours`"]
    assert rows["`--same`"]["from"] == "GD"
    assert rows["`--same`"]["default"] == "`3` (digits preset: `7`)"
    assert rows["`--changed`"]["from"] == "GD, default differs (GD: `0.5`)"
    assert rows["`--changed`"]["default"] == "`''`"
    assert rows["`--ours`"]["from"] == "fastdiff"
    assert rows["`--ours`"]["default"] == "`True`"  # a preset equal to the default is not noted


def test_cells_escape_pipes_and_newlines(monkeypatch):
    monkeypatch.setattr(ft, "entry_point", lambda name: ft.EntryPoint((_Flags,), {}, {}))
    row = ft.render_table("x").splitlines()[-1]
    assert row == r"| `--ours` | `True` | fastdiff | a \| b c |"


def test_write_replaces_only_the_marked_tables(tmp_path, capsys):
    blocks = {name: "\n".join(ft.markers(name)) for name in ft.ENTRY_POINTS}
    stale = "# Title\n\nbefore\n\n" + "\n\nbetween\n\n".join(blocks.values()) + "\n\nafter\n"
    path = tmp_path / "README.md"
    path.write_text(stale)
    assert ft.main(["--write", str(path)]) == 0
    fresh = "# Title\n\nbefore\n\n" + "\n\nbetween\n\n".join(
        ft.render_block(name) for name in ft.ENTRY_POINTS) + "\n\nafter\n"
    assert path.read_text() == fresh
    assert "updated" in capsys.readouterr().out
    assert ft.main(["--write", str(path)]) == 0  # nothing left to change
    assert path.read_text() == fresh
    assert "already current" in capsys.readouterr().out


@pytest.mark.parametrize("problem", ["missing", "twice"])
def test_write_refuses_a_file_without_exactly_one_block_per_table(tmp_path, capsys, problem):
    train = "\n".join(ft.markers("train"))
    text = train if problem == "missing" else "\n".join([train, train, *ft.markers("sample")])
    path = tmp_path / "README.md"
    path.write_text(text)
    assert ft.main(["--write", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "flags:" in err, err
    assert path.read_text() == text


def test_unknown_table_name_is_a_clear_error():
    with pytest.raises(ValueError, match="no flags table named 'nope'"):
        ft.entry_point("nope")


def _section(title):
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def test_quickstart_is_two_commands_and_ci_runs_the_test_command():
    blocks = re.findall(r"^```bash\n(.*?)^```", _section("Quickstart"), re.M | re.S)
    commands = [b.strip() for b in blocks]
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    train, test = commands
    # The one-command promise: everything else (the digits preset) is the trainer's default.
    assert train == "pip install -e . && torchrun -m fastdiff.train"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines, f".ci/run does not run the README's test command: {test}"
