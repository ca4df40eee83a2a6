"""The k-NN probe callback scores what the end-of-run evaluation would score on the same units."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from reddino.callbacks import KnnProbe, knn_curve
from reddino.data.datasets import LabelledUnitDataset, eval_transform
from reddino.eval.features import labelled_features
from reddino.eval.protocols import make_splits
from reddino.eval.session import score_feature_set
from reddino.eval.whitening import fit_whitening
from reddino.ssl.backbone import build_backbone

KNN = {"ks": [1, 3], "metric": "euclidean", "temperature": 0.07, "chunk_size": 7, "device": "cpu"}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def labelled_units(tmp_path, n_images: int = 6, per_image: int = 8) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_images):
        path = tmp_path / f"smear{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        for j in range(per_image):
            x, y = int(rng.integers(-4, 50)), int(rng.integers(-4, 34))  # some windows leave the image
            rows.append((str(path), x, y, x + 18, y + 18, "cell", "s", f"s/{i}", "ab"[j % 2]))
    columns = ["file", "x0", "y0", "x1", "y1", "unit", "source", "subject", "label"]
    return pd.DataFrame(rows, columns=columns)


def probe(units_node, **changes) -> KnnProbe:
    settings = dict(
        enabled=True,
        units=units_node,
        classes=["a", "b"],
        every_n_steps=2,
        max_units=1000,
        knn=KNN,
        n_splits=3,
        group_by="file",
        input_size=16,
        mean=MEAN,
        std=STD,
        batch_size=5,
        seed=0,
        whitening_shrinkage=None,
    )
    return KnnProbe(**{**settings, **changes})


def units_node(path) -> object:
    return OmegaConf.create({"_target_": "pandas.read_parquet", "path": str(path)})


class FakeTrainer:
    def __init__(self) -> None:
        self.is_global_zero = True
        self.loggers: list = []
        self.global_step = 0
        self.strategy = object()


def tiny_vit() -> torch.nn.Module:
    return build_backbone(
        "vit_small_patch14_dinov2", 16, 8, 0.0, 1.0, True, {"embed_dim": 24, "depth": 1, "num_heads": 2}
    )


class Module:
    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.teacher = {"backbone": tiny_vit()}


def test_probe_scores_equal_the_evaluation_path(tmp_path):
    units = labelled_units(tmp_path)
    units.to_parquet(tmp_path / "units.parquet")
    p = probe(units_node(tmp_path / "units.parquet"), whitening_shrinkage=0.01, max_units=None)
    p.setup(FakeTrainer(), None, "fit")
    assert len(p._labels) == len(units)  # max_units None: every unit
    torch.manual_seed(0)
    net = tiny_vit()
    scores = p.score(net, torch.device("cpu"))
    assert set(scores) == {f"knn{k}_weighted_f1{s}" for k in (1, 3) for s in ("", "_whitened")}

    ordered = units.sort_values("file", kind="stable").reset_index(drop=True)
    dataset = LabelledUnitDataset(ordered, eval_transform(16, MEAN, STD), ["a", "b"], 4)
    feats, labels = labelled_features(net, dataset, "cls", 5, 0, None)
    splits = make_splits("grouped_kfold", labels.numpy(), ordered["file"].to_numpy(), None, None, 3, 0)
    expected = score_feature_set(
        feats,
        labels,
        splits,
        ["a", "b"],
        {"linear": {"enabled": False}, "knn": {**KNN, "enabled": True}},
        False,
    )
    whitened = score_feature_set(
        fit_whitening(feats, 0.01)(feats),
        labels,
        splits,
        ["a", "b"],
        {"linear": {"enabled": False}, "knn": {**KNN, "enabled": True}},
        False,
    )
    for k in (1, 3):
        assert scores[f"knn{k}_weighted_f1"] == pytest.approx(
            100 * expected[f"knn{k}"]["weighted_f1"]["mean"]
        )
        assert scores[f"knn{k}_weighted_f1_whitened"] == pytest.approx(
            100 * whitened[f"knn{k}"]["weighted_f1"]["mean"]
        )


def test_probe_records_a_curve_once_per_step_and_a_disabled_one_reads_nothing(tmp_path):
    units = labelled_units(tmp_path)
    units.to_parquet(tmp_path / "units.parquet")
    p = probe(units_node(tmp_path / "units.parquet"), max_units=20)
    trainer = FakeTrainer()
    p.setup(trainer, None, "fit")
    assert len(p._labels) == 20  # a seeded subset of max_units

    module = Module()
    for step in (0, 1, 2, 2, 3, 4):
        trainer.global_step = step
        p.on_train_batch_end(trainer, module, None, None, step)
    p.on_train_end(trainer, module)
    assert [c["step"] for c in knn_curve([p])] == [0, 2, 4]

    off = probe(units_node(tmp_path / "missing.parquet"), enabled=False)
    off.setup(trainer, None, "fit")  # would raise reading the missing file if it loaded anything
    off.on_train_end(trainer, module)
    assert knn_curve([off]) == []


def test_probe_settings_are_checked():
    with pytest.raises(ValueError, match="every_n_steps >= 1"):
        probe(None, every_n_steps=0)


@pytest.mark.parametrize("max_units", [0, 1])
def test_probe_refuses_fewer_than_two_units(max_units):
    with pytest.raises(ValueError, match=r"max_units >= 2 \(or null: all\)"):
        probe(units_node("unused.parquet"), max_units=max_units)
