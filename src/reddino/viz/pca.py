"""Figure 3: PCA of patch tokens, three components over the foreground shown as RGB next to the input.

DINOv2's recipe: a first PCA over all patch tokens separates foreground from background (threshold on
the first component); a second PCA on the foreground tokens only maps its first three components to
RGB, so the colours spend their range on the structure inside the cells (cell bodies, membranes,
inclusions, abnormal shapes) instead of on the cell/background contrast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from matplotlib.figure import Figure
from timm.models.vision_transformer import VisionTransformer

from reddino.ssl.backbone import forward_tokens


@dataclass
class PatchTokens:
    """Final-norm patch tokens of one image on its patch grid, with each patch's mean input brightness."""

    tokens: np.ndarray  # (rows * cols, D)
    grid: tuple[int, int]
    brightness: np.ndarray  # (rows, cols), 0-255


@dataclass
class PatchPCA:
    """The first component over all tokens, the foreground it implies (or was given), and the RGB map."""

    first: np.ndarray  # (rows, cols)
    foreground: np.ndarray  # (rows, cols) bool
    rgb: np.ndarray  # (rows, cols, 3) in [0, 1]; background black


def patch_tokens(
    model: VisionTransformer, image: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]
) -> PatchTokens:
    """Resize an RGB uint8 image to ``size`` x ``size``, normalise and run the backbone (no grad)."""
    patch = int(model.patch_embed.patch_size[0])
    if size % patch:
        raise ValueError(f"input size {size} is not a multiple of the patch size {patch}")
    resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    x = (resized.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    with torch.no_grad():
        out = forward_tokens(model.eval(), torch.from_numpy(x.transpose(2, 0, 1).copy())[None])
    grid = (size // patch, size // patch)
    gray = resized.astype(np.float32).mean(axis=2)
    brightness = gray.reshape(grid[0], patch, grid[1], patch).mean(axis=(1, 3))
    return PatchTokens(out.patches[0].float().numpy(), grid, brightness)


def patch_foreground(instances: np.ndarray, grid: tuple[int, int], min_cover: float) -> np.ndarray:
    """Patches whose area is at least ``min_cover`` covered by objects of an instance map (0 = background)."""
    covered = (instances > 0).astype(np.float32)
    small = cv2.resize(covered, (grid[1], grid[0]), interpolation=cv2.INTER_AREA)
    return small >= min_cover


def principal_components(x: np.ndarray, n: int) -> np.ndarray:
    """Projections of the centred rows of ``x`` on its first ``n`` principal axes (N, n)."""
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:n].T


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's split of 1-D values, exact (no histogram bins): the midpoint between the two sorted values
    where the between-class variance peaks. Binned Otsu can land inside a tight cluster."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if len(v) < 2:
        raise ValueError("Otsu's threshold needs at least two values")
    total, cum = v.sum(), np.cumsum(v)[:-1]
    low = np.arange(1, len(v))
    between = low * (len(v) - low) * (cum / low - (total - cum) / (len(v) - low)) ** 2
    i = int(np.argmax(between))
    return float((v[i] + v[i + 1]) / 2)


def unit_range(values: np.ndarray, clip_percent: float) -> np.ndarray:
    """Each column mapped to [0, 1] between its ``clip_percent`` and ``100 - clip_percent`` percentiles
    (clipped), so a few extreme border tokens do not squeeze every cell into one grey."""
    lo = np.percentile(values, clip_percent, axis=0, keepdims=True)
    hi = np.percentile(values, 100 - clip_percent, axis=0, keepdims=True)
    return np.clip((values - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)


def patch_pca(patches: PatchTokens, foreground: np.ndarray | None, clip_percent: float) -> PatchPCA:
    """Foreground from the first component (or ``foreground`` as given), RGB from 3 components on it.

    Without a mask, the first component is thresholded with Otsu; its sign is arbitrary, so the side
    whose patches are darker in the input is called foreground (cells absorb light in brightfield).
    Each RGB channel spans its component's ``clip_percent``..``100 - clip_percent`` percentiles.
    """
    rows, cols = patches.grid
    first = principal_components(patches.tokens, 1)[:, 0].reshape(rows, cols)
    if foreground is None:
        side = first > otsu_threshold(first)
        darker = patches.brightness[side].mean() < patches.brightness[~side].mean() if (~side).any() else True
        foreground = side if darker else ~side
    foreground = np.asarray(foreground, dtype=bool)
    if foreground.shape != (rows, cols):
        raise ValueError(
            f"foreground of shape {foreground.shape} does not match the patch grid {(rows, cols)}"
        )
    rgb = np.zeros((rows, cols, 3), dtype=np.float64)
    fg_tokens = patches.tokens[foreground.ravel()]
    if len(fg_tokens) >= 3:
        rgb[foreground] = unit_range(principal_components(fg_tokens, 3), clip_percent)
    return PatchPCA(first=first, foreground=foreground, rgb=rgb)


def pca_figure(image: np.ndarray, pca: PatchPCA, title: str) -> Figure:
    """Input | first component | foreground tokens' 3 components as RGB (patch grid upsampled)."""
    fig = Figure(figsize=(10.5, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(image)
    axes[0].set_title("input")
    axes[1].imshow(pca.first, cmap="viridis", interpolation="nearest")
    axes[1].contour(pca.foreground, levels=[0.5], colors="white", linewidths=0.8)
    axes[1].set_title("1st component, foreground outlined")
    axes[2].imshow(pca.rgb, interpolation="nearest")
    axes[2].set_title("3 components on the foreground (RGB)")
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title)
    return fig
