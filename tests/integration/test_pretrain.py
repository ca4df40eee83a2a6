"""End-to-end pretraining runs on the embedded synthetic data at tiny sizes (CPU)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import timm
import torch
from hydra.utils import instantiate as hydra_instantiate
from safetensors.torch import load_file
from wandb_offline import read_offline_run

from reddino.weights import load_backbone
from reddino.workflows.pretraining import run


def test_debug_run_writes_checkpoints_logs_export_and_report(make_cfg, tmp_path):
    cfg = make_cfg(
        "debug=fast",
        "logger=default",
        "callbacks.knn_probe.enabled=true",
        "callbacks.knn_probe.every_n_steps=2",
        "callbacks.knn_probe.max_units=60",
    )
    summary = run(cfg)
    out = tmp_path / "run"
    assert summary["steps"] == cfg.ssl.optim.total_steps

    results = json.loads((out / "results.json").read_text())
    for model in ("pretrained_teacher", "random_init"):
        assert set(results["results"][model]) == {"linear", "knn1", "knn3"}  # the probes of reddino-eval
        for probe in ("linear", "knn1", "knn3"):
            scores = results["results"][model][probe]
            assert 0.0 <= scores["weighted_f1"]["mean"] <= 1.0 and len(scores["weighted_f1"]["folds"]) == 5
            assert len(scores["confusion"]) == len(cfg.data.classes) and scores["n_test"] > 0
    protocol = results["protocol"]
    assert protocol["sources"] == ["src4"]
    gen = cfg.data.generator
    assert protocol["subjects"] == gen.subjects_per_source
    assert protocol["groups"] == gen.subjects_per_source * gen.smears_per_subject  # grouped by smear
    assert "random_init" in (out / "results.md").read_text()
    # the k-NN probe's learning curve: before the first step, every 2 steps, at the end
    curve = results["knn_curve"]
    assert [p["step"] for p in curve] == [0, 2, 4] == list(range(0, cfg.ssl.optim.total_steps + 1, 2))
    assert all(0.0 <= p[f"knn{k}_weighted_f1"] <= 100.0 for p in curve for k in (1, 3))

    assert (out / "checkpoints" / "last.ckpt").is_file()
    metrics = pd.read_csv(out / "csv" / "metrics.csv")
    for column in (
        "train/dino_global",
        "train/ibot",
        "train/loss",
        "schedule/lr",
        "schedule/teacher_temp",
        "schedule/momentum",
        "schedule/weight_decay",
        "monitor/teacher_entropy",
        "monitor/cls_std",
        "probe/knn3_weighted_f1",
    ):
        assert column in metrics.columns, column
    # W&B review, read back from the offline run; every image and table is also a file in the run dir
    (offline,) = (out / "wandb").glob("offline-run-*")
    wb = read_offline_run(offline)
    assert wb.run_id == (out / "wandb_run_id").read_text().strip() and wb.group == "pretrain"
    assert wb.config["ssl"]["name"] == "reddino" and wb.config["model"]["patch_size"] == cfg.model.patch_size
    for model in ("pretrained_teacher", "random_init"):
        key = f"{model}/knn1/weighted_f1"
        assert wb.summary[key] == pytest.approx(results["results"][model]["knn1"]["weighted_f1"]["mean"])
    assert {"train/loss", "schedule/lr", "monitor/teacher_entropy"} <= wb.history_keys
    for name in ("umap_teacher", "pca_patches"):
        assert (out / f"{name}.png").is_file()
        assert any(m.startswith(f"media/images/{name}_") for m in wb.media), wb.media
    assert any(m.startswith("media/table/results_") for m in wb.media)
    assert len(pd.read_csv(out / "results.csv")) == 2 * 3 * 4  # models x probes x metrics

    state = load_file(str(out / "export" / "model.safetensors"))
    config = json.loads((out / "export" / "config.json").read_text())
    plain = timm.create_model(config["architecture"], num_classes=0, **config["model_args"])
    plain.load_state_dict(state, strict=True)

    # the checkpoint's teacher and the export are the same network for evaluation
    from_ckpt = load_backbone(out / "checkpoints" / "last.ckpt")
    from_export = load_backbone(out / "export")
    assert from_ckpt.input_size == from_export.input_size == cfg.crops.global_size
    x = torch.randn(2, 3, from_ckpt.input_size, from_ckpt.input_size)
    torch.testing.assert_close(from_ckpt.model.forward_features(x), from_export.model.forward_features(x))

    # the export ships the CLS whitening fitted on pretraining units; the report scored the teacher
    # with it and the random init raw
    assert from_ckpt.whitening is None and from_export.whitening is not None
    n_units = len(hydra_instantiate(cfg.data.pretrain_units))
    assert results["whitening"] == {"fitted_on": min(n_units, cfg.whitening.max_units), "shrinkage": 0.01}
    assert from_export.whitening.fitted_on == results["whitening"]["fitted_on"]
    assert protocol["features"] == {
        "pretrained_teacher": "final-norm CLS whitened (fitted on the pretraining units)",
        "random_init": "final-norm CLS, raw",
    }


def test_short_cpu_training_lowers_the_loss_without_collapse(make_cfg):
    cfg = make_cfg(
        "debug=fast",
        "report.enabled=false",
        "ssl.optim.epochs=8",
        "ssl.optim.epoch_length=5",
        "ssl.optim.base_lr=4e-3",
        "ssl.teacher.momentum_teacher=0.9",
        "data.loader.batch_size=16",
    )
    run(cfg)
    metrics = pd.read_csv(cfg.paths.output_dir + "/csv/metrics.csv")
    loss = metrics["train/loss"].dropna().to_numpy()
    assert len(loss) >= 8
    assert loss[-3:].mean() < loss[:3].mean(), f"loss did not decrease: {loss}"
    cls_std = metrics["monitor/cls_std"].dropna().to_numpy()
    uniform = 1 / cfg.model.overrides.embed_dim**0.5
    assert cls_std[-1] > 0.2 * uniform, f"collapsed: std of normalised CLS {cls_std[-1]:.4f} vs {uniform:.4f}"
    assert torch.isfinite(torch.tensor(loss)).all()


def test_a_continued_runs_baseline_is_whitened_on_the_teachers_units(make_cfg):
    """The start's whitening is refitted on the units the teacher's was fitted on (not the one its export
    shipped, fitted on other data); a random init and an unwhitened run stay raw."""
    from reddino.eval.pretrain_report import fit_export_whitening
    from reddino.workflows.pretraining import start_whitening

    cfg = make_cfg("debug=fast", "init=/some/export")
    net = hydra_instantiate(cfg.model).eval()
    units = hydra_instantiate(cfg.data.pretrain_units)
    teacher_fit = fit_export_whitening(cfg, net, units)
    baseline = start_whitening(cfg, net, units, teacher_fit)
    assert baseline is not None and baseline.fitted_on == teacher_fit.fitted_on
    torch.testing.assert_close(baseline.mean, teacher_fit.mean)  # same weights, same units: same fit
    torch.testing.assert_close(baseline.transform, teacher_fit.transform)
    assert start_whitening(cfg, net, units, None) is None
    assert start_whitening(make_cfg("debug=fast"), net, units, teacher_fit) is None


def test_nan_guard_names_the_diverged_term():
    from reddino.ssl.module import assert_finite

    with pytest.raises(FloatingPointError, match=r"\['ibot'\] diverged"):
        assert_finite({"dino_global": torch.tensor(1.0), "ibot": torch.tensor(float("nan"))}, step=7)


def test_continued_pretraining_from_a_dinov2_hub_file(make_cfg, tmp_path):
    """``init=<DINOv2 hub .pth>``: student and teacher start from it (grid resampled), heads fresh."""
    from reddino.ssl.backbone import build_backbone, resample_pos_embed_dinov2
    from reddino.weights import init_backbone_

    tiny = {"embed_dim": 48, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    hub = build_backbone("vit_small_patch14_dinov2", 518, 14, 0.0, 1.0, False, tiny)  # 37x37 grid, hub keys
    with torch.no_grad():
        for p in hub.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path / "dinov2_hub.pth"
    torch.save(hub.state_dict(), path)

    common = ("debug=fast", f"init={path}", "+init_model_args.num_heads=2", "crops.global_size=224")
    cfg = make_cfg(*common, "model.patch_size=14", "crops.local_size=98")
    # the run's network after init = the hub weights with the grid resized once, 37x37 -> 16x16 (RedDino)
    net = init_backbone_(hydra_instantiate(cfg.model), load_backbone(path, {"num_heads": 2}))
    state = dict(hub.state_dict())
    state["pos_embed"] = resample_pos_embed_dinov2(state["pos_embed"], 16)
    for key, value in state.items():
        if key != "mask_token":
            torch.testing.assert_close(net.state_dict()[key], value, msg=key)

    summary = run(cfg)
    assert set(summary["results"]) == {"pretrained_teacher", "init_weights"}
    # both rows whitened by a fit on this run's pretraining units: they differ only in the weights
    assert set(summary["protocol"]["features"].values()) == {
        "final-norm CLS whitened (fitted on the pretraining units)"
    }

    with pytest.raises(ValueError, match="do not fit"):  # patch 8 cannot take patch-14 weights
        run(make_cfg(*common))


@pytest.mark.slow
def test_fast_path_forced_on_cpu_trains_and_exports_plain_names(make_cfg, tmp_path):
    """Compiled blocks, fused kernels and the inference-mode teacher through a real (short) run."""
    cfg = make_cfg("debug=fast", "fast_path.enabled=true", "report.enabled=false")
    summary = run(cfg)
    assert summary["steps"] == cfg.ssl.optim.total_steps
    state = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
    assert not any("_orig_mod" in k for k in state)
    metrics = pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv")
    assert metrics["train/loss"].dropna().map(math.isfinite).all()
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])


@pytest.mark.slow
def test_the_collapse_guard_stops_a_collapsing_recipe(make_cfg):
    """RedDino's 131,072 prototypes from scratch with LayerScale 1e-5, scaled down: uniform targets."""
    summary = run(
        make_cfg(
            "debug=fast",
            "ssl.head.n_prototypes=131072",
            "ssl.head.ibot_n_prototypes=131072",
            "model.init_values=1e-5",
            "report.enabled=false",
            "callbacks.collapse_guard.check_every_n_steps=1",
            "callbacks.collapse_guard.patience=2",
            "callbacks.collapse_guard.stop=true",
        )
    )
    # uniform targets, and (LayerScale 1e-5) the input-independent CLS behind them
    assert {"uniform_targets", "constant_features"} == set(summary["collapse_guard"])
    assert "Too many prototypes" in summary["collapse_guard"]["uniform_targets"]
    assert summary["steps"] == 2  # stopped at the second failing check of a 4-step run


@pytest.mark.slow
def test_the_collapse_guard_is_silent_on_the_working_default(make_cfg):
    summary = run(
        make_cfg(
            "ssl.optim.epochs=2",
            "ssl.optim.epoch_length=20",
            "report.enabled=false",
            "logger=csv",
            "callbacks.collapse_guard.check_every_n_steps=5",
            "callbacks.collapse_guard.patience=2",
            "callbacks.collapse_guard.stop=true",
        )
    )
    assert summary["collapse_guard"] == {} and summary["steps"] == 40
