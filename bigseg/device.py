"""Where tensors live and how results come back: device and precision from the user's words,
the stitcher's arrays as torch tensors on the device, and asynchronous copies to the host.

On a GPU the tile scores never leave it: they are blended there (`TorchArrays`), each finished
rectangle is reduced there to uint8 labels (and probabilities), and only those travel to the
host, through page-locked memory without blocking (`HostCopy`), while the GPU goes on with the
next batch.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from bigseg.errors import InputError
from bigseg.cache import native_bf16


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{name}: CUDA is not available on this machine; use the CPU", param="device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"{name}: only {torch.cuda.device_count()} CUDA device(s)", param="device")
    elif device.type != "cpu":
        raise InputError(f"unsupported device {name!r}; use auto, cpu or cuda[:N]")
    return device


def resolve_precision(name: str, device: torch.device, cpu_bf16: bool = True) -> torch.dtype:
    """`auto`: bf16 on GPUs that support it and (inference, `cpu_bf16`) on CPUs with native bf16
    units, fp32 elsewhere; `$BIGSEG_PRECISION` replaces `auto` when set (the tests pin fp32 with it).
    Training keeps fp32 on every CPU (`cpu_bf16=False`): its recipes were made at fp32 there."""
    if name == "auto":
        name = os.environ.get("BIGSEG_PRECISION") or "auto"
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_bf16 and native_bf16():
            return torch.bfloat16
        return torch.float32
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise InputError(f"unknown precision {name!r}; use auto, fp32, bf16 or fp16")
    if table[name] is torch.float16 and device.type != "cuda":
        raise InputError("fp16 needs a GPU; use fp32 or bf16 on the CPU", param="precision")
    return table[name]


def labels_of(scores: torch.Tensor) -> torch.Tensor:
    """(C, h, w) scores -> (h, w) uint8 class indices, the first maximum on ties (as argmax).
    `max(0).indices`: on the CPU torch's argmax over the leading dimension is ~6x slower."""
    return scores.max(0).indices.to(torch.uint8)


class TorchArrays:
    """The stitcher's array namespace (`bigseg.tiling.NumpyArrays`) for float32 tensors on `device`."""

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
