"""Checkpoints and the shipped weights: what a file carries, safe loading, clear refusals, and the
weights/ files' sums and cards."""
import json
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from bigseg.checkpoint import from_model, load_backbone_weights, load_checkpoint, resolve_model, save_checkpoint
from bigseg.errors import CheckpointError
from bigseg.examples import render_street
from bigseg.infer.predictor import Predictor
from bigseg.manifest import read_manifest, sha256, weights_dir
from bigseg.models import create_model
from tests.conftest import CLASSES, TINY, tiny_model


# --- The checkpoint format: round trip, clear errors for every kind of bad file, shipped manifest.


def test_round_trip_gives_identical_predictions(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    assert ckpt.arch == "ladder-dn121" and ckpt.classes == CLASSES and ckpt.in_channels == 3
    assert ckpt.training == {"note": "test"} and len(ckpt.palette) == 3
    model = ckpt.build_model()
    again = save_checkpoint(ckpt, tiny_checkpoint.with_name("again.pt"))
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert torch.equal(model(x), load_checkpoint(again).build_model()(x))


def test_half_precision_checkpoint_loads_as_float(tmp_path):
    model = tiny_model().eval()
    path = save_checkpoint(from_model(model, "ladder-dn121", CLASSES, half=True), tmp_path / "h.pt")
    loaded = load_checkpoint(path).build_model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=0.05)


def test_save_is_atomic(tmp_path, tiny_checkpoint):
    save_checkpoint(load_checkpoint(tiny_checkpoint), tmp_path / "x.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt", "x.pt"]


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("kind,message", [
    ("missing", "not found"),
    ("truncated", "not a readable bigseg checkpoint"),
    ("text", "not a readable bigseg checkpoint"),
    ("empty", "not a readable bigseg checkpoint"),
    ("state_dict", "not a bigseg checkpoint"),
    ("code", "not a readable bigseg checkpoint"),
    ("incomplete", "incomplete"),
    ("unknown_arch", "unknown architecture"),
])
def test_bad_files_give_one_clear_error(tmp_path, tiny_checkpoint, kind, message):
    path = tmp_path / "bad.pt"
    if kind == "truncated":
        path.write_bytes(tiny_checkpoint.read_bytes()[:2000])
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "state_dict":
        torch.save(tiny_model().state_dict(), path)
    elif kind == "code":
        torch.save({"format": "bigseg-checkpoint", "x": Evil()}, path)
    elif kind == "incomplete":
        torch.save({"format": "bigseg-checkpoint", "version": 1, "arch": "ladder-dn121"}, path)
    elif kind == "unknown_arch":
        raw = torch.load(tiny_checkpoint, weights_only=True)
        raw["arch"] = "no-such-net"
        torch.save(raw, path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, tiny_checkpoint):
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["config"]["up_widths"] = [16, 8, 8, 8]
    torch.save(raw, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "mismatch.pt").build_model()


def test_model_names_resolve_through_the_manifest(tmp_path, tiny_checkpoint):
    (tmp_path / "w").mkdir()
    target = tmp_path / "w" / "tiny.pt"
    target.write_bytes(tiny_checkpoint.read_bytes())
    manifest = {"models": [{"name": "tiny-test", "arch": "ladder-dn121", "file": "tiny.pt",
                            "sha256": sha256(target)}]}
    (tmp_path / "w" / "manifest.json").write_text(json.dumps(manifest))
    assert resolve_model("tiny-test", tmp_path / "w").classes == CLASSES
    assert resolve_model("ladder-dn121", tmp_path / "w").classes == CLASSES  # arch with shipped weights
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="damaged"):
        resolve_model("tiny-test", tmp_path / "w")
    with pytest.raises(CheckpointError, match="no weights are shipped for 'ladder-dn169'"):
        resolve_model("ladder-dn169", tmp_path / "w")
    with pytest.raises(CheckpointError, match="unknown model"):
        resolve_model("whatever", tmp_path / "w")


def test_shipped_manifest_entries_are_complete_and_intact():
    for entry in read_manifest():
        for key in ("name", "arch", "file", "sha256", "classes", "palette", "normalization", "metrics"):
            assert key in entry, key
        path = weights_dir() / entry["file"]
        assert sha256(path) == entry["sha256"]
        ckpt = load_checkpoint(path)
        assert ckpt.classes == entry["classes"] and ckpt.arch == entry["arch"]


