"""The ablation grid: every variant differs from its base along its own axis only, and the summary reads
every job directory of a sweep, failed and killed ones included."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from matplotlib.container import BarContainer
from omegaconf import OmegaConf

from reddino.ablations import ERROR_FILE
from reddino.ablations.summary import (
    FIGURE_PNG,
    SUMMARY_CSV,
    SUMMARY_MD,
    collect,
    main,
    mean_interval,
    write_summary,
)
from reddino.viz.plots import ablation_bars

CONF = Path(__file__).resolve().parents[2] / "conf"
VARIANTS = sorted(p.stem for p in (CONF / "ablation").glob("*.yaml"))
# the config keys each axis may change; anything else changing is a confounded ablation
AXIS_KEYS = {
    "baseline": (),
    "koleo": ("ssl.loss.koleo_weight",),
    "centering": ("ssl.centering.method",),
    "units": ("data.pretrain_units.unit",),
    "local_crops": ("crops.n_local",),
    "augment": ("augment.",),
    "backbone": ("model.",),
}


def _flat(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _changed(base, variant) -> set[str]:
    a = _flat(OmegaConf.to_container(base, resolve=False))
    b = _flat(OmegaConf.to_container(variant, resolve=False))
    return {k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>")} - {
        "ablation.axis",
        "ablation.variant",
        "ablation",
    }


@pytest.fixture(scope="module")
def compose():
    """Compose ``pretrain`` with overrides, one Hydra initialisation for the module (no resolution)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        yield lambda *overrides, hydra=False: hydra_compose(
            "pretrain", overrides=list(overrides), return_hydra_config=hydra
        )
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("base", ["embedded", "ablations_reddino_s"])
def test_every_variant_differs_from_its_base_along_its_axis_only(compose, base):
    reference = compose(f"experiment={base}")
    for variant in VARIANTS:
        cfg = compose(f"experiment={base}", f"ablation={variant}")
        axis = cfg.ablation.axis
        assert axis in AXIS_KEYS and cfg.ablation.variant, f"{variant}: axis {axis!r}"
        changed = _changed(reference, cfg)
        stray = {k for k in changed if not any(k.startswith(p) for p in AXIS_KEYS[axis])}
        assert not stray, f"{variant} on {base} also changes {sorted(stray)}"


@pytest.mark.parametrize("grid", ["ablations", "ablations_reddino_s"])
def test_grid_sweeps_one_variant_per_axis_each_changing_something(compose, grid):
    names = compose(f"experiment={grid}", hydra=True).hydra.sweeper.params.ablation.split(",")
    assert set(names) <= set(VARIANTS)
    reference = compose(f"experiment={grid}")
    axes = []
    for name in names:
        cfg = compose(f"experiment={grid}", f"ablation={name}")
        axes.append(cfg.ablation.axis)
        if cfg.ablation.axis != "baseline":
            assert _changed(reference, cfg), f"{name} is a no-op on {grid}"
    assert sorted(axes) == sorted(AXIS_KEYS), "one job per axis of the paper, plus the baseline"


def test_the_real_grid_is_one_argument_after_the_make_target(compose):
    """``make ablations ARGS="experiment=ablations_reddino_s"``: the target's experiment, then ARGS."""
    cfg = compose("experiment=ablations", "experiment=ablations_reddino_s", hydra=True)
    assert "backbone_vit_b14" in cfg.hydra.sweeper.params.ablation.split(",")
    assert cfg.model.arch == "vit_small_patch14_dinov2" and cfg.data.name == "real"


def test_embedded_grid_is_the_embedded_default_made_shorter(compose):
    embedded, grid = compose("experiment=embedded"), compose("experiment=ablations")
    assert {k.split(".")[0] for k in _changed(embedded, grid)} <= {"ssl", "report", "logger"}
    assert grid.ssl.optim.epochs < embedded.ssl.optim.epochs


def _scores(mean: float) -> dict[str, dict[str, object]]:
    return {
        m: {"mean": mean, "std": 0.01, "folds": [mean] * 5}
        for m in ("accuracy", "balanced_accuracy", "weighted_f1", "macro_f1")
    }


