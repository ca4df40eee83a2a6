"""Every path the package works out for itself, in one place.

The configs ship inside the package as ``reddino.conf`` (``src/reddino/conf`` links to the checkout's
top-level ``conf/``; a wheel carries the files), so entry points find them through Hydra's
``pkg://`` search path whether they run from a checkout or from an installed wheel.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

CONFIG_MODULE = "reddino.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"  # for ``@hydra.main(config_path=...)``


def config_dir() -> Path:
    """The config folder on disk, for code that reads one YAML directly (``reddino-embed``, tests)."""
    folder = Path(str(importlib.resources.files(CONFIG_MODULE)))
    if not (folder / "pretrain.yaml").is_file():
        raise FileNotFoundError(f"{folder}: the reddino configs are missing from this installation")
    return folder


def project_root() -> Path:
    """Where relative run paths (``outputs/...``) start: the checkout when running from one (the folder
    with ``pyproject.toml`` and ``conf/``), else the current directory (an installed package)."""
    checkout = Path(__file__).resolve().parents[3]
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf").is_dir():
        return checkout
    return Path.cwd()
