"""Dense CRF: both back-ends against a brute-force dense Gaussian mean-field written here."""
import numpy as np
import pytest
import torch

from bigseg.crf.meanfield import Permutohedral, dense_crf
from bigseg.crf.params import CRFParams, parse_crf
from bigseg.errors import InputError


def brute_force_crf(probs, image, p: CRFParams):
    """Mean-field with exact dense kernels and symmetric normalisation, O(N^2)."""
    c, h, w = probs.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    pos = torch.stack([xs, ys], -1).reshape(-1, 2)
    rgb = image.double().permute(1, 2, 0).reshape(-1, 3)
    d_pos = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    d_rgb = ((rgb[:, None] - rgb[None]) ** 2).sum(-1)
    kernels = [(p.w1, torch.exp(-d_pos / (2 * p.theta_alpha ** 2) - d_rgb / (2 * p.theta_beta ** 2))),
               (p.w2, torch.exp(-d_pos / (2 * p.theta_gamma ** 2)))]
    logp = probs.double().clamp_min(1e-8).log().reshape(c, -1)
    q = probs.double().reshape(c, -1)
    for _ in range(p.iterations):
        message = 0
        for weight, k in kernels:
            norm = k.sum(1).rsqrt()
            message = message + weight * norm * ((q * norm) @ k.t())
        q = torch.softmax(logp + message, 0)
    return q.reshape(c, h, w).float()


def noisy_case(h=14, w=18, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(h, w, dtype=torch.long)
    labels[:, w // 3:] = 1
    labels[h // 2:, 2 * w // 3:] = 2
    colours = torch.tensor([[200.0, 40, 40], [40, 200, 40], [40, 40, 200]])
    image = colours[labels].permute(2, 0, 1) + torch.rand(3, h, w, generator=g) * 4
    logits = 1.5 * torch.nn.functional.one_hot(labels, classes).permute(2, 0, 1).float()
    logits = logits + torch.randn(classes, h, w, generator=g) * 1.2
    return labels, image, logits.softmax(0)


def test_window_back_end_equals_brute_force_when_the_window_covers_the_image():
    labels, image, probs = noisy_case()
    p = CRFParams(w1=4, theta_alpha=5, theta_beta=20, w2=3, theta_gamma=1, iterations=5, backend="window",
                  radius=18)  # window larger than the image: nothing truncated
    expected = brute_force_crf(probs, image, p)
    # the smoothness window (radius 3 theta_gamma) truncates at exp(-4.5); make it irrelevant
    got = dense_crf(probs, image, p)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=2e-3)


def test_lattice_back_end_approximates_brute_force():
    labels, image, probs = noisy_case(seed=1)
    p = CRFParams(w1=4, theta_alpha=5, theta_beta=20, w2=3, theta_gamma=1, iterations=5, backend="lattice")
    expected = brute_force_crf(probs, image, p)
    got = dense_crf(probs, image, p)
    assert (got.argmax(0) == expected.argmax(0)).float().mean() > 0.97
    assert (got - expected).abs().mean() < 0.05


def test_lattice_filter_matches_a_normalised_gaussian():
    torch.manual_seed(0)
    f = torch.rand(300, 5) * 2
    v = torch.rand(300, 2)
    k = torch.exp(-((f[:, None] - f[None]) ** 2).sum(-1) / 2)
    d = k.sum(1, keepdim=True).rsqrt()
    exact = d * (k @ (d * v))
    approx = Permutohedral(f).filter(v)
    assert ((approx - exact).abs() / exact).mean() < 0.05


@pytest.mark.parametrize("backend", ["lattice", "window"])
def test_crf_never_lowers_agreement_with_clean_colour_edges(backend):
    for seed in range(3):
        labels, image, probs = noisy_case(24, 30, seed=seed)
        before = (probs.argmax(0) == labels).float().mean()
        after = (dense_crf(probs, image, CRFParams(theta_alpha=10, theta_beta=10, backend=backend)).argmax(0)
                 == labels).float().mean()
        assert after >= before and after > 0.95


def test_window_crf_in_tiles_equals_whole_image_once_the_halo_covers_its_reach():
    from bigseg.tiling.geometry import TileGrid
    from bigseg.tiling.stitch import Pipeline, stream_tiles

    labels, image, probs = noisy_case(60, 90, seed=2)
    p = CRFParams(theta_alpha=6, theta_beta=15, iterations=3, backend="window", radius=3)
    whole = dense_crf(probs, image, p).numpy()
    halo = p.iterations * p.reach                     # 9 px: the dead zone overlap/4 must cover it
    grid = TileGrid(90, 60, 48, 4 * halo)
    stacked = torch.cat([probs, image]).numpy()
    read = lambda win: (stacked[(slice(None), *win.slices)], np.ones((win.height, win.width), bool))
    crf = lambda x: np.stack([dense_crf(torch.from_numpy(t[:3]), torch.from_numpy(t[3:]), p).numpy() for t in x])
    tiled = np.zeros_like(whole)
    for win, block, _ in stream_tiles(grid, read, Pipeline(crf, 3, np.zeros((6, 1, 1), np.float32), 4)):
        tiled[(slice(None), *win.slices)] = block
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


def test_crf_options_are_parsed_and_checked():
    assert parse_crf(None) is None
    p = parse_crf("window", "iterations=3,theta_alpha=50")
    assert (p.backend, p.iterations, p.theta_alpha) == ("window", 3, 50.0)
    with pytest.raises(InputError, match="unknown 'nope'"):
        parse_crf("lattice", "nope=1")
    with pytest.raises(InputError, match="lattice or window"):
        parse_crf("dense")
