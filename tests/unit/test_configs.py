"""Every config group option and every experiment composes, resolves and instantiates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from reddino.ssl.data_size_rule import apply_data_size_rule
from reddino.workflows.pretraining import build_collator, build_module

CONF = Path(__file__).resolve().parents[2] / "conf"
PREPARED = ("chula_rbc12", "bccd", "txl_pbc")  # already in conf/prepare.yaml's sources
USER_DATA = ("folder", "table")  # reddino-eval only, with a path to give (data.path)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_groups_exist():
    for group in ("ssl", "model", "augment", "data", "trainer", "logger", "callbacks", "experiment", "debug"):
        assert options(group), f"conf/{group} is empty"
    assert {"reddino", "dinov2", "dinobloom"} <= set(options("ssl"))
    assert {"vit_tiny", "vit_s14", "vit_b14", "vit_l14", "vit_g14"} <= set(options("model"))
    assert {"reddino", "reddino_gpu", "dinov2", "dinov2_cells"} <= set(options("augment"))


@pytest.mark.parametrize(
    "override",
    [
        f"{g}={o}"
        for g in ("ssl", "crops", "model", "augment", "data", "trainer", "logger", "callbacks", "debug")
        for o in options(g)
        if o not in USER_DATA
    ],
)
def test_group_option_composes_and_resolves(make_cfg, override):
    cfg = make_cfg(override)
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["ssl"]["optim"]["total_steps"] == int(
        container["ssl"]["optim"]["epochs"] * container["ssl"]["optim"]["epoch_length"]
    )


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_instantiates(make_cfg, experiment):
    cfg = make_cfg(f"experiment={experiment}")
    OmegaConf.to_container(cfg, resolve=True)
    apply_data_size_rule(cfg, 31_723)  # what reddino-pretrain does with the units it reads (auto values)
    with torch.device("meta"):  # full-size ViT-g + 131072-prototype heads without allocating memory
        backbone = instantiate(cfg.model)
        module = build_module(cfg, backbone)
    assert backbone.patch_embed.img_size == (cfg.crops.global_size,) * 2
    assert module.student["dino_head"].last_layer.weight_v.shape[0] == cfg.ssl.head.n_prototypes
    assert ("ibot_head" in module.student) != cfg.ssl.head.shared_ibot_head
    collator = build_collator(cfg)
    assert collator is not None
    if cfg.trainer.accelerator == "cpu":
        instantiate(cfg.trainer, logger=False)


def test_reddino_s_matches_reference_values(make_cfg):
    cfg = make_cfg("experiment=reddino_s")
    assert cfg.model.arch == "vit_small_patch14_dinov2" and cfg.model.patch_size == 14
    assert cfg.ssl.head.n_prototypes == 131072 and cfg.ssl.loss.koleo_weight == 0.0
    assert cfg.ssl.centering.method == "sinkhorn_knopp"
    assert cfg.data.loader.batch_size == 280 and cfg.ssl.optim.total_steps == 32000
    assert cfg.crops.n_local == 0 and cfg.crops.global_size == 224
    assert cfg.trainer.precision == "bf16-mixed"


def test_embedded_default_pieces_instantiate(make_cfg):
    cfg = make_cfg("debug=fast")
    transform = instantiate(cfg.augment)
    units = instantiate(cfg.data.pretrain_units)
    assert set(units["source"]) == set(cfg.data.train_sources)
    sample = transform(np.zeros((40, 40, 3), np.uint8))
    assert len(sample["global_crops"]) == 2 and sample["global_crops"][0].shape[-1] == cfg.crops.global_size
    for name, c in cfg.callbacks.items():
        assert instantiate(c) is not None, name
    for name, c in cfg.logger.items():
        assert instantiate(c) is not None, name


def test_cell_augmentations_extend_dinov2_and_switching_back_restores_the_full_set(make_cfg):
    """The embedded default's milder cell augmentations live in their own group option, so
    ``augment=dinov2`` (or ``augment=reddino``) replaces them whole instead of inheriting them."""
    cells, full = make_cfg().augment, make_cfg("augment=dinov2").augment
    assert cells._target_ == full._target_ == "reddino.data.augment.DinoV2Augmentation"
    assert list(cells.color_jitter) == [0.2, 0.2, 0.1, 0.0] and cells.grayscale_p == 0.0
    assert list(cells.global_blur_p) == [0.5, 0.1] and list(cells.blur_sigma) == [0.1, 1.0]
    assert list(full.color_jitter) == [0.4, 0.4, 0.2, 0.1] and full.grayscale_p == 0.2
    assert list(full.global_blur_p) == [1.0, 0.1] and list(full.blur_sigma) == [0.1, 2.0]
    assert {k for k in cells if k not in ("color_jitter", "grayscale_p", "global_blur_p", "blur_sigma")} == {
        k for k in full if k not in ("color_jitter", "grayscale_p", "global_blur_p", "blur_sigma")
    }
    assert "color_jitter" not in make_cfg("augment=reddino").augment


def test_ddp_trainer_instantiates_lightnings_strategy_on_cpu(make_cfg):
    from pytorch_lightning.strategies import DDPStrategy

    cfg = make_cfg("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true")
    trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2
    assert trainer.strategy._ddp_kwargs == {"find_unused_parameters": False, "gradient_as_bucket_view": True}


def test_slurm_launcher_composes_one_task_per_gpu():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(
            "pretrain",
            ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=8", "trainer=ddp"],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"


def test_fsdp_trainer_builds_lightnings_strategy_with_the_block_and_head_policy(make_cfg):
    from pytorch_lightning.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    cfg = make_cfg("trainer=fsdp")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    strategy = instantiate(cfg.trainer.strategy)  # a Trainer needs CUDA for FSDP; the strategy does not
    assert isinstance(strategy, FSDPStrategy)
    assert isinstance(strategy.kwargs["auto_wrap_policy"], ModuleWrapPolicy)
    assert strategy.kwargs["use_orig_params"] is True


def test_module_node_builds_the_lightning_module_with_the_configured_optimizer(make_cfg):
    """``module`` is instantiable (``_target_``) and the optimiser is a ``_partial_`` node of the recipe."""
    cfg = make_cfg("debug=fast", "ssl.optimizer.betas=[0.8,0.95]", "+ssl.optimizer.eps=1e-6")
    module = build_module(cfg, instantiate(cfg.model))
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {tuple(g["betas"]) for g in optimizer.param_groups} == {(0.8, 0.95)}
    assert {g["eps"] for g in optimizer.param_groups} == {1e-6}
    assert "optimizer" not in module.hparams  # checkpoints keep plain values (read with weights_only)
    sgd = make_cfg("debug=fast", "ssl.optimizer._target_=torch.optim.SGD", "~ssl.optimizer.betas")
    assert isinstance(build_module(sgd, instantiate(sgd.model)).configure_optimizers(), torch.optim.SGD)


@pytest.mark.parametrize(
    ("config_name", "override"),
    [("eval", f"eval={o}") for o in options("eval")]
    + [("eval", f"data={o}") for o in options("data") if o not in USER_DATA]
    + [("eval", f"data={o} data.path=/data/cells") for o in USER_DATA]
    + [("prepare", f"+data/source@sources.{o}={o}") for o in options("data/source") if o not in PREPARED]
    + [("pack", "quality=75"), ("embed", "mode=cell")],
)
def test_every_option_of_the_other_entry_points_composes_and_passes_its_checks(
    make_cfg, config_name, override
):
    """reddino-eval's protocols and data, every catalog source added to reddino-prepare, reddino-pack and
    reddino-embed: composed, resolved, checked by the entry point's own rules, catalog entries parsed."""
    from reddino.data.sources.catalog import SourceSpec
    from reddino.runtime.config_checks import check_config, embed_rules, eval_rules, pack_rules, prepare_rules

    required = ["weights=w", "folder=f", "out=o"] if config_name == "embed" else []
    cfg = make_cfg(*override.split(), *required, config_name=config_name)
    OmegaConf.to_container(cfg, resolve=True)
    rules = {"eval": eval_rules, "prepare": prepare_rules, "pack": pack_rules, "embed": embed_rules}
    check_config(cfg, rules[config_name]())
    if config_name == "prepare":
        for name, spec in cfg.sources.items():
            SourceSpec.from_mapping(OmegaConf.to_container(spec, resolve=True), name)
    if config_name == "eval" and cfg.data.name == "synthetic":  # real data needs `make prepare` first
        assert len(instantiate(cfg.data.eval_units)) > 0
