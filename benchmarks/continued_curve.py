"""Does continued pretraining keep what it starts from? Reads continued runs' results.json (one run per
seed, each started from its own model with ``init=``) and prints, for each run, the k-NN probe curve as
points above or below its first probe (step 0: the starting weights), the lowest point and the end; then,
over the runs, the end-of-run report's teacher minus its starting weights (``init_weights``), as the mean
and its 95 % t interval.

    .venv/bin/python benchmarks/continued_curve.py <run dir> [<run dir> ...] [--suffix _whitened]

The criterion of issue 17: never more than 1 point below the start at any checkpoint, above it at the end.
Only results.json is read (plain JSON), nothing a run directory holds is executed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from reddino.ablations.summary import mean_interval

PROBES = ("linear", "knn1", "knn20")


def curve_relative_to_start(curve: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, points above the step-0 probe) for every probe of the curve."""
    if not curve or curve[0]["step"] != 0:
        raise ValueError("the k-NN curve must start with a probe at step 0 (the starting weights)")
    start = curve[0][key]
    return [(int(p["step"]), float(p[key]) - start) for p in curve]


def report_differences(results: dict[str, Any]) -> dict[str, float]:
    """The end-of-run report's teacher minus ``init_weights``, weighted F1 in points, per probe."""
    if "init_weights" not in results:
        raise ValueError("no init_weights row: not a continued run (init=...)")
    return {
        probe: 100
        * (
            results["pretrained_teacher"][probe]["weighted_f1"]["mean"]
            - results["init_weights"][probe]["weighted_f1"]["mean"]
        )
        for probe in PROBES
        if probe in results["pretrained_teacher"]
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, nargs="+", help="continued pretraining run directories")
    parser.add_argument("--suffix", default="_whitened", help="curve keys: '_whitened' or '' (raw CLS)")
    args = parser.parse_args()
    differences: dict[str, list[float]] = {p: [] for p in PROBES}
    for run in args.runs:
        summary = json.loads((run / "results.json").read_text())
        print(f"\n{run}")
        for k in (1, 20):
            key = f"knn{k}_weighted_f1{args.suffix}"
            relative = curve_relative_to_start(summary["knn_curve"], key)
            steps = " ".join(f"{step}:{d:+.1f}" for step, d in relative)
            lowest = min(d for _, d in relative)
            print(f"  {k}-NN curve from {summary['knn_curve'][0][key]:.1f}: {steps}")
            print(f"  {k}-NN lowest {lowest:+.1f}, end {relative[-1][1]:+.1f}")
        diffs = report_differences(summary["results"])
        print("  report, teacher - init_weights: " + ", ".join(f"{p} {d:+.2f}" for p, d in diffs.items()))
        for probe, d in diffs.items():
            differences[probe].append(d)
    print(f"\nover {len(args.runs)} runs, report teacher - init_weights (points, mean [95 % t interval]):")
    for probe, values in differences.items():
        mean, lo, hi = mean_interval(values)
        print(
            f"  {probe}: {mean:+.2f} [{lo:+.2f}, {hi:+.2f}]  per run " + " ".join(f"{v:+.2f}" for v in values)
        )


if __name__ == "__main__":
    main()
