"""Kill a real ``reddino-pretrain`` process mid-run, resume it, and compare with an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SUPPORT = REPO / "tests" / "support"
TOTAL_STEPS = 8
KILL_AT = 5  # checkpoints every 2 steps (debug=fast): the last one before the kill holds step 4
COMMON = [
    "debug=fast",
    "logger=default",
    "report.enabled=false",
    f"ssl.optim.epochs={TOTAL_STEPS // 4}",
    "ssl.optim.epoch_length=4",
]


def pretrain(run_dir: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(SUPPORT),
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "reddino.pretrain", *COMMON, f"paths.cache_dir={cache}", *overrides]
    return subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=600)


def records(path: Path) -> dict[int, dict]:
    """Step -> record; a step replayed after the resume replaces the killed run's copy of it."""
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record
    return by_step


def wandb_ids(run_dir: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}


def test_killed_run_resumes_at_the_same_step_schedules_units_and_wandb_run(tmp_path):
    cache = tmp_path / "cache"
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    record = "+callbacks.record._target_=reddino_test_callbacks.RecordSteps"

    done = pretrain(
        straight, cache, f"hydra.run.dir={straight}", record, f"+callbacks.record.path={straight}.jsonl"
    )
    assert done.returncode == 0, done.stderr[-3000:]

    killed = pretrain(
        crashed,
        cache,
        f"hydra.run.dir={crashed}",
        record,
        f"+callbacks.record.path={crashed}.jsonl",
        "+callbacks.kill._target_=reddino_test_callbacks.KillAtStep",
        f"+callbacks.kill.step={KILL_AT}",
    )
    assert killed.returncode == -9, "the run should have been SIGKILLed"
    assert not (crashed / "export").exists()
    assert max(records(Path(f"{crashed}.jsonl"))) == KILL_AT - 1

    resumed = pretrain(crashed, cache, f"resume={crashed}", record, f"+callbacks.record.path={crashed}.jsonl")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in resumed.stderr + resumed.stdout

    expected, got = records(Path(f"{straight}.jsonl")), records(Path(f"{crashed}.jsonl"))
    assert sorted(got) == sorted(expected) == list(range(TOTAL_STEPS))
    for step in range(TOTAL_STEPS):
        assert got[step]["units"] == expected[step]["units"], f"unit order differs at step {step}"
        assert got[step]["schedule"] == pytest.approx(expected[step]["schedule"], rel=1e-12), step
        assert got[step]["lr"] == pytest.approx(expected[step]["lr"], rel=1e-12), step

    # same run directory, one W&B run id across the crash, the export written at the end
    run_id = (crashed / "wandb_run_id").read_text().strip()
    assert wandb_ids(crashed) == {run_id} and len(list((crashed / "wandb").glob("offline-run-*"))) == 2
    assert wandb_ids(straight) != {run_id}
    assert (crashed / "export" / "model.safetensors").is_file()
    assert (crashed / "config.yaml").is_file() and list(crashed.glob("config.resumed-*.yaml"))
    steps_logged = pd.read_csv(crashed / "csv" / "metrics.csv")["step"].dropna()
    assert steps_logged.max() == TOTAL_STEPS - 1  # the CSV log was appended to, not restarted
