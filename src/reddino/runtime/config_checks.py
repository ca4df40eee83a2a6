"""Checks of a composed config before anything runs: a typo or a wrong type names the option, the bad
value and what is allowed, instead of preparing nothing or failing deep inside a run.

Each entry point has one table ``{dotted option: rule}``; ``check_config`` applies it. Options that are
absent (a group not selected) are skipped; present ones must satisfy their rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from reddino.ssl.losses import N_GLOBAL_CROPS

FEATURE_ACCELERATORS = ("auto", "cpu", "gpu")  # the one-device predict pass (reddino.eval.features)
FEATURE_PRECISIONS = ("32-true", "bf16-mixed")
Rule = Callable[[Any], str | None]  # None when the value is fine, else what is wrong with it
MISSING = object()


class ConfigError(ValueError):
    """A config option with a value the run cannot use; the message names the option."""


def one_of(*allowed: Any) -> Rule:
    def rule(value: Any) -> str | None:
        return None if value in allowed else f"must be one of {list(allowed)}"

    return rule


def subset_of(*allowed: str, nonempty: bool = True) -> Rule:
    def rule(value: Any) -> str | None:
        if not isinstance(value, Sequence) or isinstance(value, str):
            return f"must be a list drawn from {list(allowed)}"
        bad = [v for v in value if v not in allowed]
        if bad:
            return f"has {bad}; allowed values are {list(allowed)}"
        if nonempty and not value:
            return f"must name at least one of {list(allowed)}"
        return None

    return rule


def auto_or(rule: Rule) -> Rule:
    """``auto`` (the data-size rule sets it when the run starts, reddino.ssl.data_size_rule) or ``rule``."""

    def check(value: Any) -> str | None:
        problem = None if value == "auto" else rule(value)
        return None if problem is None else f"{problem} (or auto)"

    return check


def integer(minimum: int | None = None, optional: bool = False) -> Rule:
    def rule(value: Any) -> str | None:
        if value is None:
            return None if optional else "must be an integer, not null"
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer{' or null' if optional else ''}"
        if minimum is not None and value < minimum:
            return f"must be at least {minimum}"
        return None

    return rule


def number(minimum: float | None = None, optional: bool = False, exclusive: bool = False) -> Rule:
    def rule(value: Any) -> str | None:
        if value is None:
            return None if optional else "must be a number, not null"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        if minimum is not None and (value <= minimum if exclusive else value < minimum):
            return f"must be {'greater than' if exclusive else 'at least'} {minimum}"
        return None

    return rule


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _lookup(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return MISSING
        node = node[part]
    return node


def check_config(cfg: DictConfig | Mapping[str, Any], rules: Mapping[str, Rule]) -> None:
    """Raise ``ConfigError`` listing every option of ``rules`` whose value breaks its rule."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    problems = [
        f"{option} is required here (the config's `required` list): set {option}=..."
        for option in plain.get("required") or []
        if _lookup(plain, option) in (None, MISSING)
    ]
    for option, rule in rules.items():
        value = _lookup(plain, option)
        if value is MISSING:
            continue
        wrong = rule(value)
        if wrong:
            problems.append(f"{option}={value!r}: {wrong}")
    if problems:
        raise ConfigError("; ".join(problems))


def _positive_ints(value: Any) -> str | None:
    ok = (
        isinstance(value, list)
        and value
        and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in value)
    )
    return None if ok else "must be a non-empty list of positive integers"


def prepare_rules() -> dict[str, Rule]:
    """``conf/prepare.yaml`` (reddino-prepare)."""
    from reddino.data.manifest import UNIT_KINDS

    return {
        "units": subset_of(*UNIT_KINDS),
        "offline": boolean,
        "allow_unverified": boolean,
        "missing_sources": one_of("skip", "error"),
        "progress": boolean,
        "chunk_size": integer(minimum=1),
        "max_images": integer(minimum=1, optional=True),
        "seed": integer(),
        "materialise": boolean,
        "materialise_cache_size": integer(minimum=1),
        **unit_cutting_rules(),
        "dedup.hash_size": integer(minimum=2),
        "dedup.max_distance": integer(minimum=0),
    }


