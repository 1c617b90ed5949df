"""Shared fixtures: a tiny ladder model, its checkpoint, and synthetic rasters made in tmp_path."""
from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite runs as one worker per core (`-n auto`): a worker and the subprocesses it starts
    # compute on one thread each, so workers do not fight over the cores with spinning threads
    os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np
import pytest
import torch

from bigseg.checkpoint import from_model, save_checkpoint
from bigseg.models import create_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY = dict(densenet=dict(growth_rate=4, block_config=[1, 2, 2, 1], num_init_features=8, bn_size=2),
            spp_bottleneck=8, spp_level=4, spp_width=8, up_widths=[8, 8, 8, 8], squeeze=8)
CLASSES = ["sky", "road", "car"]


# a tiny configuration of every registered architecture (tests fail for one without)
TINY_BY_ARCH = {
    **{f"ladder-dn{d}": TINY for d in ("121", "169", "161")},
    "deeplabv1-vgg16": dict(fc_width=16, dropout=0.0),
    "deeplabv2-rn101": dict(depth=18, rates=[2, 4], train_scales=[1.0, 0.5]),
    "deeplabv3-rn101": dict(depth=18, aspp_width=16),
    "deeplabv3plus-xception65": dict(middle_blocks=1, aspp_width=16, low_level_width=8, decoder_width=16),
    "deeplabv3plus-rn50": dict(depth=18, aspp_width=16, low_level_width=8, decoder_width=16),
    "deeplabv3plus-rn101": dict(depth=18, output_stride=8, aspp_width=16, low_level_width=8, decoder_width=16),
    "refinenet-rn101": dict(depth=18, widths=[8, 8, 8, 16]),
    "dupsampling-rn50": dict(depth=18, compressed=8, width=16, low_level_width=8, fit_patches=400),
    "dynamic-routing-l16": dict(layers=3, width=8),
    **{f"swiftnet-{e}": dict(width=16) for e in ("lite0", "lite1", "lite2", "rn18")},
}


