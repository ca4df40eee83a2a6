"""``reddino-pretrain`` / ``make pretrain``: compose the config, train, export the teacher, report k-NN.

Thin on purpose: every choice is in ``conf/``; this file only instantiates and calls Lightning.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

import reddino.runtime.resolvers  # noqa: F401  (registers the ${int_mul:...} resolver)
from reddino.callbacks import collapse_diagnoses, knn_curve
from reddino.data.datamodules import PretrainDataModule
from reddino.data.datasets import LabelledUnitDataset, eval_transform
from reddino.data.masking import SSLCollator
from reddino.eval.features import extract_cls_features
from reddino.eval.knn_report import format_table, grouped_knn_scores, knn_description
from reddino.runtime.config_checks import (
    check_config,
    check_crop_sizes,
    check_schedule_length,
    pretrain_rules,
)
from reddino.runtime.dashboard import log_review, save_figure
from reddino.runtime.ddp_children import pin_children_to_this_job
from reddino.runtime.fast_path import FastPath, apply_global_switches, compile_blocks_, set_fused_attention_
from reddino.runtime.paths import CONFIG_PATH
from reddino.runtime.user_errors import one_line_errors
from reddino.ssl.export import export_timm
from reddino.ssl.module import DinoV2Module
from reddino.weights import init_backbone_, load_backbone

log = logging.getLogger("reddino.pretrain")


def build_collator(cfg: DictConfig) -> SSLCollator:
    """iBOT mask collator on the patch grid of the global crops."""
    grid = cfg.ssl.crops.global_size // cfg.model.patch_size
    m = cfg.ssl.masking
    return SSLCollator(
        patch_grid=(grid, grid),
        mask_ratio_min_max=tuple(m.mask_ratio_min_max),
        mask_sample_probability=m.mask_sample_probability,
        min_num_patches=m.min_num_patches,
        min_aspect=m.min_aspect,
        seed=cfg.seed,
    )


def build_module(cfg: DictConfig, backbone: torch.nn.Module, fast: FastPath | None = None) -> DinoV2Module:
    """The LightningModule; ``fast`` (default: the plain path) decides fused AdamW and the teacher's mode."""
    s = cfg.ssl
    fast = fast or FastPath.from_config({**cfg.fast_path, "enabled": False}, "cpu")
    return DinoV2Module(
        backbone,
        head=OmegaConf.to_container(s.head, resolve=True),
        loss=OmegaConf.to_container(s.loss, resolve=True),
        centering=OmegaConf.to_container(s.centering, resolve=True),
        teacher=OmegaConf.to_container(s.teacher, resolve=True),
        optim=OmegaConf.to_container(s.optim, resolve=True),
        n_local_crops=s.crops.n_local,
        fused_optimizer=fast.fused_adamw,
        teacher_inference_mode=fast.teacher_inference_mode,
    )


def build_training(cfg: DictConfig) -> tuple[PretrainDataModule, DinoV2Module, torch.nn.Module]:
    """Datamodule, LightningModule (fast path applied) and a copy of the backbone as training starts."""
    fast = FastPath.from_config(cfg.fast_path, cfg.trainer.accelerator)
    apply_global_switches(fast)
    log.info("fast path: %s", fast)
    transform = instantiate(cfg.augment)
    datamodule = instantiate(
        cfg.data.loader,
        units=instantiate(cfg.data.pretrain_units),
        transform=transform,
        # augment.pixel_ops_device: gpu -> the pixel ops + normalisation run on the device after the copy
        gpu_transform=transform.device_transform(),
        collate_fn=build_collator(cfg),
        pin_memory=cfg.data.loader.pin_memory or fast.pin_memory,
    )
    backbone = instantiate(cfg.model)
    if cfg.init is not None:  # continued pretraining: student and teacher start from these weights
        init_backbone_(backbone, load_backbone(cfg.init, cfg.init_model_args))
        log.info("backbone initialised from %s (heads start fresh)", cfg.init)
    initial = copy.deepcopy(backbone)  # what training starts from: the baseline to beat
    module = build_module(cfg, backbone, fast)
    if fast.fused_attention:
        set_fused_attention_(module, True)
    if fast.compile_blocks:
        for nets in (module.student, module.teacher):
            compile_blocks_(nets["backbone"])
    return datamodule, module, initial


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    loggers = [
        instantiate(c, **logger_run_id(c, Path(cfg.paths.output_dir))) for c in (cfg.logger or {}).values()
    ]
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)


