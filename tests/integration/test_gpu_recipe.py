"""The GPU recipe's one command (``benchmarks/gpu_session.sh recipe``) runs end to end at toy size on CPU:
pretraining with experiment=real_gpu_s on a few prepared real images, then reddino-eval on Chula."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOY = " ".join(
    [
        "trainer=cpu",
        "++model.overrides={embed_dim:48,depth:1,num_heads:2}",
        "ssl.head.hidden_dim=32",
        "ssl.head.bottleneck_dim=16",
        "crops.global_size=28",
        "crops.local_size=14",
        "ssl.optim.epochs=2",
        "ssl.optim.epoch_length=2",
        "data.loader.batch_size=8",
        "data.loader.pin_memory=false",
        "data.loader.persistent_workers=false",
        "report.max_units=150",
        "report.probes.linear.device=cpu",
        "callbacks.knn_probe.max_units=60",
        "callbacks.knn_probe.every_n_steps=2",
    ]
)


@pytest.mark.slow
@pytest.mark.real_data
def test_the_gpu_recipe_runs_end_to_end_at_toy_size(tmp_path):
    root = os.environ.get("REDDINO_DATA_ROOT")
    if not root or not Path(root).is_dir():
        pytest.skip("REDDINO_DATA_ROOT is not set to an existing folder")
    env = {**os.environ, "REDDINO_CACHE_DIR": str(tmp_path / "cache"), "WANDB_SILENT": "true"}
    prepare = [sys.executable, "-m", "reddino.prepare", "max_images=12", "progress=false"]
    done = subprocess.run(
        [*prepare, f"hydra.run.dir={tmp_path / 'prepare'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "out"
    env.update(
        NO_WHEELS="1",
        PYTHON=sys.executable,
        OUT=str(out),
        WORKERS="0",
        RUN_DIR=str(tmp_path / "run"),
        PRETRAIN_ARGS=TOY,
        EVAL_ARGS="probes.linear.device=cpu max_units=150",
    )
    done = subprocess.run(
        ["bash", "benchmarks/gpu_session.sh", "recipe"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    pretrain = json.loads((out / "recipe_pretrain_results.json").read_text())
    assert pretrain["steps"] == 4 and pretrain["data_size_rule"]["set"]["ssl.head.n_prototypes"] >= 256
    assert {"linear", "knn1", "knn20"} <= set(pretrain["results"]["pretrained_teacher"])
    assert [p["step"] for p in pretrain["knn_curve"]] == [0, 2, 4]
    evaluation = json.loads((out / "recipe_eval" / "results.json").read_text())
    assert set(evaluation["results"]) == {"pretrained", "random_init", "morphometrics"}
