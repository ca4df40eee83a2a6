"""``reddino-pretrain`` / ``make pretrain``: compose the config and run one pretraining run.

Everything the run does is in ``reddino.workflows.pretraining.run``; every choice is in ``conf/``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import reddino.runtime.resolvers
import reddino.runtime.schemas  # noqa: F401  (registers the typed config schemas)
from reddino.runtime.ddp_children import pin_children_to_this_job
from reddino.runtime.paths import CONFIG_PATH
from reddino.runtime.user_errors import one_line_errors
from reddino.workflows.pretraining import run


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="pretrain")
@one_line_errors("reddino-pretrain")
def main(cfg: DictConfig) -> None:
    pin_children_to_this_job()
    run(cfg)


if __name__ == "__main__":
    main()