def logger_run_id(logger_cfg: DictConfig, run_dir: Path) -> dict[str, str]:
    """A W&B logger without an explicit id gets its run directory's id, so a resumed run continues it."""
    if not str(logger_cfg.get("_target_", "")).endswith("WandbLogger") or logger_cfg.get("id") is not None:
        return {}
    return {"id": run_id_of(run_dir)}


def run_id_of(run_dir: Path) -> str:
    """The W&B run id stored in ``run_dir/wandb_run_id``, created on first use.

    Created with an atomic hard link, so ranks started together (SLURM) agree on one id.
    """
    path = run_dir / "wandb_run_id"
    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".wandb_run_id.{os.getpid()}"
        tmp.write_text(secrets.token_hex(4) + "\n")  # W&B ids: short [a-z0-9] strings
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another rank won the race: use its id
        finally:
            tmp.unlink()
    return path.read_text().strip()


def checkpoint_to_resume(cfg: DictConfig) -> str | None:
    """``resume=<run dir>`` continues that run from its last checkpoint; ``ckpt_path=`` names any local file.

    URLs are refused: Lightning unpickles a downloaded checkpoint in full (``weights_only=False``), so a
    remote file could run code. Local files are read with ``weights_only=True`` (``run``).
    """
    if cfg.resume is None:
        if cfg.ckpt_path is not None and "://" in str(cfg.ckpt_path):
            raise ValueError(
                f"ckpt_path={cfg.ckpt_path}: URLs are refused (a remote checkpoint would be unpickled in "
                "full); download it, check it, and pass the local file"
            )
        return cfg.ckpt_path
    if cfg.ckpt_path is not None:
        raise ValueError("give either resume=<run dir> or ckpt_path=<file>, not both")
    last = Path(cfg.resume) / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(
            f"resume={cfg.resume}: no checkpoint at {last}. The run stopped before its first checkpoint "
            "(callbacks.checkpoint.every_n_train_steps) or the path is not a pretraining run directory."
        )
    return str(last)


def knn_evaluation(
    cfg: DictConfig, backbones: dict[str, torch.nn.Module]
) -> tuple[dict[str, Any], dict[str, torch.Tensor], pd.DataFrame]:
    """k-NN on held-out labelled units (a source unseen in pretraining), folds grouped by smear/subject.

    Returns the report, each backbone's CLS features and the units they belong to.
    """
    r = cfg.report
    units = instantiate(cfg.data.eval_units)
    if r.max_units is not None and len(units) > r.max_units:
        units = units.sample(n=r.max_units, random_state=cfg.seed).reset_index(drop=True)
    classes = list(cfg.data.classes)
    dataset = LabelledUnitDataset(
        units, eval_transform(cfg.ssl.crops.global_size, cfg.augment.mean, cfg.augment.std), classes, 64
    )
    groups = units[r.group_by].to_numpy()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {}
    features: dict[str, torch.Tensor] = {}
    for name, net in backbones.items():
        features[name], labels = extract_cls_features(net, dataset, r.batch_size, 0, device)
        results[name] = grouped_knn_scores(
            features[name], labels, groups, r.knn, len(classes), r.n_splits, cfg.seed
        )
    report = {
        "protocol": {
            "units": len(units),
            "sources": sorted(set(units["source"])),
            "subjects": int(units["subject"].nunique()),
            "groups": len(set(groups)),
            "classes": classes,
            "folds": f"{r.n_splits}-fold stratified, grouped by {r.group_by}",
            "knn": knn_description(r.knn),
        },
        "results": results,
    }
    return report, features, units


def review_figures(
    cfg: DictConfig, out: Path, teacher: torch.nn.Module, features: torch.Tensor, units: pd.DataFrame
) -> dict[str, Path]:
    """UMAP of the teacher's held-out features (by class | by subject) and the PCA map of its patch tokens."""
    from reddino.data.io import read_rgb
    from reddino.viz.pca import patch_pca, patch_tokens, pca_figure
    from reddino.viz.umap import umap_embedding, umap_panels

    f = cfg.report.figures
    xy, idx = umap_embedding(features.numpy(), f.umap_max_points, cfg.seed)
    picked = units.iloc[idx]
    umap = umap_panels(
        xy,
        {"class": picked["label"].tolist(), "subject": picked["subject"].tolist()},
        "teacher CLS, held out",
    )
    smear = read_rgb(units["file"].iloc[0])
    h, w = smear.shape[:2]
    side = min(f.pca_tile, h, w)
    top, left = (h - side) // 2, (w - side) // 2
    tile = smear[top : top + side, left : left + side]
    tokens = patch_tokens(teacher.cpu(), tile, f.pca_size, cfg.augment.mean, cfg.augment.std)
    pca = pca_figure(
        tile,
        patch_pca(tokens, None, f.pca_clip_percent),
        f"teacher patch tokens: {Path(units['file'].iloc[0]).name}",
    )
    return {
        "umap_teacher": save_figure(umap, out / "umap_teacher.png"),
        "pca_patches": save_figure(pca, out / "pca_patches.png"),
    }


