"""Training: checkpointing keeps BN statistics, resume equals uninterrupted, losses, data layouts."""
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bigseg.checkpoint import load_checkpoint
from bigseg.train.data import IGNORE, open_split
from bigseg.errors import DatasetError, Interrupted, TrainingError
from bigseg.models.blocks import set_grad_checkpointing
from bigseg.train.loop import TrainConfig, train
from bigseg.train.losses import ladder_loss, lovasz_softmax, model_loss, soft_targets
from tests.cli_helpers import run_cli
from tests.conftest import CLASSES, TINY, make_camvid_dataset, make_generic_dataset, tiny_model


def test_checkpointed_step_equals_plain_step_including_bn_statistics():
    torch.manual_seed(0)
    plain = tiny_model().train()
    ckpt = copy.deepcopy(plain)
    assert set_grad_checkpointing(ckpt, True) > 10
    x = torch.randn(2, 3, 128, 128)
    y = torch.randint(0, 3, (2, 128, 128))
    for net in (plain, ckpt):
        logits, aux = net(x, return_aux=True)
        ladder_loss(logits, aux, y)[0].backward()
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        if "running" in name:
            assert torch.allclose(a, b, atol=1e-6), name
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    set_grad_checkpointing(ckpt, False)
    assert all(m.momentum == 0.1 for m in ckpt.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_checkpointing_keeps_fewer_activations():
    """Saved-for-backward bytes shrink when dense units, stem and transitions are recomputed."""
    def saved_bytes(net):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(torch.randn(2, 3, 256, 256))
        return total
    net = tiny_model().train()
    plain = saved_bytes(net)
    set_grad_checkpointing(net, True)
    assert saved_bytes(net) < plain / 2


def test_soft_targets_are_cell_histograms_without_mostly_ignored_cells():
    labels = torch.tensor([[[0, 0, 1, 1],
                            [0, 1, 1, 1],
                            [2, 2, IGNORE, IGNORE],
                            [2, 0, IGNORE, IGNORE]]])
    target, keep = soft_targets(labels, 3, (2, 2))
    assert torch.allclose(target[0, :, 0, 0], torch.tensor([0.75, 0.25, 0.0]))
    assert torch.allclose(target[0, :, 0, 1], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(target[0, :, 1, 0], torch.tensor([0.25, 0.0, 0.75]))
    assert keep.tolist() == [[[True, True], [True, False]]]


def test_ladder_loss_weights_final_and_auxiliary_terms():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 8, 8)
    aux = [torch.randn(1, 3, 2, 2), torch.randn(1, 3, 4, 4)]
    labels = torch.randint(0, 3, (1, 8, 8))
    loss, parts = ladder_loss(logits, aux, labels, 0.4)
    assert loss.item() == pytest.approx(0.6 * parts["main"] + 0.4 * parts["aux"], rel=1e-6)
    assert parts["main"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)



def test_lovasz_softmax_is_the_mean_jaccard_loss_on_hard_predictions_and_its_extension_on_soft_ones():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 6, 7))
    labels[0, :2] = IGNORE
    pred = torch.randint(0, 4, (2, 6, 7))  # class 3 is predicted but never labelled: not averaged
    hard = 50.0 * F.one_hot(pred, 4).permute(0, 3, 1, 2).float()
    kept = labels != IGNORE
    ious = [((pred == c) & (labels == c) & kept).sum() / (((pred == c) | (labels == c)) & kept).sum() for c in range(3)]
    assert lovasz_softmax(hard, labels).item() == pytest.approx(1 - torch.stack(ious).mean().item(), abs=1e-6)
    changed = hard.clone()
    changed[0, :, :2] = torch.randn(4, 2, 7)  # void pixels do not count
    assert lovasz_softmax(changed, labels).item() == pytest.approx(lovasz_softmax(hard, labels).item(), abs=1e-7)

    # soft probabilities: the Lovász extension, class by class as in the paper's reference algorithm
    logits = torch.randn(2, 4, 6, 7, requires_grad=True)
    probs = F.softmax(logits, 1).permute(0, 2, 3, 1)[kept]
    per_class = []
    for c in range(3):
        fg = (labels[kept] == c).float()
        errors, order = (fg - probs[:, c]).abs().sort(descending=True)
        fg = fg[order]
        jaccard = [1 - (fg.sum() - fg[:k].sum()) / (fg.sum() + (1 - fg[:k]).sum()) for k in range(1, len(fg) + 1)]
        steps = [jaccard[0]] + [jaccard[k] - jaccard[k - 1] for k in range(1, len(fg))]
        per_class.append(sum(e * g for e, g in zip(errors, steps)))
    loss = lovasz_softmax(logits, labels)
    assert loss.item() == pytest.approx(torch.stack(per_class).mean().item(), abs=1e-5)
    loss.backward()
    assert logits.grad[1].abs().sum() > 0 and logits.grad[0, :, :2].abs().sum() == 0
    assert lovasz_softmax(logits, torch.full_like(labels, IGNORE)).item() == 0.0

    # added to the model's loss with its weight
    aux = [torch.randn(2, 4, 3, 4)]
    base, _ = model_loss(tiny_model(), logits, aux, labels, 0.5, 0.4)
    both, parts = model_loss(tiny_model(), logits, aux, labels, 0.5, 0.4, lovasz=0.5)
    assert both.item() == pytest.approx(base.item() + 0.5 * loss.item(), rel=1e-6) and "lovasz" in parts


