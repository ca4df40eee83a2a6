"""RedDino's pixel/colour op pool as batched torch code that runs on the training device.

Why: the albumentations pool costs ~12 ms per 224 px view on one CPU core (docs/measured_costs.md §3), so a
16-core loader feeds a GPU far slower than it trains. With ``augment=reddino_gpu`` the loader only crops,
flips and rotates (:class:`reddino.data.augment.RedDinoAugmentation` with ``pixel_ops_device: gpu``) and
:class:`RedDinoGpuPixelOps` applies the pool to whole batches after the host-to-device copy.

Semantics follow albumentations 1.3.1 ``SomeOf(pool, n=4, replace=True)`` as the reference used it: per
view and per slot one op is drawn uniformly with replacement and always applied, with its parameters
drawn per view from the 1.3.1 default ranges. Images are float32 in [0, 1] throughout (no uint8
rounding between ops), so results are close to, not bit-identical with, albumentations; each op's
docstring says where it simplifies. Every op takes ``(x, generator)`` with ``x`` of shape
(n, 3, H, W) and returns a new tensor of the same shape, clamped to [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
PixelOp = Callable[[Tensor, torch.Generator], Tensor]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, what cv2.COLOR_RGB2GRAY uses

# ---------------------------------------------------------------------------------------------------
# random draws and small helpers


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=g, device=device)


def _randint(
    low: int, high_inclusive: int, size: Sequence[int], g: torch.Generator, device: torch.device
) -> Tensor:
    return torch.randint(low, high_inclusive + 1, tuple(size), generator=g, device=device)


def _choice(values: Sequence[int], n: int, g: torch.Generator, device: torch.device) -> Tensor:
    """``n`` uniform draws from ``values`` (repeat a value in ``values`` to weigh it more)."""
    table = torch.tensor(list(values), device=device)
    return table[torch.randint(0, len(values), (n,), generator=g, device=device)]


def _col(v: Tensor) -> Tensor:
    """Per-view scalars -> (n, 1, 1, 1) for broadcasting over (n, C, H, W)."""
    return v.view(-1, 1, 1, 1)


def _pad(x: Tensor, pad: tuple[int, int, int, int], mode: str = "reflect") -> Tensor:
    """cv2's default border is BORDER_REFLECT_101 (torch 'reflect'); fall back to 'replicate' on crops
    too small to reflect (tiny debug sizes)."""
    if mode == "reflect" and max(pad) >= min(x.shape[-2:]):
        mode = "replicate"
    return F.pad(x, pad, mode=mode)


def _conv_per_view(x: Tensor, kernels: Tensor, border: str = "reflect") -> Tensor:
    """Correlate every view with its own (k, k) kernel (cv2.filter2D semantics), all views at once.

    Views are folded into channels and convolved depthwise (``groups = n * C``), so one conv2d call
    serves a batch whose views drew different kernels; smaller kernels are zero-padded to k.
    """
    n, c, h, w = x.shape
    k = kernels.shape[-1]
    p = k // 2
    xp = _pad(x, (p, p, p, p), border).reshape(1, n * c, h + 2 * p, w + 2 * p)
    weight = kernels.to(x.dtype).repeat_interleave(c, 0).unsqueeze(1)
    return F.conv2d(xp, weight, groups=n * c).reshape(n, c, h, w)


def _separable_per_view(x: Tensor, k1d: Tensor) -> Tensor:
    """Separable per-view filtering with (n, k) 1-D kernels (rows, then columns)."""
    n, c, h, w = x.shape
    k = k1d.shape[-1]
    p = k // 2
    weight = k1d.to(x.dtype).repeat_interleave(c, 0)
    xp = _pad(x, (p, p, 0, 0)).reshape(1, n * c, h, w + 2 * p)
    x = F.conv2d(xp, weight.view(n * c, 1, 1, k), groups=n * c).reshape(n, c, h, w)
    xp = _pad(x, (0, 0, p, p)).reshape(1, n * c, h + 2 * p, w)
    return F.conv2d(xp, weight.view(n * c, 1, k, 1), groups=n * c).reshape(n, c, h, w)


def _centred(kernels: Tensor, size: int) -> Tensor:
    """Zero-pad (n, k, k) or (n, k) kernels symmetrically to ``size``."""
    p = (size - kernels.shape[-1]) // 2
    pad = (p, p, p, p) if kernels.dim() == 3 else (p, p)
    return F.pad(kernels, pad)


def _box_kernels(sizes: Tensor, size: int) -> Tensor:
    """(n, size) centred 1-D box kernels of the given odd widths."""
    offsets = torch.arange(size, device=sizes.device) - size // 2
    inside = offsets.abs()[None, :] <= (sizes[:, None] // 2)
    return inside.float() / sizes[:, None].float()


def _gaussian_1d(sigma: Tensor, size: int) -> Tensor:
    """(n, size) normalised Gaussian kernels, one sigma per row."""
    offsets = (torch.arange(size, device=sigma.device) - size // 2).float()
    kernel = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    return kernel / kernel.sum(-1, keepdim=True)


def _gray(x: Tensor) -> Tensor:
    """(n, 1, H, W) luma as cv2.COLOR_RGB2GRAY."""
    weights = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _levels(x: Tensor) -> Tensor:
    """uint8 grey levels 0..255 as long (what the uint8 albumentations ops index their LUTs with)."""
    return torch.round(x.clamp(0, 1) * 255).long()


# ---------------------------------------------------------------------------------------------------
# colour spaces (cv2 float conventions: hue as a fraction of a turn here instead of degrees)


def _hue(x: Tensor, maxc: Tensor, delta: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    return torch.where(delta > 0, (h / 6) % 1.0, torch.zeros_like(h))


def rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(n, 3, H, W) RGB in [0, 1] -> hue in [0, 1), saturation, value, each (n, H, W)."""
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    return _hue(x, maxc, delta), s, maxc


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv` (closed form per channel, no branches)."""
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + h * 6) % 6
        channels.append(v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(channels, 1)


def rgb_to_hls(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(n, 3, H, W) RGB in [0, 1] -> hue in [0, 1), lightness, saturation, each (n, H, W)."""
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    lightness = (maxc + minc) / 2
    denom = (1 - (2 * lightness - 1).abs()).clamp(min=1e-12)
    s = torch.where(delta > 0, delta / denom, torch.zeros_like(delta)).clamp(0, 1)
    return _hue(x, maxc, delta), lightness, s


def hls_to_rgb(h: Tensor, lightness: Tensor, s: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hls`."""
    a = s * torch.minimum(lightness, 1 - lightness)
    channels = []
    for n in (0.0, 8.0, 4.0):
        k = (n + h * 12) % 12
        channels.append(lightness - a * torch.clamp(torch.minimum(k - 3, 9 - k), -1, 1))
    return torch.stack(channels, 1)


# ---------------------------------------------------------------------------------------------------
# the 33 ops (albumentations 1.3.1 defaults as in conf/augment/reddino.yaml)


def blur(x: Tensor, g: torch.Generator) -> Tensor:
    """Blur(blur_limit 7): box filter of odd size 3, 5 or 7 (uniform, as 1.3.1), reflect-101 border."""
    sizes = _choice((3, 5, 7), x.shape[0], g, x.device)
    return _separable_per_view(x, _box_kernels(sizes, 7))


def clahe(x: Tensor, g: torch.Generator) -> Tensor:
    """CLAHE(clip_limit (1, 4), 8x8 tiles): OpenCV's algorithm (per-tile 256-bin histograms clipped at
    ``clip * area / 256`` with the excess spread evenly, bilinear blend of the tile LUTs).

    Simplification: equalises the ITU-R 601 luma and adds the change to R, G and B (chroma kept), where
    1.3.1 equalises CIELAB L; OpenCV's residual redistribution of the clipped excess is skipped.
    """
    n, _, h, w = x.shape
    grid = 8
    clip = _uniform(n, 1.0, 4.0, g, x.device)
    y = _gray(x)
    th, tw = math.ceil(h / grid), math.ceil(w / grid)
    padded = _pad(y, (0, tw * grid - w, 0, th * grid - h))[:, 0]
    levels = _levels(padded)
    tiles = levels.reshape(n, grid, th, grid, tw).permute(0, 1, 3, 2, 4).reshape(n, grid * grid, th * tw)
    hist = torch.zeros(n, grid * grid, 256, device=x.device).scatter_add_(
        2, tiles, torch.ones_like(tiles, dtype=torch.float32)
    )
    area = th * tw
    limit = torch.floor(clip * area / 256).clamp(min=1).view(n, 1, 1)
    excess = (hist - limit).clamp(min=0).sum(-1, keepdim=True)
    hist = hist.clamp(max=limit) + excess / 256
    lut = torch.round(torch.cumsum(hist, -1) * (255.0 / area)).clamp(0, 255).reshape(-1)

    def coords(size: int, tile: int) -> tuple[Tensor, Tensor, Tensor]:
        pos = (torch.arange(size, device=x.device, dtype=torch.float32) + 0.5) / tile - 0.5
        lo = torch.floor(pos)
        weight = pos - lo
        lo = lo.long()
        return lo.clamp(0, grid - 1), (lo + 1).clamp(0, grid - 1), weight

    y0, y1, wy = coords(h, th)
    x0, x1, wx = coords(w, tw)
    level = _levels(y[:, 0])
    base = (torch.arange(n, device=x.device) * grid * grid).view(n, 1, 1)

    def at(ty: Tensor, tx: Tensor) -> Tensor:
        return lut[((base + ty.view(1, h, 1) * grid + tx.view(1, 1, w)) * 256 + level)]

    wy, wx = wy.view(1, h, 1), wx.view(1, 1, w)
    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    new = (top * (1 - wy) + bottom * wy) / 255
    return (x + (new - y[:, 0]).unsqueeze(1)).clamp(0, 1)


def channel_shuffle(x: Tensor, g: torch.Generator) -> Tensor:
    """ChannelShuffle: a uniformly random permutation of R, G, B per view (exact)."""
    perm = torch.argsort(torch.rand(x.shape[0], 3, generator=g, device=x.device), dim=1)
    return x.gather(1, perm.view(-1, 3, 1, 1).expand_as(x))


def channel_dropout(x: Tensor, g: torch.Generator) -> Tensor:
    """ChannelDropout(channel_drop_range (1, 1), fill 0): one random channel set to 0 (exact)."""
    channel = torch.randint(0, 3, (x.shape[0],), generator=g, device=x.device)
    keep = torch.arange(3, device=x.device).view(1, 3) != channel.view(-1, 1)
    return x * keep.view(-1, 3, 1, 1).to(x.dtype)


def _adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * _col(f)).clamp(0, 1)


def _adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    mean = _gray(x).mean((1, 2, 3), keepdim=True)
    return (x * _col(f) + mean * (1 - _col(f))).clamp(0, 1)


def _adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    return (x * _col(f) + _gray(x) * (1 - _col(f))).clamp(0, 1)


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    h, s, v = rgb_to_hsv(x)
    return hsv_to_rgb((h + shift.view(-1, 1, 1)) % 1.0, s, v).clamp(0, 1)


def color_jitter(x: Tensor, g: torch.Generator) -> Tensor:
    """ColorJitter(0.2, 0.2, 0.2, hue 0.2): 1.3.1's torchvision-style brightness, contrast (to the mean
    luma), saturation (to per-pixel luma) and HSV hue shift of ``hue * 360`` degrees, applied in a random
    order per view. Float math instead of 1.3.1's uint8 LUTs."""
    n, device = x.shape[0], x.device
    factors = [
        _uniform(n, 0.8, 1.2, g, device),
        _uniform(n, 0.8, 1.2, g, device),
        _uniform(n, 0.8, 1.2, g, device),
        _uniform(n, -0.2, 0.2, g, device),
    ]
    adjust = (_adjust_brightness, _adjust_contrast, _adjust_saturation, _adjust_hue)
    order = torch.argsort(torch.rand(n, 4, generator=g, device=device), dim=1).cpu()
    x = x.clone()
    for position in range(4):
        for k in range(4):
            idx = (order[:, position] == k).nonzero().flatten().to(device)
            if idx.numel():
                x[idx] = adjust[k](x[idx], factors[k][idx])
    return x


