"""``reddino-ablations-summary <sweep dir>``: one table and one figure for every job of an ablation multirun.

Each job directory of the sweep (``multirun/ablations/<timestamp>/<n>``) holds the config the job ran
with (``config.yaml``, or Hydra's ``.hydra/config.yaml`` when the job died before writing it) and, when
it finished, ``results.json``. The variant is read from the config's ``ablation`` key (conf/ablation/).
A job without results is reported as failed with the error ``reddino-ablations`` wrote to ``error.txt``,
so one failed or killed job never hides the others. Writes ``summary.csv`` (one row per job, model and
k), ``summary.md`` and ``fig2_ablation_bars.png`` (the paper's Figure 2) into the sweep directory.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from reddino.ablations import ERROR_FILE
from reddino.runtime.markdown import markdown_table
from reddino.viz.plots import MODEL_LABELS, ablation_bars, probe_label

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
FIGURE_PNG = "fig2_ablation_bars.png"
KEYS = ["job", "axis", "variant", "seed", "status", "error", "steps", "overrides", "model", "probe"]
PAIRED_COLUMNS = ["paired_seeds", "paired_diff", "paired_ci_low", "paired_ci_high"]
CONFIDENCE = 0.95


@dataclass
class JobRecord:
    """What one job directory says: its variant, whether it finished, and its k-NN scores."""

    job: str
    axis: str
    variant: str
    seed: int | None
    overrides: str
    status: str  # ok | failed
    error: str
    steps: int | None
    results: dict[str, Any] = field(default_factory=dict)


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job directories of a sweep (Hydra's ``.hydra`` marks them), numeric names in job order."""
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
    return sorted(dirs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def _config_keys(job_dir: Path) -> tuple[dict[str, Any], int | None]:
    """The job's ``ablation`` config key (axis, variant; empty for a job run without one) and seed."""
    for path in (job_dir / "config.yaml", job_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            cfg = OmegaConf.load(path)
            seed = cfg.get("seed")
            ablation = OmegaConf.to_container(cfg.get("ablation") or {}, resolve=False)
            return ablation, int(seed) if isinstance(seed, int) else None
    return {}, None


def _overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def _failure(job_dir: Path) -> str:
    """The exception of ``error.txt`` (the unindented lines closing the traceback, as one line), else
    what the job log last said."""
    error = job_dir / ERROR_FILE
    if error.is_file():
        lines = [line for line in error.read_text().splitlines() if line.strip()]
        tail: list[str] = []
        for line in reversed(lines):
            if line[:1].isspace() or line.startswith("Traceback"):
                break
            tail.insert(0, line.strip())
        return " ".join(tail) or "empty error.txt"
    logs = sorted(job_dir.glob("*.log"))
    tail = [line for log in logs for line in log.read_text(errors="replace").splitlines() if line.strip()]
    last = f"; last log line: {tail[-1].strip()}" if tail else ""
    return f"no results.json and no {ERROR_FILE} (killed, or still running){last}"


def read_job(job_dir: Path) -> JobRecord:
    ablation, seed = _config_keys(job_dir)
    overrides = [o for o in _overrides(job_dir) if not o.startswith("seed=")]
    results_path = job_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    ok = bool(results.get("results"))
    return JobRecord(
        job=job_dir.name,
        axis=str(ablation.get("axis", "-")),
        variant=str(ablation.get("variant", " ".join(overrides) or job_dir.name)),
        seed=seed,
        overrides=" ".join(overrides),
        status="ok" if ok else "failed",
        error="" if ok else _failure(job_dir),
        steps=results.get("steps"),
        results=results.get("results", {}),
    )


def collect(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per (job, model, probe) with every metric's mean and std (fractions); a failed job is one row
    with its error and no scores."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: no such sweep directory")
    records = [read_job(d) for d in job_dirs(sweep_dir)]
    if not records:
        raise FileNotFoundError(f"{sweep_dir}: no job directories (subfolders with .hydra/)")
    rows, metrics = [], {}
    for r in records:
        base = {k: getattr(r, k) for k in KEYS[:-2]}
        if r.status != "ok":
            rows.append({**base, "model": None, "probe": None})
            continue
        for model, by_k in r.results.items():
            for k, scores in by_k.items():
                row = {**base, "model": model, "probe": k}
                for m, s in scores.items():  # the metrics results.json holds, in its order
                    if isinstance(s, dict) and "mean" in s:
                        row[f"{m}_mean"], row[f"{m}_std"] = s["mean"], s["std"]
                        metrics[m] = None
                rows.append(row)
    return pd.DataFrame(rows, columns=KEYS + [f"{m}_{s}" for m in metrics for s in ("mean", "std")])


def _with_seed_key(frame: pd.DataFrame) -> pd.DataFrame:
    """``seed_key``: the job's seed, or "none" for jobs whose config has none (pairs them together)."""
    return frame.assign(seed_key=["none" if pd.isna(v) else int(v) for v in frame["seed"]])


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and its ``CONFIDENCE`` t interval (NaN bounds with fewer than two values, NaN mean with none)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(np.mean(values))
    if n == 1:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * np.std(values, ddof=1) / np.sqrt(n))
    return mean, mean - half, mean + half


def paired_differences(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per variant (and model, k): its ``metric`` minus the baseline job's with the same seed, over the
    seeds both finished, as the mean difference and its 95 % t interval (points; NaN bounds with one
    seed). A seed changes the pretraining and the report's folds alike, so pairing by seed removes what
    the two recipes share; a single run cannot rank recipes closer than its seed-to-seed spread."""
    scored = _with_seed_key(frame[frame["status"] == "ok"])
    base = scored[scored["axis"] == "baseline"].set_index(["seed_key", "model", "probe"])[f"{metric}_mean"]
    rows = []
    others = scored[scored["axis"] != "baseline"]
    for (axis, variant, model, k), g in others.groupby(["axis", "variant", "model", "probe"], sort=False):
        diffs = [
            100 * (r[f"{metric}_mean"] - base[(r["seed_key"], model, k)])
            for _, r in g.iterrows()
            if (r["seed_key"], model, k) in base.index
        ]
        n = len(diffs)
        mean, lo, hi = mean_interval(diffs)
        rows.append(
            {
                "axis": axis,
                "variant": variant,
                "model": model,
                "probe": k,
                "paired_seeds": n,
                "paired_diff": mean,
                "paired_ci_low": lo,
                "paired_ci_high": hi,
                "paired_per_seed": " ".join(f"{d:+.1f}" for d in diffs),
            }
        )
    return pd.DataFrame(
        rows, columns=["axis", "variant", "model", "probe", *PAIRED_COLUMNS, "paired_per_seed"]
    )


def paired_markdown(paired: pd.DataFrame, metric: str) -> list[str]:
    """The teacher's paired differences as a table (an interval needs at least two seeds)."""
    teacher = paired[paired["model"] == "pretrained_teacher"]
    if teacher.empty:
        return []
    table = pd.DataFrame(
        {
            "axis": teacher["axis"],
            "variant": teacher["variant"],
            "probe": [probe_label(k) for k in teacher["probe"]],
            "seeds": teacher["paired_seeds"],
            f"Δ {metric} (points)": [f"{d:+.1f}" for d in teacher["paired_diff"]],
            "95% CI": [
                "n/a (1 seed)" if n < 2 else f"[{lo:+.1f}, {hi:+.1f}]"
                for n, lo, hi in zip(
                    teacher["paired_seeds"], teacher["paired_ci_low"], teacher["paired_ci_high"], strict=True
                )
            ],
            "per seed": teacher["paired_per_seed"],
        }
    )
    return [
        "## Teacher vs the baseline, paired by seed",
        "",
        "Mean over seeds of (variant - baseline job with the same seed), with a 95 % t interval. An "
        "interval that contains 0 does not rank the two recipes. Add seeds with "
        '`make ablations ARGS="seed=0,1,2"`.',
        "",
        markdown_table(table.reset_index(drop=True)),
        "",
    ]


def metric_names(frame: pd.DataFrame) -> list[str]:
    """The metrics ``collect`` found (columns ``<metric>_mean``)."""
    return [c[: -len("_mean")] for c in frame.columns if c.endswith("_mean")]


def _cell(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def wide_table(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per job: ``metric`` as mean ± std (%) per model and k, the teacher's change from the
    baseline job (percentage points), and the job's status (with its error when it failed)."""
    frame = _with_seed_key(frame)
    scored = frame[frame["status"] == "ok"]
    baseline = scored[scored["axis"] == "baseline"].set_index(["seed_key", "model", "probe"])
    score_cols: dict[str, None] = {}
    delta_cols: dict[str, None] = {}
    rows = []
    for job, g in frame.groupby("job", sort=False):
        first = g.iloc[0]
        steps = "" if pd.isna(first["steps"]) else str(int(first["steps"]))
        seed = "" if pd.isna(first["seed"]) else str(int(first["seed"]))
        row = {"job": job, "axis": first["axis"], "variant": first["variant"], "seed": seed, "steps": steps}
        for s in g[g["status"] == "ok"].itertuples(index=False):
            mean = getattr(s, f"{metric}_mean")
            label = f"{MODEL_LABELS.get(s.model, s.model)} {probe_label(s.probe)}"
            row[label] = _cell(mean, getattr(s, f"{metric}_std"))
            score_cols[label] = None
            if s.model == "pretrained_teacher" and (first["seed_key"], s.model, s.probe) in baseline.index:
                if first["axis"] != "baseline":
                    base = baseline.at[(first["seed_key"], s.model, s.probe), f"{metric}_mean"]
                    row[f"Δ {label}"] = f"{100 * (mean - base):+.1f}"
                delta_cols[f"Δ {label}"] = None
        row["status"] = "ok" if first["status"] == "ok" else f"FAILED: {first['error']}"
        rows.append(row)
    columns = ["job", "axis", "variant", "seed", "steps", *score_cols, *delta_cols, "status"]
    return pd.DataFrame(rows, columns=columns).astype(object).fillna("")


def summary_markdown(frame: pd.DataFrame, metric: str, sweep_dir: Path) -> str:
    failed = frame[frame["status"] != "ok"]
    lines = [
        f"# Ablation summary: {sweep_dir}",
        "",
        f"{metric} in % (mean ± std over folds) of the end-of-run k-NN report; Δ = teacher minus the "
        "teacher of the baseline job with the same seed, in points.",
        "",
        markdown_table(wide_table(frame, metric)),
        "",
        *paired_markdown(paired_differences(frame, metric), metric),
    ]
    if len(failed):
        lines += [f"**{len(failed)} failed job(s):**", ""]
        lines += [f"- job {r.job} ({r.variant}): {r.error}" for r in failed.itertuples(index=False)]
    else:
        lines.append("All jobs finished.")
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: str | Path, out_dir: str | Path | None, metric: str) -> pd.DataFrame:
    """Write summary.csv, summary.md and the Figure 2 PNG (into ``out_dir``, default the sweep dir)."""
    sweep_dir = Path(sweep_dir)
    out = Path(out_dir) if out_dir is not None else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    frame = collect(sweep_dir)
    if metric not in metric_names(frame) and (frame["status"] == "ok").any():
        raise ValueError(f"no metric {metric!r} in the results; they hold {metric_names(frame)}")
    paired = paired_differences(frame, metric)
    with_pairs = frame.merge(
        paired[["axis", "variant", "model", "probe", *PAIRED_COLUMNS]],
        on=["axis", "variant", "model", "probe"],
        how="left",
    )
    with_pairs.to_csv(out / SUMMARY_CSV, index=False)
    (out / SUMMARY_MD).write_text(summary_markdown(frame, metric, sweep_dir))
    fig = ablation_bars(frame, metric)
    fig.savefig(out / FIGURE_PNG, dpi=150)
    return frame


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reddino-ablations-summary", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory, e.g. multirun/ablations/<time>")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep dir)")
    parser.add_argument("--metric", default="weighted_f1", help="the metric of the table and Figure 2")
    args = parser.parse_args(argv)
    frame = write_summary(args.sweep_dir, args.out, args.metric)
    out = args.out or args.sweep_dir
    print((out / SUMMARY_MD).read_text())
    print(f"wrote {out / SUMMARY_CSV}, {out / SUMMARY_MD}, {out / FIGURE_PNG}")
    n_failed = int((frame.drop_duplicates("job")["status"] != "ok").sum())
    return 1 if n_failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