def tiny_config(data, run_dir, **kw) -> TrainConfig:
    base = dict(data=str(data), run_dir=str(run_dir), arch_config=TINY, epochs=2, batch_size=2, crop=64,
                workers=0, device="cpu", precision="fp32", val_tile=128, seed=3)
    return TrainConfig(**{**base, **kw})


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


def test_backbone_weights_get_a_quarter_of_the_learning_rate(tmp_path):
    from bigseg.train.setup import optimizer
    model = tiny_model()
    names = {f"backbone.{n}" for n, _ in model.backbone.named_parameters()}
    opt = optimizer(tiny_config("x", "y", lr=1e-3), model, names)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 2.5e-4]
    assert len(opt.param_groups[1]["params"]) == len(names)


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


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun test runs on Linux CI")
def test_distributed_training_with_two_cpu_processes(tmp_path, tiny_checkpoint):
    """Two ranks, each making half of a teacher's targets first."""
    data = make_generic_dataset(tmp_path / "data", n=10)  # 9 training scenes, 1 for validation
    job = tmp_path / "job.py"
    job.write_text(
        "import json\n"
        "from bigseg.train.loop import TrainConfig, train\n"
        f"r = train(TrainConfig(data={str(data)!r}, run_dir={str(tmp_path / 'run')!r}, "
        f"arch_config=json.loads({json.dumps(TINY)!r}), epochs=2, batch_size=2, crop=64, workers=0, "
        f"device='cpu', precision='fp32', val_tile=128, teacher={str(tiny_checkpoint)!r}, teacher_scales=(1.0,), "
        f"windows_per_epoch=9))\n"
        "import sys; sys.stdout.write(f'RESULT {r.steps_done}\\n')  # one write: the two ranks share the pipe\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29513", str(job)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("RESULT 4") == 2  # 9 windows // (2 ranks x 2) = 2 steps per epoch, 2 epochs
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "best.pt", "curves.png", "data.json", "final.pt", "last.pt", "log.csv", "log.json", "teacher"]
    assert sorted(p.name for p in (tmp_path / "run" / "teacher").iterdir()) == [f"{i:06d}.npy" for i in range(9)] + [
        "spec.json"]


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


def test_median_frequency_weights_follow_segnet_and_weight_the_loss(tmp_path):
    from bigseg.train.data import label_statistics
    from bigseg.train.losses import class_weights, segmentation_loss

    data = make_generic_dataset(tmp_path / "data", n=4)
    train_split = open_split(data, "train")
    pixels, image_pixels = label_statistics(train_split.source, train_split.regions, 3)
    freq = pixels / image_pixels
    weights = class_weights(pixels, image_pixels, "median-frequency")
    assert weights == pytest.approx(list(np.median(freq) / freq))
    assert class_weights(pixels, image_pixels, "none") is None
    enet = class_weights(pixels, image_pixels, "enet")
    assert enet == pytest.approx(list(1 / np.log(1.02 + pixels / pixels.sum())))
    # a class twice as heavy counts twice: weighted CE = sum w_y * ce / sum w_y
    logits = torch.randn(1, 3, 4, 4)
    labels = torch.randint(0, 3, (1, 4, 4))
    w = torch.tensor([1.0, 2.0, 3.0])
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert segmentation_loss(logits, labels, w).item() == pytest.approx((w[labels] * ce).sum().item() / w[labels].sum().item())


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


