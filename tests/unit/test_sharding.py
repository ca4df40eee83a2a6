"""FSDP pieces on CPU (2 gloo processes, torch's FSDP directly: Lightning's FSDPStrategy needs CUDA).

The student/teacher pair is wrapped with the policy ``trainer=fsdp`` uses; the sharded EMA and gradient
clipping must equal the same operations on whole, unsharded tensors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from gloo import run_on_ranks
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import StateDictType

from reddino.ssl.backbone import build_backbone, forward_tokens
from reddino.ssl.module import build_ssl_networks
from reddino.ssl.sharding import clip_grad_norm_, fsdp_wrap_policy, sharded_ema_update_

pytestmark = pytest.mark.distributed
WORLD = 2
MOMENTUM = 0.9
MAX_NORM = 0.05
HEAD = {
    "n_prototypes": 24,
    "hidden_dim": 16,
    "bottleneck_dim": 8,
    "nlayers": 2,
    "shared_ibot_head": False,
    "chunked": False,
    "chunk_size": 4096,
}
HEAD["ibot_n_prototypes"] = 20


class Pair(nn.Module):
    """Student and teacher as in DinoV2Module; forward = a scalar of the student (for gradients)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        backbone = build_backbone(
            "vit_small_patch14_dinov2", 32, 8, 0.0, 1.0, False, {"embed_dim": 32, "depth": 2, "num_heads": 2}
        )
        self.student = build_ssl_networks(backbone, HEAD)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        with torch.no_grad():  # student and teacher differ, so the EMA has something to do
            for p in self.student.parameters():
                p.add_(0.05 * torch.randn_like(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = forward_tokens(self.student["backbone"], x)
        return (
            self.student["dino_head"](out.cls).square().mean() + self.student["ibot_head"](out.patches).mean()
        )


def _on_rank(rank: int) -> dict:
    del rank  # every rank runs the same code on its own shards
    pair = Pair()
    sharded = FSDP(
        Pair(), auto_wrap_policy=fsdp_wrap_policy(), use_orig_params=True, device_id=torch.device("cpu")
    )
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    # gradients: the norm over all shards of all ranks, and the clipped result
    sharded(x).backward()
    norm = clip_grad_norm_(sharded.module.student.parameters(), MAX_NORM, sharded=True)
    after = clip_grad_norm_(sharded.module.student.parameters(), float("inf"), sharded=True)
    pair(x).backward()
    reference = torch.nn.utils.clip_grad_norm_(pair.student.parameters(), MAX_NORM)
    # EMA on shards, then gathered whole
    sharded_ema_update_(sharded, sharded.module.teacher, sharded.module.student, MOMENTUM)
    with FSDP.state_dict_type(sharded, StateDictType.FULL_STATE_DICT):
        state = sharded.state_dict()
    return {
        "norm": norm,
        "after": after,
        "reference": reference,
        "teacher": {k: v for k, v in state.items() if k.startswith("teacher.")},
        "local_sizes": [p.numel() for p in sharded.module.teacher.parameters()],
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_on_rank, WORLD, tmp_path_factory.mktemp("fsdp"))


def test_parameters_really_are_sharded(results):
    whole = sum(v.numel() for v in results[0]["teacher"].values())
    assert all(sum(r["local_sizes"]) < whole for r in results)


def test_sharded_gradient_norm_is_the_global_norm_and_clips_to_max(results):
    for r in results:
        torch.testing.assert_close(r["norm"], r["reference"], atol=1e-6, rtol=1e-5)
        assert r["norm"] > MAX_NORM  # clipping had work to do
        torch.testing.assert_close(r["after"], torch.tensor(MAX_NORM), atol=1e-6, rtol=1e-4)


def test_sharded_ema_equals_the_whole_tensor_update(results):
    pair = Pair()
    student = {f"teacher.{k}": v for k, v in pair.student.state_dict().items()}
    for key, got in results[0]["teacher"].items():
        expected = (
            MOMENTUM * pair.teacher.state_dict()[key.removeprefix("teacher.")] + (1 - MOMENTUM) * student[key]
        )
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5, msg=key)
    for key, value in results[1]["teacher"].items():
        assert torch.equal(value, results[0]["teacher"][key])