def unit_cutting_rules() -> dict[str, Rule]:
    """``conf/unit_cutting/`` (patches, cells, segmentation), shared by reddino-prepare and reddino-embed."""
    from reddino.data.segment import BACKENDS, FOREGROUND_MAPS

    return {
        "patches.size": integer(minimum=8),
        "patches.min_foreground": number(minimum=0.0),
        "patches.target_pixel_size_um": number(minimum=0.0, optional=True, exclusive=True),
        "cells.point_window": integer(minimum=4),
        "cells.box_context": number(minimum=1.0),
        "cells.segment": one_of("unlabelled", "always", "never"),
        "cells.min_area": integer(minimum=0),
        "segmentation.backend": one_of(*BACKENDS),
        "segmentation.classical.cell_diameter": number(minimum=0.0, optional=True, exclusive=True),
        "segmentation.classical.foreground": one_of(*FOREGROUND_MAPS),
        "segmentation.cellpose.diameter": number(minimum=0.0, optional=True, exclusive=True),
    }


def embed_rules() -> dict[str, Rule]:
    """``conf/embed.yaml`` (reddino-embed)."""
    from reddino.eval.features import POOLINGS

    return {
        "mode": one_of("image", "patch", "cell"),
        "pooling": one_of(*POOLINGS),
        "whitening": boolean,
        "batch_size": integer(minimum=1),
        "accelerator": one_of(*FEATURE_ACCELERATORS),
        "precision": one_of(*FEATURE_PRECISIONS),
        "num_workers": integer(minimum=0),
        **unit_cutting_rules(),
    }


def loader_rules() -> dict[str, Rule]:
    """The data node shared by pretraining and its report."""
    from reddino.data.datamodules import SOURCE_WEIGHTINGS
    from reddino.data.manifest import UNIT_KINDS

    return {
        "data.loader.batch_size": integer(minimum=1),
        "data.loader.num_workers": integer(minimum=0),
        "data.loader.image_cache_size": integer(minimum=0),
        "data.loader.source_weighting": one_of(*SOURCE_WEIGHTINGS),
        "data.pretrain_units.unit": one_of(*UNIT_KINDS),
        "data.eval_units.unit": one_of(*UNIT_KINDS),
    }


def pretrain_rules() -> dict[str, Rule]:
    """``conf/pretrain.yaml`` (reddino-pretrain, the ablation jobs)."""
    from reddino.ssl.centering import CENTERING_METHODS

    return {
        **loader_rules(),
        "seed": integer(),
        "ssl.optim.epochs": integer(minimum=1),
        "ssl.optim.epoch_length": integer(minimum=1),
        "ssl.optim.base_lr": number(minimum=0.0, exclusive=True),
        "ssl.optim.freeze_backbone_epochs": number(minimum=0.0),
        "ssl.optim.backbone_lr_mult": number(minimum=0.0),
        "augment.n_global": one_of(N_GLOBAL_CROPS),  # the losses pair two global views
        "ssl.centering.method": one_of(*CENTERING_METHODS),
        "ssl.head.n_prototypes": auto_or(integer(minimum=2)),
        "ssl.head.ibot_n_prototypes": auto_or(integer(minimum=2)),
        "ssl.teacher.teacher_temp": auto_or(number(minimum=0.0, exclusive=True)),
        "ssl.teacher.warmup_teacher_temp": auto_or(number(minimum=0.0, exclusive=True)),
        "ssl.teacher.momentum_teacher": auto_or(number(minimum=0.0)),
        "crops.global_size": integer(minimum=8),
        "crops.n_local": integer(minimum=0),
        "fast_path.enabled": one_of("auto", True, False),
        **probe_rules("report.probes"),
        "report.n_splits": integer(minimum=2),
        "report.max_units": integer(minimum=1, optional=True),
        "report.batch_size": integer(minimum=1),
        "whitening.enabled": boolean,
        "whitening.shrinkage": number(minimum=0.0, exclusive=True),
        "whitening.max_units": integer(minimum=2),
        "whitening.batch_size": integer(minimum=1),
    }


