"""Training data held on the training device and augmented there (`bigseg train --data-on-device`).

A small data set on a GPU (CamVid: 367 frames of 480x360, 254 MB as uint8 images and labels; the
six Dubai training mosaics: 60 MP, 240 MB) is decoded once and kept on the device; each batch is
then cut, scaled, padded, cropped, flipped and jittered there, so no worker process decodes,
resizes and copies every sample every epoch and the GPU does not wait for the CPU. Image folders
are held image by image; raster scenes region by region (a whole scene, or a training block of a
scene split by blocks), with the label's ignore already applied, and each window the sampler draws
is a slice of its region.

The random choices are the CPU path's (`transforms.draw`, or the sampler's window and
`transforms.window_draw`, with the same per-sample generator), so a batch is the same after a
resume and whatever the batch composition. Only the resampling runs on the device: labels by
nearest neighbour with OpenCV's INTER_NEAREST mapping (equal labels), images by bilinear
interpolation when enlarging (OpenCV's INTER_LINEAR rounded to 8 bits, so within one grey level)
and antialiased bilinear when shrinking, where OpenCV averages areas (`tests/test_train_data.py`
bounds the differences).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from bigseg.errors import TrainingError
from bigseg.tiling.geometry import Window
from bigseg.train.data import IGNORE, DataSplit, RandomWindows
from bigseg.train.transforms import Augment, Draw, draw, sample_rng, window_draw

_GREY = (0.299, 0.587, 0.114)
_DEVICE_SHARE = 0.5  # at most this share of the device's free memory goes to the data


class DeviceData:
    """Every image (image folders) or region (raster scenes) of the split `data` as uint8 tensors
    on `device`: images (bands, H, W), labels (H, W)."""

    def __init__(self, data: DataSplit, device: torch.device):
        source = data.source
        room = _room(device)
        bounds = [source.extent(r) for r in data.regions]
        if bounds[0] is not None:  # a scene's size is known before it is read
            need = sum(b.width * b.height * (source.channels + 1) for b in bounds)
            if need > room:
                raise TrainingError(f"--data-on-device: the training scenes need {need / 2**30:.1f} GiB on {device}, "
                                    f"more than half of its free memory ({room / 2**30:.1f} GiB); "
                                    f"train without --data-on-device")
        self.images: dict[int, torch.Tensor] = {}
        self.labels: dict[int, torch.Tensor] = {}
        self.regions: list[tuple[int, Window, int]] = []  # scenes: (item, bounds, key of images/labels)
        self.nbytes = 0
        for key, (region, window) in enumerate(zip(data.regions, bounds)):
            patch = source.read(region.item, window)
            if patch.image.dtype != np.uint8:
                raise TrainingError(f"holds 8-bit images; {source.item_id(region.item)} is not",
                                    param="data_on_device")
            self.nbytes += patch.image.nbytes + patch.label.nbytes
            if self.nbytes > room:
                raise TrainingError(f"--data-on-device: the training split needs more than {room / 2**30:.1f} GiB "
                                    f"on {device} (half of its free memory); train without --data-on-device")
            key = region.item if window is None else key
            self.images[key] = torch.from_numpy(np.ascontiguousarray(patch.image)).to(device)
            self.labels[key] = torch.from_numpy(np.ascontiguousarray(patch.label)).to(device)
            if window is not None:
                self.regions.append((region.item, window, key))
        self.device = device

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, index: int, aug: Augment, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame `index` augmented: (bands, crop, crop) float32 in 0..255 and (crop, crop) int64."""
        image, label = self.images[index], self.labels[index]
        return augment_on_device(image, label, aug, draw(aug, rng, *label.shape, image.shape[0]))

    def window(self, item: int, window: Window, scale: float, aug: Augment, rng: np.random.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The window `window` of scene `item` (inside one held region), drawn at `scale`, augmented."""
        for held_item, b, key in self.regions:
            if held_item == item and b.col_off <= window.col_off and window.col_end <= b.col_end \
                    and b.row_off <= window.row_off and window.row_end <= b.row_end:
                rows = slice(window.row_off - b.row_off, window.row_end - b.row_off)
                cols = slice(window.col_off - b.col_off, window.col_end - b.col_off)
                image, label = self.images[key][:, rows, cols], self.labels[key][rows, cols]
                d = window_draw(aug, rng, scale, window.height, window.width, image.shape[0])
                return augment_on_device(image, label, aug, d)
        raise TrainingError(f"window {window} of scene {item} is in no region held on the device")

    def batches(self, sampler, keys: list[int], aug: Augment, seed: int, epoch: int, batch_size: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the sample keys `keys` in order (an incomplete last batch is dropped): whole
        images by item, or the windows `sampler` draws for each key."""
        for start in range(0, len(keys) - batch_size + 1, batch_size):
            pairs = [self._sample(sampler, k, aug, sample_rng(seed, epoch, k)) for k in keys[start:start + batch_size]]
            yield torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def _sample(self, sampler, key: int, aug: Augment, rng: np.random.Generator):
        if not isinstance(sampler, RandomWindows):
            return self.sample(key, aug, rng)
        item, window, scale = sampler.draw(rng, aug.crop, aug.scale_min, aug.scale_max)
        return self.window(item, window, scale, aug, rng)


def augment_on_device(image: torch.Tensor, label: torch.Tensor, aug: Augment, d: Draw
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """`transforms.augment` with the choices `d`, on the tensors' device."""
    h, w = label.shape
    x = image.float()[None]
    if d.size != (w, h):
        size = (d.size[1], d.size[0])
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=d.scale < 1)
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0]  # exact: 0..255
    c = aug.crop
    ph, pw = max(0, c - label.shape[0]), max(0, c - label.shape[1])
    if ph or pw:  # pad with ignore; the padded image area is never scored
        x = F.pad(x, (0, pw, 0, ph))
        label = F.pad(label, (0, pw, 0, ph), value=IGNORE)
    x, label = x[0, :, d.y:d.y + c, d.x:d.x + c], label[d.y:d.y + c, d.x:d.x + c]
    if d.flip:
        x, label = x.flip(-1), label.flip(-1)
    if d.turns:  # as np.rot90: counter-clockwise, in the image plane
        x, label = torch.rot90(x, d.turns, (-2, -1)), torch.rot90(label, d.turns, (-2, -1))
    if d.jitter is not None:
        x = _jitter(x, d.jitter)
    if d.gains is not None:
        x = (x * x.new_tensor(d.gains).view(-1, 1, 1)).clamp_(0, 255)
    if d.gamma is not None:
        x = 255 * (x.clamp(0, 255) / 255).pow(d.gamma)  # no negative base, whatever the resampling
    return x.contiguous(), label.long()


def _jitter(image: torch.Tensor, factors: tuple[float, float, float]) -> torch.Tensor:
    """Brightness, contrast and (RGB images only) saturation, as `transforms._jitter`."""
    b, c, s = factors
    rgb = image.shape[0] == 3
    grey = (image * image.new_tensor(_GREY).view(3, 1, 1)).sum(0) * b if rgb else None
    image = image * b
    mean = image.mean()
    image = (image - mean) * c + mean
    if rgb:
        image = (image - grey) * s + grey
    return image.clamp_(0, 255)


def _room(device: torch.device) -> float:
    """The bytes the data may take: half of a GPU's free memory (no limit in host memory)."""
    if device.type != "cuda":
        return float("inf")
    free, _ = torch.cuda.mem_get_info(device)
    return _DEVICE_SHARE * free
