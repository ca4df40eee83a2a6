"""A pretraining run directory: its W&B run id (kept across resumes) and the checkpoint to continue from."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from omegaconf import DictConfig


def logger_run_id(logger_cfg: DictConfig, run_dir: Path) -> dict[str, str]:
    """A W&B logger without an explicit id gets its run directory's id, so a resumed run continues it."""
    if not str(logger_cfg.get("_target_", "")).endswith("WandbLogger") or logger_cfg.get("id") is not None:
        return {}
    return {"id": run_id_of(run_dir)}


def run_id_of(run_dir: Path) -> str:
    """The W&B run id stored in ``run_dir/wandb_run_id``, created on first use.

    Created with an atomic hard link, so ranks started together (SLURM) agree on one id.
    """
    path = run_dir / "wandb_run_id"
    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".wandb_run_id.{os.getpid()}"
        tmp.write_text(secrets.token_hex(4) + "\n")  # W&B ids: short [a-z0-9] strings
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another rank won the race: use its id
        finally:
            tmp.unlink()
    return path.read_text().strip()


def checkpoint_to_resume(cfg: DictConfig) -> str | None:
    """``resume=<run dir>`` continues that run from its last checkpoint; ``ckpt_path=`` names any local file.

    URLs are refused: Lightning unpickles a downloaded checkpoint in full (``weights_only=False``), so a
    remote file could run code. Local files are read with ``weights_only=True`` (``run``).
    """
    if cfg.resume is None:
        if cfg.ckpt_path is not None and "://" in str(cfg.ckpt_path):
            raise ValueError(
                f"ckpt_path={cfg.ckpt_path}: URLs are refused (a remote checkpoint would be unpickled in "
                "full); download it, check it, and pass the local file"
            )
        return cfg.ckpt_path
    if cfg.ckpt_path is not None:
        raise ValueError("give either resume=<run dir> or ckpt_path=<file>, not both")
    last = Path(cfg.resume) / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(
            f"resume={cfg.resume}: no checkpoint at {last}. The run stopped before its first checkpoint "
            "(callbacks.checkpoint.every_n_train_steps) or the path is not a pretraining run directory."
        )
    return str(last)