def defocus(x: Tensor, g: torch.Generator) -> Tensor:
    """Defocus(radius (3, 10), alias_blur (0.1, 0.5)): 1.3.1's normalised disc of the drawn radius,
    smoothed by a Gaussian (3x3 for radius <= 8, else 5x5) of sigma ``alias_blur``, then convolved.

    Simplification: every disc lives on a 21x21 grid (1.3.1 uses 17x17 below radius 9), and the kernel
    smoothing pads with zeros instead of reflecting the kernel's own border.
    """
    n, device = x.shape[0], x.device
    radius = _randint(3, 10, (n,), g, device).float()
    alias = _uniform(n, 0.1, 0.5, g, device)
    offsets = (torch.arange(21, device=device) - 10).float()
    dist2 = offsets.view(1, 21, 1) ** 2 + offsets.view(1, 1, 21) ** 2
    disc = (dist2 <= radius.view(n, 1, 1) ** 2).float()
    disc = disc / disc.sum((1, 2), keepdim=True)
    smooth = _gaussian_1d(alias, 5)
    smooth = torch.where((radius <= 8).view(n, 1), _centred(_gaussian_1d(alias, 3), 5), smooth)
    kernel = torch.einsum("ni,nj->nij", smooth, smooth)
    kernel = F.conv2d(F.pad(disc, (2, 2, 2, 2)).unsqueeze(0), kernel.unsqueeze(1), groups=n).squeeze(0)
    return _conv_per_view(x, kernel / kernel.sum((1, 2), keepdim=True)).clamp(0, 1)


