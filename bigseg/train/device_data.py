"""Training data held on the training device and augmented there (`bigseg train --data-on-device`).

A small data set on a GPU (CamVid: 367 frames of 480x360, 254 MB as uint8 images and labels) is
decoded once and kept on the device; each batch is then scaled, padded, cropped, flipped and
jittered there, so no worker process decodes, resizes and copies every sample every epoch and
the GPU does not wait for the CPU.

The random choices are the CPU path's (`transforms.draw` with the same per-sample generator), so
a batch is the same after a resume and whatever the batch composition. Only the resampling runs
on the device: labels by nearest neighbour with OpenCV's INTER_NEAREST mapping (equal labels),
images by bilinear interpolation when enlarging (OpenCV's INTER_LINEAR rounded to 8 bits, so
within one grey level) and antialiased bilinear when shrinking, where OpenCV averages areas
(`tests/test_device_data.py` bounds the differences).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from bigseg.errors import TrainingError
from bigseg.train.data import IGNORE, DataSplit
from bigseg.train.transforms import Augment, Draw, draw, sample_rng

_GREY = (0.299, 0.587, 0.114)
_DEVICE_SHARE = 0.5  # at most this share of the device's free memory goes to the data


class DeviceData:
    """Every image of the split `data` (whole images of an image folder) as uint8 tensors on
    `device`: images (3, H, W), labels (H, W), by item index."""

    def __init__(self, data: DataSplit, device: torch.device):
        if not data.source.whole_images:
            raise TrainingError("holds whole images; raster scenes are read in windows by data workers",
                                param="data_on_device")
        room = _room(device)
        self.images: dict[int, torch.Tensor] = {}
        self.labels: dict[int, torch.Tensor] = {}
        self.nbytes = 0
        for region in data.regions:
            patch = data.source.read(region.item)
            if patch.image.dtype != np.uint8:
                raise TrainingError(f"holds 8-bit images; {data.source.item_id(region.item)} is not",
                                    param="data_on_device")
            self.nbytes += patch.image.nbytes + patch.label.nbytes
            if self.nbytes > room:
                raise TrainingError(f"--data-on-device: the training split needs more than {room / 2**30:.1f} GiB "
                                    f"on {device} (half of its free memory); train without --data-on-device")
            self.images[region.item] = torch.from_numpy(np.ascontiguousarray(patch.image)).to(device)
            self.labels[region.item] = torch.from_numpy(np.ascontiguousarray(patch.label)).to(device)
        self.device = device

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, index: int, aug: Augment, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame `index` augmented: (3, crop, crop) float32 in 0..255 and (crop, crop) int64."""
        image, label = self.images[index], self.labels[index]
        return augment_on_device(image, label, aug, draw(aug, rng, *label.shape))

    def batches(self, indices: list[int], aug: Augment, seed: int, epoch: int, batch_size: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the items `indices` in order (an incomplete last batch is dropped)."""
        for start in range(0, len(indices) - batch_size + 1, batch_size):
            pairs = [self.sample(i, aug, sample_rng(seed, epoch, i)) for i in indices[start:start + batch_size]]
            yield torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


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
        x = (x * x.new_tensor(d.gains).view(3, 1, 1)).clamp_(0, 255)
    if d.gamma is not None:
        x = 255 * (x.clamp(0, 255) / 255).pow(d.gamma)  # no negative base, whatever the resampling
    return x.contiguous(), label.long()


def _jitter(image: torch.Tensor, factors: tuple[float, float, float]) -> torch.Tensor:
    b, c, s = factors
    grey = (image * image.new_tensor(_GREY).view(3, 1, 1)).sum(0) * b
    image = image * b
    mean = image.mean()
    image = (image - mean) * c + mean
    image = (image - grey) * s + grey
    return image.clamp_(0, 255)


def _room(device: torch.device) -> float:
    """The bytes the data may take: half of a GPU's free memory (no limit in host memory)."""
    if device.type != "cuda":
        return float("inf")
    free, _ = torch.cuda.mem_get_info(device)
    return _DEVICE_SHARE * free
