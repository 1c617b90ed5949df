"""The predictor: batches independent of size, multi-scale and flip averaging, out-of-memory
back-off, overlap from the model, blending on the host."""
import re

import numpy as np
import pytest
import rasterio
import torch

from bigseg.checkpoint import from_model, load_checkpoint, save_checkpoint
from bigseg.tiling.geometry import default_overlap
from bigseg.models import create_model
from bigseg.models.receptive import effective_margin
from bigseg.infer.predictor import Predictor
from bigseg.run.file_job import predict_file
from tests.cli_helpers import run_cli
from tests.conftest import CLASSES, TINY_BY_ARCH, write_geotiff

FAST = ["--tile", "128", "--overlap", "32", "--device", "cpu"]


def oom_above(seg, limit_tiles: int = 1, limit_side: int = 10 ** 9):
    real = seg.engine.scores

    def guarded(batch):
        if len(batch) > limit_tiles or max(batch.shape[-2:]) > limit_side:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(batch)
    seg.engine.scores = guarded


def test_batch_size_does_not_change_the_result(tmp_path, tiny_checkpoint):
    image = np.random.default_rng(3).uniform(0, 255, (3, 200, 300)).astype(np.float32)
    ckpt = load_checkpoint(tiny_checkpoint)
    a = Predictor(ckpt, "cpu", "fp32", tile=128, overlap=32, batch_size=1).scores(image)
    b = Predictor(ckpt, "cpu", "fp32", tile=128, overlap=32, batch_size=5).scores(image)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_multiscale_and_flip_average_probabilities(tiny_checkpoint, tmp_path, capsys):
    import torch
    import torch.nn.functional as F

    ckpt = load_checkpoint(tiny_checkpoint)
    image = np.random.default_rng(4).uniform(0, 255, (3, 96, 128)).astype(np.float32)
    seg = Predictor(ckpt, "cpu", "fp32", tile=256, scales=(0.5, 1.0), flip=True)
    probs = seg.scores(image)
    assert np.allclose(probs.sum(0), 1, atol=1e-5)
    model = ckpt.build_model()
    x = (torch.from_numpy(image)[None] - torch.tensor(ckpt.normalization.mean).view(1, -1, 1, 1)) / torch.tensor(ckpt.normalization.std).view(1, -1, 1, 1)
    expected = 0
    with torch.no_grad():
        for xs in (F.interpolate(x, (48, 64), mode="bilinear", align_corners=False), x):
            for mirror in (False, True):
                y = model(xs.flip(-1) if mirror else xs)
                y = y.flip(-1) if mirror else y
                expected = expected + F.interpolate(y, (96, 128), mode="bilinear", align_corners=False).softmax(1)
    np.testing.assert_allclose(probs, (expected / 4)[0].numpy(), atol=1e-5)
    src = write_geotiff(tmp_path / "ms.tif", 150, 130)
    code, _, err = run_cli(capsys, "predict", src, "-m", tiny_checkpoint, "-o", tmp_path / "o", "--scales",
                           "0.75,1,1.25", "--flip", "--probs", *FAST)
    assert code == 0, err
    with rasterio.open(tmp_path / "o" / "ms.probs.tif") as p:
        assert np.abs(p.read().astype(int).sum(0) - 255).max() <= 2


def test_out_of_memory_halves_the_batch_with_the_same_output(tmp_path, tiny_checkpoint):
    import rasterio
    src = write_geotiff(tmp_path / "a.tif", 400, 300)
    ckpt = load_checkpoint(tiny_checkpoint)
    predict_file(Predictor(ckpt, "cpu", tile=64, overlap=16, batch_size=1), src, tmp_path / "one.tif")
    seg = Predictor(ckpt, "cpu", tile=64, overlap=16, batch_size=8)
    oom_above(seg, limit_tiles=2)
    result = predict_file(seg, src, tmp_path / "backoff.tif")
    assert seg.fitting_batch == 2
    assert [n for n in result.notes if "out of memory" in n] == [
        "out of memory with 8 tiles per batch: continuing with 4",
        "out of memory with 4 tiles per batch: continuing with 2"]
    with rasterio.open(tmp_path / "one.tif") as a, rasterio.open(tmp_path / "backoff.tif") as b:
        assert np.array_equal(a.read(), b.read())


