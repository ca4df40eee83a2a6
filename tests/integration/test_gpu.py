"""The GPU fast path end to end (skipped without CUDA): bf16 autocast, TF32, flash attention, fused AdamW
and compiled blocks train the embedded debug run, export clean timm weights, and give the losses of the
plain fp32 path on the same batch up to bf16 rounding."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from pretrain_cli import run_pretrain
from safetensors.torch import load_file

from reddino.data.masking import assemble_batch
from reddino.runtime.fast_path import FastPath, apply_global_switches, compile_blocks_, set_fused_attention_
from reddino.workflows.pretraining import build_module

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_gpu_run_with_the_fast_path_trains_exports_and_reports(tmp_path):
    done = run_pretrain(tmp_path, "debug=fast", "trainer=gpu")
    assert "compile_blocks=True" in done.stdout + done.stderr, "the fast path was not switched on"
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] > 0
    exported = load_file(tmp_path / "run" / "export" / "model.safetensors")
    assert exported and not any("_orig_mod" in k for k in exported)
    assert all(torch.isfinite(v).all() for v in exported.values())


@pytest.fixture
def restore_tf32():
    """``apply_global_switches`` is process-wide: leave later tests on full fp32 matmuls."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    torch.set_float32_matmul_precision(precision)


def test_fast_path_losses_match_the_plain_fp32_path(make_cfg, restore_tf32):
    cfg = make_cfg("debug=fast", "crops.global_size=56", "model.overrides.embed_dim=64")
    size, device = cfg.crops.global_size, torch.device("cuda")
    grid = (size // cfg.model.patch_size) ** 2
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(8, grid, dtype=torch.bool)
    masks[:4, : grid // 3] = True
    crops = torch.randn(8, 3, size, size, generator=generator)
    batch = assemble_batch(crops, None, masks, 0, torch.arange(4))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    losses = {}
    for enabled in (False, True):
        fast = FastPath.from_config({**cfg.fast_path, "enabled": enabled}, "gpu")
        apply_global_switches(fast)
        torch.manual_seed(0)
        module = build_module(cfg, instantiate(cfg.model), fast)
        set_fused_attention_(module, fast.fused_attention)
        if fast.compile_blocks:
            for nets in (module.student, module.teacher):
                compile_blocks_(nets["backbone"])
        module.to(device)
        schedules = module.build_schedules(8).values(0)
        with torch.autocast("cuda", torch.bfloat16, enabled=enabled):
            cls_probs, patch_probs = module.teacher_targets(batch, schedules["teacher_temp"])
            _, total, _ = module.student_losses(batch, cls_probs, patch_probs)
        losses[enabled] = float(total)
    assert losses[True] == pytest.approx(losses[False], rel=2e-2), losses


def test_probes_on_the_gpu_give_the_cpu_predictions():
    """k-NN (chunked matmul + top-k) and the linear probe on CUDA: the CPU's k-NN votes exactly."""
    import numpy as np

    from reddino.eval.protocols import make_splits
    from reddino.eval.session import score_feature_set

    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 3, 600))
    x = torch.from_numpy(rng.normal(size=(600, 32)).astype(np.float32)) + labels[:, None]
    splits = make_splits("grouped_kfold", labels.numpy(), np.arange(600) % 30, None, None, 5, 0)
    knn = {"enabled": True, "ks": [1, 20], "metric": "euclidean", "temperature": 0.07, "chunk_size": 128}
    linear = {"enabled": True, "backend": "torch", "C": None, "max_iter": 200}
    scores = {
        device: score_feature_set(
            x,
            labels,
            splits,
            ["a", "b", "c"],
            {"linear": {**linear, "device": device}, "knn": {**knn, "device": device}},
            False,
        )
        for device in ("cpu", "cuda")
    }
    for probe in ("knn1", "knn20"):
        assert scores["cuda"][probe]["confusion"] == scores["cpu"][probe]["confusion"]
    assert (
        abs(scores["cuda"]["linear"]["weighted_f1"]["mean"] - scores["cpu"]["linear"]["weighted_f1"]["mean"])
        < 0.02
    )
