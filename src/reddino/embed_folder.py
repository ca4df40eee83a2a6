"""``reddino-embed``: compose ``conf/embed.yaml`` and embed a folder of images.

Everything the run does is in ``reddino.workflows.embedding.run``; the Python API is ``reddino.embed``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import reddino.runtime.resolvers  # noqa: F401  (registers the config resolvers)
from reddino.runtime.paths import CONFIG_PATH
from reddino.runtime.user_errors import one_line_errors
from reddino.workflows.embedding import run


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="embed")
@one_line_errors("reddino-embed")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
