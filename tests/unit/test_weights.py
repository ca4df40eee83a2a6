"""Released-weight formats: detection, DINOv2 position-grid resampling, strict loading, hub ids offline."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from reddino.ssl.backbone import build_backbone, forward_tokens, resample_pos_embed_dinov2
from reddino.weights import (
    HubUnavailableError,
    detect_format,
    infer_model_args,
    load_backbone,
    timm_mlp_keys,
)
from reddino.weights.export import export_timm, timm_state_dict

TINY = dict(embed_dim=48, depth=2, num_heads=2)
HEADS = {"num_heads": 2}  # not recoverable from the weights for a non-standard width


def hub_source(img_size: int = 518) -> torch.nn.Module:
    """A tiny network with the DINOv2 hub key layout; at 518 px its grid is 37x37 like the hub weights."""
    torch.manual_seed(0)
    model = build_backbone("vit_small_patch14_dinov2", img_size, 14, 0.0, 1.0, False, TINY)
    with torch.no_grad():  # non-trivial values everywhere, so a wrong mapping cannot hide
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def reference_at_224(source: torch.nn.Module) -> torch.nn.Module:
    """The source weights with the position grid resized to 16x16, in a fresh 224 px network."""
    state = dict(source.state_dict())
    state["pos_embed"] = resample_pos_embed_dinov2(state["pos_embed"], 16)
    ref = build_backbone("vit_small_patch14_dinov2", 224, 14, 0.0, 1.0, False, TINY)
    ref.load_state_dict(state, strict=True)
    return ref.eval()


def assert_same_features(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), forward_tokens(reference, x).cls, atol=1e-4, rtol=1e-4)


@pytest.fixture()
def hub_file(tmp_path: Path) -> Path:
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(hub_source().state_dict(), path)
    return path


# --- position-grid resampling ------------------------------------------------------------------------


def test_resample_matches_direct_bicubic_interpolate_with_scale_factor():
    torch.manual_seed(1)
    pos = torch.randn(1, 1 + 37 * 37, 8)
    out = resample_pos_embed_dinov2(pos, 16)
    assert out.shape == (1, 257, 8)
    assert torch.equal(out[:, 0], pos[:, 0])  # CLS position untouched
    # independent layout path: channels-first via transpose, documented arguments spelled out
    grid = pos[0, 1:].t().reshape(1, 8, 37, 37)
    expected = F.interpolate(grid, scale_factor=16 / 37, mode="bicubic", align_corners=False, antialias=False)
    torch.testing.assert_close(out[0, 1:], expected.flatten(2)[0].t(), atol=1e-6, rtol=0)
    # scale 16/37 samples the same points as size=16; DINOv2's +0.1 offset samples other points
    by_size = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[0, 1:], by_size.flatten(2)[0].t(), atol=1e-5, rtol=0)
    with_offset = resample_pos_embed_dinov2(pos, 16, offset=0.1)
    expected_offset = F.interpolate(grid, scale_factor=16.1 / 37, mode="bicubic", align_corners=False)
    torch.testing.assert_close(with_offset[0, 1:], expected_offset.flatten(2)[0].t(), atol=1e-6, rtol=0)
    assert not torch.allclose(with_offset, out, atol=1e-3)


def test_resample_to_same_grid_is_exact_and_bad_grids_are_refused():
    pos = torch.randn(1, 1 + 16 * 16, 8, dtype=torch.float64)
    out = resample_pos_embed_dinov2(pos, 16)
    assert torch.equal(out, pos) and out.dtype == torch.float64
    with pytest.raises(ValueError, match="square"):
        resample_pos_embed_dinov2(torch.randn(1, 1 + 20, 8), 16)


# --- format detection -----------------------------------------------------------------------------


def test_detect_format_on_each_format(tmp_path, hub_file):
    source = hub_source()
    bloom = tmp_path / "DinoBloom-S.pth"
    torch.save(bloom_checkpoint(source), bloom)
    export = tmp_path / "export"
    small = build_backbone("vit_small_patch14_dinov2", 28, 14, 0.0, 1.0, False, TINY)
    export_timm(small, export, "vit_small_patch14_dinov2", {"img_size": 28, **TINY}, [0.5] * 3, [0.5] * 3)
    hf = hf_folder(tmp_path / "RedDino-small", hub_source(224))
    hub_safetensors = tmp_path / "hub.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(hub_safetensors))

    assert detect_format(hub_file) == "dinov2_hub"
    assert detect_format(hub_safetensors) == "dinov2_hub"
    assert detect_format(bloom) == "dinobloom"
    assert detect_format(export) == "reddino_export"
    assert detect_format(export / "model.safetensors") == "reddino_export"
    assert detect_format(hf) == "timm_hf"
    assert detect_format(make_ckpt(tmp_path)) == "lightning_ckpt"
    assert detect_format("hf_hub:Snarcy/RedDino-small") == "hf_hub"
    junk = tmp_path / "junk.pt"
    torch.save({"something": torch.zeros(1)}, junk)
    with pytest.raises(ValueError, match="unknown layout"):
        detect_format(junk)


def make_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"  # no .ckpt suffix: detected from the 'teacher.backbone.' keys
    torch.save({"state_dict": {"teacher.backbone.cls_token": torch.zeros(1, 1, 4)}}, path)
    return path


def bloom_checkpoint(source: torch.nn.Module) -> dict:
    return bloom_checkpoint_from_state(source.state_dict())


def bloom_checkpoint_from_state(state: dict[str, torch.Tensor]) -> dict:
    teacher = {f"backbone.{k}": v for k, v in state.items()}
    teacher["dino_head.mlp.0.weight"] = torch.randn(16, 48)
    teacher["dino_head.last_layer.weight_g"] = torch.randn(32, 1)
    teacher["ibot_head.mlp.0.weight"] = torch.randn(16, 48)
    return {"teacher": teacher}


def hf_folder(folder: Path, model: torch.nn.Module) -> Path:
    """The Hugging Face timm layout of the RedDino releases: config.json (no model_args) + safetensors."""
    folder.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in timm_state_dict(model).items()}, str(folder / "model.safetensors")
    )
    config = {
        "architecture": "vit_small_patch14_dinov2",
        "num_classes": 0,
        "num_features": 48,
        "global_pool": "token",
        "model_args": TINY,  # a real small release needs none; the tiny test network does
        "pretrained_cfg": {
            "input_size": [3, 224, 224],
            "fixed_input_size": True,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# --- loading: features agree with the source network -----------------------------------------------


def test_dinov2_hub_file_loads_at_224_with_resampled_grid(hub_file):
    loaded = load_backbone(hub_file, model_args=HEADS)
    assert loaded.input_size == 224 and loaded.model.pos_embed.shape == (1, 257, 48)
    assert loaded.architecture == "vit_small_patch14_dinov2"
    assert_same_features(loaded.model, reference_at_224(hub_source()))
    # the reported architecture rebuilds the same network (evaluate.py's random-init baseline)
    plain = timm.create_model(loaded.architecture, pretrained=False, num_classes=0, **loaded.model_args)
    plain.load_state_dict(loaded.model.state_dict(), strict=True)


def test_dinobloom_teacher_backbone_loads_and_heads_are_ignored(tmp_path):
    source = hub_source()
    path = tmp_path / "DinoBloom-S.pth"
    torch.save(bloom_checkpoint(source), path)
    loaded = load_backbone(path, model_args=HEADS)
    assert_same_features(loaded.model, reference_at_224(source))
    assert not any("head" in k and "weight" in k for k in loaded.model.state_dict())


def test_dinobloom_with_224_grid_needs_no_resampling(tmp_path):
    source = hub_source(224)  # DinoBloom teachers were trained at 224: pos_embed already (1, 257, D)
    path = tmp_path / "DinoBloom-S.pth"
    torch.save(bloom_checkpoint(source), path)
    assert_same_features(load_backbone(path, model_args=HEADS).model, source)


def test_timm_hf_folder_loads_strictly(tmp_path):
    source = hub_source(224)
    loaded = load_backbone(hf_folder(tmp_path / "RedDino-small", source))
    assert loaded.input_size == 224 and loaded.mean == [0.485, 0.456, 0.406]
    assert_same_features(loaded.model, source)


def test_strict_keys_name_missing_and_unexpected(tmp_path):
    state = dict(hub_source().state_dict())
    del state["blocks.1.ls2.gamma"]
    state["blocks.0.attn.extra"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError, match=r"missing \['blocks.1.ls2.gamma'\].*unexpected \['blocks.0.attn.extra'\]"
    ):
        load_backbone(path, model_args=HEADS)


def test_architecture_is_inferred_from_the_weights():
    state = hub_source().state_dict()
    with pytest.raises(ValueError, match="num_heads"):
        infer_model_args(state)
    arch, args = infer_model_args(state, HEADS)
    assert arch == "vit_small_patch14_dinov2"
    assert (args["embed_dim"], args["depth"], args["num_heads"], args["mlp_ratio"]) == (48, 2, 2, 4.0)
    assert args["img_size"] == 224 and args["patch_size"] == 14
    # standard sizes need no overrides: shapes only (meta tensors, nothing allocated)
    for dim, depth, name in ((384, 12, "small"), (768, 12, "base"), (1024, 24, "large")):
        fake = {
            "cls_token": torch.empty(1, 1, dim, device="meta"),
            "patch_embed.proj.weight": torch.empty(dim, 3, 14, 14, device="meta"),
            **{f"blocks.{i}.mlp.fc1.weight": torch.empty(4 * dim, dim, device="meta") for i in range(depth)},
            "blocks.0.mlp.fc2.weight": torch.empty(dim, 4 * dim, device="meta"),
        }
        arch, args = infer_model_args(fake)
        assert arch == f"vit_{name}_patch14_dinov2" and "embed_dim" not in args
    giant = {  # ViT-g: SwiGLU hidden 4096, packed w12 (8192, 1536) as DINOv2 stores it
        "cls_token": torch.empty(1, 1, 1536, device="meta"),
        "patch_embed.proj.weight": torch.empty(1536, 3, 14, 14, device="meta"),
        **{f"blocks.{i}.mlp.w12.weight": torch.empty(8192, 1536, device="meta") for i in range(40)},
        "blocks.0.mlp.w3.weight": torch.empty(1536, 4096, device="meta"),
    }
    arch, args = infer_model_args(timm_mlp_keys(giant))
    assert arch == "vit_giant_patch14_dinov2" and "embed_dim" not in args
    with torch.device("meta"):  # the full-size timm giant has exactly these MLP shapes
        model = timm.create_model(arch, pretrained=False, num_classes=0, **args)
    assert model.blocks[0].mlp.fc1.weight.shape == (8192, 1536) and model.blocks[0].mlp.fc2.weight.shape == (
        1536,
        4096,
    )


def giant_source(img_size: int = 518) -> dict[str, torch.Tensor]:
    """A tiny ViT-g-style network (SwiGLU MLP) as a DINOv2 state dict: ``mlp.w12`` / ``mlp.w3`` keys."""
    torch.manual_seed(1)
    model = build_backbone(
        "vit_giant_patch14_dinov2", img_size, 14, 0.0, 1.0, False, {**TINY, "mlp_ratio": 64 / 48}
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return {
        k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3."): v
        for k, v in model.state_dict().items()
    }


def dinov2_swiglu_ffn(state: dict[str, torch.Tensor], block: int, x: torch.Tensor) -> torch.Tensor:
    """DINOv2's SwiGLUFFNFused, written from its definition: w3(silu(x1) * x2), x1, x2 = w12(x).chunk(2)."""
    p = f"blocks.{block}.mlp."
    x1, x2 = F.linear(x, state[p + "w12.weight"], state[p + "w12.bias"]).chunk(2, dim=-1)
    return F.linear(F.silu(x1) * x2, state[p + "w3.weight"], state[p + "w3.bias"])


