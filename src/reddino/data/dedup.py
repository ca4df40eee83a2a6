"""Cross-source near-duplicate detection by perceptual hash.

Public blood-smear datasets re-publish each other's images (about a third of TXL-PBC's 416x416 BCD
images are BCCD images, resized and re-encoded), so byte hashes miss them; a DCT perceptual hash
(imagehash.phash) survives resizing and JPEG. Duplicates would leak a test image into pretraining
and inflate "cross-source" results, so unions drop them and the report lists them.
"""

from __future__ import annotations

from collections.abc import Sequence

import imagehash
import numpy as np
import pandas as pd
from PIL import Image


def perceptual_hash(image: np.ndarray, hash_size: int) -> str:
    """phash of an (H, W, 3) uint8 image as a hex string of ``hash_size**2`` bits."""
    return str(imagehash.phash(Image.fromarray(image), hash_size=hash_size))


def _hash_bits(hashes: Sequence[str]) -> np.ndarray:
    """(n, n_bits) bool matrix of hex hashes (all of one length)."""
    lengths = {len(h) for h in hashes}
    if len(lengths) > 1:
        raise ValueError(f"image hashes of different lengths {sorted(lengths)}: mixed hash_size settings")
    as_bytes = np.array([bytes.fromhex(h) for h in hashes], dtype=object)
    packed = np.frombuffer(b"".join(as_bytes), dtype=np.uint8).reshape(len(hashes), -1)
    return np.unpackbits(packed, axis=1).astype(bool)


def find_duplicates(
    images: pd.DataFrame, max_distance: int, priority: Sequence[str], block: int = 2048
) -> pd.DataFrame:
    """Images whose hash lies within ``max_distance`` bits of an image from an EARLIER dataset.

    ``images`` needs columns ``file``, ``dataset`` and ``image_hash``. Datasets are ranked by
    ``priority`` (the order sources are listed in the configuration): of a duplicate pair across two
    datasets, the one from the later dataset is reported with the file it duplicates, and only that one
    is dropped. Pairs inside one dataset are left alone (repeated fields of view of one slide are data,
    not leakage). Returns columns ``file, dataset, duplicate_of, duplicate_dataset, distance``.
    Exact pairwise comparison, blocked to bound memory: fine for the ~10^5 smears of the catalog.
    """
    missing = sorted(set(images["dataset"]) - set(priority))
    if missing:
        raise ValueError(f"datasets {missing} missing from the dedup priority list {list(priority)}")
    rank = {name: i for i, name in enumerate(priority)}
    table = images.assign(_rank=images["dataset"].map(rank)).sort_values(["_rank", "file"], kind="stable")
    table = table.reset_index(drop=True)
    if table.empty:
        return pd.DataFrame(columns=["file", "dataset", "duplicate_of", "duplicate_dataset", "distance"])
    bits = _hash_bits(table["image_hash"].tolist()).astype(np.int32)
    ranks = table["_rank"].to_numpy()
    rows = []
    for start in range(0, len(table), block):
        stop = min(start + block, len(table))
        # Hamming distance = bits differing = n_bits - agreeing ones - agreeing zeros
        ones = bits[start:stop] @ bits.T
        zeros = (1 - bits[start:stop]) @ (1 - bits.T)
        dist = bits.shape[1] - ones - zeros
        for local, i in enumerate(range(start, stop)):
            earlier = np.flatnonzero((dist[local] <= max_distance) & (ranks < ranks[i]))
            if earlier.size:
                j = int(earlier[np.argmin(dist[local, earlier])])
                rows.append(
                    {
                        "file": table.at[i, "file"],
                        "dataset": table.at[i, "dataset"],
                        "duplicate_of": table.at[j, "file"],
                        "duplicate_dataset": table.at[j, "dataset"],
                        "distance": int(dist[local, j]),
                    }
                )
    return pd.DataFrame(rows, columns=["file", "dataset", "duplicate_of", "duplicate_dataset", "distance"])
