"The package's shape: no import circle between edanb modules, no private name imported across modules, short functions."
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edanb"
MAX_FUNCTION_LINES = 40


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py")) if p.stem != "_modidx"}


def edanb_imports(tree: ast.Module, this: str) -> list[tuple[str, list[str]]]:
    "(module, imported names) for every import of an edanb module anywhere in `tree`, lazy imports inside functions included."
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1: module = node.module or ""
            elif (node.module or "").startswith("edanb"): module = node.module.removeprefix("edanb").lstrip(".")
            else: continue
            if module: out.append((module.split(".")[0], [a.name for a in node.names]))
            else: out.extend((a.name, []) for a in node.names)   # `from . import data` / `from edanb import data`
        elif isinstance(node, ast.Import):
            out.extend((a.name.split(".")[1], []) for a in node.names if a.name.startswith("edanb."))
    return [(m, names) for m, names in out if m != this]


def import_graph(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    return {name: {m for m, _ in edanb_imports(tree, name) if m in trees} for name, tree in trees.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    "One import cycle of the graph as a path [a, b, ..., a], or None."
    state, stack = {}, []
    def visit(node):
        state[node] = "open"; stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open": return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)): return cycle
        state[node] = "done"; stack.pop()
    for node in sorted(graph):
        if node not in state and (cycle := visit(node)): return cycle
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"cli": {"train"}, "train": {"cli"}}) == ["cli", "train", "cli"]
    assert find_cycle({"cli": {"train"}, "train": {"data"}, "data": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph(modules()))
    assert cycle is None, f"import cycle between edanb modules: {' -> '.join(cycle)}"


def test_no_private_name_imported_from_another_module():
    private = [f"{name}: {name_!r} from edanb.{module}" for name, tree in modules().items()
               for module, names in edanb_imports(tree, name) for name_ in names
               if name_.startswith("_") and not name_.startswith("__")]
    assert not private, f"private names imported across modules: {private}"


def test_no_private_attribute_of_another_object_read_across_modules():
    "`other._name` where `other` is not `self`/`cls`: a private seam of another class."
    hits = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"): continue
                if isinstance(owner, ast.Name) and owner.id in ("os", "sys", "torch", "np", "dist"): continue
                hits.append(f"{name}.py:{node.lineno} .{node.attr}")
    assert not hits, f"private attributes of other objects: {hits}"


@pytest.mark.parametrize("name", sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "_modidx"))
def test_functions_are_short(name):
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"edanb/{name}.py: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_reading_a_grid_needs_no_torch():
    import subprocess, sys
    code = ("import sys, edanb.experiment as e, edanb.cli; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]")
    subprocess.run([sys.executable, "-c", code], check=True)
