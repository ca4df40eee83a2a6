"""The fast-path switches: resolution, fused attention, in-place block compilation, teacher inference mode."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from reddino.runtime.fast_path import FastPath, compile_blocks_, set_fused_attention_
from reddino.ssl.backbone import build_backbone, forward_tokens
from reddino.workflows.pretraining import build_module

SWITCHES = {
    "tf32": True,
    "fused_attention": True,
    "fused_adamw": True,
    "compile_blocks": True,
    "pin_memory": False,
    "teacher_inference_mode": True,
}


def tiny_vit():
    torch.manual_seed(0)
    overrides = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    return build_backbone("vit_small_patch14_dinov2", 32, 8, 0.0, 1e-5, False, overrides)


def test_auto_is_off_on_cpu_and_explicit_values_are_kept():
    auto = FastPath.from_config({"enabled": "auto", **SWITCHES}, "cpu")
    assert not any(vars(auto).values())
    forced = FastPath.from_config({"enabled": True, **SWITCHES}, "cpu")
    assert vars(forced) == SWITCHES
    if not torch.cuda.is_available():
        assert not any(vars(FastPath.from_config({"enabled": "auto", **SWITCHES}, "gpu")).values())
    with pytest.raises(ValueError, match=r"fast_path\.enabled"):
        FastPath.from_config({"enabled": "yes", **SWITCHES}, "cpu")


def test_fused_and_explicit_attention_agree():
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    assert set_fused_attention_(model, False) == 2
    explicit = forward_tokens(model, x).cls
    set_fused_attention_(model, True)
    torch.testing.assert_close(forward_tokens(model, x).cls, explicit, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_compiled_blocks_keep_names_and_outputs():
    model = tiny_vit().eval()
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, :5] = True
    expected = forward_tokens(model, x, masks).patches
    assert compile_blocks_(model) == 2
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    torch.testing.assert_close(forward_tokens(model, x, masks).patches, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["sinkhorn_knopp", "centering"])
def test_teacher_inference_mode_gives_the_no_grad_targets(make_cfg, method):
    from reddino.data.masking import assemble_batch

    cfg = make_cfg("debug=fast", f"ssl.centering.method={method}")
    size = cfg.crops.global_size
    grid = (size // cfg.model.patch_size) ** 2
    masks = torch.zeros(8, grid, dtype=torch.bool)
    masks[:4, : grid // 3] = True
    batches = [
        assemble_batch(torch.randn(8, 3, size, size), None, masks, 0, torch.arange(4)) for _ in range(3)
    ]
    targets = {}
    for inference in (False, True):
        torch.manual_seed(0)
        fast = FastPath.from_config({"enabled": True, **SWITCHES, "teacher_inference_mode": inference}, "cpu")
        module = build_module(cfg, instantiate(cfg.model), fast)
        assert module.teacher_inference_mode is inference
        # consecutive steps: moving-average centering applies the previous step's (lagged) update
        targets[inference] = [module.teacher_targets(b, 0.04) for b in batches]
    for plain, fast_targets in zip(targets[False], targets[True], strict=True):
        for a, b in zip(plain, fast_targets, strict=True):
            torch.testing.assert_close(a, b)
            assert not b.requires_grad
