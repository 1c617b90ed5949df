"""Device side of predict: torch stitching equals numpy stitching (to float32 rounding); host copies."""
import numpy as np
import pytest
import torch

from bigseg.infer.engines.torch import HostCopy, TorchArrays, resolve_device, resolve_precision
from bigseg.errors import InputError
from bigseg.tiling.geometry import TileGrid
from bigseg.tiling.stitch import Pipeline, stream_tiles


def test_torch_arrays_stitch_like_numpy():
    grid = TileGrid(333, 250, 96, 40)
    rng = np.random.default_rng(3)
    image = rng.normal(size=(3, 250, 333)).astype(np.float32)
    valid = rng.random((250, 333)) > 0.05
    read = lambda win: (image[(slice(None), *win.slices)], valid[win.slices])

    def predict(x):  # tile-dependent scores, so blending matters
        return np.tanh(x * (1 + x.mean(axis=(1, 2, 3), keepdims=True)))

    fill = np.zeros((3, 1, 1), np.float32)
    expected = {w: b.copy() for w, b, _ in stream_tiles(grid, read, Pipeline(predict, 3, fill, 4))}
    got = {w: b.numpy() for w, b, _ in stream_tiles(grid, read, Pipeline(lambda x: torch.from_numpy(predict(x)), 3, fill,
                                                                        4, arrays=TorchArrays(torch.device("cpu"))))}
    assert expected.keys() == got.keys()
    for w in expected:
        # torch accumulates with a fused multiply-add: at most a rounding step from numpy's two ops
        np.testing.assert_allclose(got[w], expected[w], rtol=0, atol=1e-6)
        assert np.array_equal(got[w].argmax(0), expected[w].argmax(0)), w


def test_host_copy_gives_numpy_arrays():
    labels = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    arrays = HostCopy({"labels": labels}).numpy()
    assert isinstance(arrays["labels"], np.ndarray) and arrays["labels"].tolist() == labels.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_host_copy_from_the_gpu_waits_for_its_copy():
    x = torch.randn(4, 300, 300, device="cuda")
    labels = x.argmax(0).to(torch.uint8)
    assert np.array_equal(HostCopy({"l": labels}).numpy()["l"], labels.cpu().numpy())


def test_devices_and_precisions_are_checked():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_precision("auto", torch.device("cpu")) is torch.float32
    with pytest.raises(InputError, match="fp16 needs a GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda")


