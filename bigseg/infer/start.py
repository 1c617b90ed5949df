"""Starting a predictor from a model's name or file: without torch where the run is the plain
case and this machine's cache holds the model's card and exports (`bigseg.infer.choose.warm_start`,
`engines.cached`), else with torch. `prepare_cpu_engine` exports and times a model ahead of its runs."""
from __future__ import annotations

from typing import Callable

import numpy as np

from bigseg.errors import InputError
from bigseg.infer.choose import warm_start
from bigseg.infer.engines.cached import CachedEngine
from bigseg.infer.predictor import Predictor, build_engine
from bigseg.infer.settings import Settings


def open_predictor(model: str, settings: Settings, on_note: Callable[[str], None] | None = None, warm: bool = True,
                   before_torch: Callable[[], None] | None = None) -> Predictor:
    """The predictor of `model` (a shipped name or a .pt file). `warm` False: always torch;
    `before_torch` runs once before torch is first used (the CLI sets its threads there)."""
    start = warm_start(model, settings) if warm else None
    if start is None:
        return Predictor.running(lambda note: model_engine(model, settings, note, before_torch), settings, on_note)
    return Predictor.running(lambda note: CachedEngine(start, settings.engine,
                                                       lambda: model_engine(model, settings, note, before_torch)),
                             settings, on_note)


def model_engine(model: str, settings: Settings, note: Callable[[str], None],
                 before_torch: Callable[[], None] | None = None):
    """The engine the settings name for `model`, its checkpoint loaded (torch imported now)."""
    if before_torch is not None:
        before_torch()
    from bigseg.checkpoint import resolve_model

    return build_engine(resolve_model(model), settings, note)


def prepare_cpu_engine(model: str, sizes: list[tuple[int, int]], threads: int | None = None,
                       on_note: Callable[[str], None] | None = None) -> list[str]:
    """Export `model` for the CPU runtimes at each (height, width) and time them here, so that
    predictions of images of those sizes (or tiles of that size) start without torch; returns,
    per size, the engine `auto` chose."""
    if not sizes:
        raise InputError("needs at least one size HxW", param="sizes")
    if any(h < 16 or w < 16 for h, w in sizes):
        raise InputError(f"sizes must be at least 16x16, got {', '.join(f'{h}x{w}' for h, w in sizes)}",
                         param="sizes")
    settings = Settings("cpu", "auto", tile=max(max(s) for s in sizes), engine="auto", threads=threads)
    predictor = open_predictor(model, settings, on_note, warm=False)
    from bigseg.infer.engines.exported import ExportedModel

    exported = getattr(predictor.engine, "model", None)
    if not isinstance(exported, ExportedModel):
        raise InputError("needs OpenVINO or ONNX Runtime and onnxscript installed (pip install openvino "
                         "onnxruntime onnxscript)", param="engine")
    exported.export_after = 0.0
    chosen = []
    for h, w in sizes:
        predictor.scores(np.zeros((predictor.card.in_channels, h, w), np.float32))
        chosen.append(f"{h}x{w}: {exported.chosen.get(exported.padded((h, w)), 'torch')}")
    return chosen
