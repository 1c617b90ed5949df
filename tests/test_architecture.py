"""The package's shape: imports flow one way down the layers, no cycles (not even through imports
inside functions), no module reaches into another's private names, and the predict and training
paths stay readable (functions and classes of bounded length)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "bigseg"

# top to bottom: a room may import from its own layer's other rooms and from the layers below
LAYERS = [
    {"cli", "__main__"},
    {"run", "train"},
    {"infer", "io", "vector", "distributed", "examples"},
    {"tiling", "crf", "checkpoint", "metrics", "runtime"},
    {"models"},
    {"errors", "atomic", "catalogue", "manifest", "palette"},
]
LEVEL = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}
# the length rule holds everywhere but in models/, where a network's layers read as the paper draws them
EXEMPT = ("models/",)
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 60, 200
MAX_ROOT_MODULES = 12  # the package root: the front door, the entry point and the few shared basics


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def imports(name: str, tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import statement, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("bigseg")]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{name}: bigseg uses absolute imports only"
            if (node.module or "").startswith("bigseg"):
                found.append((node.module, [a.name for a in node.names]))
    return found


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "bigseg"


def test_every_room_has_a_layer():
    rooms = {room(m) for m in modules()} - {"bigseg"}
    assert rooms <= set(LEVEL), f"rooms without a layer: {sorted(rooms - set(LEVEL))}"


def test_imports_only_go_down_the_layers():
    wrong = []
    for name, tree in modules().items():
        here = room(name)
        if here == "bigseg":  # the package's lazy front door
            continue
        for target, _ in imports(name, tree):
            there = room(target)
            if there in LEVEL and there != here and LEVEL[there] < LEVEL[here]:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports going up: " + ", ".join(wrong)


def test_no_import_cycles_between_modules():
    graph = {name: set() for name in modules()}
    for name, tree in modules().items():
        for target, names in imports(name, tree):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in graph and candidate != name:
                    graph[name].add(candidate)
                    break
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1 and not _ancestor_package(nxt, node):
                cycle.extend(path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, path + [node]):
                return True
        state[node] = 2
        return False

    for name in sorted(graph):
        if state.get(name) is None and visit(name, []):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def _ancestor_package(a: str, b: str) -> bool:
    """A package's __init__ importing its own submodules is not a cycle."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_no_module_imports_another_modules_private_names():
    wrong = [f"{name}: {target}.{n}" for name, tree in modules().items() for target, names in imports(name, tree)
             for n in names if n.startswith("_") and not n.startswith("__")]
    assert not wrong, ", ".join(wrong)


def _body_lines(node: ast.AST) -> int:
    """Lines of code of a function or class, its signature and docstring not counted."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:] or body
    return node.end_lineno - body[0].lineno + 1


@pytest.mark.parametrize("kind,limit", [(ast.FunctionDef, MAX_FUNCTION_LINES), (ast.ClassDef, MAX_CLASS_LINES)])
def test_functions_and_classes_stay_short_everywhere_but_in_the_models(kind, limit):
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(EXEMPT):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kind) and _body_lines(node) > limit:
                long.append(f"{rel}:{node.name} ({_body_lines(node)} lines)")
    assert not long, f"over {limit} lines: " + ", ".join(long)


def test_the_package_root_holds_only_the_few_shared_basics():
    root = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


def test_the_layout_picture_in_the_docs_is_drawn_from_the_code_as_it_is():
    """docs/development.md's diagram of the wings and their imports is what `python
    docs/make_layout.py` draws from the imports now (run it after moving a module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_layout", ROOT.parent / "docs" / "make_layout.py")
    layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout)
    text = (ROOT.parent / "docs" / "development.md").read_text()
    assert layout.diagram() in text, "run `python docs/make_layout.py`"


def test_the_tests_mirror_the_wings():
    """Every wing (a folder of `bigseg/`) has its test module, `tests/test_WING.py` (training, the
    largest, one per part: `tests/test_train_*.py`); no test module is named after a wing that is gone."""
    wings = {p.name for p in ROOT.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    tests = {p.stem[len("test_"):] for p in (ROOT.parent / "tests").glob("test_*.py")}
    missing = [w for w in sorted(wings) if w not in tests and not any(t.startswith(w + "_") for t in tests)]
    assert not missing, f"wings without a test module: {missing}"
    whole = {"architecture", "docs", "extensions", "install", "checkpoint"}  # the package as a whole, and a root module
    strays = [t for t in sorted(tests) if t not in whole and t.split("_")[0] not in wings]
    assert not strays, f"test modules named after no wing: {strays}"
