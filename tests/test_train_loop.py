"""A training run: it lowers the loss and writes a predict-ready model, resumes exactly, keeps the
best by val, and its options (splits, scales, augmentation, crops, init, EMA, data on the device) do
what they say."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bigseg.checkpoint import load_checkpoint
from bigseg.errors import DatasetError, TrainingError
from bigseg.train.data import open_split
from bigseg.train.loop import train
from tests.cli_helpers import run_cli
from tests.conftest import CLASSES, TINY, make_camvid_dataset, make_generic_dataset, tiny_config


def test_resume_equals_uninterrupted(tmp_path):
    data = make_generic_dataset(tmp_path / "data", n=10)
    full = train(tiny_config(data, tmp_path / "a", max_steps=6, eval_every=0))
    first = train(tiny_config(data, tmp_path / "b", max_steps=3, eval_every=0))
    assert first.stopped == "max_steps" and first.steps_done == 3
    second = train(tiny_config(data, tmp_path / "b", max_steps=6, eval_every=0), resume=True)
    assert full.losses == first.losses + second.losses  # bit for bit, across an epoch boundary
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


def test_resume_refuses_changed_settings(tmp_path):
    data = make_generic_dataset(tmp_path / "data")
    train(tiny_config(data, tmp_path / "r", max_steps=1, eval_every=0))
    with pytest.raises(TrainingError, match="different settings: lr"):
        train(tiny_config(data, tmp_path / "r", lr=1e-3, eval_every=0), resume=True)


def test_training_lowers_the_loss_and_writes_a_predict_ready_model(tmp_path, capsys):
    data = make_generic_dataset(tmp_path / "data", n=10)
    result = train(tiny_config(data, tmp_path / "run", epochs=6, lr=3e-3, recompute_bn=2))
    assert result.stopped == "finished" and result.best_miou is not None
    assert np.mean(result.losses[-4:]) < np.mean(result.losses[:4])
    for name in ("best.pt", "final.pt", "last.pt", "log.csv", "log.json", "curves.png"):
        assert (tmp_path / "run" / name).exists(), name
    history = json.loads((tmp_path / "run" / "log.json").read_text())
    assert len(history) == 6 and all("val_miou" in r for r in history)
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt.classes == CLASSES and ckpt.training["metrics"]["val_miou"] == result.best_miou
    code, out, err = run_cli(capsys, "eval", "--model", tmp_path / "run" / "best.pt", "--data", data,
                             "--split", "val", "--out", tmp_path / "ev.json", "--device", "cpu")
    assert code == 0, err
    report = json.loads((tmp_path / "ev.json").read_text())
    assert report["miou"] == pytest.approx(result.best_miou, abs=0.02) and "mIoU" in out
    # each validation's IoU per class: a mapping in log.json, one column a class in log.csv
    best = max(history, key=lambda r: r["val_miou"])
    assert set(best["val_iou"]) == set(CLASSES)
    assert np.nanmean([np.nan if v is None else v for v in best["val_iou"].values()]) == pytest.approx(best["val_miou"])
    import csv

    header, *rows = list(csv.reader((tmp_path / "run" / "log.csv").open()))
    assert {f"val_iou_{c}" for c in CLASSES} <= set(header) and len(rows) == 6
    assert all(len(row) == len(header) for row in rows)
    column = header.index(f"val_iou_{CLASSES[0]}")
    for row, record in zip(rows, history):
        expected = record["val_iou"][CLASSES[0]]
        assert (row[column] == "") if expected is None else float(row[column]) == pytest.approx(expected)


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(tmp_path, monkeypatch, capsys):
    data = make_generic_dataset(tmp_path / "data", n=6)
    train(tiny_config(data, tmp_path / "run", epochs=1, eval_every=0))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    from bigseg.train import loop
    monkeypatch.setattr(loop, "model_loss", lambda *a, **k: (torch.tensor(float("nan")), {}))
    code, _, err = run_cli(capsys, "train", "--run", tmp_path / "run", "--resume", "--epochs", "2")
    assert code == 1 and "not finite" in err
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    code, _, err = run_cli(capsys, "train", "--run", tmp_path / "run", "--resume", "--lr", "0.1")
    assert code == 1 and "--lr cannot change when resuming" in err


def test_layouts_are_recognised_and_unknown_ones_named(tmp_path):
    import cv2
    cs = tmp_path / "cs"
    (cs / "leftImg8bit" / "val" / "aachen").mkdir(parents=True)
    (cs / "gtFine" / "val" / "aachen").mkdir(parents=True)
    cv2.imwrite(str(cs / "leftImg8bit" / "val" / "aachen" / "a_000001_000019_leftImg8bit.png"), np.zeros((4, 4, 3), np.uint8))
    ids = np.array([[7, 8, 26, 0], [24, 33, 1, 23]] * 2, np.uint8)
    cv2.imwrite(str(cs / "gtFine" / "val" / "aachen" / "a_000001_000019_gtFine_labelIds.png"), ids)
    label = open_split(cs, "val").source.read(0).label
    assert label[:2].tolist() == [[0, 1, 13, 255], [11, 18, 255, 10]]
    cam = tmp_path / "camvid"
    for d in ("train", "trainannot"):
        (cam / d).mkdir(parents=True)
    cv2.imwrite(str(cam / "train" / "x.png"), np.zeros((2, 2, 3), np.uint8))
    cv2.imwrite(str(cam / "trainannot" / "x.png"), np.array([[0, 11], [10, 3]], np.uint8))
    ds = open_split(cam, "train")
    assert ds.source.read(0).label.tolist() == [[0, 255], [10, 3]] and len(ds.classes) == 11
    with pytest.raises(DatasetError, match="unknown data layout; expected one of: Cityscapes"):
        open_split(tmp_path, "train")


def test_real_cityscapes_sample_decodes(shared_data):
    ds = open_split(shared_data / "cityscapes-sample", "val")
    patch = ds.source.read(0)
    image, label = patch.image, patch.label
    assert image.shape[1:] == label.shape and image.dtype == np.uint8 and len(ds.classes) == 19
    assert set(np.unique(label)) <= set(range(19)) | {255}


def test_train_cli_loads_torchvision_backbone_weights(tmp_path, capsys):
    """Full-size LDN121, one step on 64x64 crops: the loaded backbone trains at lr/4."""
    from tests.test_checkpoint import torchvision_densenet121
    data = make_generic_dataset(tmp_path / "data", n=4)
    torch.save(torchvision_densenet121().state_dict(), tmp_path / "densenet121.pth")
    code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "run", "--backbone-weights",
                           tmp_path / "densenet121.pth", "--max-steps", "1", "--batch-size", "2", "--crop", "64",
                           "--workers", "0", "--device", "cpu", "--eval-every", "0", "--lr", "0.001")
    assert code == 0, err
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["initial_lr"] == pytest.approx(groups[0]["initial_lr"] / 4)
    assert groups[1]["weight_decay"] == pytest.approx(groups[0]["weight_decay"] / 4)


def test_train_plus_val_fits_both_splits_and_never_selects_on_its_own_images(tmp_path, capsys):
    data = make_generic_dataset(tmp_path / "data", n=20)  # no split folders: every 10th scene is val
    names = lambda split: [Path(split.source.item_id(r.item)).name for r in split.regions]
    train_names, val_names = names(open_split(data, "train")), names(open_split(data, "val"))
    assert val_names == ["im09.png", "im19.png"] and len(train_names) == 18
    assert names(open_split(data, "train+val")) == train_names + val_names
    with pytest.raises(DatasetError, match="joined by '\\+'"):
        open_split(data, "train+train")
    with pytest.raises(DatasetError, match="no 'test' split"):
        open_split(data, "val+test")
    with pytest.raises(TrainingError, match="--val-split val overlaps --train-split train\\+val"):
        train(tiny_config(data, tmp_path / "t", epochs=1, train_split="train+val", val_split="val"))
    events = []
    train(tiny_config(data, tmp_path / "r", epochs=1, train_split="train+val", eval_every=0, windows_per_epoch=20),
          on_event=lambda kind, info: events.append((kind, info)))
    assert [info["train_images"] for kind, info in events if kind == "start"] == [20]
    assert load_checkpoint(tmp_path / "r" / "final.pt").training["config"]["train_split"] == "train+val"
    code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "s", "--train-split", "train+val",
                           "--device", "cpu")
    assert code == 1 and "--val-split val overlaps --train-split train+val" in err and len(err.splitlines()) == 1


def test_validation_runs_at_the_scales_the_model_will_be_used_at(tmp_path, capsys):
    from bigseg.infer.predictor import Predictor
    from bigseg.train.evaluation import evaluate

    data = make_generic_dataset(tmp_path / "data", n=10)
    result = train(tiny_config(data, tmp_path / "r", epochs=1, val_scales=(0.5, 1.0)))
    ckpt = load_checkpoint(tmp_path / "r" / "best.pt")
    scored = {scales: evaluate(Predictor(ckpt, "cpu", "fp32", tile=128, scales=scales, engine="torch"),
                               open_split(data, "val")).scores["miou"] for scales in ((0.5, 1.0), (1.0,))}
    assert scored[(0.5, 1.0)] != scored[(1.0,)]  # the scales matter on this data
    assert result.best_miou == pytest.approx(scored[(0.5, 1.0)], abs=1e-6)
    assert list(ckpt.training["config"]["val_scales"]) == [0.5, 1.0]
    code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "s", "--val-scales", "9",
                           "--device", "cpu")
    assert code == 1 and "--val-scales must be factors between 0.1 and 4" in err
    assert not (tmp_path / "s" / "last.pt").exists()


def test_colour_jitter_and_gamma_train(tmp_path):
    """(Out-of-range values: tests/test_train_settings.py.)"""
    data = make_generic_dataset(tmp_path / "data", n=4)
    result = train(tiny_config(data, tmp_path / "r", epochs=1, jitter=0.3, colour_jitter=0.2, gamma=0.5,
                               eval_every=0))
    assert result.stopped == "finished" and np.isfinite(result.losses).all()


def test_crop_schedule_changes_crops_by_epoch_and_odd_crops_are_refused(tmp_path):
    from bigseg.train.config import crop_at, parse_crop_schedule

    cfg = tiny_config("x", "y", epochs=10, crop=128, crop_schedule=parse_crop_schedule("64:0.6"))
    assert [crop_at(cfg, e) for e in range(10)] == [64] * 6 + [128] * 4
    with pytest.raises(TrainingError, match="fractions must rise"):
        parse_crop_schedule("64:0.8,128:0.5")
    data = make_generic_dataset(tmp_path / "data", n=4)
    with pytest.raises(TrainingError, match="crop 100 is not a multiple of 64: .* use 128 or 64"):
        train(tiny_config(data, tmp_path / "r", crop=100, eval_every=0))
    result = train(tiny_config(data, tmp_path / "s", epochs=2, crop=128, crop_schedule=((64, 0.5),), eval_every=0))
    history = json.loads((tmp_path / "s" / "log.json").read_text())
    assert [r["crop"] for r in history] == [64, 128] and result.stopped == "finished"


def test_init_starts_from_a_checkpoints_weights_with_a_new_schedule(tmp_path):
    data = make_generic_dataset(tmp_path / "data", n=4)
    train(tiny_config(data, tmp_path / "a", epochs=1, eval_every=0))
    events = []
    train(tiny_config(data, tmp_path / "b", max_steps=0, eval_every=0, init=str(tmp_path / "a" / "final.pt")),
          on_event=lambda kind, info: events.append((kind, info)))
    source = load_checkpoint(tmp_path / "a" / "final.pt").state_dict
    started = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert started["global_step"] == 0 and started["optimizer"]["state"] == {}
    for key, value in source.items():
        assert torch.equal(started["model"][key], value), key
    with pytest.raises(TrainingError, match="classes"):
        other = make_generic_dataset(tmp_path / "other", n=4)
        (other / "classes.json").write_text(json.dumps({"classes": ["a", "b", "c", "d"]}))
        train(tiny_config(other, tmp_path / "c", eval_every=0, init=str(tmp_path / "a" / "final.pt")))
    wider = {**TINY, "up_widths": [w * 2 for w in TINY["up_widths"]]}  # the same architecture, other widths
    with pytest.raises(TrainingError, match="was built with another ladder-dn121 configuration"):
        train(tiny_config(data, tmp_path / "d", eval_every=0, arch_config=wider, init=str(tmp_path / "a" / "final.pt")))


def test_freeze_bn_keeps_the_init_models_batchnorm_statistics_while_the_weights_learn(tmp_path, capsys):
    data = make_generic_dataset(tmp_path / "data", n=4)
    train(tiny_config(data, tmp_path / "a", epochs=1, eval_every=0))
    source = load_checkpoint(tmp_path / "a" / "final.pt").state_dict
    runs = {}
    for name, freeze in (("free", False), ("frozen", True)):
        train(tiny_config(data, tmp_path / name, max_steps=2, eval_every=0, init=str(tmp_path / "a" / "final.pt"),
                          freeze_bn=freeze))
        runs[name] = torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]
    stats = [k for k in source if k.endswith(("running_mean", "running_var"))]
    affine = [k[: -len("running_mean")] + "weight" for k in stats if k.endswith("running_mean")]
    assert stats and all(torch.equal(runs["frozen"][k], source[k]) for k in stats)
    assert not all(torch.equal(runs["free"][k], source[k]) for k in stats)  # training mode moves them
    assert not all(torch.equal(runs["frozen"][k], source[k]) for k in affine)  # scale and shift learn
    code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "s", "--freeze-bn", "--device", "cpu")
    assert code == 1 and "--freeze-bn keeps a trained model's batchnorm statistics: it needs --init" in err
    assert not (tmp_path / "s" / "last.pt").exists()


def test_data_on_device_trains_like_the_workers_and_resumes_exactly(tmp_path, capsys):
    data = make_camvid_dataset(tmp_path / "data", n=10)
    same = {"eval_every": 0, "scale_min": 1.0, "scale_max": 1.0}  # no resampling: the very same crops
    workers = train(tiny_config(data, tmp_path / "w", max_steps=4, **same))
    full = train(tiny_config(data, tmp_path / "a", max_steps=6, data_on_device=True, **same))
    assert np.allclose(full.losses[:4], workers.losses, rtol=1e-5)
    first = train(tiny_config(data, tmp_path / "b", max_steps=3, data_on_device=True, **same))
    second = train(tiny_config(data, tmp_path / "b", max_steps=6, data_on_device=True, **same), resume=True)
    assert full.losses == first.losses + second.losses  # bit for bit, across an epoch boundary
    code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "c", "--batch-size", "2", "--crop",
                           "64", "--device", "cpu", "--eval-every", "0", "--max-steps", "1", "--data-on-device",
                           "--model-config", "spp_bottleneck=8,spp_level=4,spp_width=8,up_widths=8/8/8/8,squeeze=8")
    assert code == 0, err
    assert re.search(r"data on the device \(0\.\d MiB, augmented there\)", err), err


def test_a_resumed_epoch_reports_all_its_steps_and_a_finished_run_says_so(tmp_path, capsys):
    data = make_generic_dataset(tmp_path / "data", n=6)
    full = train(tiny_config(data, tmp_path / "a", epochs=1, eval_every=0, windows_per_epoch=8))
    train(tiny_config(data, tmp_path / "b", epochs=1, eval_every=0, windows_per_epoch=8, max_steps=2))
    train(tiny_config(data, tmp_path / "b", epochs=1, eval_every=0, windows_per_epoch=8), resume=True)
    a, b = (json.loads((tmp_path / n / "log.json").read_text())[0] for n in ("a", "b"))
    assert b["train_loss"] == pytest.approx(a["train_loss"]) == pytest.approx(np.mean(full.losses))  # 4 steps, not 2
    assert b["seconds"] > 0
    code, _, err = run_cli(capsys, "train", "--run", tmp_path / "b", "--resume")
    assert code == 0 and "the run has finished its 1 epochs (4 steps): nothing to train" in err
    assert "resuming from" not in err and "already finished: 1 epochs, 4 steps" in err and "best.pt" in err


def test_ema_saves_the_average_of_the_steps_weights_and_resumes_exactly(tmp_path, capsys):
    data = make_generic_dataset(tmp_path / "data", n=6)
    decay = 0.5
    # the trained weights after each step, from runs stopped after 1, 2 and 3 steps
    steps = [torch.load(tmp_path / f"s{n}" / "last.pt", weights_only=True)["model"]
             for n in (1, 2, 3) if train(tiny_config(data, tmp_path / f"s{n}", max_steps=n, eval_every=0))]
    full = train(tiny_config(data, tmp_path / "a", max_steps=3, eval_every=0, ema=decay))
    state = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    for key, w1 in steps[0].items():
        if not w1.is_floating_point():
            continue
        expected = (w1 * decay + steps[1][key] * (1 - decay)) * decay + steps[2][key] * (1 - decay)
        assert torch.allclose(state["average"][f"module.{key}"], expected, atol=1e-6), key
        assert torch.equal(state["model"][key], steps[2][key]), key  # training itself is unchanged

    first = train(tiny_config(data, tmp_path / "b", max_steps=2, eval_every=0, ema=decay))
    second = train(tiny_config(data, tmp_path / "b", max_steps=3, eval_every=0, ema=decay), resume=True)
    assert full.losses == first.losses + second.losses
    resumed = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["average"]
    for key, value in state["average"].items():
        assert torch.equal(resumed[key], value), key

    finished = train(tiny_config(data, tmp_path / "c", epochs=1, eval_every=0, ema=decay))
    saved = load_checkpoint(tmp_path / "c" / "final.pt").state_dict
    average = torch.load(tmp_path / "c" / "last.pt", weights_only=True)["average"]
    assert finished.stopped == "finished"
    assert all(torch.equal(saved[k], average[f"module.{k}"]) for k in saved if saved[k].is_floating_point())
    from_last = load_checkpoint(tmp_path / "c" / "last.pt").state_dict  # `predict --model last.pt`: the average too
    assert from_last.keys() == saved.keys() and all(torch.equal(from_last[k], saved[k]) for k in saved)
    code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "s", "--ema", "1", "--device", "cpu")
    assert code == 1 and "--ema is a decay per step, at least 0 (off) and below 1, got 1.0" in err
    assert not (tmp_path / "s" / "last.pt").exists()


def test_rare_class_sampling_and_scene_balance_are_refused_for_image_folders(tmp_path, capsys):
    """(Out-of-range values: tests/test_train_settings.py.)"""
    data = make_camvid_dataset(tmp_path / "data", n=4)
    for option, value, expected in (
            ("--rare-class-sampling", "0.1", "--rare-class-sampling draws windows of raster scenes"),
            ("--scene-balance", "1", "--scene-balance weighs raster scenes against each other")):
        run = tmp_path / f"{option}{value}"
        code, _, err = run_cli(capsys, "train", "--data", data, "--run", run, option, value,
                               "--device", "cpu", "--workers", "0", "--max-steps", "1")
        assert code == 1 and expected in err, (option, value, err)
        assert not (run / "last.pt").exists()
