"""Per-parameter lr / wd multipliers (docs/reference_recipe.md §6) on a tiny timm DINOv2 ViT with a
DINO-style head."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from reddino.ssl.param_groups import apply_schedules_, build_param_groups, layer_id, wd_multiplier

N_BLOCKS = 2


class Head(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, 8))
        self.last_layer = weight_norm(nn.Linear(8, 32, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(nn.functional.normalize(self.mlp(x), dim=-1))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = timm.create_model(
            "vit_small_patch14_dinov2",
            pretrained=False,
            img_size=28,
            patch_size=14,
            embed_dim=48,
            depth=N_BLOCKS,
            num_heads=2,
            num_classes=0,
        )
        self.backbone.register_parameter("mask_token", nn.Parameter(torch.zeros(1, 48)))
        self.dino_head = Head(48)


@pytest.fixture(scope="module")
def model() -> Model:
    return Model()


def group_of(groups: list[dict]) -> dict[str, dict]:
    return {name: g for g in groups for name in g["names"]}


def test_every_trainable_param_in_exactly_one_group(model):
    groups = build_param_groups(model, patch_embed_lr_mult=0.2, layerwise_decay=0.9, n_blocks=N_BLOCKS)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    for g in groups:
        assert set(g) == {"params", "names", "lr_multiplier", "wd_multiplier", "is_last_layer", "is_backbone"}
        assert g["is_backbone"] == all(n.startswith("backbone.") for n in g["names"])
        assert len(g["params"]) == len(g["names"])


def test_frozen_params_are_skipped():
    m = Model()
    m.backbone.pos_embed.requires_grad_(False)
    by_name = group_of(build_param_groups(m, patch_embed_lr_mult=0.2, layerwise_decay=1.0, n_blocks=N_BLOCKS))
    assert "backbone.pos_embed" not in by_name
    assert "backbone.cls_token" in by_name


def test_weight_decay_multipliers(model):
    by_name = group_of(
        build_param_groups(model, patch_embed_lr_mult=0.2, layerwise_decay=0.9, n_blocks=N_BLOCKS)
    )
    zero_wd = [n for n in by_name if n.endswith(".bias") or "norm" in n or n.endswith(".gamma")]
    assert any(".ls1.gamma" in n for n in zero_wd) and any("norm1" in n for n in zero_wd)
    assert "backbone.norm.weight" in zero_wd
    for name, g in by_name.items():
        assert g["wd_multiplier"] == (0.0 if name in zero_wd else 1.0), name
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["wd_multiplier"] == 1.0
    assert by_name["dino_head.mlp.0.weight"]["wd_multiplier"] == 1.0


def test_layerwise_decay_and_patch_embed_multipliers(model):
    d = 0.9
    by_name = group_of(
        build_param_groups(model, patch_embed_lr_mult=0.2, layerwise_decay=d, n_blocks=N_BLOCKS)
    )
    top = N_BLOCKS + 1
    expected = {
        "backbone.cls_token": d**top,
        "backbone.pos_embed": d**top,
        "backbone.mask_token": d**top,
        "backbone.patch_embed.proj.weight": d**top * 0.2,
        "backbone.patch_embed.proj.bias": d**top * 0.2,
        "backbone.blocks.0.attn.qkv.weight": d ** (top - 1),
        "backbone.blocks.0.ls2.gamma": d ** (top - 1),
        "backbone.blocks.1.mlp.fc2.bias": d ** (top - 2),
        "backbone.norm.weight": 1.0,
        "dino_head.mlp.2.weight": 1.0,
        "dino_head.last_layer.parametrizations.weight.original1": 1.0,
    }
    for name, mult in expected.items():
        assert by_name[name]["lr_multiplier"] == pytest.approx(mult), name


def test_last_layer_flag(model):
    by_name = group_of(
        build_param_groups(model, patch_embed_lr_mult=0.2, layerwise_decay=1.0, n_blocks=N_BLOCKS)
    )
    flagged = {n for n, g in by_name.items() if g["is_last_layer"]}
    assert flagged == {n for n in by_name if n.startswith("dino_head.last_layer.")}
    assert len(flagged) == 2  # weight-norm magnitude and direction


def test_groups_are_fused(model):
    groups = build_param_groups(model, patch_embed_lr_mult=0.2, layerwise_decay=1.0, n_blocks=N_BLOCKS)
    # RedDino (no layer decay): backbone {1, 0.2} lr x {wd, no wd}, head {wd, no wd}, the last layer
    assert len(groups) == 7
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"], g["is_backbone"]) for g in groups]
    assert len(set(keys)) == len(keys)
    decayed = build_param_groups(model, patch_embed_lr_mult=0.2, layerwise_decay=0.9, n_blocks=N_BLOCKS)
    # embeddings (wd), patch_embed (wd, no wd), 2 blocks x (wd, no wd), backbone top (no wd), head top
    # (wd, no wd), last layer
    assert len(decayed) == 11


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("blocks.3.attn.qkv.weight", 4),
        ("backbone.blocks.11.mlp.fc1.weight", 12),
        ("student.backbone.blocks.0.norm1.weight", 1),
        ("backbone.patch_embed.proj.weight", 0),
        ("backbone.register_tokens", 0),
        ("backbone.norm.weight", 13),
        ("dino_head.last_layer.weight_v", 13),
        ("dino_head.subblocks.2.weight", 13),
    ],
)
def test_layer_id_with_any_prefix(name, expected):
    assert layer_id(name, 12) == expected


def test_wd_multiplier_rules():
    assert wd_multiplier("dino_head.mlp.0.bias") == 0.0
    assert wd_multiplier("backbone.blocks.0.ls1.gamma") == 0.0
    assert wd_multiplier("backbone.fc_norm.weight") == 0.0
    assert wd_multiplier("dino_head.last_layer.weight_g") == 1.0
    assert wd_multiplier("backbone.blocks.0.attn.proj.weight") == 1.0


def test_apply_schedules_sets_lr_and_weight_decay(model):
    groups = build_param_groups(model, patch_embed_lr_mult=0.2, layerwise_decay=0.9, n_blocks=N_BLOCKS)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    apply_schedules_(optimizer, lr=1e-3, weight_decay=0.04, last_layer_lr=0.0, backbone_lr=1e-3)
    for g in optimizer.param_groups:
        base = 0.0 if g["is_last_layer"] else 1e-3
        assert g["lr"] == pytest.approx(base * g["lr_multiplier"])
        assert g["weight_decay"] == pytest.approx(0.04 * g["wd_multiplier"])
    patch = next(g for g in optimizer.param_groups if "backbone.patch_embed.proj.weight" in g["names"])
    assert patch["lr"] == pytest.approx(1e-3 * 0.9**3 * 0.2) and patch["weight_decay"] == pytest.approx(0.04)
    last = next(g for g in optimizer.param_groups if g["is_last_layer"])
    assert last["lr"] == 0.0
    apply_schedules_(optimizer, lr=2e-3, weight_decay=0.2, last_layer_lr=5e-4, backbone_lr=2e-3)
    assert last["lr"] == pytest.approx(5e-4)
    norm = next(g for g in optimizer.param_groups if "backbone.norm.weight" in g["names"])
    assert norm["lr"] == pytest.approx(2e-3) and norm["weight_decay"] == 0.0


def test_optimizer_step_runs_and_respects_zero_lr_for_frozen_last_layer():
    m = Model()
    groups = build_param_groups(m, patch_embed_lr_mult=0.2, layerwise_decay=1.0, n_blocks=N_BLOCKS)
    optimizer = torch.optim.AdamW(groups)
    apply_schedules_(optimizer, lr=1e-2, weight_decay=0.04, last_layer_lr=0.0, backbone_lr=1e-2)
    last_before = m.dino_head.last_layer.parametrizations.weight.original1.detach().clone()
    qkv_before = m.backbone.blocks[0].attn.qkv.weight.detach().clone()
    out = m.dino_head(m.backbone(torch.randn(2, 3, 28, 28)))
    out.square().mean().backward()
    optimizer.step()
    assert torch.equal(m.dino_head.last_layer.parametrizations.weight.original1, last_before)
    assert not torch.equal(m.backbone.blocks[0].attn.qkv.weight, qkv_before)


def test_a_frozen_backbone_stays_put_while_the_head_learns():
    """The head warm-up: backbone_lr 0 moves no backbone weight (no decay either), the heads move."""
    m = Model()
    groups = build_param_groups(m, patch_embed_lr_mult=0.2, layerwise_decay=1.0, n_blocks=N_BLOCKS)
    optimizer = torch.optim.AdamW(groups)
    apply_schedules_(optimizer, lr=1e-2, weight_decay=0.04, last_layer_lr=1e-2, backbone_lr=0.0)
    backbone_before = {k: v.detach().clone() for k, v in m.backbone.state_dict().items()}
    head_before = m.dino_head.mlp[0].weight.detach().clone()
    m.dino_head(m.backbone(torch.randn(2, 3, 28, 28))).square().mean().backward()
    optimizer.step()
    for key, value in m.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    assert not torch.equal(m.dino_head.mlp[0].weight, head_before)