def tiny_model(num_classes: int = 3, in_channels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return create_model("ladder-dn121", num_classes, in_channels, **TINY)


@pytest.fixture(autouse=True)
def torch_engine_and_private_cache(tmp_path_factory, monkeypatch):
    """Tests run the torch engine at fp32 unless they ask for another engine or precision (an
    export takes seconds), and never write to the user's cache folder."""
    monkeypatch.setenv("BIGSEG_ENGINE", "torch")
    monkeypatch.setenv("BIGSEG_PRECISION", "fp32")  # the same results on a CPU with bf16 units as without
    monkeypatch.setenv("BIGSEG_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """The CLI installs SIGTERM and SIGINT handlers (a stop saves what a job has) when a test runs
    it in this process; they must not outlive the test, or a `timeout` or Ctrl-C meant for pytest
    would be taken for a job's stop and the suite would run on."""
    import signal

    from bigseg import runtime

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in before.items():
        if signal.getsignal(s) is not handler:
            signal.signal(s, handler)
    runtime._stop_signal, runtime._pending = None, False


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    model = tiny_model()
    # a non-trivial running mean/var so eval-mode batchnorm does something
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return save_checkpoint(from_model(model, "ladder-dn121", CLASSES, training={"note": "test"}),
                           tmp_path / "tiny.pt")


def write_geotiff(path: Path, width: int, height: int, count: int = 3, dtype="uint8", nodata=None,
                  seed: int = 0, tiled: bool = True, crs: str = "EPSG:32633", data: np.ndarray | None = None,
                  empty: bool = False, **extra) -> Path:
    """A GeoTIFF of random (or given) pixels; `empty`: write no pixels at all (with SPARSE_OK=True
    a file without blocks, whatever its size)."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    if data is None and not empty:
        data = rng.integers(0, 255, (count, height, width)).astype(dtype)
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=dtype, crs=crs,
                   transform=from_origin(500000.0, 4000000.0, 0.5, 0.5), nodata=nodata, **extra)
    if tiled:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as dst:
        if not empty:
            dst.write(data)
    return path


def interrupt_after(segmenter, calls: int) -> None:
    """Make `segmenter` raise KeyboardInterrupt at its `calls`-th batch: an interrupted job."""
    real, count = segmenter.engine.scores, {"n": 0}

    def failing(batch):
        count["n"] += 1
        if count["n"] == calls:
            raise KeyboardInterrupt
        return real(batch)

    segmenter.engine.scores = failing


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED


def tiny_config(data, run_dir, **kw):
    """A `TrainConfig` of the tiny ladder on the CPU in fp32: two epochs of 64-px crops."""
    from bigseg.train.loop import TrainConfig

    base = dict(data=str(data), run_dir=str(run_dir), arch_config=TINY, epochs=2, batch_size=2, crop=64,
                workers=0, device="cpu", precision="fp32", val_tile=128, seed=3)
    return TrainConfig(**{**base, **kw})


def make_generic_dataset(root: Path, n: int = 6, size: tuple[int, int] = (80, 96), seed: int = 0) -> Path:
    """images/ + masks/ + classes.json with learnable content: class = which colour a region has."""
    import json

    import cv2

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], np.uint8)
    h, w = size
    for i in range(n):
        label = np.zeros((h, w), np.uint8)
        label[:, w // 3:] = 1
        label[h // 2:, : w // 2] = 2
        label = np.roll(label, int(rng.integers(0, w)), 1)
        image = colours[label] + rng.integers(0, 30, (h, w, 3)).astype(np.uint8)
        label[0, :5] = 255  # some ignore
        cv2.imwrite(str(root / "images" / f"im{i:02d}.png"), image[..., ::-1])
        cv2.imwrite(str(root / "masks" / f"im{i:02d}.png"), label)
    (root / "classes.json").write_text(json.dumps({"classes": CLASSES, "palette": [[255, 0, 0], [0, 255, 0], [0, 0, 255]],
                                                   "ignore": [255]}))
    return root


def make_camvid_dataset(root: Path, n: int = 6, val: int = 2, size: tuple[int, int] = (80, 96), seed: int = 0) -> Path:
    """A CamVid-layout folder (train/ + trainannot/, val/ + valannot/) of small images with the
    same learnable content as `make_generic_dataset`: an image folder, read whole."""
    import cv2

    generic = make_generic_dataset(root / "generic", n + val, size, seed)
    for split, names in (("train", range(n)), ("val", range(n, n + val))):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in names:
            image = cv2.imread(str(generic / "images" / f"im{i:02d}.png"))
            label = cv2.imread(str(generic / "masks" / f"im{i:02d}.png"), cv2.IMREAD_UNCHANGED)
            cv2.imwrite(str(root / split / f"im{i:02d}.png"), image)
            cv2.imwrite(str(root / f"{split}annot" / f"im{i:02d}.png"), np.where(label == 255, 11, label).astype(np.uint8))
    return root


def small_receptive_field_net() -> torch.nn.Module:
    """Two 5x5 convolutions: a receptive radius of 4 pixels (tiles with overlap 16 stitch exactly)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, padding=2), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 4, 5, padding=2)).eval()


def tiled_prediction(predict, image: np.ndarray, tile: int = 96, overlap: int = 16) -> np.ndarray:
    """`predict` over (bands, H, W) `image` through stream_tiles, stitched into one array."""
    from bigseg.tiling.geometry import TileGrid
    from bigseg.tiling.stitch import Pipeline, stream_tiles

    grid = TileGrid(image.shape[2], image.shape[1], tile, overlap)
    read = lambda win: (image[(slice(None), *win.slices)], np.ones((win.height, win.width), bool))
    tiled = None
    for win, block, _ in stream_tiles(grid, read, Pipeline(predict, 4, np.zeros((len(image), 1, 1), np.float32), 5)):
        if tiled is None:
            tiled = np.zeros((len(block), *image.shape[1:]), block.dtype)
        tiled[(slice(None), *win.slices)] = block
    return tiled
