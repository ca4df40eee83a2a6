"""One ``reddino-embed`` run: a folder of images -> ``embeddings.npy``, ``units.parquet`` and
``skipped.csv`` in ``cfg.out`` (options: ``conf/embed.yaml``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from reddino.embedding import UNIT_CUTTING_SECTIONS, embed
from reddino.runtime.config_checks import check_config, embed_rules


def run(cfg: DictConfig) -> Path:
    """Embed ``cfg.folder`` as ``conf/embed.yaml`` says and write the three files into ``cfg.out``."""
    check_config(cfg, embed_rules())
    out = Path(cfg.out)
    embeddings, units, skipped = embed(
        cfg.weights,
        cfg.folder,
        mode=cfg.mode,
        pooling=cfg.pooling,
        whitening=cfg.whitening,
        batch_size=cfg.batch_size,
        accelerator=cfg.accelerator,
        precision=cfg.precision,
        num_workers=cfg.num_workers,
        settings={k: OmegaConf.to_container(cfg[k], resolve=True) for k in UNIT_CUTTING_SECTIONS},
    )
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", embeddings)
    units.to_parquet(out / "units.parquet", index=False)
    skipped.to_csv(out / "skipped.csv", index=False)
    print(f"{len(units)} units embedded ({embeddings.shape[1]}-d) -> {out}; {len(skipped)} files skipped")
    for row in skipped.itertuples(index=False):
        print(f"  skipped {row.file}: {row.reason}")
    return out
