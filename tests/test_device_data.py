"""Training data on the device: the same augmentation as the worker path, from frames decoded once."""
import json

import numpy as np
import pytest
import rasterio
import torch

from bigseg.errors import TrainingError
from bigseg.train.data import IGNORE, DataSplit, ImageSource, Patch, Region
from bigseg.train.device_data import DeviceData
from bigseg.train.transforms import Augment, augment, sample_rng


class Frames(ImageSource):
    """Images of textured synthetic frames with thin structures (the cases resampling changes)."""

    channels, name = 3, "frames"

    def __init__(self, n=6, size=(90, 130)):
        rng = np.random.default_rng(0)
        h, w = size
        yy, xx = np.mgrid[:h, :w]
        self.items = []
        for i in range(n):
            image = (rng.integers(0, 256, (h, w, 3)) * 0.3 + 120 + 60 * np.sin(xx / (3 + i))[..., None]).astype(np.uint8)
            label = ((xx // (2 + i) + yy // 7) % 4).astype(np.uint8)
            label[:, (7 * i) % w] = 3  # one-pixel poles
            label[rng.random((h, w)) < 0.02] = IGNORE
            self.items.append((image, label))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def read(self, i, window=None):
        image, label = self.items[i]
        return Patch(np.ascontiguousarray(image.transpose(2, 0, 1)), label.copy(), np.ones(label.shape, bool))

    def split(self) -> DataSplit:
        return DataSplit(self, [Region(i) for i in range(len(self))], "train")


@pytest.mark.parametrize("scales", [(1.0, 1.0), (1.0, 2.0), (0.5, 1.0)], ids=["same", "enlarged", "shrunk"])
def test_device_augmentation_makes_the_worker_paths_crops(scales):
    frames = Frames()
    data = DeviceData(frames.split(), torch.device("cpu"))
    assert data.nbytes == sum(i.nbytes + lab.nbytes for i, lab in frames.items)
    for jitter, colour, gamma in ((0.0, 0.0, 0.0), (0.3, 0.0, 0.0), (0.3, 0.2, 0.0), (0.3, 0.2, 0.5)):
        aug = Augment(96, *scales, True, jitter, colour, gamma)
        for i in range(len(frames)):
            image, label = augment(*frames[i], aug, sample_rng(4, 2, i))
            x, y = data.sample(i, aug, sample_rng(4, 2, i))
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (3, 96, 96)
            same = (y.numpy() == label).mean()
            diff = np.abs(x.numpy() - image)
            if scales == (1.0, 1.0):
                assert same == 1 and diff.max() < 1e-3  # no resampling: the same pixels
            elif scales[0] >= 1:
                assert same > 0.995 and diff.max() <= 1.5  # OpenCV rounds its bilinear output to 8 bits
            else:
                assert same > 0.995 and diff.mean() < 3  # area averaging vs antialiased bilinear
            assert (y == IGNORE).any() or (label != IGNORE).all()


def test_batches_follow_the_indices_and_drop_the_incomplete_last_batch():
    data = DeviceData(Frames(n=5).split(), torch.device("cpu"))
    aug = Augment(64, 0.75, 1.25, True, 0.0)
    batches = list(data.batches(None, [4, 2, 0, 1, 3], aug, seed=1, epoch=0, batch_size=2))
    assert len(batches) == 2 and batches[0][0].shape == (2, 3, 64, 64)
    x, y = data.sample(0, aug, sample_rng(1, 0, 0))
    assert torch.equal(batches[1][0][0], x) and torch.equal(batches[1][1][0], y)


def test_a_data_set_too_large_for_the_gpu_is_refused_before_it_is_copied(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20_000, 80_000))
    with pytest.raises(TrainingError, match="without --data-on-device"):
        DeviceData(Frames(n=2).split(), torch.device("cuda"))


def test_colour_jitter_casts_each_channel_and_leaves_the_other_choices_as_they_were():
    from bigseg.train.transforms import draw

    image = np.full((40, 50, 3), 100, np.uint8)
    label = np.zeros((40, 50), np.uint8)
    plain, cast = Augment(32, 0.75, 1.5, True, 0.3), Augment(32, 0.75, 1.5, True, 0.3, 0.25)
    for i in range(20):
        a, b = draw(plain, sample_rng(0, 0, i), 40, 50), draw(cast, sample_rng(0, 0, i), 40, 50)
        assert a.gains is None and (a.scale, a.y, a.x, a.flip, a.jitter) == (b.scale, b.y, b.x, b.flip, b.jitter)
        assert all(0.75 <= g <= 1.25 for g in b.gains)
    x, _ = augment(image, label, Augment(32, 1.0, 1.0, False, 0.0, 0.25), sample_rng(0, 0, 3))
    gains = draw(Augment(32, 1.0, 1.0, False, 0.0, 0.25), sample_rng(0, 0, 3), 40, 50).gains
    assert np.allclose(x.reshape(3, -1).mean(1), 100 * np.array(gains), atol=1e-3)
    assert len({round(g, 3) for g in gains}) == 3  # a cast, not a brightness change


def test_gamma_bends_the_tone_curve_both_ways_and_leaves_the_other_choices_as_they_were():
    from bigseg.train.transforms import draw

    plain, toned = Augment(32, 0.75, 1.5, True, 0.3, 0.2), Augment(32, 0.75, 1.5, True, 0.3, 0.2, 0.5)
    exponents = []
    for i in range(200):
        a, b = draw(plain, sample_rng(0, 0, i), 40, 50), draw(toned, sample_rng(0, 0, i), 40, 50)
        assert a.gamma is None and (a.scale, a.y, a.x, a.flip, a.jitter, a.gains) == \
            (b.scale, b.y, b.x, b.flip, b.jitter, b.gains)
        exponents.append(b.gamma)
    assert all(1 / 1.5 <= g <= 1.5 for g in exponents)
    assert 0.35 < np.mean(np.array(exponents) > 1) < 0.65  # darker and brighter about equally often
    # black and white stay, mid-grey moves as 255 * (x / 255) ** g; both paths agree
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, 13:26], image[:, 26:] = 128, 255
    label = np.zeros((40, 40), np.uint8)
    aug = Augment(40, 1.0, 1.0, False, 0.0, 0.0, 0.5)
    g = draw(aug, sample_rng(0, 0, 7), 40, 40).gamma
    x, _ = augment(image, label, aug, sample_rng(0, 0, 7))
    assert x[:, :, 5].max() == 0 and np.allclose(x[:, :, 35], 255) and not np.isclose(g, 1, atol=0.05)
    assert np.allclose(x[:, :, 20], 255 * (128 / 255) ** g, atol=1e-3)
    one = Frames(n=1)
    one.items = [(image, label)]
    y, _ = DeviceData(one.split(), torch.device("cpu")).sample(0, aug, sample_rng(0, 0, 7))
    assert np.abs(y.numpy() - x).max() < 1e-3