def test_colour_jitter_and_gamma_train_and_out_of_range_jitter_is_refused_before_training(tmp_path, capsys):
    data = make_generic_dataset(tmp_path / "data", n=4)
    result = train(tiny_config(data, tmp_path / "r", epochs=1, jitter=0.3, colour_jitter=0.2, gamma=0.5,
                               eval_every=0))
    assert result.stopped == "finished" and np.isfinite(result.losses).all()
    for flag in ("--jitter", "--colour-jitter", "--gamma"):
        code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "s", flag, "1.2", "--device", "cpu")
        assert code == 1 and f"{flag} must be at least 0 and below 1, got 1.2" in err
    assert not (tmp_path / "s" / "last.pt").exists()


def test_lovasz_trains_and_an_out_of_range_weight_is_refused_before_training(tmp_path, capsys):
    data = make_generic_dataset(tmp_path / "data", n=4)
    plain = train(tiny_config(data, tmp_path / "a", epochs=1, eval_every=0))
    with_lovasz = train(tiny_config(data, tmp_path / "b", epochs=1, eval_every=0, lovasz=1.0))
    assert np.isfinite(with_lovasz.losses).all() and with_lovasz.losses[0] > plain.losses[0]
    assert load_checkpoint(tmp_path / "b" / "final.pt").training["config"]["lovasz"] == 1.0
    code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "s", "--lovasz", "20", "--device", "cpu")
    assert code == 1 and "--lovasz is a loss weight from 0 to 10, got 20" in err
    assert not (tmp_path / "s" / "last.pt").exists()


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


def test_gradient_checkpointing_is_off_on_the_cpu_unless_asked_and_says_so(tmp_path):
    data = make_generic_dataset(tmp_path / "data", n=4)
    events = []
    cfg = tiny_config(data, tmp_path / "a", max_steps=1, eval_every=0)
    train(cfg, on_event=lambda kind, info: events.append((kind, info)))
    start = next(info for kind, info in events if kind == "start")
    assert start["grad_checkpoint"] is False and start["grad_checkpoint_auto"] and start["threads"] >= 1
    events.clear()
    train(tiny_config(data, tmp_path / "b", max_steps=1, eval_every=0, grad_checkpoint=True),
          on_event=lambda kind, info: events.append((kind, info)))
    assert next(info for kind, info in events if kind == "start")["grad_checkpoint"] is True


def test_ctrl_c_in_training_says_what_was_kept_and_the_resume_says_where_it_continues(tmp_path, capsys, monkeypatch):
    from bigseg.train import loop

    data = make_generic_dataset(tmp_path / "data", n=10)
    real, calls = loop.model_loss, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "model_loss", interrupted)
    args = ["train", "--data", data, "--run", tmp_path / "r", "--batch-size", "2", "--crop", "64", "--workers", "0",
            "--device", "cpu", "--eval-every", "0", "--epochs", "2", "--model-config",
            "spp_bottleneck=8,spp_level=4,spp_width=8,up_widths=8/8/8/8,squeeze=8"]
    code, _, err = run_cli(capsys, *args)
    assert code == 130
    assert "interrupted: kept epoch 1 step 2 (2 steps) in" in err and "--resume" in err
    monkeypatch.setattr(loop, "model_loss", real)
    code, _, err = run_cli(capsys, "train", "--run", tmp_path / "r", "--resume")
    assert code == 0, err
    assert "resuming from epoch 1, step 2 (2 steps done)" in err


def test_eval_takes_a_folder_with_only_a_test_split(tmp_path, tiny_checkpoint, capsys):
    import cv2

    root = tmp_path / "camvid-test"
    for d in ("test", "testannot"):
        (root / d).mkdir(parents=True)
    cv2.imwrite(str(root / "test" / "a.png"), np.zeros((64, 64, 3), np.uint8))
    cv2.imwrite(str(root / "testannot" / "a.png"), np.zeros((64, 64), np.uint8))
    assert len(open_split(root, "test")) == 1
    with pytest.raises(DatasetError, match="needs train/ and trainannot/"):
        open_split(root, "train")


