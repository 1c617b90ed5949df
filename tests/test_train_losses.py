"""Losses and steps: gradient checkpointing keeps BN statistics, the ladder, Lovasz and
distillation-free losses, class balancing, the encoder's reduced learning rate."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bigseg.checkpoint import load_checkpoint
from bigseg.models.blocks import set_grad_checkpointing
from bigseg.train.data import IGNORE, open_split
from bigseg.train.loop import train
from bigseg.train.losses import ladder_loss, lovasz_softmax, model_loss, soft_targets
from tests.conftest import make_generic_dataset, tiny_config, tiny_model


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


def test_backbone_weights_get_a_quarter_of_the_learning_rate(tmp_path):
    from bigseg.train.setup import optimizer
    model = tiny_model()
    names = {f"backbone.{n}" for n, _ in model.backbone.named_parameters()}
    opt = optimizer(tiny_config("x", "y", lr=1e-3), model, names)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 2.5e-4]
    assert len(opt.param_groups[1]["params"]) == len(names)


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


def test_lovasz_trains_and_is_recorded_in_the_run(tmp_path):
    data = make_generic_dataset(tmp_path / "data", n=4)
    plain = train(tiny_config(data, tmp_path / "a", epochs=1, eval_every=0))
    with_lovasz = train(tiny_config(data, tmp_path / "b", epochs=1, eval_every=0, lovasz=1.0))
    assert np.isfinite(with_lovasz.losses).all() and with_lovasz.losses[0] > plain.losses[0]
    assert load_checkpoint(tmp_path / "b" / "final.pt").training["config"]["lovasz"] == 1.0


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
