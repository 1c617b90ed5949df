"""The torch engine: a checkpoint's model on a device (any device, every option): normalisation,
precision (autocast), several scales and flips, the dense CRF. Its model is the module itself or,
on the CPU with `--engine openvino|onnx|auto`, the module whose tiles run through an exported
runtime (`engines.exported`).

On a GPU the tile scores never leave it: they are blended there (`TorchArrays`), each finished
rectangle is reduced there to uint8 labels (and probabilities), and only those travel to the host,
through page-locked memory without blocking (`HostCopy`), while the GPU goes on with the next
batch; where the stitcher's band would not fit in GPU memory, blending moves to the host.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from bigseg.checkpoint import weights_digest
from bigseg.crf.meanfield import dense_crf
from bigseg.infer.cache import record_default_threads
from bigseg.infer.card import ModelCard, card_of, write_card
from bigseg.infer.choose import Cuda, choose_device, choose_precision, choose_runtimes, installed_runtimes, \
    runtime_precision
from bigseg.infer.engines.base import OUT_OF_MEMORY
from bigseg.infer.engines.export import ExportCache
from bigseg.infer.engines.exported import ExportedModel
from bigseg.infer.settings import Settings
from bigseg.manifest import sha256
from bigseg.tiling.geometry import TileGrid, stitcher_peak_pixels



def cuda_facts() -> Cuda:
    available = torch.cuda.is_available()
    return Cuda(available, torch.cuda.device_count() if available else 0,
                available and torch.cuda.is_bf16_supported())


def resolve_device(name: str = "auto") -> torch.device:
    """`--device` as a torch device (`bigseg.infer.choose.choose_device`)."""
    return torch.device(choose_device(name, cuda_facts()))


def resolve_precision(name: str, device: torch.device, cpu_bf16: bool = True) -> torch.dtype:
    """`--precision` on `device` as a torch dtype (`bigseg.infer.choose.choose_precision`)."""
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return getattr(torch, choose_precision(name, device.type, cuda_bf16, cpu_bf16))


def labels_of(scores: torch.Tensor) -> torch.Tensor:
    """(C, h, w) scores -> (h, w) uint8 class indices, the first maximum on ties (as argmax).
    `max(0).indices`: on the CPU torch's argmax over the leading dimension is ~6x slower."""
    return scores.max(0).indices.to(torch.uint8)


