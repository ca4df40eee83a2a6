"""``reddino-pack`` / ``make pack``: compose the config and pack a prepared folder into a portable copy.

Everything the run does is in ``reddino.data.pack.run``; every choice is in ``conf/pack.yaml``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import reddino.runtime.resolvers
import reddino.runtime.schemas  # noqa: F401  (registers the typed config schemas)
from reddino.data.pack import run
from reddino.runtime.paths import CONFIG_PATH
from reddino.runtime.user_errors import one_line_errors


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="pack")
@one_line_errors("reddino-pack")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
