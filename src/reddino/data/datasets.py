"""Torch datasets over a units table: crops are cut on the fly from the (cached) source images."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from reddino.data.io import BadImageError, read_rgb
from reddino.data.manifest import validate_units
from reddino.data.patches import crop_padded


class ImageCache:
    """Small per-process LRU of decoded images: many units share one smear."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, path: str) -> np.ndarray:
        if path in self._items:
            self._items.move_to_end(path)
            return self._items[path]
        image = read_rgb(path)
        if self.capacity > 0:
            self._items[path] = image
            if len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return image


class UnitDataset(Dataset):
    """Unlabelled units for pretraining: returns ``transform(crop)`` (the multi-crop dict).

    A dict sample also carries ``unit_index`` (its row in ``units``), so a batch says which units it
    holds: the resume test checks the data order with it, and a diverging step can be traced to inputs.
    """

    def __init__(self, units: pd.DataFrame, transform: Callable[[np.ndarray], Any], cache_size: int) -> None:
        self.units = validate_units(units).reset_index(drop=True)
        self.files = self.units["file"].to_numpy()
        self.boxes = self.units[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.int64)
        self.transform = transform
        self.cache = ImageCache(cache_size)

    def __len__(self) -> int:
        return len(self.units)

    def crop(self, index: int) -> np.ndarray:
        return crop_padded(self.cache.get(self.files[index]), self.boxes[index])

    def __getitem__(self, index: int) -> Any:
        sample = self.transform(self.crop(index))
        if isinstance(sample, dict):
            sample["unit_index"] = index
        return sample


class DecodedUnitDataset(UnitDataset):
    """Unit crops -> ``(index, transformed crop)``; a unit whose image fails to decode gives
    ``(index, None)``, so one bad file is skipped and reported instead of ending a long pass."""

    def __getitem__(self, index: int) -> Any:
        try:
            return index, self.transform(self.crop(index))
        except BadImageError:
            return index, None


def collate_decoded(
    batch: list[tuple[int, Any]],
) -> tuple[torch.Tensor | None, tuple[torch.Tensor, list[int]]]:
    """(images of the decoded units or None, (their indices, indices of units whose image failed))."""
    kept = [(i, x) for i, x in batch if x is not None]
    index = torch.tensor([i for i, _ in kept], dtype=torch.long)
    images = torch.stack([x for _, x in kept]) if kept else None
    return images, (index, [i for i, x in batch if x is None])


def eval_transform(
    size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[np.ndarray], torch.Tensor]:
    """Resize to ``size`` x ``size`` (bilinear, as the reference eval) and normalise; no augmentation."""
    mean_a = np.asarray(mean, dtype=np.float32) * 255.0
    std_a = np.asarray(std, dtype=np.float32) * 255.0

    def apply(crop: np.ndarray) -> torch.Tensor:
        resized = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
        return torch.from_numpy(((resized.astype(np.float32) - mean_a) / std_a).transpose(2, 0, 1).copy())

    return apply


class LabelledUnitDataset(UnitDataset):
    """Labelled units for evaluation: returns (image tensor, class index) through one global label map."""

    def __init__(
        self,
        units: pd.DataFrame,
        transform: Callable[[np.ndarray], torch.Tensor],
        classes: Sequence[str],
        cache_size: int,
    ) -> None:
        super().__init__(units, transform, cache_size)
        self.classes = list(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        labels = self.units["label"]
        unknown = sorted(set(labels.dropna()) - set(index))
        if labels.isna().any() or unknown:
            raise ValueError(f"labels outside the label map {self.classes}: {unknown or 'missing labels'}")
        self.targets = labels.map(index).to_numpy(dtype=np.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.crop(index)), int(self.targets[index])
