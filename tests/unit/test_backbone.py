"""Backbone factory, masked-token forward and the timm export round trip."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from reddino.ssl.backbone import MASK_TOKEN_KEY, build_backbone, forward_tokens
from reddino.weights.export import export_timm, timm_state_dict

TINY = dict(embed_dim=48, depth=2, num_heads=2)


def tiny(init_values: float | None = 1.0) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("vit_small_patch14_dinov2", 32, 8, 0.0, init_values, True, TINY)


def test_state_dict_is_dinov2_layout_plus_mask_token():
    model = tiny()
    keys = set(model.state_dict())
    assert MASK_TOKEN_KEY in keys
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"} <= keys
    assert {"blocks.0.ls1.gamma", "blocks.1.mlp.fc2.bias", "blocks.1.attn.qkv.weight"} <= keys
    assert not any(k.startswith("head.") and "weight" in k for k in keys)
    assert model.state_dict()["pos_embed"].shape == (1, 1 + 4 * 4, 48)
    assert MASK_TOKEN_KEY not in timm_state_dict(model)


def test_unmasked_forward_matches_timm():
    model = tiny().eval()
    x = torch.randn(3, 3, 32, 32)
    out = forward_tokens(model, x)
    assert out.cls.shape == (3, 48) and out.patches.shape == (3, 16, 48)
    torch.testing.assert_close(out.cls, model(x))
    torch.testing.assert_close(torch.cat([out.cls[:, None], out.patches], 1), model.forward_features(x))


def test_masked_patches_get_the_mask_token_before_position_embedding():
    model = tiny().eval()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5, 6]] = True
    out = forward_tokens(model, x, masks)
    # independent computation: embed, substitute, then the rest of timm's forward
    emb = model.patch_embed(x).reshape(2, 16, 48).clone()
    emb[0, [1, 5, 6]] = model.mask_token[0]
    tokens = model._pos_embed(emb.reshape(2, 4, 4, 48))
    expected = model.norm(model.blocks(tokens))
    torch.testing.assert_close(out.cls, expected[:, 0])
    torch.testing.assert_close(out.patches, expected[:, 1:])
    # image 1 has no mask: identical to the unmasked pass
    torch.testing.assert_close(out.cls[1], forward_tokens(model, x).cls[1])
    with pytest.raises(ValueError, match="patch grid"):
        forward_tokens(model, x, torch.zeros(2, 9, dtype=torch.bool))


def test_other_input_sizes_interpolate_position_embedding():
    out = forward_tokens(tiny().eval(), torch.randn(1, 3, 16, 16))
    assert out.patches.shape == (1, 4, 48)


def test_export_reloads_in_plain_timm_with_identical_features(tmp_path):
    model = tiny().eval()
    args = dict(img_size=32, patch_size=8, init_values=1.0, dynamic_img_size=True, **TINY)
    path = export_timm(
        model, tmp_path, "vit_small_patch14_dinov2", args, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    )
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_features"] == 48 and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    plain = timm.create_model(config["architecture"], pretrained=False, num_classes=0, **config["model_args"])
    plain.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain.eval()(x), model(x), atol=1e-5, rtol=1e-5)


def test_position_grid_at_other_sizes_follows_dinov2_not_timm():
    """Local crops (and any other grid) get DINOv2's interpolation: bicubic with scale (n + 0.1) / M and
    no antialiasing; at the model's own grid the embedding is used as is (timm's result exactly)."""
    import torch.nn.functional as F

    from reddino.ssl.backbone import add_pos_embed, build_backbone

    torch.manual_seed(0)
    model = build_backbone(
        "vit_small_patch14_dinov2", 64, 8, 0.0, 1.0, True, {"embed_dim": 24, "depth": 1, "num_heads": 2}
    )
    with torch.no_grad():
        model.pos_embed.normal_()
    native = torch.randn(2, 8, 8, 24)
    torch.testing.assert_close(add_pos_embed(model, native), model._pos_embed(native), rtol=0, atol=0)
    local = torch.randn(2, 4, 4, 24)
    grid = model.pos_embed[:, 1:].reshape(1, 8, 8, 24).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, scale_factor=(4.1 / 8, 4.1 / 8), mode="bicubic", antialias=False)
    expected = torch.cat([model.pos_embed[:, :1], expected.flatten(2).transpose(1, 2)], dim=1)
    out = add_pos_embed(model, local)
    torch.testing.assert_close(out[:, 1:], local.reshape(2, 16, 24) + expected[:, 1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 0], (model.cls_token + model.pos_embed[:, :1])[:, 0].expand(2, -1))
    assert not torch.allclose(out, model._pos_embed(local), atol=1e-3)  # timm's antialiased resize differs
