"""The shipped weights: where they are (package data `bigseg.weights`, installed with bigseg,
or `$BIGSEG_WEIGHTS`), their manifest (name, architecture, classes, licence, scores, sha256) and
file digests. No torch here: `bigseg models` lists them at once."""
from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any


def weights_dir() -> Path:
    """`$BIGSEG_WEIGHTS` when set, else the weights installed with the package."""
    override = os.environ.get("BIGSEG_WEIGHTS")
    return Path(override) if override else Path(str(resources.files("bigseg.weights")))


def read_manifest(folder: Path | None = None) -> list[dict[str, Any]]:
    """The manifest's model entries ([] when there is none)."""
    path = (folder or weights_dir()) / "manifest.json"
    if not path.is_file():
        return []
    return json.loads(path.read_text())["models"]


def find_entry(spec: str, folder: Path | None = None) -> dict[str, Any] | None:
    """The entry named `spec`, else the first entry of architecture `spec`."""
    entries = read_manifest(folder)
    return next((e for e in entries if e["name"] == spec), None) or next((e for e in entries if e["arch"] == spec), None)


def shipped_archs(folder: Path | None = None) -> set[str]:
    return {e["arch"] for e in read_manifest(folder)}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
