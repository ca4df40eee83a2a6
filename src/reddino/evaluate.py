"""``reddino-eval`` / ``make eval``: compose the config and evaluate frozen features under a protocol.

Everything the run does is in ``reddino.workflows.evaluation.run``; every choice is in ``conf/eval.yaml``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import reddino.runtime.resolvers
import reddino.runtime.schemas  # noqa: F401  (registers the typed config schemas)
from reddino.runtime.paths import CONFIG_PATH
from reddino.runtime.user_errors import one_line_errors
from reddino.workflows.evaluation import run


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
@one_line_errors("reddino-eval")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
