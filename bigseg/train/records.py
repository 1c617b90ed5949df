"""What a run folder records for people: `log.csv` / `log.json` (per-epoch metrics), `curves.png`
and `data.json` (how the data was read and split, its classes, what was computed from it)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from bigseg.atomic import write_text
from bigseg.train.data import DataSplit
from bigseg.train.plot import plot_curves


def write_logs(run_dir: Path, history: list[dict]) -> None:
    """log.json as recorded (`val_iou` per class a mapping), log.csv flat (`val_iou_<class>` columns)."""
    flat = [_flat(r) for r in history]
    keys = sorted({k for r in flat for k in r})
    table = io.StringIO()
    rows = csv.writer(table, lineterminator="\n")  # quotes a class name with a comma
    rows.writerow(keys)
    rows.writerows(["" if r.get(k) is None else r.get(k) for k in keys] for r in flat)
    write_text(run_dir / "log.csv", table.getvalue())
    write_text(run_dir / "log.json", json.dumps(history, indent=1))
    plot_curves(history, run_dir / "curves.png")


def _flat(record: dict) -> dict:
    return {f"{key}_{inner}" if isinstance(value, dict) else key: v
            for key, value in record.items()
            for inner, v in (value.items() if isinstance(value, dict) else [(None, value)])}


def write_data_description(run_dir: Path, train: DataSplit, val: DataSplit | None, notes: list[str],
                           input: dict, prepared: dict) -> None:
    """data.json: how the data was read and split, its classes, and what was computed from it."""
    source = train.source
    table = source.table
    write_text(run_dir / "data.json", json.dumps({
        "data": source.name, "kind": source.kind, "notes": notes,
        "classes": [{"name": n, "value": v, "colour": list(c)} for n, v, c in zip(table.names, table.codes, table.palette)],
        "bands": source.channels, "input": input, "train": _split(train), "val": None if val is None else _split(val),
        "prepared": prepared}, indent=1, default=float))


def _split(split: DataSplit) -> dict:
    source = split.source
    return {"split": split.split, "regions": len(split.regions), **source.describe_regions(split.regions)}