def downscale(x: Tensor, g: torch.Generator) -> Tensor:
    """Downscale(scale 0.25, nearest both ways): exact (no random parameter at the 1.3.1 defaults)."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h * 0.25)), max(1, round(w * 0.25))), mode="nearest")
    return F.interpolate(small, size=(h, w), mode="nearest")


def emboss(x: Tensor, g: torch.Generator) -> Tensor:
    """Emboss(alpha (0.2, 0.5), strength (0.2, 0.7)): 1.3.1's 3x3 kernel blended with identity (exact
    up to uint8 rounding)."""
    n, device = x.shape[0], x.device
    alpha = _uniform(n, 0.2, 0.5, g, device).view(n, 1, 1)
    s = _uniform(n, 0.2, 0.7, g, device).view(n, 1, 1)
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    effect = torch.cat(
        [
            torch.cat([-1 - s, -s, zero], 2),
            torch.cat([-s, one, s], 2),
            torch.cat([zero, s, 1 + s], 2),
        ],
        1,
    )
    identity = torch.zeros(1, 3, 3, device=device)
    identity[0, 1, 1] = 1
    return _conv_per_view(x, (1 - alpha) * identity + alpha * effect).clamp(0, 1)


def equalize(x: Tensor, g: torch.Generator) -> Tensor:
    """Equalize(mode cv, by_channels): cv2.equalizeHist per channel on the uint8 levels (exact)."""
    n, c, h, w = x.shape
    levels = _levels(x).reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(
        1, levels, torch.ones_like(levels, dtype=torch.float32)
    )
    cdf = torch.cumsum(hist, 1)
    first = torch.where(hist > 0, cdf, torch.full_like(cdf, float("inf"))).min(1, keepdim=True).values
    total = float(h * w)
    scale = 255.0 / (total - first).clamp(min=1)
    lut = torch.round((cdf - first) * scale).clamp(0, 255)
    constant = first == total  # one grey level: cv2 leaves the channel as it is
    out = lut.gather(1, levels)
    out = torch.where(constant, levels.float(), out)
    return (out / 255).reshape(n, c, h, w)


def fancy_pca(x: Tensor, g: torch.Generator) -> Tensor:
    """FancyPCA(alpha 0.1): 1.3.1's per-image PCA of the RGB pixels (no ImageNet eigenbasis), with ONE
    scalar ``alpha ~ N(0, 0.1)`` per image and 1.3.1's arithmetic, including its ``np.column_stack``
    of the sorted eigenvectors (which transposes them). Eigenvector signs may differ from LAPACK's,
    which alpha's symmetric distribution makes irrelevant."""
    n = x.shape[0]
    pixels = x.flatten(2).transpose(1, 2).double()  # (n, HW, 3)
    centred = pixels - pixels.mean(1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred / max(pixels.shape[1] - 1, 1)
    vals, vecs = torch.linalg.eigh(cov)
    vals, vecs = vals.flip(-1), vecs.flip(-1)  # descending, as 1.3.1 sorts them
    alpha = torch.randn(n, generator=g, device=x.device).double() * 0.1
    add = vecs.transpose(1, 2) @ (alpha.view(n, 1) * vals).unsqueeze(-1)  # column_stack == transpose
    return (x + add.view(n, 3, 1, 1).to(x.dtype)).clamp(0, 1)


def gauss_noise(x: Tensor, g: torch.Generator) -> Tensor:
    """GaussNoise(var_limit (10, 50), per_channel): variance drawn uniformly in px^2 as 1.3.1 did,
    zero-mean noise per pixel and channel."""
    sigma = _uniform(x.shape[0], 10.0, 50.0, g, x.device).sqrt() / 255
    noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
    return (x + noise * _col(sigma)).clamp(0, 1)


def gaussian_blur(x: Tensor, g: torch.Generator) -> Tensor:
    """GaussianBlur(blur_limit (3, 7), sigma 0): 1.3.1's odd-size draw (P(3)=0.2, P(5)=P(7)=0.4) and
    OpenCV's fixed binomial kernels for sigma 0 and ksize <= 7 (exact up to uint8 rounding)."""
    sizes = _choice((3, 5, 5, 7, 7), x.shape[0], g, x.device)
    table = torch.tensor(
        [
            [0, 0, 1, 2, 1, 0, 0],
            [0, 1, 4, 6, 4, 1, 0],
            [1, 6, 15, 20, 15, 6, 1],
        ],
        device=x.device,
        dtype=torch.float32,
    )
    k1d = table[(sizes - 3) // 2]
    return _separable_per_view(x, k1d / k1d.sum(1, keepdim=True))


def glass_blur(x: Tensor, g: torch.Generator) -> Tensor:
    """GlassBlur(sigma 0.7, max_delta 4, iterations 2, fast): Gaussian (5x5, sigma 0.7), two rounds of
    local pixel displacement in the interior, Gaussian again.

    Simplification: each interior pixel takes the value at a random offset in [-4, 3]^2 (a gather);
    1.3.1 swaps the two pixels, which cannot be done in parallel without write races.
    """
    n, c, h, w = x.shape
    kernel = _gaussian_1d(torch.full((n,), 0.7, device=x.device), 5)
    x = _separable_per_view(x, kernel)
    delta = 4
    rows = torch.arange(delta + 1, h - delta + 1, device=x.device)
    cols = torch.arange(delta + 1, w - delta + 1, device=x.device)
    if rows.numel() and cols.numel():
        base = torch.arange(h * w, device=x.device).view(1, h, w).repeat(n, 1, 1)
        for _ in range(2):
            dy = _randint(-delta, delta - 1, (n, rows.numel(), cols.numel()), g, x.device)
            dx = _randint(-delta, delta - 1, (n, rows.numel(), cols.numel()), g, x.device)
            index = base.clone()
            index[:, rows[:, None], cols[None, :]] = (rows[:, None] + dy) * w + cols[None, :] + dx
            x = x.flatten(2).gather(2, index.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)
    return _separable_per_view(x, kernel).clamp(0, 1)


def hue_saturation_value(x: Tensor, g: torch.Generator) -> Tensor:
    """HueSaturationValue(20, 30, 20): 1.3.1's uint8 shifts (hue in OpenCV's 0-180 units, i.e. up to
    +-40 degrees; saturation and value by up to 30 and 20 of 255), in float HSV."""
    n, device = x.shape[0], x.device
    hue = _uniform(n, -20.0, 20.0, g, device) / 180
    sat = _uniform(n, -30.0, 30.0, g, device) / 255
    val = _uniform(n, -20.0, 20.0, g, device) / 255
    h, s, v = rgb_to_hsv(x)
    h = (h + hue.view(n, 1, 1)) % 1.0
    s = (s + sat.view(n, 1, 1)).clamp(0, 1)
    v = (v + val.view(n, 1, 1)).clamp(0, 1)
    return hsv_to_rgb(h, s, v).clamp(0, 1)


def iso_noise(x: Tensor, g: torch.Generator) -> Tensor:
    """ISONoise(color_shift (0.01, 0.05), intensity (0.1, 0.5)): 1.3.1's HLS recipe: Poisson
    luminance noise of rate ``std(L) * intensity * 255`` pulling L towards 1, Gaussian hue noise of
    ``color_shift * 360 * intensity`` degrees (wrapped), back to RGB."""
    n, device = x.shape[0], x.device
    shift = _uniform(n, 0.01, 0.05, g, device)
    intensity = _uniform(n, 0.1, 0.5, g, device)
    h, lightness, s = rgb_to_hls(x)
    rate = lightness.flatten(1).std(1, unbiased=False) * intensity * 255
    lum_noise = torch.poisson(rate.view(n, 1, 1).expand_as(lightness).contiguous(), generator=g)
    hue_noise = torch.randn(lightness.shape, generator=g, device=device) * (shift * intensity).view(n, 1, 1)
    h = (h + hue_noise) % 1.0
    lightness = (lightness + lum_noise / 255 * (1 - lightness)).clamp(0, 1)
    return hls_to_rgb(h, lightness, s).clamp(0, 1)


_JPEG_LUMA = [
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
]
_JPEG_CHROMA = [
    [17, 18, 24, 47, 99, 99, 99, 99],
    [18, 21, 26, 66, 99, 99, 99, 99],
    [24, 26, 56, 99, 99, 99, 99, 99],
    [47, 66, 99, 99, 99, 99, 99, 99],
] + [[99] * 8] * 4


def _dct_matrix(device: torch.device) -> Tensor:
    k = torch.arange(8, device=device, dtype=torch.float32).view(8, 1)
    i = torch.arange(8, device=device, dtype=torch.float32).view(1, 8)
    m = torch.cos((2 * i + 1) * k * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m


def _quant_tables(quality: Tensor) -> tuple[Tensor, Tensor]:
    """(n, 8, 8) libjpeg tables scaled for ``quality`` (>= 50: scale = 200 - 2q)."""
    scale = torch.where(quality < 50, 5000 / quality.float(), 200 - 2 * quality.float()).view(-1, 1, 1)
    tables = []
    for base in (_JPEG_LUMA, _JPEG_CHROMA):
        t = torch.tensor(base, device=quality.device, dtype=torch.float32).unsqueeze(0)
        tables.append(torch.floor((t * scale + 50) / 100).clamp(1, 255))
    return tables[0], tables[1]


def _dct_quantise(plane: Tensor, table: Tensor, dct: Tensor) -> Tensor:
    """Quantise (n, H, W) in 0-255 units with H, W multiples of 8 through the 8x8 DCT and back."""
    n, h, w = plane.shape
    blocks = (plane - 128).reshape(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    coef = dct @ blocks @ dct.T
    t = table.view(n, 1, 1, 8, 8)
    blocks = dct.T @ (torch.round(coef / t) * t) @ dct
    return blocks.permute(0, 1, 3, 2, 4).reshape(n, h, w) + 128


def image_compression(x: Tensor, g: torch.Generator) -> Tensor:
    """ImageCompression(JPEG, quality 99-100): baseline JPEG as libjpeg/OpenCV encode it: full-range
    YCbCr, 4:2:0 chroma (2x2 mean), 8x8 DCT quantised with the standard tables scaled to the drawn
    quality, inverse DCT, chroma upsampled bilinearly (libjpeg's 'fancy' triangle filter, approximately)
    and rounded to uint8 levels. Edges are padded by replication to whole blocks."""
    n, _, h, w = x.shape
    quality = _randint(99, 100, (n,), g, x.device)
    q_luma, q_chroma = _quant_tables(quality)
    dct = _dct_matrix(x.device)
    ph, pw = math.ceil(h / 16) * 16, math.ceil(w / 16) * 16
    v = _pad(x * 255, (0, pw - w, 0, ph - h), "replicate")
    r, gg, b = v.unbind(1)
    y = 0.299 * r + 0.587 * gg + 0.114 * b
    cb = -0.168736 * r - 0.331264 * gg + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * gg - 0.081312 * b + 128
    y = _dct_quantise(y, q_luma, dct)
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2)
    chroma = torch.stack([_dct_quantise(chroma[:, i], q_chroma, dct) for i in range(2)], 1)
    chroma = F.interpolate(chroma, size=(ph, pw), mode="bilinear", align_corners=False)
    cb, cr = chroma[:, 0] - 128, chroma[:, 1] - 128
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return (torch.round(rgb[..., :h, :w]).clamp(0, 255) / 255).to(x.dtype)


def invert_img(x: Tensor, g: torch.Generator) -> Tensor:
    """InvertImg: 1 - x (exact)."""
    return 1 - x


def median_blur(x: Tensor, g: torch.Generator) -> Tensor:
    """MedianBlur(blur_limit 7): median of an odd 3, 5 or 7 window (uniform), replicated border (exact).

    Views are grouped by window size and chunked, since the unfolded windows take k^2 times the image.
    """
    sizes = _choice((3, 5, 7), x.shape[0], g, x.device).cpu()
    out = x.clone()
    _, c, h, w = x.shape
    for k in (3, 5, 7):
        idx = (sizes == k).nonzero().flatten().to(x.device)
        for chunk in idx.split(8):
            if not chunk.numel():
                continue
            p = k // 2
            patches = F.unfold(_pad(x[chunk], (p, p, p, p), "replicate"), k)  # (m, c*k*k, h*w)
            patches = patches.view(chunk.numel(), c, k * k, h * w)
            out[chunk] = patches.median(2).values.view(chunk.numel(), c, h, w)
    return out


def motion_blur(x: Tensor, g: torch.Generator) -> Tensor:
    """MotionBlur(blur_limit 7, allow_shifted): 1.3.1's kernel, a 1-px line between two random points of
    an odd 3, 5 or 7 grid (distinct rows when the columns coincide), normalised. The line is rasterised
    by sampling instead of cv2.line's Bresenham (same pixels for these short lines up to ties)."""
    n, device = x.shape[0], x.device
    k = _choice((3, 5, 7), n, g, device)
    kf = k.float()
    x1 = torch.floor(torch.rand(n, generator=g, device=device) * kf)
    x2 = torch.floor(torch.rand(n, generator=g, device=device) * kf)
    y1 = torch.floor(torch.rand(n, generator=g, device=device) * kf)
    y2_any = torch.floor(torch.rand(n, generator=g, device=device) * kf)
    y2_distinct = (y1 + 1 + torch.floor(torch.rand(n, generator=g, device=device) * (kf - 1))) % kf
    y2 = torch.where(x1 == x2, y2_distinct, y2_any)
    t = torch.linspace(0, 1, 15, device=device).view(1, 15)
    offset = ((7 - k) // 2).view(n, 1)
    px = torch.round(x1.view(n, 1) + t * (x2 - x1).view(n, 1)).long() + offset
    py = torch.round(y1.view(n, 1) + t * (y2 - y1).view(n, 1)).long() + offset
    kernel = torch.zeros(n, 49, device=device).scatter_(1, py * 7 + px, 1.0).view(n, 7, 7)
    return _conv_per_view(x, kernel / kernel.sum((1, 2), keepdim=True)).clamp(0, 1)


def multiplicative_noise(x: Tensor, g: torch.Generator) -> Tensor:
    """MultiplicativeNoise(0.9-1.1, per_channel False, elementwise False): one factor per view (exact
    up to 1.3.1's uint8 truncation)."""
    return (x * _col(_uniform(x.shape[0], 0.9, 1.1, g, x.device))).clamp(0, 1)


def posterize(x: Tensor, g: torch.Generator) -> Tensor:
    """Posterize(num_bits 4): keep the top 4 bits of the uint8 level (exact)."""
    return torch.div(_levels(x), 16, rounding_mode="floor").float().mul(16 / 255).to(x.dtype)


def random_brightness_contrast(x: Tensor, g: torch.Generator) -> Tensor:
    """RandomBrightnessContrast(0.2, 0.2, brightness_by_max): ``x * (1 + c) + b`` with c, b uniform in
    +-0.2 (exact up to uint8 rounding)."""
    n = x.shape[0]
    alpha = 1 + _uniform(n, -0.2, 0.2, g, x.device)
    beta = _uniform(n, -0.2, 0.2, g, x.device)
    return (x * _col(alpha) + _col(beta)).clamp(0, 1)


def rgb_shift(x: Tensor, g: torch.Generator) -> Tensor:
    """RGBShift(20, 20, 20): add a per-channel shift uniform in +-20/255 (exact up to uint8 rounding)."""
    shift = _uniform(x.shape[0] * 3, -20.0, 20.0, g, x.device).view(-1, 3, 1, 1) / 255
    return (x + shift).clamp(0, 1)


def random_gamma(x: Tensor, g: torch.Generator) -> Tensor:
    """RandomGamma(gamma_limit (80, 120)): ``x ** (gamma / 100)`` (exact up to 1.3.1's LUT truncation)."""
    gamma = _uniform(x.shape[0], 80.0, 120.0, g, x.device) / 100
    return x.clamp(0, 1) ** _col(gamma)


def random_rain(x: Tensor, g: torch.Generator) -> Tensor:
    """RandomRain(1.3.1 defaults): ``H * W // 600`` drops, each a 1-px line of colour (200, 200, 200)
    from a random start to ``(x + slant, y + 20)`` with slant ``int(U(-10, 10))`` per view, then a 7x7
    box blur and brightness x0.7 (HSV value x0.7 == RGB x0.7). Drops are rasterised one pixel per row
    (the lines are steep: |slant| < length); the length is capped at ``H - 1`` on tiny crops."""
    n, _, h, w = x.shape
    device = x.device
    length = min(20, h - 1)
    drops = h * w // 600
    slant = torch.trunc(_uniform(n, -10.0, 10.0, g, device)).long().view(n, 1)
    if drops > 0 and length > 0:
        lo = torch.clamp(slant, max=0)  # slant < 0: x in [slant, W]; else x in [0, W - slant]
        hi = torch.where(slant < 0, torch.full_like(slant, w), w - slant)
        x0 = lo + torch.floor(torch.rand(n, drops, generator=g, device=device) * (hi - lo + 1)).long()
        y0 = _randint(0, h - length, (n, drops), g, device)
        j = torch.arange(length + 1, device=device).view(1, 1, -1)
        px = x0.unsqueeze(-1) + torch.round(slant.view(n, 1, 1) * j / length).long()
        py = y0.unsqueeze(-1) + j
        inside = (px >= 0) & (px < w) & (py < h)  # cv2.line clips at the border
        flat = torch.where(inside, py.clamp(max=h - 1) * w + px.clamp(0, w - 1), torch.full_like(px, h * w))
        mask = torch.zeros(n, h * w + 1, device=device).scatter_(1, flat.view(n, -1), 1.0)
        mask = mask[:, : h * w].view(n, 1, h, w)
        x = torch.where(mask > 0, torch.full_like(x, 200 / 255), x)
    box = _box_kernels(torch.full((n,), 7, device=device), 7)
    return (_separable_per_view(x, box) * 0.7).clamp(0, 1)


def _polygon_mask(vx: Tensor, vy: Tensor, h: int, w: int) -> Tensor:
    """Even-odd fill of (n, V) polygons at pixel centres -> (n, H, W) bool."""
    py = torch.arange(h, device=vx.device, dtype=torch.float32).view(1, 1, h, 1)
    px = torch.arange(w, device=vx.device, dtype=torch.float32).view(1, 1, 1, w)
    x0, y0 = vx.unsqueeze(-1).unsqueeze(-1), vy.unsqueeze(-1).unsqueeze(-1)
    x1, y1 = x0.roll(-1, 1), y0.roll(-1, 1)
    straddles = (y0 > py) != (y1 > py)
    safe = torch.where(y1 == y0, torch.ones_like(y1), y1 - y0)
    crossing = straddles & (px < (x1 - x0) * (py - y0) / safe + x0)
    return crossing.sum(1) % 2 == 1


def random_shadow(x: Tensor, g: torch.Generator) -> Tensor:
    """RandomShadow(roi (0, 0.5, 1, 1), 1-2 shadows, 5 vertices): 1.3.1 halves HLS lightness inside
    random 5-gons in the lower half. Polygons are filled with the even-odd rule at pixel centres
    (cv2.fillPoly also paints the boundary pixels)."""
    n, _, h, w = x.shape
    device = x.device
    count = _randint(1, 2, (n,), g, device)
    mask = torch.zeros(n, h, w, dtype=torch.bool, device=device)
    for shadow in range(2):
        vx = _randint(0, w, (n, 5), g, device).float()
        vy = _randint(h // 2, h, (n, 5), g, device).float()
        mask |= _polygon_mask(vx, vy, h, w) & (count > shadow).view(n, 1, 1)
    hue, lightness, s = rgb_to_hls(x)
    lightness = torch.where(mask, lightness * 0.5, lightness)
    return hls_to_rgb(hue, lightness, s).clamp(0, 1)


def random_snow(x: Tensor, g: torch.Generator) -> Tensor:
    """RandomSnow(snow_point (0.1, 0.3), brightness 2.5): 1.3.1's bleach: HLS lightness below
    ``(snow_point * 127.5 + 85) / 255`` is multiplied by 2.5 and clipped."""
    n = x.shape[0]
    threshold = (_uniform(n, 0.1, 0.3, g, x.device) * 127.5 + 85) / 255
    hue, lightness, s = rgb_to_hls(x)
    lightness = torch.where(lightness < threshold.view(n, 1, 1), (lightness * 2.5).clamp(max=1), lightness)
    return hls_to_rgb(hue, lightness, s).clamp(0, 1)


def random_sun_flare(x: Tensor, g: torch.Generator) -> Tensor:
    """RandomSunFlare(roi top half, 6-10 circles, src_radius 400, white): 1.3.1's rendering. The flare
    circles (radius 1 or 8 px at <= 299 px) sit on a random line through the centre and are blended in
    order into a cumulative overlay with alpha 0.05-0.2; the source is 40 concentric white discs up to
    radius 400 blended with alpha ``a^3`` (closed form: a pixel at distance d keeps
    ``prod(1 - alpha_i)`` over the discs reaching it). Discs are rasterised at pixel centres."""
    n, _, h, w = x.shape
    device = x.device
    angle = 2 * math.pi * torch.rand(n, generator=g, device=device)
    cx = torch.floor(w * torch.rand(n, generator=g, device=device))
    cy = torch.floor(h * 0.5 * torch.rand(n, generator=g, device=device))
    count = _randint(6, 10, (n,), g, device)
    n_points = math.ceil(w / 10)
    ys = torch.arange(h, device=device, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, device=device, dtype=torch.float32).view(1, 1, w)
    overlay, output = x.clone(), x.clone()
    max_rad = max(h // 100 - 2, 2)
    for circle in range(10):
        alpha = _uniform(n, 0.05, 0.2, g, device)
        t = -cx + 10 * _randint(0, n_points - 1, (n,), g, device).float()
        px = torch.trunc(cx + t * torch.cos(angle))
        py = torch.trunc(cy + t * torch.sin(angle))
        radius = _randint(1, max_rad, (n,), g, device).float() ** 3
        colour = _randint(205, 255, (n, 3), g, device).float() / 255
        valid = (count > circle).view(n, 1, 1)
        disc = ((xs - px.view(n, 1, 1)) ** 2 + (ys - py.view(n, 1, 1)) ** 2) <= radius.view(n, 1, 1) ** 2
        overlay = torch.where((disc & valid).unsqueeze(1), colour.view(n, 3, 1, 1), overlay)
        a = _col(alpha) * valid.unsqueeze(1)
        output = a * overlay + (1 - a) * output
    steps = 40
    radii = torch.floor(torch.linspace(1, 400, steps, device=device))
    alphas = torch.linspace(0, 1, steps, device=device).flip(0) ** 3
    keep = torch.cumprod((1 - alphas).flip(0), 0).flip(0)  # keep[j] = prod_{i >= j} (1 - alpha_i)
    keep = torch.cat([keep, torch.ones(1, device=device)])
    dist = ((xs - cx.view(n, 1, 1)) ** 2 + (ys - cy.view(n, 1, 1)) ** 2).sqrt()
    factor = keep[torch.searchsorted(radii, dist.contiguous())]
    return (1 - (1 - output) * factor.unsqueeze(1)).clamp(0, 1)


def random_tone_curve(x: Tensor, g: torch.Generator) -> Tensor:
    """RandomToneCurve(scale 0.1): the cubic Bezier through (0, 0), control points at heights
    ``N(0.25, 0.1)`` and ``N(0.75, 0.1)`` (clipped to [0, 1]) and (1, 1), applied to the intensity
    directly instead of through 1.3.1's rounded 256-entry LUT."""
    n = x.shape[0]
    low = (0.25 + 0.1 * torch.randn(n, generator=g, device=x.device)).clamp(0, 1)
    high = (0.75 + 0.1 * torch.randn(n, generator=g, device=x.device)).clamp(0, 1)
    t = x.clamp(0, 1)
    return (3 * (1 - t) ** 2 * t * _col(low) + 3 * (1 - t) * t**2 * _col(high) + t**3).clamp(0, 1)


def _fog_rings(width: int, height: int, coef: float) -> list[tuple[int, int, int, int, int]]:
    """1.3.1's haze layout for one view: (count, x_lo, x_hi, y_lo, y_hi) per ring (as RandomFog131)."""
    hw = max(1, int(width // 3 * coef))
    step_x = max(1, 3 * hw * width // (height + width))
    step_y = max(1, 3 * hw * height // (height + width))
    rings = []
    mid_x, mid_y, ring = width // 2 - 2 * hw, height // 2 - hw, 1
    while mid_x > -hw or mid_y > -hw:
        rings.append((hw // 10 * ring, mid_x, width - mid_x - hw, mid_y, height - mid_y - hw))
        mid_x, mid_y, ring = mid_x - step_x, mid_y - step_y, ring + 1
    return rings


def random_fog(x: Tensor, g: torch.Generator) -> Tensor:
    """RandomFog(fog_coef (0.3, 1), alpha_coef 0.08): 1.3.1's haze, white discs of diameter
    ``hw = max(W // 3 * coef, 10)`` on rings spreading from the centre, each blended with alpha
    ``0.08 * coef``, then a box blur of ``hw // 10``. Sequential blending with white has the closed form
    ``1 - (1 - x) * (1 - alpha) ** (discs covering the pixel)``, so all discs are counted at once. Even
    box widths are centred (cv2 anchors them half a pixel off)."""
    n, _, h, w = x.shape
    device = x.device
    coef = _uniform(n, 0.3, 1.0, g, device)
    layouts = [_fog_rings(w, h, float(k)) for k in coef.cpu().tolist()]
    bounds = [[ring[1:] for ring in rings for _ in range(ring[0])] for rings in layouts]
    most = max(1, max(len(b) for b in bounds))
    table = torch.zeros(n, most, 4, device=device)
    valid = torch.zeros(n, most, dtype=torch.bool, device=device)
    for view, b in enumerate(bounds):
        if b:
            table[view, : len(b)] = torch.tensor(b, device=device, dtype=torch.float32)
            valid[view, : len(b)] = True
    u = torch.rand(n, most, 2, generator=g, device=device)
    hx = torch.floor(table[..., 0] + u[..., 0] * (table[..., 1] - table[..., 0] + 1))
    hy = torch.floor(table[..., 2] + u[..., 1] * (table[..., 3] - table[..., 2] + 1))
    hw = torch.clamp(torch.floor((w // 3) * coef), min=10)
    rad = torch.floor(hw / 2).view(n, 1, 1, 1)
    ys = torch.arange(h, device=device, dtype=torch.float32).view(1, 1, h, 1)
    xs = torch.arange(w, device=device, dtype=torch.float32).view(1, 1, 1, w)
    centre_x = (hx + torch.floor(hw / 2).view(n, 1)).view(n, most, 1, 1)
    centre_y = (hy + torch.floor(hw / 2).view(n, 1)).view(n, most, 1, 1)
    covered = torch.zeros(n, h, w, device=device)
    for chunk in torch.arange(most, device=device).split(16):
        inside = (xs - centre_x[:, chunk]) ** 2 + (ys - centre_y[:, chunk]) ** 2 <= rad**2
        covered += (inside & valid[:, chunk].view(n, -1, 1, 1)).sum(1)
    alpha = (0.08 * coef).view(n, 1, 1)
    x = 1 - (1 - x) * ((1 - alpha) ** covered).unsqueeze(1)
    box = torch.clamp(torch.floor(hw / 10), min=1).long()
    box = box + (box % 2 == 0).long()  # odd, centred
    size = int(box.max().item())
    return _separable_per_view(x, _box_kernels(box, size)).clamp(0, 1)


def ringing_overshoot(x: Tensor, g: torch.Generator) -> Tensor:
    """RingingOvershoot(blur_limit (7, 15), cutoff (pi/4, pi/2)): 1.3.1's 2-D sinc (jinc) low-pass
    ``cutoff * J1(cutoff * r) / (2 pi r)`` on an odd 7-15 grid, normalised, applied with conv2d."""
    n, device = x.shape[0], x.device
    k = _choice((7, 9, 11, 13, 15), n, g, device)
    cutoff = _uniform(n, math.pi / 4, math.pi / 2, g, device).view(n, 1, 1)
    offsets = (torch.arange(15, device=device) - 7).float()
    r = torch.sqrt(offsets.view(1, 15, 1) ** 2 + offsets.view(1, 1, 15) ** 2).expand(n, 15, 15)
    safe = torch.where(r > 0, r, torch.ones_like(r))
    kernel = cutoff * torch.special.bessel_j1(cutoff * safe) / (2 * math.pi * safe)
    kernel = torch.where(r > 0, kernel, cutoff**2 / (4 * math.pi))
    half = (k // 2).view(n, 1, 1)
    inside = (offsets.abs().view(1, 15, 1) <= half) & (offsets.abs().view(1, 1, 15) <= half)
    kernel = kernel * inside
    return _conv_per_view(x, kernel / kernel.sum((1, 2), keepdim=True)).clamp(0, 1)


def sharpen(x: Tensor, g: torch.Generator) -> Tensor:
    """Sharpen(alpha (0.2, 0.5), lightness (0.5, 1)): 1.3.1's 3x3 kernel ``-1`` around ``8 + lightness``
    blended with identity (exact up to uint8 rounding)."""
    n, device = x.shape[0], x.device
    alpha = _uniform(n, 0.2, 0.5, g, device).view(n, 1, 1)
    lightness = _uniform(n, 0.5, 1.0, g, device)
    effect = -torch.ones(n, 3, 3, device=device)
    effect[:, 1, 1] = 8 + lightness
    identity = torch.zeros(1, 3, 3, device=device)
    identity[0, 1, 1] = 1
    return _conv_per_view(x, (1 - alpha) * identity + alpha * effect).clamp(0, 1)


def solarize(x: Tensor, g: torch.Generator) -> Tensor:
    """Solarize(threshold 128): invert the pixels whose uint8 level is >= 128 (exact)."""
    return torch.where(x * 255 >= 127.5, 1 - x, x)


PIXEL_OPS: dict[str, PixelOp] = {
    "Blur": blur,
    "CLAHE": clahe,
    "ChannelShuffle": channel_shuffle,
    "ChannelDropout": channel_dropout,
    "ColorJitter": color_jitter,
    "Defocus": defocus,
    "Downscale": downscale,
    "Emboss": emboss,
    "Equalize": equalize,
    "FancyPCA": fancy_pca,
    "GaussNoise": gauss_noise,
    "GaussianBlur": gaussian_blur,
    "GlassBlur": glass_blur,
    "HueSaturationValue": hue_saturation_value,
    "ISONoise": iso_noise,
    "ImageCompression": image_compression,
    "InvertImg": invert_img,
    "MedianBlur": median_blur,
    "MotionBlur": motion_blur,
    "MultiplicativeNoise": multiplicative_noise,
    "Posterize": posterize,
    "RandomBrightnessContrast": random_brightness_contrast,
    "RGBShift": rgb_shift,
    "RandomGamma": random_gamma,
    "RandomRain": random_rain,
    "RandomShadow": random_shadow,
    "RandomSnow": random_snow,
    "RandomSunFlare": random_sun_flare,
    "RandomToneCurve": random_tone_curve,
    "RandomFog": random_fog,
    "RingingOvershoot": ringing_overshoot,
    "Sharpen": sharpen,
    "Solarize": solarize,
}


def pixel_ops(names: Sequence[str]) -> list[PixelOp]:
    """The torch ops for albumentations class ``names`` (repeats kept: they weigh more in the draw)."""
    unknown = [name for name in names if name not in PIXEL_OPS]
    if unknown:
        raise ValueError(f"Unknown RedDino pixel op(s) {unknown}; known ops: {', '.join(PIXEL_OPS)}")
    return [PIXEL_OPS[name] for name in names]


class RedDinoGpuPixelOps:
    """RedDino's colour/pixel pool + ImageNet normalisation on whole batches of crops, on their device.

    Input: (N, 3, H, W) raw pixel values, uint8 or float holding 0-255 (the SSL collator keeps the
    loader's uint8 crops as uint8). Output: float32, normalised with ``mean``/``std``. Each view
    draws ``n_pixel_ops`` ops uniformly with replacement from ``pixel_transforms``; all ops are applied.

    Randomness comes from one ``torch.Generator`` per device, seeded from ``seed`` (plus the DDP rank,
    so ranks augment differently), created on first use so the object stays picklable.
    """

    def __init__(
        self,
        pixel_transforms: Sequence[str],
        n_pixel_ops: int,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int | None,
    ) -> None:
        if n_pixel_ops < 0:
            raise ValueError(f"n_pixel_ops must be >= 0, got {n_pixel_ops}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
        self.names = tuple(str(name) for name in pixel_transforms)
        self.ops = pixel_ops(self.names)
        self.n_pixel_ops = int(n_pixel_ops)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_generators"] = {}
        return state

    def generator(self, device: torch.device) -> torch.Generator:
        """This device's generator (created and seeded on first use)."""
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            if self.seed is None:
                gen.seed()
            else:
                rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
                gen.manual_seed(int(self.seed) + 1_000_003 * rank)
            self._generators[key] = gen
        return self._generators[key]

    def draw(self, n_views: int, g: torch.Generator, device: torch.device) -> Tensor:
        """(n_views, n_pixel_ops) op indices, uniform with replacement, in application order."""
        return torch.randint(
            0, max(len(self.ops), 1), (n_views, self.n_pixel_ops), generator=g, device=device
        )

    @torch.no_grad()
    def apply_pixel_ops(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Apply the drawn ops slot by slot; each op runs once per slot on all views that drew it."""
        if not self.ops or self.n_pixel_ops == 0 or x.shape[0] == 0:
            return x
        draws = self.draw(x.shape[0], g, x.device).cpu()  # one sync; the grouping is host-side
        x = x.clone()
        for slot in range(self.n_pixel_ops):
            for i, op in enumerate(self.ops):
                idx = (draws[:, slot] == i).nonzero().flatten()
                if idx.numel():
                    idx = idx.to(x.device)
                    x[idx] = op(x[idx], g).clamp(0, 1)
        return x

    @torch.no_grad()
    def __call__(self, crops: Tensor) -> Tensor:
        """Raw 0-255 crops -> augmented, normalised float32 crops on the same device."""
        if crops.dim() != 4 or crops.shape[1] != 3:
            raise ValueError(f"expected (N, 3, H, W) crops, got shape {tuple(crops.shape)}")
        x = crops.float() / 255
        x = self.apply_pixel_ops(x, self.generator(x.device))
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


__all__ = [
    "PIXEL_OPS",
    "RedDinoGpuPixelOps",
    "hls_to_rgb",
    "hsv_to_rgb",
    "pixel_ops",
    "rgb_to_hls",
    "rgb_to_hsv",
]