@pytest.mark.parametrize("packaging", ["hub", "dinobloom"])
def test_vit_g_swiglu_weights_load_into_timm_giant(tmp_path, packaging):
    state = giant_source()
    assert "blocks.0.mlp.w12.weight" in state and state["blocks.0.mlp.w12.weight"].shape == (64, 48)
    path = tmp_path / f"{packaging}-g.pth"
    torch.save(state if packaging == "hub" else bloom_checkpoint_from_state(state), path)
    loaded = load_backbone(path, model_args=HEADS)
    assert loaded.architecture == "vit_giant_patch14_dinov2" and loaded.input_size == 224
    x = torch.randn(5, 48)
    with torch.no_grad():
        for block in range(2):
            got = loaded.model.blocks[block].mlp(x)
            torch.testing.assert_close(got, dinov2_swiglu_ffn(state, block, x), atol=1e-6, rtol=1e-5)
    # and the whole network agrees with the same weights in timm's own names at 224 px
    timm_names = dict(loaded.model.state_dict())
    reference = build_backbone(
        "vit_giant_patch14_dinov2", 224, 14, 0.0, 1.0, False, {**TINY, "mlp_ratio": 64 / 48}
    )
    reference.load_state_dict({**timm_names, "mask_token": torch.zeros(1, 48)}, strict=True)
    assert_same_features(loaded.model, reference.eval())


