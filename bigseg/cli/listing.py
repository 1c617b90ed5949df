"""`bigseg models`: the registered architectures and the shipped weights, from the catalogue and
the weights manifest alone (no torch, so it answers at once). Plain aligned text that reads at
80 columns and in logs."""
from __future__ import annotations

import textwrap

from bigseg.catalogue import ARCHITECTURES
from bigseg.cli.render import out
from bigseg.manifest import read_manifest, weights_dir

NAME = 22  # width of the name column


def _block(name: str, lines: list[str]) -> str:
    body = [textwrap.fill(line, 78, initial_indent=" " * NAME, subsequent_indent=" " * NAME) for line in lines]
    if len(name) > NAME - 3:  # a long name gets a line of its own
        return "\n".join([f"  {name}"] + body)
    first = body[0][NAME:] if body else ""
    return "\n".join([f"  {name:<{NAME - 2}}{first}"] + body[1:])


def models() -> None:
    """List the architectures (paper, parameters) and the shipped weights (classes, scores, licence)."""
    out.print("Architectures (parameters at 19 classes, inference heads only):", markup=False)
    for name in sorted(ARCHITECTURES):
        f = ARCHITECTURES[name]
        out.print(_block(name, [f"{f.params / 1e6:.2f} M (authors' config {f.reference_params / 1e6:.2f} M), "
                                f"{f.paper}", f.note]), markup=False, highlight=False)
    shipped = read_manifest()
    out.print(f"\nShipped weights ({weights_dir()}):", markup=False)
    if not shipped:
        out.print("  none in this installation", markup=False)
    for e in shipped:
        metrics = e.get("metrics", {})
        scores = ", ".join(f"{split} {100 * metrics[split]['miou']:.1f}" for split in ("val", "test") if split in metrics)
        out.print(_block(e["name"], [f"{e['arch']}, {len(e['classes'])} classes: {', '.join(e['classes'])}",
                                     f"mIoU {scores or 'not measured'}; data: {e.get('data') or '-'}",
                                     f"licence: {e.get('licence') or 'not stated'}"]), markup=False, highlight=False)