def _job(
    sweep: Path, num: int, axis: str, variant: str, teacher: float | None, seed: int | None = None
) -> Path:
    """A job directory as reddino-ablations leaves it; ``teacher=None``: no results.json."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    overrides = f"- ablation={variant.replace(' ', '_')}\n" + (f"- seed={seed}\n" if seed is not None else "")
    (job / ".hydra" / "overrides.yaml").write_text(overrides)
    config = {"ablation": {"axis": axis, "variant": variant}, **({"seed": seed} if seed is not None else {})}
    (job / "config.yaml").write_text(OmegaConf.to_yaml(config))
    if teacher is not None:
        results = {
            "pretrained_teacher": {"knn1": _scores(teacher), "knn20": _scores(teacher + 0.02)},
            "random_init": {"knn1": _scores(0.30), "knn20": _scores(0.31)},
        }
        (job / "results.json").write_text(json.dumps({"steps": 100, "results": results}))
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "multirun"
    _job(sweep, 0, "baseline", "baseline", 0.35)
    _job(sweep, 1, "koleo", "KoLeo 0.1", 0.40)
    failed = _job(sweep, 2, "centering", "moving-average centering", None)
    (failed / ERROR_FILE).write_text(
        "Traceback (most recent call last):\n  File x, line 1\n    run()\n"
        "FloatingPointError: ['ibot'] diverged\nfull_key: ssl\n\n"  # a message on two lines
    )
    killed = _job(sweep, 10, "units", "patches", None)  # killed by the scheduler: no error.txt
    (killed / "job.log").write_text("[INFO] step 40\n[INFO] step 41\n\n")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")  # a file, not a job
    return sweep


def test_summary_reports_every_job_with_failures_and_their_errors(sweep):
    frame = collect(sweep)
    jobs = frame.drop_duplicates("job").set_index("job")
    assert list(jobs.index) == ["0", "1", "2", "10"]  # numeric job order, not "10" < "2"
    assert list(jobs["status"]) == ["ok", "ok", "failed", "failed"]
    assert jobs.at["2", "error"] == "FloatingPointError: ['ibot'] diverged full_key: ssl"
    assert "killed" in jobs.at["10", "error"] and "step 41" in jobs.at["10", "error"]
    scored = frame[frame["status"] == "ok"]
    assert len(scored) == 2 * 2 * 2  # 2 jobs x 2 models x 2 k
    row = scored[
        (scored["job"] == "1") & (scored["model"] == "pretrained_teacher") & (scored["probe"] == "knn20")
    ]
    assert row["weighted_f1_mean"].item() == pytest.approx(0.42)


def test_summary_files_and_exit_status(sweep, tmp_path, capsys):
    out = tmp_path / "summary"
    assert main([str(sweep), "--out", str(out)]) == 1  # failed jobs: non-zero, after writing everything
    for name in (SUMMARY_CSV, SUMMARY_MD, FIGURE_PNG):
        assert (out / name).is_file(), name
    md = (out / SUMMARY_MD).read_text()
    header = "| job | axis | variant | seed | steps | teacher 1-NN | teacher 20-NN | random init 1-NN | "
    header += "random init 20-NN"
    assert md.count(header) == 1
    scores = "40.0 ± 1.0 | 42.0 ± 1.0 | 30.0 ± 1.0 | 31.0 ± 1.0"
    assert f"| 1 | koleo | KoLeo 0.1 |  | 100 | {scores} | +5.0 | +5.0 | ok |" in md
    assert "| koleo | KoLeo 0.1 | 1-NN | 1 | +5.0 | n/a (1 seed) | +5.0 |" in md  # one seed: no interval
    assert "2 failed job(s)" in md and "job 2 (moving-average centering): FloatingPointError" in md
    assert "FAILED" in capsys.readouterr().out
    csv = pd.read_csv(out / SUMMARY_CSV)
    assert set(csv["status"]) == {"ok", "failed"} and len(csv) == 8 + 2

    for failed in ("2", "10"):  # once the failed jobs are gone, the sweep is clean
        for p in sorted((sweep / failed).rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (sweep / failed).rmdir()
    assert main([str(sweep)]) == 0
    assert "All jobs finished." in (sweep / SUMMARY_MD).read_text()


def test_ablation_bars_keep_a_slot_for_failed_variants(sweep):
    frame = write_summary(sweep, None, "weighted_f1")
    fig = ablation_bars(frame, "weighted_f1")
    one_nn, twenty_nn = fig.axes
    assert one_nn.get_title() == "1-NN" and twenty_nn.get_title() == "20-NN"
    assert [t.get_text() for t in one_nn.get_xticklabels()] == [
        "baseline",
        "KoLeo 0.1",
        "moving-average centering",
        "patches",
    ]
    teacher, random_init = [c for c in one_nn.containers if isinstance(c, BarContainer)]
    heights = [bar.get_height() for bar in teacher]
    assert heights[:2] == pytest.approx([35.0, 40.0]) and all(h != h for h in heights[2:])  # NaN: no bar
    assert [bar.get_height() for bar in random_init][:2] == pytest.approx([30.0, 30.0])
    assert sum(t.get_text() == "failed" for t in one_nn.texts) == 2
    (baseline,) = [line for line in one_nn.get_lines() if line.get_label() == "baseline teacher"]
    assert baseline.get_ydata()[0] == pytest.approx(35.0)


def test_collect_rejects_a_directory_without_jobs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no job directories"):
        collect(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such sweep"):
        collect(tmp_path / "missing")


def test_seeds_pair_each_variant_with_the_baseline_of_the_same_seed(tmp_path):
    from scipy import stats

    sweep = tmp_path / "multirun"
    base = {0: 0.30, 1: 0.40, 2: 0.35}  # seed-to-seed spread far larger than the effect
    gain = {0: 0.02, 1: 0.03, 2: 0.01}
    for i, seed in enumerate(base):
        _job(sweep, 2 * i, "baseline", "baseline", base[seed], seed)
        _job(sweep, 2 * i + 1, "koleo", "KoLeo 0.1", base[seed] + gain[seed], seed)
    frame = write_summary(sweep, None, "weighted_f1")
    assert sorted(frame["seed"].dropna().unique()) == [0, 1, 2]
    csv = pd.read_csv(sweep / SUMMARY_CSV)
    row = csv[
        (csv["variant"] == "KoLeo 0.1") & (csv["model"] == "pretrained_teacher") & (csv["probe"] == "knn1")
    ]
    diffs = [100 * g for g in gain.values()]
    half = stats.t.ppf(0.975, 2) * pd.Series(diffs).std() / 3**0.5
    assert row["paired_seeds"].iloc[0] == 3
    assert row["paired_diff"].iloc[0] == pytest.approx(2.0)
    assert row["paired_ci_low"].iloc[0] == pytest.approx(2.0 - half)
    assert row["paired_ci_high"].iloc[0] == pytest.approx(2.0 + half)
    md = (sweep / SUMMARY_MD).read_text()
    assert (
        f"| koleo | KoLeo 0.1 | 1-NN | 3 | +2.0 | [{2.0 - half:+.1f}, {2.0 + half:+.1f}] | +2.0 +3.0 +1.0 |"
        in md
    )
    assert "| 1 | koleo | KoLeo 0.1 | 0 | 100 |" in md  # each job against its own seed's baseline


def test_sweep_grids_live_in_their_own_group_and_set_only_the_sweeper(compose):
    """conf/sweep/ holds the grids; an experiment picks one, and the sweep adds no run setting."""
    conf = Path(__file__).resolve().parents[2] / "conf"
    assert not any("sweeper" in p.read_text() for p in (conf / "experiment").glob("*.yaml"))
    for grid in sorted(p.stem for p in (conf / "sweep").glob("*.yaml")):
        plain, swept = compose("experiment=embedded"), compose("experiment=embedded", f"sweep={grid}")
        assert not _changed(plain, swept), f"sweep={grid} changes run settings"
        names = compose("experiment=embedded", f"sweep={grid}", hydra=True).hydra.sweeper.params.ablation
        assert set(names.split(",")) <= set(VARIANTS)


def test_mean_interval_is_the_t_interval_and_has_no_bounds_below_two_values():
    mean, lo, hi = mean_interval([1.0, 2.0, 3.0])
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - 2.4841, 2.0 + 2.4841), abs=1e-4)  # 4.3027 / sqrt(3)
    one = mean_interval([1.5])
    assert one[0] == 1.5 and all(v != v for v in one[1:])  # NaN bounds
    assert all(v != v for v in mean_interval([]))