def test_quarter_turns_move_image_label_and_targets_together_on_both_paths():
    from bigseg.train.transforms import draw

    plain, turned = Augment(48, 1.0, 1.0, True), Augment(48, 1.0, 1.0, True, rotate=True)
    for i in range(12):  # turning is drawn last: the other choices are those of a run without it
        a, b = draw(plain, sample_rng(0, 0, i), 40, 50), draw(turned, sample_rng(0, 0, i), 40, 50)
        assert a.turns == 0 and (a.scale, a.y, a.x, a.flip) == (b.scale, b.y, b.x, b.flip)
    assert {draw(turned, sample_rng(0, 0, i), 40, 50).turns for i in range(40)} == {0, 1, 2, 3}
    frames = Frames(n=3, size=(48, 48))
    data = DeviceData(frames.split(), torch.device("cpu"))
    for i in range(3):
        image, label = frames[i]
        target = np.eye(4, dtype=np.float32)[label % 4]
        x, y, t = augment(image, label, turned, sample_rng(7, 0, i), target)
        d = draw(turned, sample_rng(7, 0, i), 48, 48)
        expected = np.rot90(label[:, ::-1] if d.flip else label, d.turns)
        assert np.array_equal(y, expected) and np.array_equal(t.argmax(0), expected % 4)
        dx, dy = data.sample(i, turned, sample_rng(7, 0, i))
        assert np.array_equal(dy.numpy(), y) and np.abs(dx.numpy() - x).max() < 1e-3