class TorchArrays:
    """The stitcher's array namespace (`bigseg.tiling.stitch.NumpyArrays`) for float32 tensors on
    `device`, with the finishing of rectangles (labels, probabilities, copies to the host)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._profiles: dict[bytes, torch.Tensor] = {}  # a grid has a handful of distinct profiles

    def zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def weights(self, wy: np.ndarray, wx: np.ndarray) -> torch.Tensor:
        return torch.outer(self._profile(wy), self._profile(wx))

    def _profile(self, p: np.ndarray) -> torch.Tensor:
        key = p.tobytes()
        t = self._profiles.get(key)
        if t is None:
            if len(self._profiles) > 64:
                self._profiles.clear()
            t = self._profiles[key] = torch.from_numpy(np.ascontiguousarray(p)).to(self.device)
        return t

    def accumulate(self, acc: torch.Tensor, wsum: torch.Tensor, scores: torch.Tensor, w: torch.Tensor) -> None:
        acc.addcmul_(scores, w)  # no (C, h, w) temporary per tile: less memory traffic and churn
        wsum += w

    def mean(self, acc: torch.Tensor, wsum: torch.Tensor) -> torch.Tensor:
        # the same IEEE division as numpy's `divide(acc, wsum, where=wsum > 0)`: equal bit for bit
        return acc.div_(torch.where(wsum > 0, wsum, 1.0))

    def labels(self, scores: torch.Tensor) -> torch.Tensor:
        return labels_of(scores)

    def probabilities(self, block: torch.Tensor, averaged: bool) -> torch.Tensor:
        """uint8 probabilities p x 255 of a finished rectangle's logits (or averaged probabilities)."""
        p = block / block.sum(0, keepdim=True).clamp_min(1e-12) if averaged else torch.softmax(block, 0)
        return torch.round(p * 255).to(torch.uint8)

    def host(self, tensors: dict[str, torch.Tensor]) -> "HostCopy":
        return HostCopy(tensors)

    def numpy(self, x: torch.Tensor) -> np.ndarray:
        return x.cpu().numpy()

    def from_numpy(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(self.device)

    def concatenate(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts)


class HostCopy:
    """Tensors on their way to the host: on a GPU copied into page-locked memory without
    blocking, behind a CUDA event; `numpy()` waits for that copy only (not for later work)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.event = None
        if tensors and next(iter(tensors.values())).is_cuda:
            self.host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in tensors.items()}
            for k, v in tensors.items():
                self.host[k].copy_(v, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensors

    def numpy(self) -> dict[str, np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return {k: v.numpy() for k, v in self.host.items()}


class TorchEngine:
    """A checkpoint's model on the settings' device (the `TileEngine` of torch). `note` says
    something once (an export, a fallback, an out-of-memory back-off)."""

    def __init__(self, checkpoint: Any, settings: Settings, note: Callable[[str], None]):
        self.settings, self.note = settings, note
        self.torch_device = resolve_device(settings.device)
        self.dtype = resolve_precision(settings.precision, self.torch_device)
        self.device, self.precision = str(self.torch_device), str(self.dtype).removeprefix("torch.")
        self.on_gpu = self.torch_device.type == "cuda"
        runtimes = choose_runtimes(settings.engine, self.torch_device.type, installed_runtimes(), _exporter())
        # channels-last on both: cuDNN's and oneDNN's convolutions run faster in that layout
        self.module = checkpoint.build_model().to(self.torch_device, memory_format=torch.channels_last)
        if self.on_gpu:
            torch.backends.cudnn.benchmark = True  # tiles share one shape: autotune once
        self.checkpoint = checkpoint
        self._card: ModelCard | None = None
        self.model: Callable = self.module
        self.name = "torch"
        if runtimes:
            self.model = self._exported(runtimes)
            self.name = self.model.name
        elif settings.compile:
            self.model = torch.compile(self.module, dynamic=False)
        self.arrays = TorchArrays(self.torch_device)
        self.lookahead = 1 if self.on_gpu else 0  # a GPU computes batch k + 1 while batch k is written
        norm = checkpoint.normalization
        self._mean = torch.tensor(norm.mean, dtype=torch.float32, device=self.torch_device).view(1, -1, 1, 1)
        self._std = torch.tensor(norm.std, dtype=torch.float32, device=self.torch_device).view(1, -1, 1, 1)

    @property
    def card(self) -> ModelCard:
        if self._card is None:
            self._card = card_of(self.checkpoint, self.module, weights_digest(self.checkpoint))
        return self._card

    def _exported(self, runtimes: tuple[str, ...]) -> ExportedModel:
        """The model through the exported runtimes; its card kept in the cache, so that a later run
        whose exports are cached starts without torch. A shipped model (run again and again)
        prepares the fast engine for its tiles at its first batch."""
        choose = self.settings.engine == "auto"
        model = ExportedModel(self.module, ExportCache(self.card.identity, self.card.in_channels), runtimes,
                              torch.get_num_threads(), self.note, choose, runtime_precision(self.precision),
                              self.card.output_multiple)
        if self.checkpoint.file:
            write_card(self.card, self.checkpoint.file_sha256 or sha256(self.checkpoint.file))
            record_default_threads(torch.get_num_threads())
        if choose and self.card.shipped:
            model.export_after = 0.0
        return model

    def scores(self, batch: np.ndarray) -> torch.Tensor:
        """One forward pass (scales, flips, CRF) of a batch; queued on the device, not awaited."""
        host = torch.from_numpy(np.ascontiguousarray(batch))
        if self.on_gpu:  # page-locked staging: the copy runs asynchronously
            image = host.pin_memory().to(self.torch_device, non_blocking=True)
        else:
            image = host
        with torch.inference_mode():
            scores = self._scores(image)
            if self.settings.crf is not None:
                scores = torch.stack([dense_crf(p, im, self.settings.crf) for p, im in zip(scores, image)])
        return scores

    def _scores(self, image: torch.Tensor) -> torch.Tensor:
        """Logits, or with several scales / flips / turns the mean softmax over them (as in DeepLab and
        RefineNet testing); softmax probabilities when a CRF follows."""
        s = self.settings
        x = ((image - self._mean) / self._std).contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast(self.torch_device.type, dtype=self.dtype)
                    if self.dtype is not torch.float32 else nullcontext())
        with torch.inference_mode(), autocast:
            if s.scales == (1.0,) and not s.flip and not s.turns:
                y = self.model(x).float()
                return y.softmax(1) if s.crf is not None else y
            return multi_scale_probabilities(self.model, x, s.scales, s.flip, s.turns)

    def out_of_memory(self, error: BaseException) -> bool:
        """torch and ONNX Runtime report exhausted memory in their own types; on a GPU the cached
        blocks are freed for the smaller batch that follows."""
        found = isinstance(error, torch.OutOfMemoryError) or any(m in str(error).lower() for m in OUT_OF_MEMORY)
        if found and self.on_gpu:
            torch.cuda.empty_cache()
        return found

    def for_grid(self, grid: TileGrid):
        """Itself; on a GPU, blending on the host when the stitcher's largest held area would take
        more than half of the free memory (a very wide raster)."""
        if not self.blends_on_device(grid):
            self.note("the stitcher's overlap band would not fit in GPU memory: blending on the host")
            return OnHost(self)
        return self

    def blends_on_device(self, grid: TileGrid) -> bool:
        if not self.on_gpu:
            return True
        need = stitcher_peak_pixels(grid) * (self.card.num_classes + 1) * 4
        return need < 0.5 * torch.cuda.mem_get_info(self.torch_device)[0]

    def expected_runtime(self, shape: tuple[int, int]) -> str | None:
        return self.model.expected_runtime(shape) if isinstance(self.model, ExportedModel) else None


class OnHost:
    """A GPU engine whose scores are blended on the host."""

    def __init__(self, engine: TorchEngine):
        self.engine, self.name, self.device, self.precision = engine, engine.name, engine.device, engine.precision
        self.lookahead = engine.lookahead
        self.arrays = TorchArrays(torch.device("cpu"))

    def scores(self, batch: np.ndarray) -> torch.Tensor:
        return self.engine.scores(batch).cpu()

    def out_of_memory(self, error: BaseException) -> bool:
        return self.engine.out_of_memory(error)

    def for_grid(self, grid: TileGrid) -> "OnHost":
        return self

    def expected_runtime(self, shape: tuple[int, int]) -> str | None:
        return None


def views(flip: bool, turns: bool) -> list[tuple[int, bool]]:
    """The (quarter turns, mirrored) views averaged: the image alone; with `flip` its mirror image;
    with `turns` the three quarter turns of each (with both, the eight symmetries of a square, the
    usual test-time averaging of imagery seen from above, where no direction is up)."""
    return [(k, m) for k in (range(4) if turns else (0,)) for m in ((False, True) if flip else (False,))]


def multi_scale_probabilities(model: Callable, x: torch.Tensor, scales: tuple[float, ...], flip: bool,
                              turns: bool = False) -> torch.Tensor:
    """The mean softmax over scaled (mirrored, turned) copies of normalised `x`, each brought back
    to x's size and orientation (DeepLab / RefineNet test-time averaging)."""
    h, w = x.shape[-2:]
    total, seen = None, views(flip, turns)
    for s in scales:
        xs = x if s == 1 else F.interpolate(x, (max(1, round(h * s)), max(1, round(w * s))),
                                            mode="bilinear", align_corners=False)
        for k, mirrored in seen:
            xv = torch.rot90(xs, k, (-2, -1)) if k else xs
            xv = xv.flip(-1) if mirrored else xv
            y = model(xv.contiguous(memory_format=torch.channels_last) if k else xv).float()
            y = y.flip(-1) if mirrored else y
            y = torch.rot90(y, -k, (-2, -1)) if k else y
            if s != 1:
                y = F.interpolate(y, (h, w), mode="bilinear", align_corners=False)
            p = y.softmax(1)
            total = p if total is None else total + p
    return total / (len(scales) * len(seen))


def _exporter() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxscript") is not None
