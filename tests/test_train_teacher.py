"""Distillation: a teacher's targets move with the image, are kept in the run and resumed exactly,
and several teachers give the mean of their targets."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bigseg.errors import TrainingError
from bigseg.train.data import IGNORE
from bigseg.train.loop import TrainConfig, train
from tests.cli_helpers import run_cli
from tests.conftest import CLASSES, make_camvid_dataset, make_generic_dataset, tiny_config, tiny_model


def test_a_teachers_targets_move_with_the_image_and_the_distillation_loss_pulls_the_student_to_them():
    from bigseg.train.losses import distil_loss
    from bigseg.train.transforms import Augment, augment, sample_rng

    rng = np.random.default_rng(0)
    label = np.kron(rng.integers(0, 11, (5, 7)), np.ones((8, 8), np.int64)).astype(np.uint8)  # 11 classes, as CamVid
    label[:6, :9] = IGNORE
    image = rng.integers(0, 256, (40, 56, 3)).astype(np.uint8)
    target = np.eye(11, dtype=np.float16)[np.where(label == IGNORE, 0, label)]  # the teacher labels void too
    for seed in range(8):  # 64 px crops of a 56x40 image: padded, and flipped in about half of them
        _, lab, t = augment(image, label, Augment(crop=64, scale_min=1, scale_max=1), sample_rng(seed, 0, 0), target)
        padded = t.sum(0) == 0
        assert t.shape == (11, 64, 64) and padded.sum() == 64 * 64 - 40 * 56 and (lab[padded] == IGNORE).all()
        labelled = lab != IGNORE
        assert (t.argmax(0)[labelled] == lab[labelled]).all()
    # enlarged and shrunk: the probabilities are resampled smoothly, the labels by nearest neighbour
    for scale, crop in ((2.0, 64), (0.7, 32)):
        _, lab, t = augment(image, label, Augment(crop=crop, scale_min=scale, scale_max=scale), sample_rng(1, 0, 0),
                            target)
        labelled = lab != IGNORE
        assert (t.argmax(0)[labelled] == lab[labelled]).mean() > 0.8, scale  # misplaced: about 1 in 11
        assert np.allclose(t.sum(0)[t.sum(0) > 0.5], 1, atol=2e-3)

    # targets kept at half the size each way (`--teacher-reduction 2`) grow back with each crop
    from bigseg.train.teacher import kept_size
    from bigseg.train.transforms import resize_channels

    yy, xx = np.mgrid[0:40, 0:56] / 9.0
    smooth = torch.softmax(torch.from_numpy(np.stack([np.sin(xx + k) + np.cos(yy * (k + 1) / 3) for k in range(11)])
                                            ).float() * 3, 0).permute(1, 2, 0).numpy()
    half = resize_channels(smooth, kept_size(40, 56, 2))
    assert half.shape == (20, 28, 11)
    for seed, (scale, crop) in enumerate(((1.0, 64), (2.0, 64), (0.7, 32), (1.3, 32))):
        aug = Augment(crop=crop, scale_min=scale, scale_max=scale)
        _, _, full = augment(image, label, aug, sample_rng(seed, 0, 0), smooth)
        _, _, grown = augment(image, label, aug, sample_rng(seed, 0, 0), half)
        seen = full.sum(0) > 0.5
        assert ((grown.sum(0) > 0.5) == seen).all(), scale  # the same pixels: the image's, not the padding
        assert np.abs(grown - full).max(0)[seen].mean() < 0.05, scale
        assert (grown.argmax(0) == full.argmax(0))[seen].mean() > 0.9, scale

    # the soft cross-entropy's minimum is the teacher's distribution, on the pixels it saw
    teacher = torch.softmax(3 * torch.randn(1, 4, 5, 6), 1)
    teacher[..., -1] = 0  # padding: no target there
    logits = torch.zeros(1, 4, 5, 6, requires_grad=True)
    optimiser = torch.optim.Adam([logits], lr=0.1)
    for _ in range(400):
        loss, parts = distil_loss(torch.zeros(()), {"main": 0.0}, logits, teacher, 2.0)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert set(parts) == {"main", "distil"}
    assert torch.allclose(logits.softmax(1)[..., :-1], teacher[..., :-1], atol=0.01)
    assert logits.grad[..., -1].abs().max() == 0


def test_training_with_a_teacher_keeps_its_targets_in_the_run_and_resumes_exactly(tmp_path, tiny_checkpoint, capsys,
                                                                                   monkeypatch):
    data = make_generic_dataset(tmp_path / "data", n=6)  # raster scenes: 5 for training, 1 for validation
    events = []
    settings = dict(teacher=str(tiny_checkpoint), teacher_scales=(1.0, 1.5), eval_every=0)
    full = train(tiny_config(data, tmp_path / "a", max_steps=4, **settings),
                 on_event=lambda kind, info: events.append((kind, info)))
    announced = [i for k, i in events if k == "teacher"]
    assert announced == [{"images": 5, "of": 5, "teachers": 1, "scales": [1.0, 1.5], "flip": True, "turns": False,
                          "bytes": announced[0]["bytes"]}]
    steps = [i for k, i in events if k == "step"]
    assert len(steps) == 4 and all(i["distil"] > 0 for i in steps)
    files = sorted((tmp_path / "a" / "teacher").glob("*.npy"))
    assert len(files) == 5 and sum(f.stat().st_size for f in files) == announced[0]["bytes"]
    first = np.load(files[0])
    assert first.shape == (80, 96, 3) and first.dtype == np.float16 and np.allclose(first.sum(-1), 1, atol=2e-3)

    # interrupted and resumed: the targets are read back, not made again, and the steps are the same
    events.clear()
    part = train(tiny_config(data, tmp_path / "b", max_steps=2, **settings))
    rest = train(tiny_config(data, tmp_path / "b", max_steps=4, **settings), resume=True,
                 on_event=lambda kind, info: events.append((kind, info)))
    assert part.losses + rest.losses == full.losses and not [k for k, _ in events if k == "teacher"]

    # the teacher changes the loss; targets made at other scales are made again
    plain = train(tiny_config(data, tmp_path / "c", max_steps=4, eval_every=0))
    assert plain.losses[0] != full.losses[0]
    events.clear()
    train(tiny_config(data, tmp_path / "a", max_steps=1, **{**settings, "teacher_scales": (1.0,)}),
          on_event=lambda kind, info: events.append((kind, info)))
    assert [i["images"] for k, i in events if k == "teacher"] == [5]

    # from the CLI, into a student of another size (full LDN121); a teacher file that is not there is one line
    code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "d", "--teacher", tiny_checkpoint,
                           "--teacher-scales", "1", "--no-teacher-flip", "--distil", "0.5", "--max-steps", "1",
                           "--batch-size", "2", "--crop", "64", "--workers", "0", "--device", "cpu", "--eval-every", "0")
    assert code == 0, err
    assert "computing the teacher's targets for 5 of 5 images (scales 1)" in err
    spec = json.loads((tmp_path / "d" / "teacher" / "spec.json").read_text())
    assert spec["scales"] == [1.0] and spec["flip"] is False and len(spec["images"]) == 5
    assert "reduction" not in spec  # full size: the spec of runs made before the option, which resume as they were
    one_pass = np.load(tmp_path / "d" / "teacher" / "000000.npy").astype(np.float32)  # logits made probabilities
    assert one_pass.min() >= 0 and np.allclose(one_pass.sum(-1), 1, atol=2e-3)
    code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "e", "--teacher", tmp_path / "no.pt",
                           "--max-steps", "1", "--batch-size", "2", "--device", "cpu", "--workers", "0", "--eval-every", "0")
    assert code != 0 and "--teacher" in err and "not found" in err and "Traceback" not in err

    # targets that would not fit on the run folder's disk are refused before any is made
    from bigseg.train import teacher

    free = teacher.MARGIN + announced[0]["bytes"] - 1  # one byte short
    monkeypatch.setattr(teacher.shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
    with pytest.raises(TrainingError, match=r"--teacher: the targets of 5 images take about 0\.00 GB .* 1\.07 GB free"):
        train(tiny_config(data, tmp_path / "f", max_steps=1, **settings))
    assert not list((tmp_path / "f" / "teacher").glob("*.npy"))
    free += 1
    train(tiny_config(data, tmp_path / "f", max_steps=1, **settings))
    assert len(list((tmp_path / "f" / "teacher").glob("*.npy"))) == 5

    # kept at a quarter of the size each way: 16x less disk, made again for the new spec (turned
    # passes averaged too), and trained on
    events.clear()
    reduced = train(tiny_config(data, tmp_path / "f", max_steps=2, teacher_reduction=4, teacher_turns=True, **settings),
                    on_event=lambda kind, info: events.append((kind, info)))
    files = sorted((tmp_path / "f" / "teacher").glob("*.npy"))
    assert len(files) == 5 and np.load(files[0]).shape == (20, 24, 3)
    assert sum(f.stat().st_size for f in files) == [i for k, i in events if k == "teacher"][0]["bytes"]
    spec = json.loads((tmp_path / "f" / "teacher" / "spec.json").read_text())
    assert spec["reduction"] == 4 and spec["turns"] is True
    assert [i["turns"] for k, i in events if k == "teacher"] == [True]
    assert len(reduced.losses) == 2 and all(i["distil"] > 0 for k, i in events if k == "step")


def test_several_teachers_give_the_mean_of_their_targets(tmp_path, tiny_checkpoint, capsys):
    from bigseg.checkpoint import from_model, save_checkpoint

    data = make_generic_dataset(tmp_path / "data", n=4)  # 3 training scenes
    other = save_checkpoint(from_model(tiny_model(seed=1), "ladder-dn121", CLASSES), tmp_path / "other.pt")
    settings = dict(teacher_scales=(1.0,), teacher_flip=False, max_steps=1, eval_every=0)
    for name, teacher in (("a", str(tiny_checkpoint)), ("b", str(other))):
        train(tiny_config(data, tmp_path / name, teacher=teacher, **settings))
    code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "ab", "--teacher", tiny_checkpoint,
                           "--teacher", other, "--teacher-scales", "1", "--no-teacher-flip", "--max-steps", "1",
                           "--batch-size", "2", "--crop", "64", "--workers", "0", "--device", "cpu",
                           "--eval-every", "0", "--model-config",
                           "spp_bottleneck=8,spp_level=4,spp_width=8,up_widths=8/8/8/8,squeeze=8")
    assert code == 0, err
    assert "computing the mean of 2 teachers' targets for 3 of 3 images" in err
    for i in range(3):
        a, b, ab = (np.load(tmp_path / name / "teacher" / f"{i:06d}.npy").astype(np.float32) for name in ("a", "b", "ab"))
        assert np.abs(a - b).max() > 0.05  # two different teachers
        assert np.allclose(ab, (a + b) / 2, atol=2e-3)
    spec = json.loads((tmp_path / "ab" / "teacher" / "spec.json").read_text())
    assert len(spec["weights"]) == 2 and spec["weights"][0] == json.loads(
        (tmp_path / "a" / "teacher" / "spec.json").read_text())["weights"]
    stored = torch.load(tmp_path / "ab" / "last.pt", weights_only=True)["config"]["teacher"]
    assert stored == (str(tiny_checkpoint), str(other))
    # one teacher is stored by its name, as before ensembles (so older runs resume); one named twice is refused
    assert torch.load(tmp_path / "a" / "last.pt", weights_only=True)["config"]["teacher"] == str(tiny_checkpoint)
    assert TrainConfig(data="d", run_dir="r", teacher=[str(other)]).teacher == str(other)
    with pytest.raises(TrainingError, match="has the weights of --teacher"):
        train(tiny_config(data, tmp_path / "c", teacher=(str(tiny_checkpoint), str(other), str(tiny_checkpoint)),
                          **settings))


def test_an_image_folders_teacher_targets_are_whole_images_and_train(tmp_path):
    """Image folders (CamVid layout) keep one target per whole image, resized once when kept smaller."""
    from bigseg.checkpoint import from_model, save_checkpoint
    from bigseg.train.data.folders import CAMVID_CLASSES

    data = make_camvid_dataset(tmp_path / "data", n=4)
    teacher = save_checkpoint(from_model(tiny_model(11), "ladder-dn121", CAMVID_CLASSES), tmp_path / "t.pt")
    events = []
    result = train(tiny_config(data, tmp_path / "r", max_steps=2, eval_every=0, teacher=str(teacher),
                               teacher_scales=(1.0,), teacher_reduction=2),
                   on_event=lambda kind, info: events.append((kind, info)))
    assert [i["images"] for k, i in events if k == "teacher"] == [4] and len(result.losses) == 2
    kept = np.load(tmp_path / "r" / "teacher" / "000000.npy")
    assert kept.shape == (40, 48, 11) and np.allclose(kept.astype(np.float32).sum(-1), 1, atol=5e-3)
    assert all(i["distil"] > 0 for k, i in events if k == "step")
