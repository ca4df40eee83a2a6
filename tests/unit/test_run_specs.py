"""A shared run directory is foreign input: its config.yaml is read as plain values, never run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from reddino.run_specs import UntrustedConfigError, backbone_args, plain_value, read_run_units
from reddino.runtime.run_dir import checkpoint_to_resume
from reddino.ssl.backbone import build_backbone
from reddino.weights import build_from_config, load_backbone

MODEL = {
    "_target_": "reddino.ssl.backbone.build_backbone",
    "arch": "vit_small_patch14_dinov2",
    "img_size": 32,
    "patch_size": 8,
    "drop_path_rate": 0.0,
    "init_values": 1.0,
    "dynamic_img_size": True,
    "overrides": {"embed_dim": 48, "depth": 2, "num_heads": 2},
}
AUGMENT = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def run_dir(tmp_path: Path, config: dict) -> Path:
    """A run directory with a real teacher checkpoint of MODEL and the given config.yaml."""
    args = {k: v for k, v in MODEL.items() if k != "_target_"}
    net = build_backbone(**args)
    state = {f"teacher.backbone.{k}": v for k, v in net.state_dict().items()}
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": state}, tmp_path / "checkpoints" / "last.ckpt")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "checkpoints" / "last.ckpt"


def test_a_checkpoint_loads_from_plain_values(tmp_path):
    loaded = load_backbone(run_dir(tmp_path, {"model": MODEL, "augment": AUGMENT}))
    assert loaded.architecture == "vit_small_patch14_dinov2" and loaded.input_size == 32
    assert loaded.model_args["embed_dim"] == 48 and loaded.mean == [0.5] * 3
    assert loaded.model(torch.randn(1, 3, 32, 32)).shape == (1, 48)


@pytest.mark.parametrize(
    "model",
    [
        {"_target_": "builtins.open", "file": "VICTIM", "mode": "w"},
        {**MODEL, "_target_": "shutil.copyfile"},
        {**MODEL, "overrides": {"embed_layer": {"_target_": "builtins.open", "file": "VICTIM", "mode": "w"}}},
        {**MODEL, "arch": "hf_hub:someone/model"},
        {**MODEL, "img_size": "32"},
        {**MODEL, "overrides": {"num_heads": {"_target_": "builtins.open"}}},
    ],
    ids=["open", "copyfile", "nested-target", "hub-arch", "string-size", "override-target"],
)
def test_a_hostile_run_config_is_refused_and_runs_nothing(tmp_path, monkeypatch, model):
    victim = tmp_path / "VICTIM"
    monkeypatch.chdir(tmp_path)  # a relative 'file: VICTIM' would land here
    model = yaml.safe_load(yaml.safe_dump(model).replace("VICTIM", str(victim)))
    ckpt = run_dir(tmp_path, {"model": model, "augment": AUGMENT})
    with pytest.raises(UntrustedConfigError, match=r"config\.yaml"):
        load_backbone(ckpt)
    assert not victim.exists()


def test_hostile_units_nodes_are_refused(tmp_path):
    victim = tmp_path / "x"
    with pytest.raises(UntrustedConfigError, match=r"_target_=.builtins\.open."):
        read_run_units({"_target_": "builtins.open", "file": str(victim), "mode": "w"}, tmp_path)
    with pytest.raises(UntrustedConfigError, match="Hydra directives"):
        read_run_units(
            {
                "_target_": "reddino.data.manifest.read_manifest",
                "path": {"_target_": "pathlib.Path.write_text"},
                "unit": "cell",
            },
            tmp_path,
        )
    with pytest.raises(UntrustedConfigError, match="arguments do not fit"):
        read_run_units({"_target_": "reddino.data.manifest.read_manifest", "evil": 1}, tmp_path)
    assert not victim.exists()


def test_synthetic_units_of_a_foreign_run_go_to_our_cache(tmp_path):
    elsewhere = tmp_path / "not_ours"
    node = {
        "_target_": "reddino.data.manifest.synthetic_units",
        "cache_dir": str(elsewhere),
        "generator": {
            "seed": 0,
            "n_sources": 1,
            "subjects_per_source": 1,
            "smears_per_subject": 1,
            "smear_size": [96, 96],
            "cells_per_smear": [4, 6],
            "class_concentration": 0.5,
            "distractors": False,
        },
        "unit": "cell",
        "patch_size": 32,
        "cell_context": 1.25,
        "cell_window": None,
        "sources": ["src0"],
        "rbc_only": True,
    }
    units = read_run_units(node, tmp_path / "ours")
    assert len(units) > 0 and not elsewhere.exists() and (tmp_path / "ours").is_dir()


def test_plain_value_and_backbone_args_name_the_key():
    assert plain_value({"a": [1, 2.0, None, "x"]}, "cfg") == {"a": [1, 2.0, None, "x"]}
    with pytest.raises(UntrustedConfigError, match=r"cfg\.a\[0\]\._target_"):
        plain_value({"a": [{"_target_": "os.system"}]}, "cfg")
    with pytest.raises(UntrustedConfigError, match=r"model\.overrides\.block_fn: not an allowed"):
        backbone_args({**MODEL, "overrides": {"block_fn": "x"}})
    with pytest.raises(UntrustedConfigError, match="unknown keys"):
        backbone_args({**MODEL, "pretrained": True})


def test_an_export_config_json_cannot_name_code():
    with pytest.raises(UntrustedConfigError, match="not a registered timm architecture"):
        build_from_config({"architecture": "hf_hub:x/y", "model_args": {}})
    with pytest.raises(UntrustedConfigError, match="_target_"):
        build_from_config(
            {"architecture": "vit_small_patch14_dinov2", "model_args": {"x": {"_target_": "os.system"}}}
        )


@pytest.mark.parametrize("url", ["http://example.org/x.ckpt", "https://h/x.ckpt", "s3://bucket/x.ckpt"])
def test_remote_checkpoints_are_refused(url):
    with pytest.raises(ValueError, match="URLs are refused"):
        checkpoint_to_resume(OmegaConf.create({"resume": None, "ckpt_path": url}))


def test_truncated_weight_files_are_named(tmp_path):
    net = build_backbone(**{k: v for k, v in MODEL.items() if k != "_target_"})
    from reddino.weights.export import export_timm

    export_timm(
        net, tmp_path / "export", MODEL["arch"], {"img_size": 32, **MODEL["overrides"]}, [0.5] * 3, [0.5] * 3
    )
    weights = tmp_path / "export" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"{weights}: not a readable safetensors file"):
        load_backbone(tmp_path / "export")
    pth = tmp_path / "hub.pth"
    torch.save(net.state_dict(), pth)
    pth.write_bytes(pth.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{pth}: not a readable torch file"):
        load_backbone(pth)