# --- safety and hub ids ---------------------------------------------------------------------------


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what ``weights_only=True`` must refuse to do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "was_executed"
    path = tmp_path / "evil.pth"
    torch.save({"teacher": {"backbone.cls_token": Payload(marker)}}, path)
    with pytest.raises(ValueError, match="weights_only"):
        detect_format(path)
    with pytest.raises(ValueError, match="weights_only"):
        load_backbone(path)
    assert not marker.exists()


def test_hub_id_offline_fails_fast_with_download_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("must not try the network when offline")

    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(HubUnavailableError) as info:
        load_backbone("hf_hub:Snarcy/RedDino-small")
    message = str(info.value)
    for part in (
        "Snarcy/RedDino-small",
        "config.json",
        "model.safetensors",
        "folder",
        "instead of the hub id",
    ):
        assert part in message


def test_hub_id_without_network_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    def no_network(*args, **kwargs):
        raise AssertionError("must not start a download that would only retry")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(HubUnavailableError, match=r"no network.*Snarcy/RedDino-base"):
        load_backbone("hf_hub:Snarcy/RedDino-base")


def test_hub_id_download_failure_gives_the_same_instructions(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [])  # pretend the host resolves

    def unreachable(*args, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(timm, "create_model", unreachable)
    with pytest.raises(HubUnavailableError, match=r"Snarcy/RedDino-large.*config.json and model.safetensors"):
        load_backbone("hf_hub:Snarcy/RedDino-large")
