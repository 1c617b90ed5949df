"""The shipped weights: listed, intact, the default of `predict`, and sensible on a rendered street."""
import numpy as np
import pytest

from bigseg.checkpoint import resolve_model
from bigseg.examples import render_street
from bigseg.manifest import read_manifest
from bigseg.infer.predictor import Predictor

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
