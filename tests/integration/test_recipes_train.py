"""Every ssl recipe trains one step on every model family at toy width, at the recipe's own crop sizes.

The patch-14 families run under ``experiment=reddino_s`` (224 px global crops, 98 px local crops for
ssl=dinov2), the patch-8 tiny ViT under the embedded default (64 / 32 px): the combinations a user gets
from ``make pretrain ARGS="experiment=... ssl=... model=..."``. A crop that is not a whole number of
patches, a head that does not fit, or a loss that assumes a crop count fails here.
"""

from __future__ import annotations

import pytest

from reddino.workflows.pretraining import run

SSL = ("reddino", "dinov2", "dinobloom")
MODELS = ("vit_tiny", "vit_s14", "vit_b14", "vit_l14", "vit_g14")
TOY = [
    "++model.overrides={embed_dim: 48, depth: 1, num_heads: 2}",
    "ssl.head.n_prototypes=64",
    "ssl.head.ibot_n_prototypes=64",
    "ssl.head.hidden_dim=32",
    "ssl.head.bottleneck_dim=16",
    "data.loader.batch_size=2",
    "data.loader.num_workers=0",
    "data.loader.persistent_workers=false",
    "data.loader.pin_memory=false",
    "trainer=cpu",
    "trainer.max_steps=1",
    "logger=csv",
    "report.enabled=false",
]


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("ssl", SSL)
def test_one_training_step(make_cfg, ssl: str, model: str) -> None:
    experiment = "embedded" if model == "vit_tiny" else "reddino_s"
    cfg = make_cfg(f"experiment={experiment}", f"ssl={ssl}", f"model={model}", *TOY)
    summary = run(cfg)
    assert summary["steps"] == 1