def test_one_tile_that_does_not_fit_is_split_into_sub_tiles(tmp_path, tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    image = np.random.default_rng(0).integers(0, 255, (3, 200, 200)).astype(np.float32)
    # the 200-px tile is predicted as 100-px sub-tiles with the default overlap rule: exactly
    # what 100-px tiles give from the start
    half = Predictor(ckpt, "cpu", tile=100, batch_size=1).scores(image)
    seg = Predictor(ckpt, "cpu", tile=256)
    oom_above(seg, limit_side=128)
    backed = seg.scores(image)
    assert any("sub-tiles" in n for n in seg.notes)
    assert np.allclose(backed, half, atol=1e-5)
    seg = Predictor(ckpt, "cpu", tile=256)
    oom_above(seg, limit_side=16)
    with pytest.raises(Exception, match="out of memory even for 32-pixel tiles"):
        seg.scores(image)


def test_effective_margin_of_a_conv_stack_is_its_receptive_field():
    net = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 3, padding=1) for _ in range(5)])
    for conv in net:
        torch.nn.init.constant_(conv.weight, 1.0)
    assert effective_margin(net, 64, mass=1.0, in_channels=1) == 5
    assert effective_margin(net, 64, mass=0.5, in_channels=1) < 5


def test_overlap_follows_the_model(tmp_path):
    assert default_overlap(None, 1024) == 256 and default_overlap(40, 1024) == 160
    assert default_overlap(172, 1024) == 512 and default_overlap(172, 2048) == 688
    torch.manual_seed(0)
    model = create_model("dupsampling-rn50", 3, **TINY_BY_ARCH["dupsampling-rn50"])
    path = save_checkpoint(from_model(model, "dupsampling-rn50", CLASSES), tmp_path / "d.pt")
    seg = Predictor(load_checkpoint(path), "cpu", tile=1024)
    assert seg.overlap == 512 and "context margin 172" in seg.overlap_from
    assert Predictor(load_checkpoint(path), "cpu", tile=1024, overlap=100).overlap == 100


def test_blending_on_the_host_when_the_band_does_not_fit_gives_the_same_mask(tmp_path, tiny_checkpoint, monkeypatch):
    import rasterio

    from bigseg.checkpoint import load_checkpoint
    from bigseg.infer.engines.torch import TorchEngine
    from bigseg.infer.predictor import Predictor
    from bigseg.run.file_job import predict_file
    from tests.conftest import write_geotiff

    src = write_geotiff(tmp_path / "a.tif", 300, 200)
    seg = Predictor(load_checkpoint(tiny_checkpoint), "cpu", tile=64, overlap=16)
    predict_file(seg, src, tmp_path / "device.tif")
    monkeypatch.setattr(TorchEngine, "blends_on_device", lambda self, grid: False)
    result = predict_file(seg, src, tmp_path / "host.tif")
    assert any("blending on the host" in n for n in result.notes)
    with rasterio.open(tmp_path / "device.tif") as a, rasterio.open(tmp_path / "host.tif") as b:
        assert np.array_equal(a.read(), b.read())


def test_the_python_api_says_how_to_pass_an_image_and_scales_a_float_image_in_0_to_1(tmp_path, tiny_checkpoint):
    import warnings

    from bigseg import BigsegError
    from bigseg.checkpoint import load_checkpoint
    from bigseg.infer.predictor import Predictor

    seg = Predictor(load_checkpoint(tiny_checkpoint), "cpu", "fp32", tile=64)
    image = np.random.default_rng(0).integers(0, 256, (3, 48, 72)).astype(np.uint8)
    for bad, says in ((image.transpose(1, 2, 0), "looks like (height, width, bands): pass np.moveaxis(image, -1, 0)"),
                      (image[0], "a 2-D 48x72 array: one band is image[None]"),
                      (np.concatenate([image, image[:1]]), "has 4 band(s) first (4x48x72); the model takes 3")):
        with pytest.raises(BigsegError, match=re.escape(says)):
            seg.segment(bad)
    with pytest.raises(BigsegError, match="valid is 10x10; the image is 48x72"):
        seg.segment(image, np.ones((10, 10), bool))
    with pytest.warns(UserWarning, match=r"values lie in 0\.\.1; the model takes 0\.\.255"):
        scaled = seg.segment(image / 255.0)
    assert np.array_equal(scaled, seg.segment(image)) and seg.take_notes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 8-bit values as floats are what the model takes: no warning
        seg.segment(image.astype(np.float32))


def test_predict_file_creates_a_missing_output_folder_as_the_cli_does(tmp_path, tiny_checkpoint):
    from bigseg.checkpoint import load_checkpoint
    from bigseg.infer.predictor import Predictor
    from bigseg.run.file_job import predict_file

    src = write_geotiff(tmp_path / "a.tif", 64, 48)
    seg = Predictor(load_checkpoint(tiny_checkpoint), "cpu", "fp32", tile=64)
    result = predict_file(seg, src, tmp_path / "new" / "deeper" / "a.mask.tif")
    assert result.output.is_file()
