"""Fully-connected CRF with Gaussian edge potentials (Krähenbühl & Koltun 2011, as used by DeepLab
v1/v2), in plain torch: mean-field inference with Potts compatibility,

    Q <- softmax( log P + w1 * K_app(Q) + w2 * K_smooth(Q) ),
    k_app(i, j)    = exp(-|p_i - p_j|^2 / 2 theta_alpha^2 - |I_i - I_j|^2 / 2 theta_beta^2)
    k_smooth(i, j) = exp(-|p_i - p_j|^2 / 2 theta_gamma^2)

each kernel applied with symmetric normalisation (D^-1/2 K D^-1/2, D = K 1) as in the reference
implementation. Two ways to apply K: `lattice`, high-dimensional filtering on the permutohedral
lattice (Adams et al. 2010) as in the original; `window`, exact Gaussian sums over a truncated
(2r+1)^2 window (ConvCRF-style), optionally on a grid downsampled by `downsample`.
Returns probabilities, so overlapping tiles blend.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bigseg.crf.params import CRFParams


def dense_crf(probs: torch.Tensor, image: torch.Tensor, p: CRFParams = CRFParams()) -> torch.Tensor:
    """Refine (C, H, W) probabilities with the (3, H, W) 0..255 image; returns (C, H, W) probabilities."""
    if p.backend not in ("lattice", "window"):
        raise ValueError(f"unknown CRF back-end {p.backend!r}; use lattice or window")
    if probs.device.type == "cpu":
        # exp() of far Gaussian offsets and of confident logits lands in the denormal range,
        # where x86 arithmetic is ~100x slower; flush them to zero for the CRF only
        torch.set_flush_denormal(True)
        try:
            return _mean_field(probs, image, p)
        finally:
            torch.set_flush_denormal(False)
    return _mean_field(probs, image, p)


def _mean_field(probs: torch.Tensor, image: torch.Tensor, p: CRFParams) -> torch.Tensor:
    c, h, w = probs.shape
    probs, image = probs.float(), image.float()
    logp = probs.clamp_min(1e-8).log()
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=probs.device),
                            torch.arange(w, dtype=torch.float32, device=probs.device), indexing="ij")
    if p.backend == "lattice":
        pos = torch.stack([xs, ys], -1).reshape(-1, 2)
        rgb = image.permute(1, 2, 0).reshape(-1, 3)
        kernels = [(p.w1, Permutohedral(torch.cat([pos / p.theta_alpha, rgb / p.theta_beta], 1))),
                   (p.w2, Permutohedral(pos / p.theta_gamma))]
        apply = lambda k, q: k.filter(q.reshape(c, -1).t()).t().reshape(c, h, w)  # noqa: E731
    else:
        kernels = [(p.w1, WindowKernel(image, p.theta_alpha, p.theta_beta, p.radius, p.downsample, (h, w),
                                       probs.device)),
                   (p.w2, WindowKernel(None, p.theta_gamma, None, max(1, math.ceil(3 * p.theta_gamma)), 1, (h, w),
                                       probs.device))]
        apply = lambda k, q: k.filter(q)  # noqa: E731
    q = probs
    for _ in range(p.iterations):
        message = sum(weight * apply(kernel, q) for weight, kernel in kernels)
        q = torch.softmax(logp + message, 0)
    return q


class _Normalised:
    """Symmetric normalisation D^-1/2 K D^-1/2 around a raw kernel product `_raw`."""

    def _init_norm(self, ones: torch.Tensor) -> None:
        self.norm = self._raw(ones).clamp_min(1e-20).rsqrt()

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        return self.norm * self._raw(values * self.norm)


class WindowKernel(_Normalised):
    """Exact Gaussian sums over a (2r+1)^2 window on a grid downsampled by `step` (ConvCRF-style).
    `image` None gives the smoothness (positions only) kernel for an image of `shape`."""

    def __init__(self, image: torch.Tensor | None, theta_pos: float, theta_col: float | None, radius: int,
                 step: int, shape: tuple[int, int], device: torch.device):
        self.radius, self.step, self.shape = radius, step, shape
        k = 2 * radius + 1
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device) * step
        dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
        weights = torch.exp(-(dy ** 2 + dx ** 2) / (2 * theta_pos ** 2)).reshape(-1, 1, 1)
        grid = self._down(torch.ones((1, *shape), device=device))
        inside = F.unfold(grid[None], k, padding=radius)[0].reshape(k * k, *grid.shape[-2:])
        weights = weights * inside  # neighbours outside the image do not exist
        if image is not None:
            feat = self._down(image)
            cols = F.unfold(feat[None], k, padding=radius)[0].reshape(feat.shape[0], k * k, *feat.shape[-2:])
            weights = weights * torch.exp(-((cols - feat[:, None]) ** 2).sum(0) / (2 * theta_col ** 2))
        self.weights = weights
        self._init_norm(torch.ones((1, *shape), device=device))

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.step == 1 else F.avg_pool2d(x[None], self.step, ceil_mode=True)[0]

    def _raw(self, values: torch.Tensor) -> torch.Tensor:
        k = 2 * self.radius + 1
        small = self._down(values)
        hh, ww = small.shape[-2:]
        padded = F.pad(small, (self.radius,) * 4)
        # accumulate one shifted copy per offset in place: the (C, k*k, H, W) unfolded tensor
        # would cost k*k times the memory and is slower on CPU
        out = torch.zeros_like(small)
        for o in range(k * k):
            dy, dx = divmod(o, k)
            out.addcmul_(padded[:, dy:dy + hh, dx:dx + ww], self.weights[o])
        if self.step > 1:
            out = F.interpolate(out[None], self.shape, mode="bilinear", align_corners=False)[0]
        return out


class Permutohedral(_Normalised):
    """Gaussian filtering in feature space on the permutohedral lattice (Adams, Baek, Davis 2010):
    splat onto the enclosing simplex's vertices, blur [1 2 1] along each of the d+1 lattice
    directions, slice back with the barycentric weights. `features`: (N, d), unit standard deviation."""

    def __init__(self, features: torch.Tensor):
        n, d = features.shape
        self.n, self.d = n, d
        dev = features.device
        scale = math.sqrt(2.0 / 3.0) * (d + 1) / torch.sqrt(
            torch.arange(1, d + 1, dtype=torch.float64, device=dev) * torch.arange(2, d + 2, dtype=torch.float64, device=dev))
        cf = features.double() * scale                                          # (N, d)
        # elevate to the hyperplane sum(x) = 0 in d+1 dimensions
        elevated = torch.zeros(n, d + 1, dtype=torch.float64, device=dev)
        csum = torch.flip(torch.cumsum(torch.flip(cf, [1]), 1), [1])            # sum_{k>=i} cf_k
        elevated[:, 0] = csum[:, 0]
        idx = torch.arange(1, d + 1, device=dev, dtype=torch.float64)
        nxt = torch.cat([csum[:, 1:], torch.zeros(n, 1, dtype=torch.float64, device=dev)], 1)
        elevated[:, 1:] = nxt - idx * cf
        # nearest remainder-0 lattice point and the rank (ordering) of the differences
        v = elevated / (d + 1)
        up, down = torch.ceil(v) * (d + 1), torch.floor(v) * (d + 1)
        rem0 = torch.where(up - elevated < elevated - down, up, down)
        total = (rem0.sum(1) / (d + 1)).round().long()
        diff = elevated - rem0
        rank = (diff[:, :, None] < diff[:, None, :]).sum(2) + \
            ((diff[:, :, None] == diff[:, None, :]) & (torch.arange(d + 1, device=dev)[:, None] > torch.arange(d + 1, device=dev)[None, :])).sum(2)
        rank = rank.long()  # coordinates with a larger difference (ties broken by index)
        # fold the remainder-0 point back onto the plane
        t = total[:, None]
        pos = t > 0
        neg = t < 0
        move_down = pos & (rank >= d + 1 - t)
        move_up = neg & (rank < -t)
        rem0 = rem0 - (d + 1) * move_down + (d + 1) * move_up
        rank = rank + t - (d + 1) * move_down + (d + 1) * move_up
        # barycentric coordinates
        bary = torch.zeros(n, d + 2, dtype=torch.float64, device=dev)
        vv = (elevated - rem0) / (d + 1)
        bary.scatter_add_(1, d - rank, vv)
        bary.scatter_add_(1, d + 1 - rank, -vv)
        bary[:, 0] += 1 + bary[:, d + 1]
        self.bary = bary[:, : d + 1].float()                                    # (N, d+1)
        # the d+1 enclosing vertices: rem0 + canonical(r)[rank]
        r = torch.arange(d + 1, device=dev)
        canonical = torch.where(rank[:, None, :] <= d - r[None, :, None], r[None, :, None], r[None, :, None] - (d + 1))
        keys = (rem0.long()[:, None, :] + canonical)[:, :, :d]                   # (N, d+1, d)
        self.offset = keys.reshape(-1, d).min(0).values - d - 2
        self.base = int((keys.reshape(-1, d).max(0).values - self.offset).max().item()) + d + 3
        codes = self._encode(keys)
        self.vertex_codes, self.index = torch.unique(codes.reshape(-1), return_inverse=True)
        self.index = self.index.reshape(n, d + 1)
        self.m = len(self.vertex_codes)
        self.neighbours = self._neighbours(dev)
        self._init_norm(torch.ones(n, 1, device=dev))

    def _neighbours(self, dev: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each vertex's two neighbours along each of the d+1 lattice directions. Codes are
        positional in `base`, and every key +- a lattice step stays inside the encoded range
        (offset and base carry a margin of d+2), so a neighbour's code is the vertex's code plus a
        constant per direction; missing neighbours point at an extra all-zero row m."""
        d, m = self.d, self.m
        place = self.base ** torch.arange(d - 1, -1, -1, device=dev)
        neighbours = []
        for j in range(d + 1):
            step = torch.full((d,), -1, dtype=torch.long, device=dev)
            if j < d:
                step[j] = d
            delta = int((step * place).sum())
            neighbours.append((self._find(self.vertex_codes + delta, m), self._find(self.vertex_codes - delta, m)))
        return neighbours

    def _encode(self, keys: torch.Tensor) -> torch.Tensor:
        k = keys - self.offset
        code = torch.zeros(k.shape[:-1], dtype=torch.long, device=k.device)
        for i in range(self.d):
            code = code * self.base + k[..., i]
        return code

    def _find(self, codes: torch.Tensor, missing: int) -> torch.Tensor:
        pos = torch.searchsorted(self.vertex_codes, codes).clamp_max(len(self.vertex_codes) - 1)
        return torch.where(self.vertex_codes[pos] == codes, pos, missing)

    def _raw(self, values: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, C): splat, blur, slice. Buffers are reused and gathers go through
        index_select: on CPU this is 3x faster than fancy indexing and fresh tensors."""
        c, m = values.shape[1], self.m
        flat = self.index.reshape(-1)
        lattice = values.new_zeros(m + 1, c)       # the last row stays zero: 'absent neighbour'
        spare = values.new_zeros(m + 1, c)
        left, right = values.new_empty(m, c), values.new_empty(m, c)
        lattice.index_add_(0, flat, (self.bary[:, :, None] * values[:, None, :]).reshape(-1, c))
        for n1, n2 in self.neighbours:
            torch.index_select(lattice, 0, n1, out=left)
            torch.index_select(lattice, 0, n2, out=right)
            left.add_(right)
            torch.add(lattice[:m], left, alpha=0.5, out=spare[:m])
            lattice, spare = spare, lattice
        gathered = torch.index_select(lattice, 0, flat).reshape(self.n, self.d + 1, c)
        out = torch.bmm(self.bary[:, None, :], gathered)[:, 0]
        return out * (1.0 / (1.0 + 2.0 ** (-self.d)))
