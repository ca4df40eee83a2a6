"""Reading weight files without running anything they hold, and naming the file when it is broken."""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file


def load_torch_file(path: Path) -> Any:
    """``torch.load`` that never runs pickled code: a file holding arbitrary objects is refused, and a
    truncated or corrupt file is named."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: refused: it holds pickled objects other than tensors/containers "
            "(read with weights_only=True; convert it to safetensors or a plain state dict)"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a readable torch file ({err}); truncated or corrupt?") from err


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open`` whose failure on a truncated or corrupt file names the file."""
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); truncated or corrupt?") from err
    with handle as f:
        yield f


def safetensors_metadata(path: Path) -> dict[str, str] | None:
    with open_safetensors(path) as f:
        return f.metadata()


def read_state(path: Path) -> Any:
    """Tensors of a safetensors file, or a torch file read with ``weights_only=True``."""
    if path.suffix != ".safetensors":
        return load_torch_file(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); truncated or corrupt?") from err