def _device(value: Any) -> str | None:
    ok = isinstance(value, str) and (value in ("auto", "cpu", "cuda") or value.startswith("cuda:"))
    return None if ok else "must be auto, cpu, cuda or cuda:<n>"


def probe_rules(node: str) -> dict[str, Rule]:
    """A ``conf/probes/reference.yaml`` node placed at ``node``."""
    return {
        f"{node}.threads": auto_or(integer(minimum=1)),
        f"{node}.linear.backend": one_of("torch", "sklearn"),
        f"{node}.linear.max_iter": integer(minimum=1),
        f"{node}.knn.metric": one_of("euclidean", "cosine"),
        f"{node}.knn.chunk_size": integer(minimum=1),
        f"{node}.knn.device": _device,
        f"{node}.linear.device": _device,
        f"{node}.knn.ks": _positive_ints,
    }


def eval_rules() -> dict[str, Rule]:
    """``conf/eval.yaml`` (reddino-eval)."""
    from reddino.eval.features import POOLINGS
    from reddino.eval.protocols import PROTOCOLS

    return {
        "feature_sets": subset_of("pretrained", "random_init", "morphometrics"),
        "max_units": integer(minimum=1, optional=True),
        "features.pooling": one_of(*POOLINGS),
        "features.whitening": boolean,
        "features.batch_size": integer(minimum=1),
        "features.num_workers": integer(minimum=0),
        "features.accelerator": one_of(*FEATURE_ACCELERATORS),
        "features.precision": one_of(*FEATURE_PRECISIONS),
        **probe_rules("probes"),
        "eval.protocol": one_of(*PROTOCOLS),
        "eval.group_by": one_of("file", "subject", "source", None),
        "data.box_context": number(minimum=1.0),
        "eval.n_splits": integer(minimum=2),
    }


def pack_rules() -> dict[str, Rule]:
    """``conf/pack.yaml`` (reddino-pack)."""
    return {
        "quality": integer(minimum=1),
        "workers": integer(minimum=1, optional=True),
        "small_file_bytes": integer(minimum=0),
        "keep_original_if_smaller": boolean,
        "progress": boolean,
    }


def check_crop_sizes(cfg: DictConfig) -> None:
    """Every crop the model sees must be a whole number of patches (a 96 px local crop for a patch-14
    model fails at its first step otherwise)."""
    patch = int(cfg.model.patch_size)
    sizes = {"crops.global_size": int(cfg.crops.global_size)}
    if int(cfg.crops.n_local) > 0:
        sizes["crops.local_size"] = int(cfg.crops.local_size)
    wrong = [f"{k}={v}" for k, v in sizes.items() if v % patch]
    if wrong:
        raise ConfigError(
            f"{', '.join(wrong)}: not a multiple of model.patch_size={patch}; use multiples of {patch} "
            f"(e.g. {7 * patch} for local crops, {16 * patch} for global ones)"
        )


def check_schedule_length(cfg: DictConfig) -> None:
    """``trainer.max_steps`` must end the run inside the schedules (lr, temperatures, momentum are
    defined up to ``ssl.optim.total_steps``): -1 or a larger value would train on past their end."""
    total = int(cfg.ssl.optim.total_steps)
    steps = cfg.trainer.max_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
        raise ConfigError(
            f"trainer.max_steps={steps!r}: must be between 1 and ssl.optim.total_steps={total} "
            "(the schedules end there); lengthen the run with ssl.optim.epochs / ssl.optim.epoch_length"
        )
