"""The package finds its configs without the checkout: they ship as ``reddino.conf`` (pkg:// search path)."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import tomllib
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from reddino.runtime.paths import CONFIG_MODULE, CONFIG_PATH, config_dir

REPO = Path(__file__).resolve().parents[2]


def test_the_packaged_configs_are_the_checkout_configs():
    assert config_dir().resolve() == (REPO / "conf").resolve()
    assert f"pkg://{CONFIG_MODULE}" == CONFIG_PATH


def test_every_config_file_is_package_data_of_the_wheel():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = data[CONFIG_MODULE]
    files = [p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*") if p.is_file()]
    files = [f for f in files if "__pycache__" not in f and f != "__init__.py"]  # __init__: a module
    missing = [
        f
        for f in files
        if not any(fnmatch(f, pat) or fnmatch(f, pat.removeprefix("**/")) for pat in patterns)
    ]
    assert files and missing == []


def test_hydra_composes_from_the_package_module():
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            for name in ("pretrain", "eval", "prepare", "pack"):
                assert compose(name).task_name == name
    finally:
        GlobalHydra.instance().clear()
