"""The data path is one-way: no import cycle anywhere in fastdiff/ or kernels/.

Every import statement counts, function-local ones included, and so does
``importlib.import_module("literal")`` (a lazy import hides a cycle from the interpreter, not
from a reader). Package ``__init__`` files that only
re-export are not nodes: an import of a name through a package is followed to the submodule
that defines it. ``kernels/`` is the package ``fastdiff.kernels``.
"""
import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = {"fastdiff": ROOT / "fastdiff", "fastdiff.kernels": ROOT / "kernels"}


def _module_files():
    """{dotted module name: path} for every .py file of the two trees."""
    files = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package] + parts)
            if package == "fastdiff" and parts[:1] == ["kernels"]:
                continue  # a shim folder, if any, is the kernels package itself
            files[name] = path
    return files


def _is_package(name, files):
    return files.get(name, pathlib.Path()).name == "__init__.py"


def _resolve_relative(module, is_package, level, target):
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _reexports(package, files):
    """{name: submodule} that a package's __init__ imports from its own submodules."""
    tree = ast.parse(files[package].read_text())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = (_resolve_relative(package, True, node.level, node.module) if node.level
                      else node.module)
            if source in files and source != package:
                for alias in node.names:
                    out[alias.asname or alias.name] = source
    return out


def _target(name, imported, files):
    """The module an import of ``imported`` from ``name`` lands in (through re-exports)."""
    if name in files and not _is_package(name, files):
        return name
    if name in files:  # a package: follow the name to the submodule that defines it
        if imported and f"{name}.{imported}" in files:
            return _target(f"{name}.{imported}", None, files)
        source = _reexports(name, files).get(imported)
        if source is not None:
            return _target(source, imported, files)
    return None


def _is_import_module_call(node):
    return (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str))


def import_graph():
    files = _module_files()
    graph = {name: set() for name in files if not _is_package(name, files)}
    for module in graph:
        tree = ast.parse(files[module].read_text())
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [_target(a.name, None, files) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = (_resolve_relative(module, False, node.level, node.module)
                          if node.level else node.module)
                targets = [_target(source, a.name, files) for a in node.names]
            elif _is_import_module_call(node):
                targets = [_target(node.args[0].value, None, files)]
            graph[module].update(t for t in targets if t and t != module)
    return graph


def find_cycle(graph):
    """One cycle as a list of modules (first == last), or None."""
    state = {}  # 1: on the stack, 2: done
    stack = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_in_fastdiff_or_kernels():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_function_local_imports_and_reexports():
    graph = import_graph()
    # models/layers.py imports the ops inside functions; evaluate imports through
    # fastdiff.data's __init__ (re-exports) to the defining submodule.
    assert "fastdiff.ops.group_norm_silu" in graph["fastdiff.models.layers"]
    assert "fastdiff.data.image_folder" in graph["fastdiff.evaluate.fid"]
    # ops reach their Triton launchers with function-local imports (no triton import on
    # the CPU path), and share the input checks with them.
    assert "fastdiff.kernels.group_norm_silu" in graph["fastdiff.ops.group_norm_silu"]
    assert "fastdiff.kernels.attention" in graph["fastdiff.ops.attention"]
    assert "fastdiff.kernels.inputs" in graph["fastdiff.kernels.attention"]
    assert all(not name.endswith("__init__") for name in graph)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_kernels_import_nothing_from_fastdiff_above_them():
    # The data path runs ops -> kernels: a launcher that reached back into fastdiff.ops (or
    # the models, the trainer) would make the kernels unusable on their own.
    graph = import_graph()
    kernels = [name for name in graph if name.startswith("fastdiff.kernels.")]
    assert "fastdiff.kernels.inputs" in kernels
    for name in kernels:
        above = sorted(t for t in graph[name] if not t.startswith("fastdiff.kernels."))
        assert not above, f"{name} imports {above}"


# Run in a fresh interpreter (this test process may have imported triton already): import
# each module in turn, and say after each whether triton is loaded.
_IMPORTS_TRITON = """
import importlib, sys
for module in sys.argv[1:]:
    importlib.import_module(module)
    print(module, "triton" in sys.modules)
"""


def test_the_cpu_path_imports_no_triton():
    # What the ops and the models import on every path must work without triton installed.
    modules = ["fastdiff.kernels.inputs", "fastdiff.ops", "fastdiff.models.layers"]
    proc = subprocess.run([sys.executable, "-c", _IMPORTS_TRITON, *modules],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [word for m in modules for word in (m, "False")], proc.stdout
