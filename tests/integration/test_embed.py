"""``reddino-embed`` and the ``reddino.embed`` / ``reddino.load_backbone`` API."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import reddino
from conftest import data_root
from reddino.eval.whitening import fit_whitening
from reddino.runtime.config_checks import ConfigError
from reddino.ssl.backbone import build_backbone, forward_tokens
from reddino.weights.export import export_timm
from reddino.workflows.embedding import run

TINY = {"embed_dim": 48, "depth": 2, "num_heads": 2}


@pytest.fixture
def export(tmp_path):
    torch.manual_seed(0)
    net = build_backbone("vit_small_patch14_dinov2", 32, 8, 0.0, 1.0, True, TINY).eval()
    args = {"img_size": 32, "patch_size": 8, "init_values": 1.0, "dynamic_img_size": True, **TINY}
    export_timm(net, tmp_path / "export", "vit_small_patch14_dinov2", args, [0.5] * 3, [0.25] * 3)
    return tmp_path / "export", net


def test_embed_cell_images_matches_the_network_and_reports_bad_files(export, tmp_path, make_cfg):
    folder, net = export
    cells = tmp_path / "cells"
    (cells / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for name in ("a.png", "b.png", "sub/c.png"):
        arrays[name] = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(arrays[name]).save(cells / name)
    (cells / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    (cells / "notes.txt").write_text("not an image")

    cfg = make_cfg(
        f"weights={folder}", f"folder={cells}", f"out={tmp_path / 'out'}", "batch_size=2", config_name="embed"
    )
    assert cfg.mode == "image" and cfg.pooling == "cls"  # the defaults come from conf/embed.yaml
    run(cfg)

    emb = np.load(tmp_path / "out" / "embeddings.npy")
    units = pd.read_parquet(tmp_path / "out" / "units.parquet")
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert emb.shape == (3, 48) and len(units) == 3
    assert [f.split("cells/")[1] for f in units["file"]] == ["a.png", "b.png", "sub/c.png"]
    assert len(skipped) == 1 and skipped["file"].iloc[0].endswith("broken.png")
    x = torch.stack(
        [torch.from_numpy((arrays[n].astype(np.float32) / 255 - 0.5) / 0.25).permute(2, 0, 1) for n in arrays]
    )
    with torch.no_grad():
        expected = forward_tokens(net, x).cls.numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-4)

    # an export that ships a CLS whitening is embedded whitened; whitening=false gives the raw CLS
    whitening = fit_whitening(torch.from_numpy(rng.normal(size=(50, 48)).astype(np.float32)), 0.01)
    args = {"img_size": 32, "patch_size": 8, "init_values": 1.0, "dynamic_img_size": True, **TINY}
    export_timm(net, folder, "vit_small_patch14_dinov2", args, [0.5] * 3, [0.25] * 3, whitening)
    whitened, _, _ = reddino.embed(folder, cells, batch_size=2)
    raw, _, _ = reddino.embed(folder, cells, batch_size=2, whitening=False)
    np.testing.assert_allclose(raw, expected, atol=1e-4)
    np.testing.assert_allclose(whitened, whitening(torch.from_numpy(expected)).numpy(), atol=1e-3)


def test_export_reloads_in_plain_timm_with_identical_features(export):
    import timm
    from safetensors.torch import load_file

    folder, net = export
    config = __import__("json").loads((folder / "config.json").read_text())
    plain = timm.create_model(config["architecture"], num_classes=0, **config["model_args"]).eval()
    plain.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), forward_tokens(net, x).cls, atol=1e-4, rtol=1e-4)
    assert reddino.load_backbone(folder).input_size == 32


@pytest.mark.real_data
def test_embed_chula_smears_as_patches_and_cells(export, tmp_path):
    root = data_root()
    if root is None or not (root / "chula-rbc-12").is_dir():
        pytest.skip("REDDINO_DATA_ROOT does not hold the shared datasets")
    folder, _ = export
    smears = tmp_path / "smears"
    smears.mkdir()
    for n in (1, 2, 101):
        shutil.copy(root / "chula-rbc-12" / "Dataset" / f"{n}.jpg", smears / f"{n}.jpg")
    emb, units, skipped = reddino.embed(folder, smears, mode="patch", batch_size=16)
    assert len(units) == len(emb) > 0 and units["unit"].eq("patch").all() and skipped.empty
    assert ((units["x1"] - units["x0"]) == 224).all()
    emb, units, skipped = reddino.embed(folder, smears, mode="cell", batch_size=64)
    assert len(units) == len(emb) > 3 * 30  # dozens of cells per 640x480 smear
    assert np.isfinite(emb).all()


def test_embed_options_are_checked_before_anything_loads(make_cfg, tmp_path):
    """A typo in an enumerated option names the option and what is allowed; the weights are never read."""
    base = [f"weights={tmp_path / 'absent'}", f"folder={tmp_path}", f"out={tmp_path / 'out'}"]
    for bad, named in (
        ("mode=cels", "mode='cels'"),
        ("batch_size=0", "batch_size=0"),
        ("precision=16", "precision=16"),
        ("accelerator=tpu", "accelerator='tpu'"),
    ):
        with pytest.raises(ConfigError, match=named.replace("'", ".")):
            run(make_cfg(*base, bad, config_name="embed"))
    assert not (tmp_path / "out").exists()


def test_embed_and_prepare_cut_smears_with_one_config(make_cfg):
    """reddino-embed's patches / cells / segmentation are make prepare's (conf/unit_cutting/)."""
    embed_cfg, prepare_cfg = make_cfg(config_name="embed"), make_cfg(config_name="prepare")
    for section in ("patches", "cells", "segmentation"):
        assert embed_cfg[section] == prepare_cfg[section]
