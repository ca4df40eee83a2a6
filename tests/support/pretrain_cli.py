"""Run ``reddino-pretrain`` as a real CLI process with a run directory and cache inside a test's tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_pretrain(tmp_path: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m reddino.pretrain <overrides>`` into ``tmp_path/run``; fails the test on a non-zero exit."""
    cmd = [
        sys.executable,
        "-m",
        "reddino.pretrain",
        *overrides,
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "WANDB_SILENT": "true"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
