"""The CLS whitening an export ships: its math, its file, and that every feature path applies it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from reddino.eval.features import FeatureExtractor, pool_tokens
from reddino.eval.whitening import FeatureWhitening, fit_whitening
from reddino.ssl.backbone import build_backbone
from reddino.weights import load_backbone
from reddino.weights.export import WHITENING_FILE, WHITENING_KEY, export_timm

TINY = dict(embed_dim=32, depth=1, num_heads=2)


def correlated(n: int = 4000, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    mixing = torch.logspace(-1, 1, d)[:, None] * rotation  # correlated, scales over 2 decades
    return torch.randn(n, d, generator=g) @ mixing + 5.0


def test_fit_whitening_makes_the_fitted_features_white():
    x = correlated()
    w = fit_whitening(x, shrinkage=1e-6)
    z = w(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(16), atol=1e-3, rtol=0)
    torch.testing.assert_close(z.T @ z / len(z), torch.eye(16), atol=2e-3, rtol=0)
    assert w.fitted_on == 4000 and w.shrinkage == 1e-6


def test_shrinkage_keeps_small_directions_from_being_blown_up():
    """Variance v is scaled to v / (v + s * mean(v)): a flat direction stays flat, a large one goes to 1."""
    x = torch.randn(5000, 3, generator=torch.Generator().manual_seed(1)) * torch.tensor([10.0, 1.0, 0.0])
    z = fit_whitening(x, shrinkage=0.1)(x)
    var = z.var(0, correction=0)
    mean_var = (100.0 + 1.0) / 3
    expected = torch.tensor([100.0 / (100.0 + 0.1 * mean_var), 1.0 / (1.0 + 0.1 * mean_var), 0.0])
    torch.testing.assert_close(var.sort().values, expected.sort().values, atol=0.03, rtol=0.03)
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_shrinkage_must_be_positive(bad):
    with pytest.raises(ValueError, match="shrinkage"):
        fit_whitening(correlated(10), bad)


def test_whitening_checks_shapes_values_and_input_width():
    with pytest.raises(ValueError, match=r"\[D\] and \[D, D\]"):
        FeatureWhitening(torch.zeros(4), torch.eye(3), 0.01, 10)
    with pytest.raises(ValueError, match="NaN or inf"):
        FeatureWhitening(torch.zeros(2), torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 0.01, 10)
    w = fit_whitening(correlated(100, 4), 0.01)
    with pytest.raises(ValueError, match="fitted on 4-d features, got 5-d"):
        w(torch.zeros(3, 5))
    assert w.digest() != fit_whitening(correlated(100, 4, seed=1), 0.01).digest()


@pytest.fixture
def tiny_export(tmp_path):
    torch.manual_seed(0)
    net = build_backbone("vit_small_patch14_dinov2", 28, 14, 0.0, 1.0, False, TINY).eval()
    images = torch.randn(64, 3, 28, 28)
    with torch.no_grad():
        whitening = fit_whitening(pool_tokens(net, images, "cls"), 0.01)
    args = {"img_size": 28, **TINY}
    export_timm(net, tmp_path / "export", "vit_small_patch14_dinov2", args, [0.5] * 3, [0.5] * 3, whitening)
    return tmp_path / "export", net, whitening, images


def test_export_ships_the_whitening_and_every_loader_path_applies_it(tiny_export):
    folder, net, whitening, images = tiny_export
    config = json.loads((folder / "config.json").read_text())
    assert config[WHITENING_KEY]["file"] == WHITENING_FILE and config[WHITENING_KEY]["applies_to"] == "cls"
    loaded = load_backbone(folder)
    assert loaded.whitening is not None and loaded.whitening.digest() == whitening.digest()
    with torch.no_grad():
        raw = pool_tokens(net, images, "cls")
        expected = whitening(raw)
        extracted, _ = FeatureExtractor(loaded.model, "cls", loaded.whitening).extract([(images, None)])
        both = pool_tokens(loaded.model, images, "cls+mean", loaded.whitening)
    torch.testing.assert_close(extracted, expected)
    torch.testing.assert_close(both[:, :32], expected)  # whitening applies to the CLS part only
    torch.testing.assert_close(both[:, 32:], net.forward_features(images)[:, 1:].mean(1))
    assert not torch.allclose(raw, extracted)


def test_export_without_whitening_removes_a_stale_file(tiny_export):
    folder, net, _, _ = tiny_export
    export_timm(net, folder, "vit_small_patch14_dinov2", {"img_size": 28, **TINY}, [0.5] * 3, [0.5] * 3)
    assert not (folder / WHITENING_FILE).exists()
    assert WHITENING_KEY not in json.loads((folder / "config.json").read_text())
    assert load_backbone(folder).whitening is None


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"file": "../outside.safetensors"}, "file name inside the export folder"),
        ({"file": "whitening.pth"}, "file name inside the export folder"),
        ("whitening.safetensors", "expected"),
        ({"file": "absent.safetensors"}, "missing"),
    ],
)
def test_a_shared_export_cannot_point_the_whitening_elsewhere(tiny_export, entry, message):
    folder = tiny_export[0]
    config = json.loads((folder / "config.json").read_text())
    config[WHITENING_KEY] = entry
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_backbone(folder)


def test_a_whitening_file_of_the_wrong_width_or_content_is_named(tiny_export):
    folder = tiny_export[0]
    save_file({"mean": torch.zeros(8), "transform": torch.eye(8)}, str(folder / WHITENING_FILE))
    with pytest.raises(ValueError, match=r"whitening is 8-d, the backbone's CLS is 32-d"):
        load_backbone(folder)
    save_file({"mean": torch.zeros(32)}, str(folder / WHITENING_FILE))
    with pytest.raises(ValueError, match="expected tensors 'mean' and 'transform'"):
        load_backbone(folder)
    (folder / WHITENING_FILE).write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_backbone(folder)


def test_the_fit_after_pretraining_skips_units_whose_image_no_longer_decodes(tmp_path, caplog):
    """One bad file at the end of a long run is skipped and counted, not fatal."""
    from omegaconf import OmegaConf
    from PIL import Image

    from reddino.eval.pretrain_report import fit_export_whitening

    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        path = tmp_path / f"smear{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        rows += [(str(path), x, x, x + 14, x + 14, "cell", "s", f"s/{i}", None) for x in range(0, 24, 2)]
    (tmp_path / "smear1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # broken after preparation
    columns = ["file", "x0", "y0", "x1", "y1", "unit", "source", "subject", "label"]
    units = pd.DataFrame(rows, columns=columns)
    cfg = OmegaConf.create(
        {
            "seed": 0,
            "whitening": {"shrinkage": 0.01, "max_units": 1000, "batch_size": 5},
            "crops": {"global_size": 28},
            "augment": {"mean": [0.5] * 3, "std": [0.25] * 3},
        }
    )
    torch.manual_seed(0)
    net = build_backbone("vit_small_patch14_dinov2", 28, 14, 0.0, 1.0, False, TINY).eval()
    with caplog.at_level("WARNING", logger="reddino.pretrain"):
        whitening = fit_export_whitening(cfg, net, units)
    assert whitening.fitted_on == 24 and whitening.dim == 32
    assert "12 units skipped" in caplog.text and "smear1.png" in caplog.text
