"""Draws the package's layout for docs/development.md from the code: one box per wing (a package
under bigseg/, or a module at its root) listing its modules, and an arrow wherever a wing imports
another. The few shared basics at the bottom (errors, atomic writes, the manifest, ...) are one
box, and the arrows into it are left out: every wing uses them.

    python docs/make_layout.py      # rewrites the diagram between its markers in docs/development.md

A test checks that the diagram in the docs is the one the code draws now.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "bigseg"
DOC = Path(__file__).resolve().parent / "development.md"
BASICS = {"errors", "atomic", "catalogue", "manifest", "palette"}
BEGIN, END = "<!-- layout: drawn by docs/make_layout.py -->", "<!-- /layout -->"


def wing(module: str) -> str:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "bigseg"
    return "basics" if name in BASICS else name


def modules() -> dict[str, list[str]]:
    """Each wing's modules (relative names, without .py)."""
    found: dict[str, list[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("").as_posix()
        name = wing("bigseg." + rel.replace("/", "."))
        if name in ("__init__", "__main__") or path.name == "__init__.py":
            continue
        found.setdefault(name, []).append(rel.split("/", 1)[1] if "/" in rel else rel)
    return found


def imports() -> set[tuple[str, str]]:
    """(wing, wing it imports), both of bigseg, basics left out."""
    edges = set()
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("").parts
        here = wing(".".join(rel))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bigseg"):
                targets = [f"{node.module}.{a.name}" if node.module == "bigseg" else node.module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("bigseg.")]
            else:
                continue
            for target in targets:
                there = wing(target)
                if here != "__main__" and there not in (here, "basics", "bigseg", "__version__"):
                    edges.add((here, there))
    return edges


def diagram() -> str:
    """The Mermaid flowchart, between its markers."""
    boxes = modules()
    lines = [BEGIN, "```mermaid", "flowchart TD"]
    for name in sorted(boxes):
        if (ROOT / f"{name}.py").is_file():
            label = f"<b>{name}.py</b>"
        else:
            label = f"<b>{name if name == 'basics' else name + '/'}</b><br/>{', '.join(boxes[name])}"
        lines.append(f'  {name}["{label}"]')
    lines += [f"  {a} --> {b}" for a, b in sorted(imports())]
    return "\n".join(lines + ["```", END])


def main() -> None:
    text = DOC.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    DOC.write_text(text[:start] + diagram() + text[end:])
    print(f"wrote the layout diagram in {DOC}")


if __name__ == "__main__":
    main()
