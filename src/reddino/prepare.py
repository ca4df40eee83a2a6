"""``reddino-prepare`` / ``make prepare``: compose the config and turn catalog sources into manifests.

Everything the run does is in ``reddino.workflows.preparation.run``; every choice is in ``conf/prepare.yaml``
(how smears are cut: ``conf/unit_cutting/``).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import reddino.runtime.resolvers
import reddino.runtime.schemas  # noqa: F401  (registers the typed config schemas)
from reddino.runtime.paths import CONFIG_PATH
from reddino.runtime.user_errors import one_line_errors
from reddino.workflows.preparation import run


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="prepare")
@one_line_errors("reddino-prepare")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
