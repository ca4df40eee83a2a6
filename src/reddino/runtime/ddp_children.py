"""Make Lightning's DDP child processes join the Hydra job that started them.

Lightning starts ranks 1..N-1 by re-running the script with the original ``sys.argv`` plus
``hydra.run.dir=<HydraConfig run.dir>``. Two things then go wrong without help: in a multirun job the
children would re-launch the whole sweep (argv holds ``-m`` and every sweep value), and ``run.dir`` is not
the job's directory (that is ``sweep.dir/subdir``), so children would write into folders of their own.
"""

from __future__ import annotations

import sys

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import read_write


def pin_children_to_this_job() -> None:
    """Point ``hydra.run.dir`` at this job's output directory and, in a multirun job, make ``sys.argv``
    this job's own overrides, so DDP children run this one job in this one directory."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