def torchvision_densenet121() -> nn.Module:
    growth, blocks, init, bn_size = 32, (6, 12, 24, 16), 64, 4
    features = OrderedDict(conv0=nn.Conv2d(3, init, 7, 2, 3, bias=False), norm0=nn.BatchNorm2d(init),
                           relu0=nn.ReLU(), pool0=nn.MaxPool2d(3, 2, 1))
    ch = init
    for i, n in enumerate(blocks):
        block = nn.Module()
        for j in range(n):
            layer = nn.Module()
            layer.norm1 = nn.BatchNorm2d(ch + j * growth)
            layer.relu1 = nn.ReLU()
            layer.conv1 = nn.Conv2d(ch + j * growth, bn_size * growth, 1, bias=False)
            layer.norm2 = nn.BatchNorm2d(bn_size * growth)
            layer.relu2 = nn.ReLU()
            layer.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)
            block.add_module(f"denselayer{j + 1}", layer)
        features[f"denseblock{i + 1}"] = block
        ch += n * growth
        if i < 3:
            features[f"transition{i + 1}"] = nn.Sequential(OrderedDict(
                norm=nn.BatchNorm2d(ch), relu=nn.ReLU(), conv=nn.Conv2d(ch, ch // 2, 1, bias=False),
                pool=nn.AvgPool2d(2, 2)))
            ch //= 2
    features["norm5"] = nn.BatchNorm2d(ch)
    net = nn.Module()
    net.features = nn.Sequential(features)
    net.classifier = nn.Linear(ch, 1000)
    return net


def test_torchvision_densenet121_weights_load_into_the_backbone(tmp_path):
    torch.manual_seed(1)
    reference = torchvision_densenet121()
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
    state = reference.state_dict()
    torch.save(state, tmp_path / "densenet121.pth")
    model = create_model("ladder-dn121", 11)
    names = load_backbone_weights(model, tmp_path / "densenet121.pth")
    assert len(names) == sum(1 for _ in model.backbone.parameters())
    ours = model.state_dict()
    for key, value in state.items():
        if key.startswith(("features.norm5", "classifier")):
            continue
        assert torch.equal(ours["backbone." + key], value), key


def test_backbone_weights_of_another_shape_are_refused(tmp_path):
    torch.save(create_model("ladder-dn169", 3).backbone.state_dict(), tmp_path / "dn169.pth")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_backbone_weights(create_model("ladder-dn121", 3), tmp_path / "dn169.pth")


@pytest.mark.parametrize("kind,says", [
    ("truncated", "a truncated or damaged zip archive"),
    ("text", "a text file"),
    ("pickle", "a plain Python pickle"),
    ("code", "a zip archive holding Python objects other than tensors"),
])
def test_model_file_errors_say_what_the_file_is_and_never_invite_unsafe_loading(tmp_path, tiny_checkpoint,
                                                                                 kind, says, recwarn):
    import pickle

    path = tmp_path / "bad.pt"
    if kind == "truncated":
        path.write_bytes(tiny_checkpoint.read_bytes()[: tiny_checkpoint.stat().st_size // 2])
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    else:
        torch.save({"format": "bigseg-checkpoint", "x": Evil()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert says in message and "weights_only" not in message and "\n" not in message
    assert message.endswith("use a .pt file written by `bigseg train`")
    assert not [w for w in recwarn if "torch" in str(w.filename) or "weights" in str(w.message)]


def test_a_run_checkpoint_predicts_like_the_model_it_holds(tmp_path, capsys):
    from bigseg.train.loop import TrainConfig, train
    from tests.cli_helpers import run_cli
    from tests.conftest import TINY, make_generic_dataset

    data = make_generic_dataset(tmp_path / "data", n=4)
    train(TrainConfig(data=str(data), run_dir=str(tmp_path / "run"), arch_config=TINY, epochs=1, batch_size=2, crop=64,
                      workers=0, device="cpu", precision="fp32", eval_every=0, seed=1))
    last, final = load_checkpoint(tmp_path / "run" / "last.pt"), load_checkpoint(tmp_path / "run" / "final.pt")
    assert last.classes == final.classes and last.normalization == final.normalization
    assert all(torch.equal(last.state_dict[k], final.state_dict[k]) for k in final.state_dict)
    image = data / "images" / "im00.png"
    for name in ("last", "final"):
        code, _, err = run_cli(capsys, "predict", image, "-m", tmp_path / "run" / f"{name}.pt", "-o",
                               tmp_path / f"{name}.png", "--device", "cpu", "--tile", "64")
        assert code == 0, err
    assert (tmp_path / "last.png").read_bytes() == (tmp_path / "final.png").read_bytes()
    # a run checkpoint of an older bigseg, which did not describe its model, says what to use instead
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    del state["checkpoint"]
    torch.save(state, tmp_path / "old-last.pt")
    with pytest.raises(CheckpointError, match="is a run checkpoint .* predict with best.pt or final.pt beside it"):
        load_checkpoint(tmp_path / "old-last.pt")


def test_weights_of_another_architecture_are_summarised_in_one_short_line(tmp_path):
    from bigseg.models import create_model

    other = create_model("deeplabv3-rn101", 3, 3, depth=18, aspp_width=16)
    ckpt = load_checkpoint(save_checkpoint(from_model(other, "deeplabv3-rn101", ["a", "b", "c"]), tmp_path / "x.pt"))
    ckpt.arch, ckpt.config = "ladder-dn121", TINY
    with pytest.raises(CheckpointError) as e:
        ckpt.build_model()
    message = str(e.value)
    assert len(message) < 600 and "\n" not in message
    assert re.search(r"\d+ of its \d+ tensors missing \(.*, \.\.\.\); \d+ unexpected \(.*\)", message), message
    assert message.endswith("the file holds weights of another architecture or configuration")


def test_a_checkpoint_naming_another_architecture_is_one_error_line(tmp_path, tiny_checkpoint, capsys):
    """Its settings belong to the ladder; its architecture field says DeepLab v3+."""
    import cv2

    from tests.cli_helpers import run_cli

    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["arch"] = "deeplabv3plus-rn50"
    torch.save(raw, tmp_path / "edited.pt")
    cv2.imwrite(str(tmp_path / "a.png"), np.full((40, 50, 3), 90, np.uint8))
    code, _, err = run_cli(capsys, "predict", tmp_path / "a.png", "-m", tmp_path / "edited.pt", "-o", tmp_path / "out",
                           "--device", "cpu")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and "Traceback" not in err and len(lines) == 1
    assert lines[0].startswith("Error: ") and "do not fit architecture 'deeplabv3plus-rn50'" in lines[0]


# --- The shipped weights: listed, intact, the default of `predict`, and sensible on a rendered street.


SHIPPED = read_manifest()


needs_weights = pytest.mark.skipif(not SHIPPED, reason="no weights shipped in weights/")


@needs_weights
def test_default_model_is_shipped_and_verified():
    ckpt = resolve_model("ladder-dn121")  # verifies the sha256 on the way
    entry = next(e for e in SHIPPED if e["arch"] == "ladder-dn121")
    assert ckpt.classes == entry["classes"] and ckpt.palette == entry["palette"]
    commands = entry["training_commands"]
    assert commands and all(c.startswith("bigseg train") for c in commands)
    assert all("--init" in c for c in commands[1:])  # each later stage continues from weights
    from bigseg.cli.predict import DEFAULT_MODEL

    default = resolve_model(DEFAULT_MODEL)  # predict's default is shipped, and intact
    assert default.classes == entry["classes"]  # a street model, as the README promises


@needs_weights
@pytest.mark.parametrize("model", ["ladder-dn121", "swiftnet-lite0-camvid"])
@pytest.mark.parametrize("seed", [0, 1])  # 0 is examples/street.jpg; weights/README.md gives sky recall on ten scenes
def test_rendered_street_scene_is_segmented_sensibly(seed, model):
    """Where the rendered scene is sky (road), sky (road) is predicted more than anything else."""
    image, truth = render_street(480, 360, seed=seed)
    seg = Predictor(resolve_model(model), "cpu", "fp32", tile=512)
    labels = seg.segment(np.moveaxis(image, -1, 0))
    classes = seg.card.classes
    for name in ("sky", "road"):
        votes = np.bincount(labels[truth == classes.index(name)], minlength=len(classes))
        assert classes[votes.argmax()] == name, (name, dict(zip(classes, votes)))


@needs_weights
@pytest.mark.parametrize("arch", ["ladder-dn121", "swiftnet-lite0"])
def test_shipped_score_on_camvid_test_is_reproduced(shared_data, arch):
    from bigseg.train.data import open_split
    from bigseg.train.evaluation import evaluate

    entry = next(e for e in SHIPPED if e["arch"] == arch and "camvid" in e["name"])
    seg = Predictor(resolve_model(entry["name"]), "cpu", "fp32", tile=1024)
    result = evaluate(seg, open_split(shared_data / "camvid", "test"))
    assert result.scores["miou"] == pytest.approx(entry["metrics"]["test"]["miou"], abs=0.002)


@needs_weights
@pytest.mark.parametrize("name, spec_name", [("ladder-dn121-camvid", "curve.json"),
                                             ("swiftnet-lite0-camvid", "swiftnet-lite0-camvid-curve.json"),
                                             ("landcover-dubai", "landcover-dubai-curve.json")])
def test_the_model_cards_learning_curve_ends_at_the_shipped_scores_and_draws(tmp_path, monkeypatch, name, spec_name):
    """A card's curve spec (the figures its png draws) ends where the manifest's scores are, has a
    stage per training command, and draws."""
    import importlib.util
    import json
    from pathlib import Path

    import cv2

    folder = Path(__file__).resolve().parents[1] / "weights"
    curve = json.loads((folder / spec_name).read_text())
    entry = next(e for e in SHIPPED if e["name"] == name)
    _, val, test = curve["stages"][-1]["points"][-1]
    shipped = {split: round(100 * m["miou"], 2) for split, m in entry["metrics"].items()}
    assert (val, test) == (shipped["val"], shipped.get("test"))
    starts = [s["start"] for s in curve["stages"]]
    assert starts == sorted(starts) and len(entry["training_commands"]) == len(curve["stages"])
    spec = importlib.util.spec_from_file_location("plot_curve", folder.parent / "tools" / "plot_curve.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    (tmp_path / spec_name).write_text(json.dumps(curve))
    monkeypatch.setattr(plot, "HERE", tmp_path)
    image = cv2.imread(str(plot.main(spec_name)))
    assert image.shape == (plot.H, plot.W, 3) and (image == plot.VAL[::-1]).all(-1).any()
    assert (tmp_path / curve["png"]).exists() and (folder / curve["png"]).exists()
