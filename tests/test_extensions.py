"""Each extension is one module in one place (docs/development.md, "Where to add a thing"): a toy
one of each, added here the way a contributor's module would add it, works end to end."""
import json
from dataclasses import dataclass

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from bigseg.checkpoint import load_checkpoint
from bigseg.infer.card import card_of
from bigseg.infer.engines import base as engines
from bigseg.infer.predictor import Predictor
from bigseg.io.kinds import Output
from bigseg.models.base import FlatConfig, SegmentationModel
from bigseg.tiling.stitch import NUMPY
from tests.cli_helpers import run_cli
from tests.conftest import make_generic_dataset


@dataclass(frozen=True)
class PixelwiseConfig(FlatConfig):
    width: int = 4


class Pixelwise(SegmentationModel):
    """A toy architecture: class scores from each pixel's bands alone (two 1x1 convolutions)."""

    output_multiple, context_margin = 1, 0

    def __init__(self, num_classes: int, in_channels: int, width: int = 4):
        super().__init__(num_classes, in_channels, PixelwiseConfig(width))
        self.net = nn.Sequential(nn.Conv2d(in_channels, width, 1), nn.ReLU(), nn.Conv2d(width, num_classes, 1))

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        logits = self.net(x)
        return (logits, None) if return_aux else logits


@pytest.fixture
def toy_architecture(monkeypatch):
    """`toy-pixelwise`, registered as a model module registers itself (its facts and its builder)."""
    from bigseg import catalogue
    from bigseg.models import registry

    monkeypatch.setitem(catalogue.ARCHITECTURES, "toy-pixelwise",
                        catalogue.ArchFacts("a toy", "one pixel at a time", 0, 0, 0.0))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # undone after the test
    registry.register("toy-pixelwise", width=4)(lambda num_classes, in_channels, width: Pixelwise(num_classes,
                                                                                                  in_channels, width))
    return "toy-pixelwise"


def test_a_new_model_is_one_registered_module_and_then_trains_and_predicts_by_name(toy_architecture, tmp_path, capsys):
    data = make_generic_dataset(tmp_path / "data", n=6)
    code, out, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "run", "--model", toy_architecture,
                             "--epochs", "1", "--batch-size", "2", "--crop", "64", "--workers", "0", "--device", "cpu",
                             "--eval-every", "0")
    assert code == 0, err
    ckpt = load_checkpoint(tmp_path / "run" / "final.pt")
    assert ckpt.arch == toy_architecture and ckpt.config == {"width": 4}
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    code, _, err = run_cli(capsys, "predict", tmp_path / "a.png", "-m", tmp_path / "run" / "final.pt",
                           "-o", tmp_path / "out", "--device", "cpu", "--tile", "32")
    assert code == 0, err
    assert cv2.imread(str(tmp_path / "out" / "a.mask.png"), cv2.IMREAD_UNCHANGED).shape == (50, 70)