def _scenes(tmp_path, one_scene=False):
    from bigseg.train.data import DataSet, DataSettings, SplitSettings
    from tests.test_train_data import classes_csv, learnable_scene

    learnable_scene(tmp_path, "a", 300, 260, nodata=0)
    if not one_scene:
        learnable_scene(tmp_path, "b", 240, 200, seed=1)
        learnable_scene(tmp_path, "c", 200, 220, seed=2)
    classes_csv(tmp_path / "classes.csv")
    for path in (tmp_path / "labels").glob("*.tif"):  # an unlabelled corner in each scene
        with rasterio.open(path, "r+") as f:
            label = f.read(1)
            label[:40, :50] = 255
            f.write(label, 1)
    with rasterio.open(tmp_path / "images" / "a.tif", "r+") as f:  # and the image's nodata in one
        image = f.read()
        image[:, -30:, -60:] = 0
        f.write(image)
    return DataSet(tmp_path, DataSettings(split=SplitSettings(block=96, buffer=8)))


@pytest.mark.parametrize("one_scene, rare", [(False, 0.0), (True, 0.0), (False, 0.1)],
                         ids=["whole scenes", "blocks of one scene", "rare-class sampling"])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.6, 1.6)], ids=["same", "scaled"])
def test_scene_windows_cut_on_the_device_are_the_worker_paths_windows(tmp_path, one_scene, rare, scales):
    from bigseg.train.data import EpochView, RandomWindows

    train = _scenes(tmp_path, one_scene).split("train")
    data = DeviceData(train, torch.device("cpu"))
    assert len(data) == len(train.regions) and data.nbytes == sum(
        b.width * b.height * 4 for b in map(train.source.bounds, train.regions))
    sampler = RandomWindows(train.source, train.regions, 24, 1, rare, len(train.classes))
    assert (sampler.class_probabilities is not None) == bool(rare)
    aug = Augment(64, *scales, True, 0.2, 0.1, 0.0, rotate=True)
    view = EpochView(train.source, sampler, sampler.epoch(3, 1), aug, 3, 1)
    batch = next(data.batches(sampler, view.keys, aug, 3, 1, 2))
    assert torch.equal(batch[1][1], data._sample(sampler, 1, aug, sample_rng(3, 1, 1))[1])
    for k in range(24):
        image, label = view[k]
        x, y = data._sample(sampler, k, aug, sample_rng(3, 1, k))
        same = (y.numpy() == label).mean()
        diff = np.abs(x.numpy() - image)
        if scales == (1.0, 1.0):  # no resampling: the same pixels, the same ignore
            assert same == 1 and diff.max() < 1e-3, k
        else:
            assert same > 0.99 and diff.mean() < 3, k
    # the scene with nodata: its ignore travels to the device
    assert any((data.labels[key] == IGNORE).any() for key in data.labels)


def test_scenes_too_large_for_the_gpu_are_refused_before_any_is_read(tmp_path, monkeypatch):
    train = _scenes(tmp_path).split("train")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (200_000, 800_000))
    monkeypatch.setattr(type(train.source), "read", lambda *a, **k: pytest.fail("read before the size check"))
    with pytest.raises(TrainingError, match=r"training scenes need .* without --data-on-device"):
        DeviceData(train, torch.device("cuda"))


def test_training_on_scenes_held_on_the_device_equals_training_from_workers(tmp_path, capsys):
    """At scale 1 and without photometric jitter (whose float rounding differs by 1e-5 between the
    paths, enough to flip the sign of Adam's first update of a near-zero gradient) the two paths make
    the same batches, so the same run gives the same model."""
    from tests.cli_helpers import run_cli
    from tests.test_train_data import MODEL_CONFIG

    _scenes(tmp_path / "data")
    losses = []
    for extra in ([], ["--data-on-device"]):
        run = tmp_path / f"run{len(extra)}"
        code, _, err = run_cli(capsys, "train", "--data", tmp_path / "data", "--run", run, "--device", "cpu",
                               "--crop", "64", "--batch-size", "2", "--workers", "0", "--epochs", "2",
                               "--windows-per-epoch", "4", "--scale-min", "1", "--scale-max", "1", "--rotate",
                               "--eval-every", "0", "--model-config", MODEL_CONFIG, *extra)
        assert code == 0, err
        losses.append([e["train_loss"] for e in json.loads((run / "log.json").read_text())])
    assert losses[0] == losses[1] and len(losses[0]) == 2
