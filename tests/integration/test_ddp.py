"""Data parallelism through Lightning's DDP strategy on CPU (gloo, 2 processes).

One global batch split over 2 ranks must give the losses and teacher targets of 1 process on the whole
batch (Sinkhorn-Knopp and centering reduce over ranks), and the ranks must keep one teacher. The CLI test
checks that Hydra and DDP agree on one run directory, also inside a multirun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pretrain_cli import run_pretrain
from pytorch_lightning.strategies import DDPStrategy
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from reddino.data.masking import assemble_batch
from reddino.ssl.module import DinoV2Module
from reddino.workflows.pretraining import build_collator, build_module

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORLD = 2
IMAGES = 8  # global batch: 4 images per rank
STEPS = 3


class RecordingModule(DinoV2Module):
    """Keeps every step's loss terms and teacher targets, and saves them with the teacher at the end."""

    record_dir: str = ""

    def on_train_start(self) -> None:
        super().on_train_start()
        self.records: list[dict] = []

    def teacher_targets(self, batch, teacher_temp):
        cls_probs, patch_probs = super().teacher_targets(batch, teacher_temp)
        self.records.append({"cls_probs": cls_probs.clone(), "patch_probs": patch_probs.clone()})
        return cls_probs, patch_probs

    def log_step(self, terms, total, probs, cls, batch_size):
        self.records[-1]["terms"] = {k: float(v.detach()) for k, v in terms.items()}
        super().log_step(terms, total, probs, cls, batch_size)

    def on_train_end(self) -> None:
        super().on_train_end()
        torch.save(
            {
                "records": self.records,
                "teacher": {k: v.detach().clone() for k, v in self.teacher.state_dict().items()},
                "rank_difference": self.teacher_rank_difference,
            },
            Path(self.record_dir) / f"rank{self.global_rank}.pt",
        )


class FixedBatches(pl.LightningDataModule):
    """The same global batches every run; each rank serves its contiguous share of the images."""

    def __init__(self, crops: torch.Tensor, masks: torch.Tensor) -> None:
        super().__init__()
        self.crops, self.masks = crops, masks  # (steps, 2 * IMAGES, ...) crop-major

    @property
    def batch_size(self) -> int:
        return IMAGES // self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        rows = crop_rows(self.trainer.global_rank, self.trainer.world_size)
        batches = [
            assemble_batch(c[rows], None, m[rows], 0, torch.arange(len(rows)))
            for c, m in zip(self.crops, self.masks, strict=True)
        ]
        return DataLoader(batches, batch_size=None, shuffle=False)


def crop_rows(rank: int, world: int) -> list[int]:
    """Rows of the global crop-major batch (crop c of image i at c * IMAGES + i) that ``rank`` holds."""
    per_rank = IMAGES // world
    images = range(rank * per_rank, (rank + 1) * per_rank)
    return [c * IMAGES + i for c in range(2) for i in images]


def train(cfg, data: FixedBatches, world: int, out: Path) -> list[dict]:
    torch.manual_seed(0)
    module = build_module(cfg, instantiate(cfg.model))
    module.__class__ = RecordingModule
    module.record_dir = str(out)
    out.mkdir()
    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo") if world > 1 else "auto"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=data)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("method", ["sinkhorn_knopp", "centering"])
def test_two_ranks_match_one_process_on_the_same_global_batch(make_cfg, tmp_path, method):
    cfg = make_cfg("debug=fast", f"ssl.centering.method={method}")
    size = cfg.crops.global_size
    gen = torch.Generator().manual_seed(1)
    crops = torch.randn(STEPS, 2 * IMAGES, 3, size, size, generator=gen)
    collator = build_collator(cfg)
    masks = torch.stack([collator._draw_masks(2 * IMAGES)[0] for _ in range(STEPS)])
    data = FixedBatches(crops, masks)

    single = train(cfg, data, 1, tmp_path / "one")[0]
    ranks = train(cfg, data, WORLD, tmp_path / "two")

    for step in range(STEPS):
        one = single["records"][step]
        for term, value in one["terms"].items():  # DDP averages the ranks' losses (and gradients)
            mean = sum(r["records"][step]["terms"][term] for r in ranks) / WORLD
            assert mean == pytest.approx(value, rel=1e-4, abs=1e-6), (step, term)
        if step > 0:
            continue  # later steps also carry float-rounding differences of the all-reduced gradients
        for rank, r in enumerate(ranks):
            rows = crop_rows(rank, WORLD)
            torch.testing.assert_close(
                r["records"][0]["cls_probs"], one["cls_probs"][rows], atol=1e-6, rtol=1e-5
            )
            per_crop = masks[0].sum(-1).tolist()
            one_patches = one["patch_probs"].split(per_crop)
            rank_patches = r["records"][0]["patch_probs"].split([per_crop[i] for i in rows])
            for local, row in enumerate(rows):
                torch.testing.assert_close(rank_patches[local], one_patches[row], atol=1e-6, rtol=1e-5)

    # one teacher on every rank, bit for bit, and the same network as the single process trained
    assert [r["rank_difference"] for r in ranks] == [0.0, 0.0]
    for key, value in ranks[0]["teacher"].items():
        assert torch.equal(value, ranks[1]["teacher"][key]), key
        torch.testing.assert_close(value, single["teacher"][key], atol=1e-5, rtol=1e-4)


def test_ddp_multirun_job_keeps_one_run_directory(tmp_path):
    """``reddino-pretrain -m trainer=ddp`` on 2 CPU processes: every rank works in the job's folder."""
    env = {**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "reddino.pretrain",
        "-m",
        "debug=fast",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.benchmark=false",
        "report.enabled=false",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "seed=0",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    assert not (tmp_path / "outputs").exists(), "a DDP child created a single-run folder"
    jobs = [p for p in (tmp_path / "multirun").glob("pretrain/*/*") if p.is_dir()]
    assert [j.name for j in jobs] == ["0"], jobs
    job = jobs[0]
    results = json.loads((job / "results.json").read_text())
    assert results["world_size"] == 2 and results["teacher_rank_difference"] == 0.0
    assert results["steps"] > 0 and (job / "export" / "model.safetensors").is_file()
    assert (job / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP through Lightning needs CUDA")
def test_fsdp_run_trains_exports_and_reports(tmp_path):
    """``trainer=fsdp`` end to end on the GPUs there are (2 at most): sharded EMA and clipping, gathered
    export, k-NN report. One GPU still runs Lightning's FSDP wrapping, flat parameters and gathers."""
    devices = min(2, torch.cuda.device_count())
    run_pretrain(tmp_path, "debug=fast", "trainer=fsdp", f"trainer.devices={devices}")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == devices and results["teacher_rank_difference"] is None
    assert results["steps"] > 0
    exported = load_file(tmp_path / "run" / "export" / "model.safetensors")
    assert exported and not any("_orig_mod" in k or "_fsdp" in k for k in exported)