def test_sigterm_to_the_process_group_saves_last_pt_like_ctrl_c(tmp_path):
    """What systemd, SLURM and CI send: the job saves where it is and says so (exit 143), even when
    it was started in the background with SIGINT ignored and the data worker gets the signal too."""
    import signal
    import time

    data = make_generic_dataset(tmp_path / "data", n=10)
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "bigseg", "train", "--data", str(data), "--run", str(run), "--batch-size", "2",
           "--crop", "64", "--workers", "1", "--device", "cpu", "--eval-every", "0", "--epochs", "500",
           "--model-config", "spp_bottleneck=8,spp_level=4,spp_width=8,up_widths=8/8/8/8,squeeze=8"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (run / "log.csv").exists():
        time.sleep(0.05)
    time.sleep(1.5)  # inside the second epoch
    os.killpg(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    kept = re.search(r"interrupted: kept epoch (\d+) step (\d+) \((\d+) steps\)", err)
    assert kept, err
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["global_step"] == int(kept[3]) >= 1
    assert (state["epoch"] + 1, state["step_in_epoch"]) == (int(kept[1]), int(kept[2]))


def test_an_unreadable_image_read_by_a_worker_is_one_line_and_the_process_ends(tmp_path):
    """A worker's error comes back wrapped in its traceback, and the loader it belongs to (kept
    alive by that traceback) used to leave the process waiting for its worker at exit for ever."""
    data = make_camvid_dataset(tmp_path / "data", n=10)  # an image folder: images are read by the workers
    for name in ("im03.png", "im04.png", "im05.png"):  # training images; drop_last leaves out at most one
        (data / "train" / name).write_bytes(b"\x89PNG not really")
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "bigseg", "train", "--data", str(data), "--run", str(run), "--batch-size", "2",
           "--crop", "64", "--workers", "1", "--device", "cpu", "--eval-every", "0", "--epochs", "2",
           "--model-config", "spp_bottleneck=8,spp_level=4,spp_width=8,up_widths=8/8/8/8,squeeze=8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "not a readable image" in error[0] and "data/train/im0" in error[0], proc.stderr
    assert "kept epoch 1 step" in error[0] and (run / "last.pt").is_file()


def test_a_killed_data_worker_keeps_the_run_checkpoint_and_leaves_no_process(tmp_path, monkeypatch):
    import multiprocessing
    import signal

    from bigseg.train.data import EpochView

    data = make_generic_dataset(tmp_path / "data", n=10)
    fetch = EpochView.__getitem__

    def killed_in_epoch_two(self, i):
        if self.epoch == 1 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer does
        return fetch(self, i)

    monkeypatch.setattr(EpochView, "__getitem__", killed_in_epoch_two)
    with pytest.raises(TrainingError, match=r"a data worker stopped: .*\(pid(\(s\))? \d+\).*; kept epoch 2 step 0 \(4 steps\)"):
        train(tiny_config(data, tmp_path / "r", workers=1, epochs=3, eval_every=0, windows_per_epoch=9))
    state = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 0, 4)
    assert not multiprocessing.active_children()

    # torch raises a death wherever this process is: inside a step, half of it is not kept
    from bigseg.train import loop

    calls = {"n": 0}

    def dies_in_step_6(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("DataLoader worker (pid 12345) is killed by signal: Killed. ")
        return model_loss(*args, **kw)

    monkeypatch.setattr(EpochView, "__getitem__", fetch)
    monkeypatch.setattr(loop, "model_loss", dies_in_step_6)
    with pytest.raises(TrainingError, match=r"pid 12345.*inside a step, so .*last.pt keeps the run as it was saved"):
        train(tiny_config(data, tmp_path / "s", workers=1, epochs=3, eval_every=0, windows_per_epoch=9))
    state = torch.load(tmp_path / "s" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 0, 4)  # the epoch's end


class SigtermInAFinaliser:
    """Created and dropped at once: SIGTERM reaches this process while Python runs the finaliser,
    so the stop handler's KeyboardInterrupt is dropped (as in logging's at-fork hook)."""

    def __del__(self):
        import signal

        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # the handler runs here, inside the finaliser: its exception is dropped
            pass


@pytest.fixture
def stop_handlers():
    """The CLI's stop handlers in this process for one test; the previous ones back afterwards."""
    import signal

    from bigseg import runtime

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    assert runtime.stop_on_terminate()
    yield
    for s, handler in before.items():
        signal.signal(s, handler)
    runtime._stop_signal, runtime._pending = None, False


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_sigterm_that_python_drops_in_a_finaliser_still_stops_training_at_the_next_step(tmp_path, stop_handlers):
    """CI's flake: the SIGTERM landed while the DataLoader forked the next epoch's worker, logging's
    at-fork hook swallowed the KeyboardInterrupt ("Exception ignored in ... _releaseLock") and a
    500-epoch run went on. Here a finaliser at the end of epoch 1 receives the signal the same way.
    A stop the job caught as usual leaves nothing pending for the next job of the process."""
    import signal

    from bigseg import runtime

    seen = {}

    def on_event(kind, info):
        seen.setdefault(kind, info)
        if kind == "epoch" and info["epoch"] == 1:
            SigtermInAFinaliser()

    data = make_generic_dataset(tmp_path / "data", n=10)
    with pytest.raises(Interrupted, match=r"kept epoch 2 step 0 \((\d+) steps\)") as stopped:
        train(tiny_config(data, tmp_path / "r", epochs=4, eval_every=0), on_event=on_event)
    one_epoch = seen["start"]["steps_per_epoch"]
    assert f"({one_epoch} steps)" in str(stopped.value)
    assert runtime.stop_signal() == signal.SIGTERM
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["global_step"] == one_epoch

    def ctrl_c_at_step_2(kind, info):
        if kind == "step" and info["global_step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # delivered as usual: caught by the job, nothing left pending

    with pytest.raises(Interrupted, match=r"\(2 steps\)"):
        train(tiny_config(data, tmp_path / "c", eval_every=0), on_event=ctrl_c_at_step_2)
    try:
        after = train(tiny_config(data, tmp_path / "next", max_steps=3, eval_every=0))
    except KeyboardInterrupt as e:  # pytest would take it for the user's Ctrl-C and end the session
        pytest.fail(f"the stop the previous job handled stopped the next one too: {e}")
    assert after.steps_done == 3


def test_a_stop_inside_a_step_lands_after_it_and_the_resumed_run_equals_an_uninterrupted_one(
        tmp_path, stop_handlers, monkeypatch, capfd):
    """SIGTERM or Ctrl-C during the forward pass used to raise there: the batchnorm statistics had
    moved for a step that the resumed run did again. A second Ctrl-C still stops at once."""
    import signal

    from bigseg.train import loop

    data = make_generic_dataset(tmp_path / "data", n=10)
    full = train(tiny_config(data, tmp_path / "a", max_steps=5, eval_every=0))
    calls = {"n": 0}
    signals: list[int] = []

    def loss_then_signals(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # after step 3's forward pass, before its update
            for s in signals:
                os.kill(os.getpid(), s)
        return model_loss(*args, **kw)

    monkeypatch.setattr(loop, "model_loss", loss_then_signals)
    signals[:] = [signal.SIGTERM]
    with pytest.raises(Interrupted, match=r"kept epoch 1 step 3 \(3 steps\)"):
        train(tiny_config(data, tmp_path / "b", max_steps=5, eval_every=0))
    assert "stopping at the end of this step" in capfd.readouterr().err
    monkeypatch.setattr(loop, "model_loss", model_loss)
    second = train(tiny_config(data, tmp_path / "b", max_steps=5, eval_every=0), resume=True)
    assert second.losses == full.losses[3:]
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for key in a["model"]:  # running means and variances included
        assert torch.equal(a["model"][key], b["model"][key]), key

    calls["n"], signals[:] = 0, [signal.SIGINT, signal.SIGINT]
    monkeypatch.setattr(loop, "model_loss", loss_then_signals)
    with pytest.raises(Interrupted, match=r"kept epoch 1 step 2 \(2 steps\)"):
        train(tiny_config(data, tmp_path / "c", max_steps=5, eval_every=0))
    assert "Ctrl-C again to stop at once" in capfd.readouterr().err


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_eval_stops_at_the_next_image_and_a_stopped_command_leaves_nothing_pending(tmp_path, tiny_checkpoint,
                                                                                  stop_handlers, monkeypatch, capsys):
    """`bigseg eval` checks for a dropped stop per image; any command the CLI sees stopped (eval, or a
    `--parts` prediction, which has no handler of its own) leaves nothing pending for the next one."""
    import signal

    from bigseg import runtime
    from bigseg.infer.predictor import Predictor
    from bigseg.train import evaluation

    data = make_generic_dataset(tmp_path / "data", n=6)
    seen = []

    def on_image(done, total):
        seen.append(done)
        if done == 2:
            SigtermInAFinaliser()

    seg = Predictor(load_checkpoint(tiny_checkpoint), "cpu", "fp32", tile=64)
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate(seg, open_split(data, "train"), on_image=on_image)
    assert seen == [1, 2] and not runtime._pending

    from bigseg.train.data import source  # raster scenes score their regions block by block (`Source.confusion`)

    real, calls = source.confusion, []

    def ctrl_c_on_the_second_image(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # delivered as usual: the handler raises, the CLI catches
        return real(*args)

    monkeypatch.setattr(source, "confusion", ctrl_c_on_the_second_image)
    args = ("eval", "--data", data, "--model", tiny_checkpoint, "--split", "train", "--device", "cpu", "--tile", "64",
            "--engine", "torch", "-o", tmp_path / "e.json")
    code, _, err = run_cli(capsys, *args)
    assert code == 130 and "interrupted" in err, err
    assert not runtime._pending
    monkeypatch.setattr(source, "confusion", real)
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err


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


def test_the_gpu_schedule_script_runs_a_tiny_schedule_on_the_cpu(tmp_path):
    """weights/train-camvid-gpu.sh end to end on a tiny CamVid pack: calibration, the fitted
    schedule, the fp16 model back in pieces that join into a loadable checkpoint."""
    import hashlib
    import shutil
    import tarfile
    from pathlib import Path

    import cv2

    for tool in ("bash", "timeout", "split", "sha256sum"):
        if not shutil.which(tool):
            pytest.skip(f"needs {tool}")
    rng = np.random.default_rng(0)
    root = tmp_path / "pack" / "camvid"
    for split, n in (("train", 6), ("val", 2)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(n):
            label = np.repeat(np.arange(12, dtype=np.uint8), 8)[None].repeat(72, 0)
            label = np.roll(label, int(rng.integers(0, 96)), 1)
            cv2.imwrite(str(root / split / f"f{i}.jpg"), (label[..., None] * 20 + rng.integers(0, 20, (72, 96, 3))).astype(np.uint8))
            cv2.imwrite(str(root / f"{split}annot" / f"f{i}.png"), label)
    with tarfile.open(tmp_path / "pack.tar", "w") as tar:
        tar.add(root, arcname="camvid")
    out = tmp_path / "out"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PACK": str(tmp_path / "pack.tar"), "BUDGET": "30", "MAX_EPOCHS": "2", "DEVICE": "cpu",
           "PRECISION": "fp32", "BATCH": "2", "CROP": "64", "INIT": "none", "RUN": str(tmp_path / "run"),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "EXTRA": "--model-config spp_bottleneck=8,spp_level=4,spp_width=8,up_widths=8/8/8/8,squeeze=8"}
    done = subprocess.run(["bash", str(repo / "weights" / "train-camvid-gpu.sh"), str(out)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "training 2 epochs, validating every 1" in done.stdout
    parts = sorted(out.glob("best-fp16.pt.part-*"))
    listed = dict(line.split()[::-1] for line in (out / "parts.sha256").read_text().splitlines())
    assert parts and all(hashlib.sha256(p.read_bytes()).hexdigest() == listed[p.name] for p in parts)
    (tmp_path / "best.pt").write_bytes(b"".join(p.read_bytes() for p in parts))
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt.classes[:2] == ["sky", "building"] and all(
        v.dtype == torch.float16 for v in ckpt.state_dict.values() if v.is_floating_point())
    assert len(json.loads((out / "log.json").read_text())) == 2
    assert (out / "command.txt").read_text().startswith("bigseg train --data")


def test_the_landcover_gpu_schedule_runs_a_tiny_schedule_on_the_cpu(tmp_path):
    """weights/train-landcover-gpu.sh end to end on tiny raster scenes: calibration, the fitted
    schedule, the fp16 model back in pieces, and its eval reports on the held-out scene."""
    import shutil
    from pathlib import Path

    from tests.test_train_data import classes_csv, learnable_scene

    for tool in ("bash", "timeout", "split", "sha256sum"):
        if not shutil.which(tool):
            pytest.skip(f"needs {tool}")
    for i, name in enumerate("abc"):
        learnable_scene(tmp_path / "dubai", name, 160, 128, seed=i)
    classes_csv(tmp_path / "dubai" / "classes.csv")
    out = tmp_path / "out"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DATA": str(tmp_path / "dubai"), "BUDGET": "30", "MAX_EPOCHS": "2", "DEVICE": "cpu",
           "PRECISION": "fp32", "BATCH": "2", "CROP": "64", "WINDOWS": "4", "WORKERS": "0", "RUN": str(tmp_path / "run"),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "EXTRA": "--model-config spp_bottleneck=8,spp_level=4,spp_width=8,up_widths=8/8/8/8,squeeze=8"}
    done = subprocess.run(["bash", str(repo / "weights" / "train-landcover-gpu.sh"), str(out)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "training 2 epochs, validating every 1" in done.stdout
    (tmp_path / "best.pt").write_bytes(b"".join(p.read_bytes() for p in sorted(out.glob("best-fp16.pt.part-*"))))
    assert load_checkpoint(tmp_path / "best.pt").classes == ["water", "field", "road"]
    single, averaged = (json.loads((out / f).read_text()) for f in ("eval-val.json", "eval-val-ms.json"))
    assert single["split"] == "val" and single["images"] == 1 and not single["flip"] and averaged["flip"]
    assert (out / "train.log").read_text().startswith("bigseg train --data")


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
    assert announced == [{"images": 5, "of": 5, "teachers": 1, "scales": [1.0, 1.5], "flip": True,
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

    # kept at a quarter of the size each way: 16x less disk, made again for the new spec, and trained on
    events.clear()
    reduced = train(tiny_config(data, tmp_path / "f", max_steps=2, teacher_reduction=4, **settings),
                    on_event=lambda kind, info: events.append((kind, info)))
    files = sorted((tmp_path / "f" / "teacher").glob("*.npy"))
    assert len(files) == 5 and np.load(files[0]).shape == (20, 24, 3)
    assert sum(f.stat().st_size for f in files) == [i for k, i in events if k == "teacher"][0]["bytes"]
    assert json.loads((tmp_path / "f" / "teacher" / "spec.json").read_text())["reduction"] == 4
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


def test_rare_class_sampling_and_scene_balance_are_refused_for_image_folders_and_out_of_range(tmp_path, capsys):
    data = make_camvid_dataset(tmp_path / "data", n=4)
    for option, value, expected in (
            ("--rare-class-sampling", "0.1", "--rare-class-sampling draws windows of raster scenes"),
            ("--rare-class-sampling", "-1", "--rare-class-sampling is a temperature from 0 (off) to 10, got -1.0"),
            ("--scene-balance", "1", "--scene-balance weighs raster scenes against each other"),
            ("--scene-balance", "2", "--scene-balance is from 0 (scenes drawn by area) to 1 (every scene alike), got 2.0")):
        run = tmp_path / f"{option}{value}"
        code, _, err = run_cli(capsys, "train", "--data", data, "--run", run, option, value,
                               "--device", "cpu", "--workers", "0", "--max-steps", "1")
        assert code == 1 and expected in err, (option, value, err)
        assert not (run / "last.pt").exists()


def test_eval_scores_in_fp32_on_the_cpu_and_keeps_its_report_beside_the_model_not_here(
        tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """As training validates (fp32 on the CPU), whatever bf16 units the CPU has; no file appears
    in the working folder unasked."""
    import shutil

    from bigseg.infer import choose

    monkeypatch.delenv("BIGSEG_PRECISION")  # the tests pin fp32; here eval's own default decides
    monkeypatch.setattr(choose, "native_bf16", lambda: True)
    monkeypatch.chdir(tmp_path)
    data = make_generic_dataset(tmp_path / "data", n=4)
    model = tmp_path / "run" / "best.pt"
    model.parent.mkdir()
    shutil.copy(tiny_checkpoint, model)
    code, out, err = run_cli(capsys, "eval", "--data", data, "--model", model, "--device", "cpu", "--engine", "torch")
    assert code == 0, err
    assert "(float32, cpu; report: " in out and not list(tmp_path.glob("eval-*.json"))
    report = json.loads((tmp_path / "run" / "best.eval-val.json").read_text())
    assert report["precision"] == "float32"
    code, out, err = run_cli(capsys, "eval", "--data", data, "--model", model, "--device", "cpu", "--engine", "torch",
                             "--precision", "bf16", "-o", tmp_path / "bf16.json")
    assert code == 0 and json.loads((tmp_path / "bf16.json").read_text())["precision"] == "bfloat16"
