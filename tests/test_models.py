"""The ladder DenseNet and the registry: shapes, SPP grids, paper figures, faithful structure."""
import pytest
import torch
import torch.nn.functional as F

from bigseg.models import create_model, get_arch, list_archs, model_config
from bigseg.models.complexity import count_macs, count_parameters
from bigseg.models.ladder import spp_grid
from tests.conftest import TINY_BY_ARCH, tiny_model


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
