"""``reddino-eval`` end to end on synthetic cells: an exported backbone vs random init and morphometrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from wandb_offline import read_offline_run

from reddino.eval.features import load_features, pool_tokens
from reddino.eval.whitening import fit_whitening
from reddino.ssl.backbone import build_backbone
from reddino.weights import load_export
from reddino.weights.export import export_timm
from reddino.workflows.evaluation import run

# the tiny synthetic data of debug=fast (shared cache with the pretraining tests)
SMALL_DATA = (
    "data.generator.subjects_per_source=5",
    "data.generator.smears_per_subject=1",
    "data.generator.smear_size=[192,192]",
    "data.generator.cells_per_smear=[25,40]",
)


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    net = build_backbone(
        "vit_small_patch14_dinov2", 32, 8, 0.0, 1.0, True, {"embed_dim": 48, "depth": 2, "num_heads": 2}
    )
    args = {
        "img_size": 32,
        "patch_size": 8,
        "init_values": 1.0,
        "dynamic_img_size": True,
        "embed_dim": 48,
        "depth": 2,
        "num_heads": 2,
    }
    export_timm(net, tmp_path / "export", "vit_small_patch14_dinov2", args, [0.5] * 3, [0.25] * 3)
    return tmp_path / "export", net


def test_export_loads_back_with_identical_features(exported):
    folder, net = exported
    loaded = load_export(folder)
    assert loaded.input_size == 32 and loaded.mean == [0.5] * 3
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.model.forward_features(x), net.eval().forward_features(x))


def test_eval_kfold_with_baselines_batch_effects_and_wandb(make_cfg, exported, tmp_path):
    folder, _ = exported
    cfg = make_cfg(
        f"weights={folder}",
        *SMALL_DATA,
        "max_units=240",
        "data.eval_sources=[src3,src4]",
        "probes.knn.ks=[1,5]",
        "probes.linear.max_iter=50",
        "umap.max_points=200",
        "progress=false",
        config_name="eval",
    )
    summary = run(cfg)
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(summary))
    assert set(results["results"]) == {"pretrained", "random_init", "morphometrics"}
    for by_probe in results["results"].values():
        assert set(by_probe) == {"linear", "knn1", "knn5"}
        for scores in by_probe.values():
            assert len(scores["weighted_f1"]["folds"]) == 5 and scores["n_test"] == 240
            assert sum(map(sum, scores["confusion"])) == 240
    assert results["protocol"]["sources"] == ["src3", "src4"]
    effects = results["batch_effects"]["random_init"]
    assert effects["source_predictability"]["chance"] == 0.5
    assert 0.0 <= effects["neighbour_mixing"]["ratio"] <= 2.0
    assert len(list(out.glob("umap_*_by_*.png"))) == 6
    metrics = pd.read_csv(out / "csv" / "metrics.csv")
    assert "pretrained/linear/weighted_f1" in metrics.columns
    # W&B review, read back from the offline run: config, summary, tables and images, all also on disk
    wb = read_offline_run(sorted((out / "wandb").glob("offline-run-*"))[0])
    assert wb.group == "eval" and wb.config["eval"]["protocol"] == cfg.eval.protocol == "grouped_kfold"
    assert wb.summary["pretrained/linear/weighted_f1"] == pytest.approx(
        results["results"]["pretrained"]["linear"]["weighted_f1"]["mean"]
    )
    assert "random_init/batch/mixing_ratio" in wb.summary
    for probe in ("linear", "knn1", "knn5"):
        assert (out / f"confusion_pretrained_{probe}.png").is_file()
        assert any(m.startswith(f"media/images/confusion_pretrained_{probe}_") for m in wb.media)
        assert any(m.startswith(f"media/table/pretrained/{probe}/confusion_") for m in wb.media), wb.media
        assert (out / "tables" / f"pretrained__{probe}__per_class_f1.csv").is_file()
    assert sum(m.startswith("media/images/umap_") for m in wb.media) == 6
    # a second evaluation reads every feature set from the cache
    again = run(cfg)
    assert again["results"]["pretrained"]["knn1"] == summary["results"]["pretrained"]["knn1"]


def test_eval_loso_and_missing_weights(make_cfg, tmp_path):
    cfg = make_cfg(
        "eval=loso",
        *SMALL_DATA,
        "feature_sets=[random_init]",
        "features.image_size=32",
        "max_units=200",
        "data.eval_sources=[src2,src3,src4]",
        "probes.linear.enabled=false",
        "umap.enabled=false",
        "logger=csv",
        "progress=false",
        config_name="eval",
    )
    summary = run(cfg)
    assert summary["protocol"]["splits"] == ["loso:src2", "loso:src3", "loso:src4"]
    assert set(summary["results"]["random_init"]) == {"knn1", "knn20"}
    cfg.feature_sets = ["pretrained"]
    cfg.pretrain_runs = str(tmp_path / "no-runs-here")
    with pytest.raises(FileNotFoundError, match=r"no weights given and no pretraining run .*pass weights="):
        run(cfg)


def test_a_bare_eval_takes_the_newest_pretraining_export(make_cfg, exported, tmp_path, capsys):
    folder, _ = exported
    runs = tmp_path / "outputs" / "pretrain"
    for stamp in ("2026-01-01_00-00-00", "2026-02-01_00-00-00"):
        shutil.copytree(folder, runs / stamp / "export")
    (runs / "2026-03-01_00-00-00").mkdir()  # newer, but crashed before its export: not a candidate
    cfg = make_cfg(
        *SMALL_DATA,
        f"pretrain_runs={runs}",
        "feature_sets=[pretrained]",
        "max_units=120",
        "probes.linear.enabled=false",
        "batch_effects.enabled=false",
        "umap.enabled=false",
        "logger=csv",
        "progress=false",
        config_name="eval",
    )
    summary = run(cfg)
    newest = str(runs / "2026-02-01_00-00-00" / "export")
    assert summary["protocol"]["weights"] == newest
    assert f"weights={newest}" in capsys.readouterr().out


def test_several_backbones_in_one_run_each_with_its_input_and_random_init(exported, make_cfg, tmp_path):
    """``weights=[a, b]``: one table, a row per backbone and per distinct random init, same folds."""
    folder, _ = exported
    torch.manual_seed(1)
    other = build_backbone(
        "vit_small_patch14_dinov2", 48, 8, 0.0, 1.0, True, {"embed_dim": 32, "depth": 1, "num_heads": 2}
    )
    args = {"img_size": 48, "patch_size": 8, "init_values": 1.0, "dynamic_img_size": True}
    args.update(embed_dim=32, depth=1, num_heads=2)
    export_timm(other, tmp_path / "run_b" / "export", "vit_small_patch14_dinov2", args, [0.5] * 3, [0.2] * 3)
    cfg = make_cfg(
        f"weights=[{folder},{tmp_path / 'run_b' / 'export'}]",
        *SMALL_DATA,
        "max_units=120",
        "feature_sets=[pretrained,random_init]",
        "probes.knn.ks=[1]",
        "probes.linear.enabled=false",
        "umap.enabled=false",
        "batch_effects.enabled=false",
        "logger=csv",
        "progress=false",
        config_name="eval",
    )
    summary = run(cfg)
    label_a = folder.parent.name
    assert set(summary["results"]) == {
        f"pretrained:{label_a}",
        "pretrained:run_b",
        f"random_init:{label_a}",
        "random_init:run_b",
    }
    assert summary["protocol"]["weights"] == [str(folder), str(tmp_path / "run_b" / "export")]
    table = (tmp_path / "run" / "results.md").read_text()
    assert all(name in table for name in summary["results"])
    cached = [
        p.name for p in Path(cfg.features.cache_dir).iterdir() if p.name.startswith("pretrained_run_b-")
    ]
    assert len(cached) == 1  # each backbone's own features (its input size and normalisation), cached


def test_an_exports_whitening_is_applied_unless_switched_off(make_cfg, exported, tmp_path):
    """An export that ships a CLS whitening is scored whitened; features.whitening=false scores the raw
    CLS (the paper's protocol). Both are cached apart."""
    folder, net = exported
    torch.manual_seed(1)
    with torch.no_grad():
        whitening = fit_whitening(pool_tokens(net.eval(), torch.randn(80, 3, 32, 32), "cls"), 0.01)
    args = json.loads((folder / "config.json").read_text())["model_args"]
    export_timm(net, folder, "vit_small_patch14_dinov2", args, [0.5] * 3, [0.25] * 3, whitening)
    common = (
        f"weights={folder}",
        *SMALL_DATA,
        "max_units=120",
        "feature_sets=[pretrained]",
        "probes.linear.enabled=false",
        "batch_effects.enabled=false",
        "umap.enabled=false",
        "progress=false",
        f"features.cache_dir={tmp_path / 'features'}",  # its own: other tests cache these raw features
    )
    whitened = run(make_cfg(*common, config_name="eval"))
    raw_cfg = make_cfg(*common, "features.whitening=false", config_name="eval")
    raw = run(raw_cfg)
    assert whitened["results"]["pretrained"]["knn1"] != raw["results"]["pretrained"]["knn1"]
    cached = {
        load_features(path).meta["whitening"]: load_features(path)
        for path in Path(raw_cfg.features.cache_dir).glob("pretrained-*")
    }
    assert set(cached) == {None, whitening.digest()}
    expected = whitening(torch.from_numpy(cached[None].features))
    torch.testing.assert_close(torch.from_numpy(cached[whitening.digest()].features), expected)
