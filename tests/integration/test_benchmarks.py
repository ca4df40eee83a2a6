"""The training benchmark scripts run end to end at tiny sizes (so one GPU command gives real figures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TINY = ["debug=fast", "crops.global_size=32", "crops.local_size=16"]


def run_script(module: str, *args: str, cache: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REDDINO_CACHE_DIR": str(cache)}
    done = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_step_time_prints_every_piece(tmp_path):
    out = run_script("benchmarks.step_time", "--steps", "2", "--warmup", "1", *TINY, cache=tmp_path)
    for piece in ("data", "teacher_forward", "student_forward_loss", "backward", "optimizer", "ema", "total"):
        line = next(line for line in out.splitlines() if line.strip().startswith(piece))
        assert float(line.split()[1]) >= 0.0, line
    assert "units/s" in out


def test_augment_throughput_covers_both_pipelines_and_every_pixel_transform(tmp_path):
    out = run_script("benchmarks.augment_throughput", "--units", "4", "--repeats", "1", *TINY, cache=tmp_path)
    rates = [line for line in out.splitlines() if "views/s per core" in line]
    assert [r.split()[0] for r in rates] == ["reddino", "dinov2"]
    assert all(float(r.split(":")[-1].split()[0]) > 0 for r in rates)
    per_transform = [line for line in out.splitlines() if "ms per 32px crop" in line]
    assert len(per_transform) >= 30 and any("CLAHE" in line for line in per_transform)


def test_throughput_reports_both_modes_flops_and_the_split(tmp_path):
    report = tmp_path / "throughput.json"
    profile = tmp_path / "kernels.txt"
    args = ["--steps", "2", "--warmup", "1", "--cached-batches", "2", "--json", str(report)]
    args += ["--profile", str(profile), "--peak-tflops", "1.0"]
    out = run_script("benchmarks.throughput", *args, *TINY, cache=tmp_path)
    figures = json.loads(report.read_text())
    assert figures["flops_per_step"] > 0 and figures["batch"] == 8
    for mode in ("model", "loader"):
        rate = figures["modes"][mode]
        assert rate["images_per_s"] > 0 and 0 < rate["mfu"] == pytest.approx(rate["achieved_tflops"])
        assert f"{mode:6s} step" in out
    assert set(figures["modes"]["model"]["split_ms"]) == {
        "data",
        "teacher_forward",
        "student_forward_loss",
        "backward",
        "optimizer",
        "ema",
    }
    assert "aten::" in profile.read_text()


def test_throughput_measures_the_dense_and_chunked_heads_with_one_flag(tmp_path):
    report = tmp_path / "heads.json"
    args = ["--steps", "1", "--warmup", "1", "--cached-batches", "1", "--modes", "model"]
    args += ["--heads", "dense,chunked", "--json", str(report), "ssl.head.chunk_size=16"]
    out = run_script("benchmarks.throughput", *args, *TINY, cache=tmp_path)
    heads = json.loads(report.read_text())["heads"]
    assert set(heads) == {"dense", "chunked"} and "## head path: chunked" in out
    assert heads["dense"]["flops_per_step"] == heads["chunked"]["flops_per_step"] > 0  # model FLOPs
    assert "ssl.head.chunked=True" in heads["chunked"]["overrides"]
    assert all(h["modes"]["model"]["images_per_s"] > 0 for h in heads.values())


def test_the_head_step_benchmark_runs_both_paths_to_the_same_loss(tmp_path):
    out = run_script(
        "benchmarks.head_step", "--tokens", "64", "--prototypes", "512", "--dim", "16", "--chunk", "16",
        "--repeats", "1", cache=tmp_path,
    )  # fmt: skip
    rows = [
        line.split("|")
        for line in out.splitlines()
        if line.startswith("| dense") or line.startswith("| chunked")
    ]
    assert [r[1].strip() for r in rows] == ["dense", "chunked"]
    assert float(rows[0][5]) == pytest.approx(float(rows[1][5]), rel=1e-5)  # the same loss
    assert "chunked / dense: time" in out


@pytest.mark.parametrize("plain", [False, True], ids=["augmented", "no-augment"])
def test_supervised_probe_trains_and_scores_the_held_out_cells(tmp_path, plain):
    args = ["--steps", "3", *(["--no-augment"] if plain else []), *TINY]
    out = run_script("benchmarks.supervised_probe", *args, cache=tmp_path)
    assert ("none (resize + flip)" in out) == plain
    scores = [line for line in out.splitlines() if "weighted F1" in line]
    assert [s.split()[0] for s in scores] == ["knn1", "knn3"]  # debug=fast reports k = 1 and 3
    assert all(0.0 <= float(s.split()[3]) <= 100.0 for s in scores)
    assert "loss" in out and "train cells" in out


def test_eval_speed_compares_our_scoring_with_the_reference_protocol_side_by_side(tmp_path):
    out = run_script("benchmarks.eval_speed", "--n", "600", "--folds", "1", cache=tmp_path)
    assert "ours: torch linear + k-NN [1, 20] (one search)" in out
    assert "reference: sklearn linear + one KNeighborsClassifier per k" in out
    assert "speed-up, reference / ours, same folds and features:" in out
    assert "weighted F1 20-NN - sklearn_20-NN: +0.00 points" in out  # identical k-NN votes


def test_whitening_knn_scores_raw_and_whitened_teacher_and_random_init(tmp_path, make_cfg):
    from reddino.workflows.pretraining import run

    cfg = make_cfg("debug=fast", "report.enabled=false")
    run(cfg)
    out = run_script("benchmarks.whitening_knn", str(tmp_path / "run"), cache=Path(cfg.paths.cache_dir))
    rows = [line for line in out.splitlines() if line.startswith(("teacher", "random init"))]
    assert [r.split(":")[0] for r in rows] == [
        "teacher, raw",
        "teacher, whitened",
        "random init, raw",
        "random init, whitened",
    ]
    assert all("linear" in r and "knn1" in r and "knn3" in r for r in rows)


def test_continued_curve_reads_the_curve_against_its_start_and_pairs_the_report(tmp_path):
    def scores(linear: float, knn1: float, knn20: float) -> dict:
        return {
            p: {"weighted_f1": {"mean": v}} for p, v in (("linear", linear), ("knn1", knn1), ("knn20", knn20))
        }

    runs = []
    for seed, (dip, end, gain) in enumerate([(-0.4, 0.5, 0.004), (-1.5, -0.2, 0.002)]):
        curve = [
            {"step": s, "knn1_weighted_f1_whitened": 60 + d, "knn20_weighted_f1_whitened": 64 + d}
            for s, d in ((0, 0.0), (50, dip), (100, end))
        ]
        results = {
            "pretrained_teacher": scores(0.65 + gain, 0.58 + gain, 0.64 + gain),
            "init_weights": scores(0.65, 0.58, 0.64),
        }
        run = tmp_path / f"C{seed}"
        run.mkdir()
        (run / "results.json").write_text(json.dumps({"knn_curve": curve, "results": results}))
        runs.append(str(run))
    out = run_script("benchmarks.continued_curve", *runs, cache=tmp_path)
    assert "1-NN lowest -0.4, end +0.5" in out and "20-NN lowest -1.5, end -0.2" in out
    assert "report, teacher - init_weights: linear +0.40, knn1 +0.40, knn20 +0.40" in out
    assert "over 2 runs" in out and "knn20: +0.30 [-0.97, +1.57]" in out

    bare = tmp_path / "scratch"  # a from-scratch run has no starting weights to compare with
    bare.mkdir()
    (bare / "results.json").write_text(
        json.dumps(
            {
                "knn_curve": [{"step": 0, "knn1_weighted_f1_whitened": 1, "knn20_weighted_f1_whitened": 1}],
                "results": {
                    "pretrained_teacher": scores(0.5, 0.5, 0.5),
                    "random_init": scores(0.4, 0.4, 0.4),
                },
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.continued_curve", str(bare)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "no init_weights row: not a continued run" in done.stderr