def results_frame(results: dict[str, Any]) -> pd.DataFrame:
    """One row per (model, k, metric): mean and std over folds."""
    return pd.DataFrame(
        [
            {"model": model, "knn": k, "metric": metric, "mean": s["mean"], "std": s["std"]}
            for model, by_k in results.items()
            for k, by_metric in by_k.items()
            for metric, s in by_metric.items()
        ]
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, export and evaluate; returns what was written to ``results.json``."""
    check_config(cfg, pretrain_rules())
    check_schedule_length(cfg)
    check_crop_sizes(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = checkpoint_to_resume(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # DDP children re-run this script in the same directory
        first = not (out / "config.yaml").exists()  # a resumed run keeps the original beside its own
        name = "config.yaml" if first else f"config.resumed-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        (out / name).write_text(OmegaConf.to_yaml(cfg, resolve=True))

    datamodule, module, initial = build_training(cfg)
    trainer = build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    summary: dict[str, Any] = {
        "steps": int(trainer.global_step),
        "world_size": trainer.world_size,
        "teacher_rank_difference": module.teacher_rank_difference,
        "collapse_guard": collapse_diagnoses(trainer.callbacks),
        "knn_curve": knn_curve(trainer.callbacks),
    }
    teacher = final_teacher(trainer, module, initial)  # collective under FSDP: every rank calls it
    if trainer.is_global_zero:
        model_args = {
            k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "_target_"
        }
        arch = model_args.pop("arch")
        model_args.update(model_args.pop("overrides"))
        weights = export_timm(teacher, out / "export", arch, model_args, cfg.augment.mean, cfg.augment.std)
        summary["exported"] = str(weights)
        if cfg.report.enabled:
            initial_name = "init_weights" if cfg.init is not None else "random_init"
            report, features, units = knn_evaluation(
                cfg, {"pretrained_teacher": teacher, initial_name: initial}
            )
            summary.update(report)
            table = format_table(report["results"])
            (out / "results.md").write_text(table + "\n")
            frame = results_frame(report["results"])
            frame.to_csv(out / "results.csv", index=False)
            log.info("k-NN on held-out units %s:\n%s", report["protocol"], table)
            print(f"\nk-NN evaluation on held-out {report['protocol']['sources']} ({out}):\n{table}\n")
            images = {}
            if cfg.report.figures.enabled:
                images = review_figures(cfg, out, teacher, features["pretrained_teacher"], units)
            log_review(
                trainer.loggers,
                OmegaConf.to_container(cfg, resolve=True),
                _flatten_scores(frame),
                {"knn_results": frame},
                images,
                step=trainer.global_step,
            )
        (out / "results.json").write_text(json.dumps(summary, indent=2))
    close_loggers(trainer)
    return summary


def final_teacher(
    trainer: pl.Trainer, module: DinoV2Module, initial: torch.nn.Module
) -> torch.nn.Module | None:
    """The trained teacher backbone, whole: the module's own, or under FSDP gathered onto rank 0.

    Under FSDP every rank holds shards; Lightning's full state dict (rank 0 only) is loaded into a copy of
    the initial backbone. Other ranks get None.
    """
    if module.fsdp_root() is None:
        return module.teacher["backbone"]
    state = trainer.strategy.lightning_module_state_dict()
    if not trainer.is_global_zero:
        return None
    prefix = "teacher.backbone."
    teacher = copy.deepcopy(initial)
    teacher.load_state_dict(
        {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True
    )
    return teacher.eval()


def close_loggers(trainer: pl.Trainer) -> None:
    """Flush every logger and end the W&B run, so the next run in this process starts its own."""
    for lg in trainer.loggers:
        lg.save()
        if isinstance(lg, WandbLogger) and lg._experiment is not None:
            lg.experiment.finish()


def _flatten_scores(frame: pd.DataFrame) -> dict[str, float]:
    """``knn/<model>/<k>/<metric>`` -> mean, from ``results_frame``'s rows."""
    return {f"knn/{r.model}/{r.knn}/{r.metric}": r.mean for r in frame.itertuples(index=False)}


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="pretrain")
@one_line_errors("reddino-pretrain")
def main(cfg: DictConfig) -> None:
    pin_children_to_this_job()
    run(cfg)


if __name__ == "__main__":
    main()