class LinearEngine:
    """A toy engine that reads no export: each pixel's class scores are a fixed linear map of its
    normalised bands, computed in numpy (what a contributor's `TileEngine` module would do)."""

    name, device, precision, lookahead, arrays = "toy-linear", "cpu", "float32", 0, NUMPY

    def __init__(self, checkpoint, settings, note):
        self.card = card_of(checkpoint, None, "toy-linear weights")
        self.weights = np.random.default_rng(0).normal(size=(self.card.num_classes, self.card.in_channels))
        norm = self.card.normalization
        self.mean = np.asarray(norm.mean, np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(norm.std, np.float32).reshape(1, -1, 1, 1)

    def scores(self, batch: np.ndarray) -> np.ndarray:
        return np.einsum("cb,nbhw->nchw", self.weights, (batch - self.mean) / self.std).astype(np.float32)

    def out_of_memory(self, error: BaseException) -> bool:
        return False

    def for_grid(self, grid):
        return self

    def expected_runtime(self, shape):
        return None


def test_a_new_engine_is_one_registered_module_and_runs_from_the_cli(tiny_checkpoint, tmp_path, capsys, request):
    engines.register_engine("toy-linear", LinearEngine)
    request.addfinalizer(lambda: engines.BUILDERS.pop("toy-linear"))
    image = np.random.default_rng(1).integers(0, 255, (90, 130, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    code, out, err = run_cli(capsys, "predict", tmp_path / "a.png", "-m", tiny_checkpoint, "-o", tmp_path / "out",
                             "--engine", "toy-linear", "--tile", "64", "--overlap", "16", "--device", "cpu")
    assert code == 0, err
    engine = LinearEngine(load_checkpoint(tiny_checkpoint), None, None)
    whole = engine.scores(image[..., ::-1].transpose(2, 0, 1)[None].astype(np.float32))[0].argmax(0)
    got = cv2.imread(str(tmp_path / "out" / "a.mask.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(got, whole)  # pixelwise: the tiles stitch to the whole image's labels exactly


def test_a_new_onnx_runtime_is_one_registered_module_and_auto_knows_it(tiny_checkpoint, tmp_path, monkeypatch,
                                                                       request):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from bigseg.infer.engines import onnx

    monkeypatch.setenv("BIGSEG_CACHE", str(tmp_path / "cache"))
    request.addfinalizer(lambda: engines.RUNTIMES.pop("toy-rt"))
    engines.register_runtime(engines.Runtime("toy-rt", "Toy Runtime", "onnxruntime", "onnxruntime", onnx.open_export))
    ckpt = load_checkpoint(tiny_checkpoint)
    image = np.random.default_rng(2).uniform(0, 255, (3, 100, 120)).astype(np.float32)
    toy = Predictor(ckpt, "cpu", "fp32", tile=128, engine="toy-rt")
    assert toy.engine.model.runtimes == ("toy-rt",) and "toy-rt" in engines.engine_names()
    scores = toy.scores(image)
    assert any("exporting the model for Toy Runtime" in n for n in toy.notes)
    reference = Predictor(ckpt, "cpu", "fp32", tile=128, engine="onnx").scores(image)
    assert np.allclose(scores, reference, atol=1e-4)
    assert Predictor(ckpt, "cpu", "fp32", tile=128, engine="auto").engine.model.runtimes[-1] == "toy-rt"


class ArraySource:
    """A toy data source: images and labels held in one .npz file per split (`images`: (n, 3, h,
    w) uint8, `labels`: (n, h, w) class indices), each image read whole, as a contributor's
    source module would define it."""

    def __init__(self, path):
        from bigseg.train.data import ImageSource
        from bigseg.train.data.classes import fixed_table

        class Arrays(ImageSource):  # images read whole: sampled, augmented and scored as image folders are
            name, channels, kind = path.stem, 3, "arrays"

            def __init__(inner):
                arrays = np.load(path)
                inner.images, inner.labels = arrays["images"], arrays["labels"]
                inner.table = fixed_table(["dark", "light"], [[0, 0, 0], [255, 255, 255]], [0, 1], str(path))

            def __len__(inner):
                return len(inner.images)

            def item_id(inner, i):
                return f"{path}#{i}"

            def size(inner, i):
                return inner.images.shape[3], inner.images.shape[2]

            def read(inner, i, window=None):
                from bigseg.train.data import Patch

                image, label = inner.images[i], inner.labels[i]
                if window is not None:
                    image, label = image[(slice(None), *window.slices)], label[window.slices]
                return Patch(image.copy(), label.copy(), np.ones(label.shape, bool))

        self.source = Arrays()


def write_arrays(folder, seed=0):
    """Light squares on dark ground, labelled light and dark, in train.npz and val.npz."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    (folder / "arrays.json").write_text("{}")
    for split, n in (("train", 6), ("val", 2)):
        labels = np.zeros((n, 64, 80), np.uint8)
        for k in range(n):
            y, x = rng.integers(0, 32), rng.integers(0, 48)
            labels[k, y:y + 24, x:x + 24] = 1
        images = (labels[:, None].repeat(3, 1) * 180 + rng.integers(0, 60, (n, 3, 64, 80))).astype(np.uint8)
        np.savez(folder / f"{split}.npz", images=images, labels=labels)
    return folder


@pytest.fixture
def array_layout(request):
    """The `arrays` layout, registered as a data source module registers itself."""
    from bigseg.train.data import DataSplit, Layout, Region, register_layout
    from bigseg.train.data.layouts import LAYOUTS

    class Splits:
        def __init__(self, root, settings):
            self.root, self.notes = root, ["read from arrays"]

        def split(self, names, split):
            source = ArraySource(self.root / f"{names[0]}.npz").source
            return DataSplit(source, [Region(i) for i in range(len(source))], split)

    layout = register_layout(Layout("arrays", "arrays (train.npz + val.npz beside arrays.json)",
                                    lambda root: (root / "arrays.json").is_file(), Splits))
    request.addfinalizer(lambda: LAYOUTS.remove(layout))
    return layout


def test_a_new_data_source_is_one_registered_module_and_trains_and_scores_from_the_cli(
        array_layout, toy_architecture, tmp_path, capsys):
    data = write_arrays(tmp_path / "arrays")
    code, out, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "run", "--model", toy_architecture,
                             "--epochs", "2", "--batch-size", "2", "--crop", "64", "--workers", "0", "--device", "cpu",
                             "--precision", "fp32")
    assert code == 0, err
    record = json.loads((tmp_path / "run" / "data.json").read_text())
    assert record["kind"] == "arrays" and "read from arrays" in record["notes"]
    code, out, err = run_cli(capsys, "eval", "--model", tmp_path / "run" / "best.pt", "--data", data, "--split", "val",
                             "--device", "cpu")
    assert code == 0, err
    assert "val: 2 images" in out and "mIoU" in out


class CountsOutput(Output):
    """A toy output format: each class's pixel count, from the mask's rows as they are written."""

    takes_rows = True

    def __init__(self, target):
        self.path, self.counts = target.sibling("counts", ".json"), np.zeros(256, np.int64)

    def rows(self, top, labels):
        self.counts += np.bincount(labels.ravel(), minlength=256)

    def commit(self):
        from bigseg.atomic import write_text

        return write_text(self.path, json.dumps({str(v): int(n) for v, n in enumerate(self.counts) if n}))


@pytest.fixture
def counts_kind(request):
    """The `counts` output kind, registered as an output format module registers itself."""
    from bigseg.io.kinds import OUTPUT_KINDS, OutputKind, register_output

    kind = register_output(OutputKind("counts", ".counts.", "a counts table", lambda write: False,
                                      lambda t: t.sibling("counts", ".json"), CountsOutput,
                                      lambda t: {"format": "JSON"}))
    request.addfinalizer(lambda: OUTPUT_KINDS.pop("counts"))
    return kind


def test_a_new_output_format_is_one_registered_module_and_is_written_from_the_cli(
        counts_kind, tiny_checkpoint, tmp_path, capsys):
    from tests.conftest import write_geotiff

    data = np.random.default_rng(2).integers(1, 255, (3, 700, 150)).astype(np.uint8)
    data[:, 100:200, :40] = 0  # nodata
    src = write_geotiff(tmp_path / "a.tif", 150, 700, nodata=0, data=data)  # two block rows of the mask
    args = ("predict", src, "-m", tiny_checkpoint, "-o", tmp_path / "out", "--tile", "64", "--overlap", "16",
            "--device", "cpu", "--also", "counts")
    code, out, err = run_cli(capsys, *args, "--dry-run", "--json")
    assert code == 0, err
    assert [o["path"].split("/")[-1] for o in json.loads(out)[0]["outputs"]] == ["a.mask.tif", "a.counts.json"]
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    import rasterio

    with rasterio.open(tmp_path / "out" / "a.mask.tif") as ds:
        mask = ds.read(1)
    counts = json.loads((tmp_path / "out" / "a.counts.json").read_text())
    assert counts == {str(v): int(n) for v, n in enumerate(np.bincount(mask.ravel())) if n}
    assert counts["255"] == 100 * 40  # the input's nodata, counted as the mask holds it
    code, out, err = run_cli(capsys, *args, "--json")  # every file there: nothing to do
    assert code == 0 and json.loads(out)["skipped"]
    code, out, err = run_cli(capsys, *args[:-1], "nonesuch")
    assert code != 0 and "no output kind 'nonesuch'; there are mask, probs, overlay, polygons, areas, counts" in err
