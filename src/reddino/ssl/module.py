"""The DINOv2 / RedDino LightningModule: wires backbone, heads, losses, centering, schedules and EMA.

All math lives in the sibling modules (losses, centering, schedules, ema, param_groups); this class only
decides what runs on which tensors in which order, following the reference's loss assembly
(docs/reference_recipe.md §7) and its optimiser / teacher update (§5-§6).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from reddino.runtime.distributed import all_reduce_sum_, max_rank_difference
from reddino.ssl.backbone import forward_tokens
from reddino.ssl.centering import build_centering
from reddino.ssl.chunked_head import (
    ChunkedTargets,
    chunked_dino_loss_terms,
    chunked_ibot_loss,
    chunked_targets,
)
from reddino.ssl.ema import ema_param_pairs, ema_update_
from reddino.ssl.heads import DINOHead
from reddino.ssl.losses import dino_loss_terms, ibot_patch_loss, koleo_loss
from reddino.ssl.monitors import collapse_monitors
from reddino.ssl.param_groups import apply_schedules_, build_param_groups
from reddino.ssl.schedules import SSLSchedules, scale_lr
from reddino.ssl.sharding import clip_grad_norm_, sharded_ema_update_
from reddino.weights.export import timm_state_dict

log = logging.getLogger("reddino.ssl")


def build_ssl_networks(backbone: VisionTransformer, head: Mapping[str, Any]) -> nn.ModuleDict:
    """Backbone plus DINO head (and a separate iBOT head when not shared), keyed as in DINOv2 checkpoints."""
    dim = int(backbone.embed_dim)
    common = dict(
        hidden_dim=head["hidden_dim"], bottleneck_dim=head["bottleneck_dim"], nlayers=head["nlayers"]
    )
    nets = nn.ModuleDict(
        {"backbone": backbone, "dino_head": DINOHead(in_dim=dim, out_dim=head["n_prototypes"], **common)}
    )
    if not head["shared_ibot_head"]:
        nets["ibot_head"] = DINOHead(in_dim=dim, out_dim=head["ibot_n_prototypes"], **common)
    return nets


def assert_finite(terms: Mapping[str, Tensor], step: int) -> None:
    """Stop the run with a message naming what diverged (the reference only asserted 'NaN detected')."""
    bad = {k: float(v.detach()) for k, v in terms.items() if not torch.isfinite(v).all()}
    if bad:
        values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        raise FloatingPointError(
            f"non-finite loss at step {step}: {sorted(bad)} diverged ({values}). Lower the learning rate, "
            "check the inputs for NaNs, or raise ssl.loss.koleo_eps if KoLeo is the culprit."
        )


class DinoV2Module(pl.LightningModule):
    """Student/teacher self-distillation with DINO (CLS) and iBOT (masked patch) losses."""

    def __init__(
        self,
        backbone: VisionTransformer,
        head: Mapping[str, Any],
        loss: Mapping[str, Any],
        centering: Mapping[str, Any],
        teacher: Mapping[str, Any],
        optim: Mapping[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer],
        n_local_crops: int,
        fused_optimizer: bool,
        teacher_inference_mode: bool,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "optimizer"])  # checkpoints hold plain values only
        self.optimizer_factory = optimizer
        self.student = build_ssl_networks(backbone, head)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.loss_cfg = dict(loss)
        self.teacher_cfg = dict(teacher)
        self.optim_cfg = dict(optim)
        self.n_local_crops = int(n_local_crops)
        self.fused_optimizer = fused_optimizer
        self.teacher_inference_mode = teacher_inference_mode
        method, iters, mom = (
            centering["method"],
            centering["sinkhorn_iterations"],
            centering["center_momentum"],
        )
        ibot_k = head["n_prototypes"] if head["shared_ibot_head"] else head["ibot_n_prototypes"]
        self.dino_centering = build_centering(method, head["n_prototypes"], iters, mom, patch=False)
        self.ibot_centering = build_centering(method, ibot_k, iters, mom, patch=True)
        # ssl.head.chunked: teacher targets and student cross-entropy over row chunks (no [N, K] tensor)
        self.chunk_size: int | None = int(head["chunk_size"]) if head["chunked"] else None
        self.schedules: SSLSchedules | None = None
        self._step_values: dict[str, float] = {}
        self._ema_pairs: tuple[list[Tensor], list[Tensor]] = ([], [])
        self.teacher_rank_difference: float | None = None  # measured at the end of fit

    # ----------------------------------------------------------------------------------- set-up
    @property
    def n_blocks(self) -> int:
        return len(self.student["backbone"].blocks)

    def global_batch_size(self) -> int:
        """Images per optimiser step over all devices: the batch the lr scaling rule refers to."""
        loader = self.trainer.datamodule.batch_size if self.trainer.datamodule is not None else None
        if loader is None:
            raise RuntimeError("DinoV2Module needs a datamodule exposing batch_size for the lr scaling rule")
        return int(loader) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def build_schedules(self, global_batch: int) -> SSLSchedules:
        o, t = self.optim_cfg, self.teacher_cfg
        return SSLSchedules.from_config(
            total_steps=int(o["total_steps"]),
            epoch_length=int(o["epoch_length"]),
            lr=scale_lr(o["base_lr"], global_batch, o["scaling_rule"]),
            min_lr=o["min_lr"],
            warmup_epochs=o["warmup_epochs"],
            weight_decay=o["weight_decay"],
            weight_decay_end=o["weight_decay_end"],
            momentum_teacher=t["momentum_teacher"],
            final_momentum_teacher=t["final_momentum_teacher"],
            warmup_teacher_temp=t["warmup_teacher_temp"],
            teacher_temp=t["teacher_temp"],
            warmup_teacher_temp_epochs=t["warmup_teacher_temp_epochs"],
            freeze_last_layer_epochs=o["freeze_last_layer_epochs"],
            freeze_backbone_epochs=o["freeze_backbone_epochs"],
            backbone_lr_mult=o["backbone_lr_mult"],
        )

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.schedules is None:
            self.schedules = self.build_schedules(self.global_batch_size())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = build_param_groups(
            self.student,
            patch_embed_lr_mult=self.optim_cfg["patch_embed_lr_mult"],
            layerwise_decay=self.optim_cfg["layerwise_decay"],
            n_blocks=self.n_blocks,
        )
        for g in groups:
            g.pop("names", None)
        fused = {"fused": True} if self.fused_optimizer and self.device.type == "cuda" else {}
        return self.optimizer_factory(groups, lr=0.0, **fused)

    # -------------------------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        assert self.schedules is not None
        self._step_values = self.schedules.values(self.global_step)
        v = self._step_values
        for opt in self.trainer.optimizers:
            apply_schedules_(
                opt,
                lr=v["lr"],
                weight_decay=v["weight_decay"],
                last_layer_lr=v["last_layer_lr"],
                backbone_lr=v["backbone_lr"],
            )

    def ibot_head(self, nets: nn.ModuleDict) -> nn.Module:
        return nets["ibot_head"] if "ibot_head" in nets else nets["dino_head"]

    def teacher_targets(
        self, batch: Mapping[str, Any], teacher_temp: float
    ) -> tuple[Tensor | ChunkedTargets, Tensor | ChunkedTargets]:
        """Teacher CLS and masked-patch target distributions on the unmasked global crops.

        The teacher forward runs under ``inference_mode`` on the fast path; the centering then runs under
        ``no_grad`` and writes fresh tensors, which the student's backward may save (inference tensors
        cannot be saved, and copying [M, 131072] targets would cost ~11 GB on a ViT-S batch).
        """
        inference = self.teacher_inference_mode and self.fsdp_root() is None  # FSDP gathers need autograd-
        if self.chunk_size is not None:
            return self._chunked_teacher_targets(batch, teacher_temp, inference)
        with torch.inference_mode() if inference else torch.no_grad():  # visible (non-inference) tensors
            cls_logits, patch_logits = self._teacher_logits(batch)
        with torch.no_grad():
            n_masked = all_reduce_sum_(batch["n_masked_patches"].detach().clone().to(patch_logits.device))
            cls_probs = self.dino_centering.targets(cls_logits, teacher_temp)
            patch_probs = self.ibot_centering.targets(patch_logits, teacher_temp, n_samples_total=n_masked)
        return cls_probs, patch_probs

    def _chunked_teacher_targets(
        self, batch: Mapping[str, Any], teacher_temp: float, inference: bool
    ) -> tuple[ChunkedTargets, ChunkedTargets]:
        """Teacher targets kept as bottleneck features + scaling vectors (``reddino.ssl.chunked_head``)."""
        assert self.chunk_size is not None
        self.teacher.eval()
        with torch.inference_mode() if inference else torch.no_grad():
            out = forward_tokens(self.teacher["backbone"], batch["global_crops"])
            dino, ibot = self.teacher["dino_head"], self.ibot_head(self.teacher)
            cls_z = dino.bottleneck(out.cls)
            patch_z = ibot.bottleneck(out.patches.flatten(0, 1)[batch["mask_indices"]])
            dino_w, ibot_w = dino.prototypes(), ibot.prototypes()
        with torch.no_grad():
            n_masked = all_reduce_sum_(batch["n_masked_patches"].detach().clone().to(patch_z.device))
            cls = chunked_targets(self.dino_centering, cls_z, dino_w, teacher_temp, self.chunk_size)
            patches = chunked_targets(
                self.ibot_centering, patch_z, ibot_w, teacher_temp, self.chunk_size, n_samples_total=n_masked
            )
        return cls, patches

    def _teacher_logits(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Head outputs (autocast dtype) for the CLS tokens and the patches the student sees masked."""
        self.teacher.eval()
        out = forward_tokens(self.teacher["backbone"], batch["global_crops"])
        cls_logits = self.teacher["dino_head"](out.cls)
        patches = out.patches.flatten(0, 1)[batch["mask_indices"]]
        return cls_logits, self.ibot_head(self.teacher)(patches)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        cls_probs, patch_probs = self.teacher_targets(batch, self._step_values["teacher_temp"])
        terms, total, student_cls = self.student_losses(batch, cls_probs, patch_probs)
        self.log_step(terms, total, cls_probs, student_cls, batch_size=batch["global_crops"].shape[0] // 2)
        return total

    def student_losses(
        self, batch: Mapping[str, Any], cls_probs: Tensor | Any, patch_probs: Tensor | Any
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Student forward (masked global crops, local crops if any) and the weighted loss terms.

        Returns the terms, their weighted total and the student's global-crop CLS tokens (for monitoring).
        """
        student_temp = self.loss_cfg["student_temp"]
        out = forward_tokens(self.student["backbone"], batch["global_crops"], batch["masks"])
        if self.chunk_size is not None:
            terms = self._chunked_student_terms(batch, out, cls_probs, patch_probs, student_temp)
            return self._weighted(terms, out.cls)
        cls_logits = self.student["dino_head"](out.cls)
        patch_logits = self.ibot_head(self.student)(out.patches.flatten(0, 1)[batch["mask_indices"]])
        local_logits = None
        if self.n_local_crops > 0:
            local = forward_tokens(self.student["backbone"], batch["local_crops"])
            local_logits = self.student["dino_head"](local.cls)

        terms = dino_loss_terms(cls_logits, cls_probs, local_logits, self.n_local_crops, student_temp)
        terms["ibot"] = ibot_patch_loss(
            patch_logits, patch_probs, batch["masks_weight"], batch["n_images"], student_temp
        )
        return self._weighted(terms, out.cls)

    def _chunked_student_terms(
        self, batch: Mapping[str, Any], out: Any, cls_targets: Any, patch_targets: Any, student_temp: float
    ) -> dict[str, Tensor]:
        """DINO and iBOT terms from the student's bottleneck features, chunk by chunk."""
        assert self.chunk_size is not None
        dino, ibot = self.student["dino_head"], self.ibot_head(self.student)
        z_local = None
        if self.n_local_crops > 0:
            z_local = dino.bottleneck(forward_tokens(self.student["backbone"], batch["local_crops"]).cls)
        terms = chunked_dino_loss_terms(
            dino.bottleneck(out.cls),
            dino.prototypes(),
            cls_targets,
            z_local,
            self.n_local_crops,
            student_temp,
            self.chunk_size,
        )
        terms["ibot"] = chunked_ibot_loss(
            ibot.bottleneck(out.patches.flatten(0, 1)[batch["mask_indices"]]),
            ibot.prototypes(),
            patch_targets,
            batch["masks_weight"],
            batch["n_images"],
            student_temp,
            self.chunk_size,
        )
        return terms

    def _weighted(self, terms: dict[str, Tensor], cls: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """KoLeo (when on) added to the terms, and their weighted total."""
        weights = {"dino_global": "dino_weight", "dino_local": "dino_weight", "ibot": "ibot_weight"}
        if self.loss_cfg["koleo_weight"] > 0:
            chunks = cls.chunk(2)
            terms["koleo"] = sum(koleo_loss(c, self.loss_cfg["koleo_eps"]) for c in chunks)
            weights["koleo"] = "koleo_weight"
        total = sum(self.loss_cfg[weights[k]] * v for k, v in terms.items())
        assert_finite({**terms, "total": total}, self.global_step)
        return terms, total, cls

    def ema_step(self) -> None:
        """teacher <- m * teacher + (1 - m) * student with this step's momentum."""
        root = self.fsdp_root()
        if root is not None:
            sharded_ema_update_(root, self.teacher, self.student, self._step_values["momentum"])
            return
        teacher, student = self._ema_pairs
        ema_update_(teacher, student, self._step_values["momentum"])

    def log_step(
        self,
        terms: dict[str, Tensor],
        total: Tensor,
        probs: Tensor | ChunkedTargets,
        cls: Tensor,
        batch_size: int,
    ) -> None:
        """Loss terms, schedules and collapse monitors (``reddino.ssl.monitors``; the CollapseGuard
        callback reads them)."""
        logs = {f"train/{k}": v.detach() for k, v in terms.items()}
        logs["train/loss"] = total.detach()
        logs.update({f"schedule/{k}": float(v) for k, v in self._step_values.items()})
        with torch.no_grad():
            monitors = collapse_monitors(probs, self.student["dino_head"], cls)
        uniform_std = cls.shape[-1] ** -0.5  # the spread is the std over this uniform-sphere value
        logs.update({f"monitor/{k}": v for k, v in monitors.items()})
        logs["monitor/cls_std"] = monitors["cls_spread"] * uniform_std
        logs["monitor/cls_std_uniform"] = torch.tensor(uniform_std)
        self.log_dict(
            logs, on_step=True, on_epoch=False, prog_bar=False, batch_size=batch_size, sync_dist=False
        )
        self.log("loss", total.detach(), prog_bar=True, on_step=True, batch_size=batch_size)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm=None,
    ) -> None:
        """Clip each student submodule separately, as the reference does (backbone and heads)."""
        clip = self.optim_cfg["clip_grad"]
        if clip and clip > 0:
            sharded = self.fsdp_root() is not None
            for sub in self.student.values():
                clip_grad_norm_(sub.parameters(), clip, sharded)

    def fsdp_root(self) -> FSDP | None:
        """The FSDP unit Lightning wrapped this module in, when training is sharded (``trainer=fsdp``)."""
        model = self._trainer.strategy.model if self._trainer is not None else None
        return model if isinstance(model, FSDP) else None

    def on_train_start(self) -> None:
        if self.fsdp_root() is None:  # sharded training pairs parameters inside each update
            self._ema_pairs = ema_param_pairs(self.teacher, self.student)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Student step, then the EMA teacher update, inside the same Lightning step.

        Done here rather than in ``on_train_batch_end``: Lightning runs callbacks' batch-end hooks
        (ModelCheckpoint) before the module's, so a checkpoint would hold a teacher one update behind
        its student; and with gradient accumulation the teacher must move once per optimiser step.
        """
        super().optimizer_step(*args, **kwargs)
        self.ema_step()

    def on_train_end(self) -> None:
        """Check that data parallelism kept one teacher: every rank must hold identical weights.

        Logged (and written to results.json by reddino-pretrain) rather than raised: the export of a
        long run is still worth keeping when the check fails.
        """
        if self.fsdp_root() is not None:
            return  # each rank holds different shards by design
        self.teacher_rank_difference = max_rank_difference(list(self.teacher.parameters()))
        if self.teacher_rank_difference != 0.0:
            log.error(
                f"teacher weights differ between the {self.trainer.world_size} ranks (fingerprint difference "
                f"{self.teacher_rank_difference:.3g}): the EMA saw different students, i.e. gradients were "
                "not synchronised"
            )

    # ------------------------------------------------------------------------------------ export
    def teacher_backbone_state(self) -> dict[str, Tensor]:
        """Teacher backbone weights with timm key names (what gets exported and evaluated)."""
        return timm_state_dict(self.teacher["backbone"])
