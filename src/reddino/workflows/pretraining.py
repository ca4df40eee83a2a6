"""One pretraining run, assembled from a composed config: data module, LightningModule, Trainer; then the
export of the teacher and the end-of-run report. ``reddino-pretrain`` and the ablation jobs call ``run``."""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from reddino.callbacks import collapse_diagnoses, knn_curve
from reddino.data.datamodules import PretrainDataModule
from reddino.data.masking import SSLCollator
from reddino.eval.pretrain_report import fit_export_whitening, held_out_evaluation, review_figures
from reddino.eval.session import degeneracy_warnings, flat_scores, results_frame, results_table
from reddino.eval.whitening import FeatureWhitening
from reddino.runtime.config_checks import (
    check_config,
    check_crop_sizes,
    check_schedule_length,
    pretrain_rules,
)
from reddino.runtime.dashboard import log_review
from reddino.runtime.fast_path import FastPath, apply_global_switches, compile_blocks_, set_fused_attention_
from reddino.runtime.run_dir import checkpoint_to_resume, logger_run_id
from reddino.ssl.data_size_rule import AUTO, RULED_KEYS, apply_data_size_rule
from reddino.ssl.module import DinoV2Module
from reddino.weights import init_backbone_, load_backbone
from reddino.weights.export import export_timm

log = logging.getLogger("reddino.pretrain")


def build_collator(cfg: DictConfig) -> SSLCollator:
    """iBOT mask collator on the patch grid of the global crops."""
    grid = cfg.crops.global_size // cfg.model.patch_size
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
    unresolved = [key for key in RULED_KEYS if OmegaConf.select(cfg, key) == AUTO]
    if unresolved:
        raise ValueError(f"{unresolved} are auto: apply the data-size rule first (apply_data_size_rule)")
    fast = fast or FastPath.from_config({**cfg.fast_path, "enabled": False}, "cpu")
    return instantiate(
        cfg.module,
        backbone,
        fused_optimizer=fast.fused_adamw,
        teacher_inference_mode=fast.teacher_inference_mode,
        _convert_="all",
    )


def build_training(
    cfg: DictConfig, units: pd.DataFrame | None = None
) -> tuple[PretrainDataModule, DinoV2Module, torch.nn.Module]:
    """Datamodule, LightningModule (fast path applied) and a copy of the backbone as training starts
    (the baseline the report scores the teacher against).

    ``units``: the pretraining units when already read (``run`` reads them first for the data-size
    rule); None reads ``data.pretrain_units``.
    """
    fast = FastPath.from_config(cfg.fast_path, cfg.trainer.accelerator)
    apply_global_switches(fast)
    log.info("fast path: %s", fast)
    transform = instantiate(cfg.augment)
    datamodule = instantiate(
        cfg.data.loader,
        units=instantiate(cfg.data.pretrain_units) if units is None else units,
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
    start = copy.deepcopy(backbone)  # the baseline to beat
    module = build_module(cfg, backbone, fast)
    if fast.fused_attention:
        set_fused_attention_(module, True)
    if fast.compile_blocks:
        for nets in (module.student, module.teacher):
            compile_blocks_(nets["backbone"])
    return datamodule, module, start


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    loggers = [
        instantiate(c, **logger_run_id(c, Path(cfg.paths.output_dir))) for c in (cfg.logger or {}).values()
    ]
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)


def start_whitening(
    cfg: DictConfig, start: torch.nn.Module, units: pd.DataFrame, teacher_whitening: FeatureWhitening | None
) -> FeatureWhitening | None:
    """The baseline row's whitening. Continued pretraining: the starting weights whitened by a fit on the
    same pretraining units as the teacher's, so the two rows differ only in the weights (the starting
    export's own whitening was fitted on the data it was trained on, not this run's).
    A random init stays raw: it scores higher raw (docs/feature_whitening.md)."""
    if cfg.init is None or teacher_whitening is None:
        return None
    return fit_export_whitening(cfg, start, units)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, export and evaluate; returns what was written to ``results.json``."""
    check_config(cfg, pretrain_rules())
    check_schedule_length(cfg)
    check_crop_sizes(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = checkpoint_to_resume(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    units = instantiate(cfg.data.pretrain_units)
    ruled = apply_data_size_rule(cfg, len(units))
    if ruled:
        log.info("data-size rule for %d units (docs/data_size_rule.md): %s", len(units), ruled)
    if rank_zero_only.rank == 0:  # DDP children re-run this script in the same directory
        first = not (out / "config.yaml").exists()  # a resumed run keeps the original beside its own
        name = "config.yaml" if first else f"config.resumed-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        (out / name).write_text(OmegaConf.to_yaml(cfg, resolve=True))

    datamodule, module, start = build_training(cfg, units)
    trainer = build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    summary: dict[str, Any] = {
        "steps": int(trainer.global_step),
        "world_size": trainer.world_size,
        "teacher_rank_difference": module.teacher_rank_difference,
        "collapse_guard": collapse_diagnoses(trainer.callbacks),
        "knn_curve": knn_curve(trainer.callbacks),
        "data_size_rule": {"units": len(units), "set": ruled},
    }
    teacher = final_teacher(trainer, module, start)  # collective under FSDP: every rank calls it
    if trainer.is_global_zero:
        model_args = {
            k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "_target_"
        }
        arch = model_args.pop("arch")
        model_args.update(model_args.pop("overrides"))
        whitening = fit_export_whitening(cfg, teacher, units) if cfg.whitening.enabled else None
        if whitening is not None:
            summary["whitening"] = {"fitted_on": whitening.fitted_on, "shrinkage": whitening.shrinkage}
        weights = export_timm(
            teacher, out / "export", arch, model_args, cfg.augment.mean, cfg.augment.std, whitening
        )
        summary["exported"] = str(weights)
        if cfg.report.enabled:
            initial_name = "init_weights" if cfg.init is not None else "random_init"
            baseline_whitening = start_whitening(cfg, start, units, whitening)
            report, features, units = held_out_evaluation(
                cfg,
                {"pretrained_teacher": teacher, initial_name: start},
                {"pretrained_teacher": whitening, initial_name: baseline_whitening},
            )
            summary.update(report)
            for warning in degeneracy_warnings(report["results"]):
                log.warning("degenerate: %s", warning)
            table = results_table(report["results"], row_label="model")
            (out / "results.md").write_text(table + "\n")
            frame = results_frame(report["results"], row_label="model")
            frame.to_csv(out / "results.csv", index=False)
            log.info("probes on held-out units %s:\n%s", report["protocol"], table)
            print(f"\nprobes on held-out {report['protocol']['sources']} ({out}):\n{table}\n")
            images = {}
            if cfg.report.figures.enabled:
                images = review_figures(cfg, out, teacher, features["pretrained_teacher"], units)
            log_review(
                trainer.loggers,
                OmegaConf.to_container(cfg, resolve=True),
                flat_scores(report["results"]),
                {"results": frame},
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
