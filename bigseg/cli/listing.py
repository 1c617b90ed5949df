"""`bigseg models`: the registered architectures and the shipped weights, from the catalogue and
the weights manifest alone (no torch, so it answers at once). Plain aligned text that reads at
80 columns and in logs."""
from __future__ import annotations

import sys
import textwrap

import typer

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


def models(
    prepare: str | None = typer.Option(
        None, "--prepare", metavar="MODEL",
        help="Export MODEL (a shipped name or a .pt file) for OpenVINO and ONNX Runtime and time them here, "
             "so that later predictions of --size images start without torch in about a second."),
    size: list[str] | None = typer.Option(
        None, "--size", metavar="HxW", help="With --prepare: image or tile sizes to prepare (repeat it; "
        "default 1024x1024, the default tile, which serves every larger image)."),
) -> None:
    """List the architectures (paper, parameters, GMACs) and the shipped weights (classes, scores, licence)."""
    if prepare is not None:
        return _prepare(prepare, size or ["1024x1024"])
    out.print("Architectures (parameters at 19 classes, inference heads only; multiply-adds at 1024x2048):",
              markup=False)
    for name in sorted(ARCHITECTURES):
        f = ARCHITECTURES[name]
        out.print(_block(name, [f"{f.params / 1e6:.2f} M (authors' config {f.reference_params / 1e6:.2f} M), "
                                f"{f.gmacs:.0f} GMACs, {f.paper}", f.note]), markup=False, highlight=False)
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


def _prepare(model: str, sizes: list[str]) -> None:
    from bigseg.errors import InputError

    parsed = []
    for text in sizes:
        h, sep, w = text.lower().partition("x")
        if not sep or not h.strip().isdigit() or not w.strip().isdigit():
            raise InputError(f"--size takes HEIGHTxWIDTH, e.g. 360x480; got {text!r}")
        parsed.append((int(h), int(w)))
    from bigseg.infer.start import prepare_cpu_engine

    say = lambda note: print(f"note: {note}", file=sys.stderr, flush=True)
    print(f"preparing {model} for {', '.join(sizes)} on this CPU (an export takes tens of seconds each)",
          file=sys.stderr, flush=True)
    for line in prepare_cpu_engine(model, parsed, on_note=say):
        out.print(f"  {line}", markup=False, highlight=False)
