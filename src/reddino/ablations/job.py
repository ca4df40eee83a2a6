"""``reddino-ablations``: one pretraining job of the ablation grid, with its failure written down.

Hydra's launchers keep going past a failed job (the basic launcher raises only after the last one), but
they keep the exception in memory: nothing in the job directory says why it has no ``results.json``.
This entry point runs ``reddino.workflows.pretraining.run`` unchanged and, when it raises, writes the
traceback to ``error.txt`` in the job directory before re-raising, so the summary can say which job
failed and why.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

import reddino.runtime.resolvers
import reddino.runtime.schemas  # noqa: F401  (registers the typed config schemas)
from reddino.ablations import ERROR_FILE
from reddino.runtime.paths import CONFIG_PATH
from reddino.workflows.pretraining import run


def run_recording_errors(cfg: DictConfig) -> None:
    """``pretrain.run``; an exception's traceback goes to ``<output_dir>/error.txt``, then it re-raises."""
    out = Path(cfg.paths.output_dir)
    try:
        run(cfg)
    except Exception:
        out.mkdir(parents=True, exist_ok=True)
        (out / ERROR_FILE).write_text(traceback.format_exc())
        raise


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="pretrain")
def main(cfg: DictConfig) -> None:
    run_recording_errors(cfg)


if __name__ == "__main__":
    main()
