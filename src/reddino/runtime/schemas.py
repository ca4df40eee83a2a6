"""Typed schemas of the config sections the training code reads by key, so that a wrong type fails when
the config is composed, naming the key (``ssl.optim.base_lr=abc``, ``data.loader.batch_size=abc``).

Hydra already refuses keys that do not exist (``ssl.optim.base_lrr=1``: "Could not override"); these
schemas add the types. They hold no values: every value stays in the YAML files (``MISSING`` here), which
name their schema in their defaults list (``conf/ssl/reddino.yaml``: ``- /schema/ssl@_here_``). Importing
this module registers them with Hydra's ConfigStore (idempotent); entry points and tests import it next
to ``reddino.runtime.resolvers``.

Fields the data-size rule may set (``auto``, reddino.ssl.data_size_rule) are typed ``Any`` and checked
when the run starts (reddino.runtime.config_checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class HeadSchema:
    n_prototypes: Any = MISSING  # int or auto
    hidden_dim: int = MISSING
    bottleneck_dim: int = MISSING
    nlayers: int = MISSING
    shared_ibot_head: bool = MISSING
    ibot_n_prototypes: Any = MISSING  # int or auto
    chunked: bool = MISSING
    chunk_size: int = MISSING


@dataclass
class LossSchema:
    dino_weight: float = MISSING
    ibot_weight: float = MISSING
    koleo_weight: float = MISSING
    koleo_eps: float = MISSING
    student_temp: float = MISSING


@dataclass
class CenteringSchema:
    method: str = MISSING
    sinkhorn_iterations: int = MISSING
    center_momentum: float = MISSING


@dataclass
class MaskingSchema:
    mask_sample_probability: float = MISSING
    mask_ratio_min_max: list[float] = MISSING
    min_num_patches: int = MISSING
    min_aspect: float = MISSING


@dataclass
class CropsSchema:
    """``crops``: the views each image gives the recipe (conf/crops/)."""

    n_local: int = MISSING
    global_size: int = MISSING
    local_size: int = MISSING
    global_scale: list[float] = MISSING
    local_scale: list[float] = MISSING


@dataclass
class TeacherSchema:
    momentum_teacher: Any = MISSING  # float or auto
    final_momentum_teacher: float = MISSING
    warmup_teacher_temp: Any = MISSING  # float or auto
    teacher_temp: Any = MISSING  # float or auto
    warmup_teacher_temp_epochs: float = MISSING


@dataclass
class OptimSchema:
    epochs: int = MISSING
    epoch_length: int = MISSING
    total_steps: int = MISSING
    base_lr: float = MISSING
    scaling_rule: str = MISSING
    min_lr: float = MISSING
    warmup_epochs: float = MISSING
    weight_decay: float = MISSING
    weight_decay_end: float = MISSING
    clip_grad: float | None = MISSING
    freeze_last_layer_epochs: float = MISSING
    freeze_backbone_epochs: float = MISSING
    backbone_lr_mult: float = MISSING
    patch_embed_lr_mult: float = MISSING
    layerwise_decay: float = MISSING


@dataclass
class SSLSchema:
    """``ssl``: the self-supervised recipe (conf/ssl/)."""

    name: str = MISSING
    head: HeadSchema = field(default_factory=HeadSchema)
    loss: LossSchema = field(default_factory=LossSchema)
    centering: CenteringSchema = field(default_factory=CenteringSchema)
    masking: MaskingSchema = field(default_factory=MaskingSchema)
    teacher: TeacherSchema = field(default_factory=TeacherSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    optimizer: Any = MISSING  # a _partial_ node: the optimiser class and its fixed arguments


@dataclass
class LoaderSchema:
    """``data.loader``: the pretraining DataModule (conf/data/)."""

    _target_: str = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    pin_memory: bool = MISSING
    persistent_workers: bool = MISSING
    image_cache_size: int = MISSING
    source_weighting: str = MISSING
    seed: int = MISSING


SCHEMAS = {"ssl": SSLSchema, "crops": CropsSchema, "loader": LoaderSchema}


def register_schemas() -> None:
    """Store each schema as ``schema/<name>`` in Hydra's ConfigStore."""
    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(group="schema", name=name, node=node)


register_schemas()
