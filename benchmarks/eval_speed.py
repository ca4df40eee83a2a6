"""Wall time of the evaluation core on cached features: grouped 5-fold x (linear probe, 1-NN, 20-NN).

Synthetic Gaussian-mixture "CLS features" (class means + a per-image offset + noise, raw and unevenly
scaled like real embeddings) at the paper's dataset sizes. Prints one line per fold and a summary.
Ours (the torch linear probe and ONE neighbour search serving every k, as ``reddino-eval`` scores) runs
side by side with the reference protocol (scikit-learn's LogisticRegression and one
KNeighborsClassifier per k) on the same folds, and the summary gives the ratio of the two times.

    .venv/bin/python benchmarks/eval_speed.py                      # Chula scale, 5 folds, with sklearn
    .venv/bin/python benchmarks/eval_speed.py --scale elsafty --folds 1 --no-sklearn
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from reddino.eval.knn import knn_predict_many
from reddino.eval.linear import TORCH_TOL, TorchLinearProbe, reference_C, sklearn_linear_probe
from reddino.eval.metrics import classification_metrics
from reddino.eval.protocols import grouped_kfold

T = TypeVar("T")
SCALES = {  # (cells, feature dim, classes, cells per image)
    "chula": (22_000, 384, 13, 35),
    "elsafty": (240_000, 768, 8, 35),
}


def synthetic_features(
    n: int, dim: int, classes: int, per_image: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features float32, labels, image ids): imbalanced classes, image-level offsets, raw scaling."""
    rng = np.random.default_rng(seed)
    groups = np.arange(n) // per_image
    labels = rng.choice(classes, size=n, p=rng.dirichlet(np.full(classes, 2.0)))
    means = rng.normal(scale=0.1, size=(classes, dim))
    image_offsets = rng.normal(scale=0.3, size=(groups.max() + 1, dim))
    x = means[labels] + image_offsets[groups] + rng.normal(size=(n, dim))
    scale = rng.lognormal(sigma=0.5, size=dim)  # unstandardised, like raw CLS dimensions
    return (x * scale + 0.5).astype(np.float32), labels, groups


def torch_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    test_x: torch.Tensor,
    classes: int,
    dtype: torch.dtype,
    precondition: bool,
    tol: float,
) -> tuple[torch.Tensor, int]:
    """``torch_linear_probe`` plus the L-BFGS iteration count (every class is in every synthetic fold)."""
    C = reference_C(x.shape[1], classes)
    probe = TorchLinearProbe(x.shape[1], classes, C, len(y), 1000, tol).to(dtype)
    iterations = probe.fit_full_batch(x.to(dtype), y, precondition=precondition)
    with torch.no_grad():
        return probe(test_x.to(dtype)).argmax(dim=1), iterations


def bare_distance_matmul(train_x: torch.Tensor, test_x: torch.Tensor, chunk_size: int) -> None:
    """The floor of any exact k-NN: every test-train dot product, chunk by chunk, nothing else."""
    for start in range(0, test_x.shape[0], chunk_size):
        test_x[start : start + chunk_size] @ train_x.T


def sklearn_knn(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int) -> np.ndarray:
    """The reference's k-NN: a default KNeighborsClassifier (Euclidean, uniform votes), fit per k."""
    return KNeighborsClassifier(n_neighbors=k).fit(train_x, train_y).predict(test_x)


def timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """(result, seconds)."""
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def run(args: argparse.Namespace) -> None:
    n, dim, classes, per_image = SCALES[args.scale]
    n = args.n or n
    x_np, y_np, groups = synthetic_features(n, dim, classes, per_image, args.seed)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    print(
        f"{args.scale}: {n} x {dim}, {classes} classes, {groups.max() + 1} images, threads {args.threads}, "
        f"torch {args.dtype}, precondition {args.precondition}, tol {args.tol:g}"
    )
    totals: dict[str, float] = {}
    f1: dict[str, list[float]] = {}
    agreement = []
    for fold, (tr_np, te_np) in enumerate(grouped_kfold(y_np, groups, 5, args.seed)):
        if fold >= args.folds:
            break
        tr, te = torch.from_numpy(tr_np), torch.from_numpy(te_np)
        (pred, iters), t_lin = timed(
            torch_probe, x[tr], y[tr], x[te], classes, dtype, args.precondition, args.tol
        )
        row = {"torch_linear": (pred, t_lin)}
        if args.ks:
            _, t_mm = timed(bare_distance_matmul, x[tr], x[te], 2048)
            row["bare_matmul"] = (None, t_mm)
            by_k, t_knn = timed(
                knn_predict_many, x[tr], y[tr], x[te], args.ks, classes, "euclidean", None, 2048
            )
            for k in args.ks:  # one search serves every k: its time is booked once, on the first k
                row[f"{k}-NN"] = (by_k[k], t_knn if k == args.ks[0] else 0.0)
        if args.sklearn:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                sk, t_sk = timed(
                    sklearn_linear_probe,
                    x_np[tr_np],
                    y_np[tr_np],
                    x_np[te_np],
                    reference_C(dim, classes),
                    1000,
                )
            converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
            row["sklearn_linear"] = (torch.from_numpy(sk), t_sk)
            for k in args.ks:
                pred_sk, t_sk_k = timed(sklearn_knn, x_np[tr_np], y_np[tr_np], x_np[te_np], k)
                row[f"sklearn_{k}-NN"] = (torch.from_numpy(pred_sk), t_sk_k)
            agreement.append(float((row["torch_linear"][0].cpu() == row["sklearn_linear"][0]).float().mean()))
        parts = []
        for name, (p, t) in row.items():
            totals[name] = totals.get(name, 0.0) + t
            if p is None:  # a timing floor, no prediction
                parts.append(f"{name} {t:6.1f}s")
                continue
            score = classification_metrics(y[te], p.cpu(), classes)["weighted_f1"]
            f1.setdefault(name, []).append(score)
            parts.append(f"{name} {t:6.1f}s wF1 {100 * score:5.1f}")
        extra = f" | torch L-BFGS iters {iters}" + (
            f", sklearn converged {converged}" if args.sklearn else ""
        )
        print(f"fold {fold}: " + " | ".join(parts) + extra, flush=True)
    core = totals["torch_linear"] + sum(totals[f"{k}-NN"] for k in args.ks)
    print("totals: " + ", ".join(f"{k} {v:.1f}s" for k, v in totals.items()))
    print(f"ours: torch linear + k-NN {list(args.ks)} (one search): {core:.1f}s")
    if args.ks:
        knn_time = sum(totals[f"{k}-NN"] for k in args.ks)
        print(
            f"k-NN {list(args.ks)} / bare distance matmul: {knn_time:.1f}s / {totals['bare_matmul']:.1f}s"
            f" = {knn_time / totals['bare_matmul']:.2f}x"
        )
    if args.sklearn:
        reference = totals["sklearn_linear"] + sum(totals[f"sklearn_{k}-NN"] for k in args.ks)
        print(f"reference: sklearn linear + one KNeighborsClassifier per k: {reference:.1f}s")
        print(f"speed-up, reference / ours, same folds and features: {reference / core:.2f}x")
        for ours, ref in [("torch_linear", "sklearn_linear")] + [
            (f"{k}-NN", f"sklearn_{k}-NN") for k in args.ks
        ]:
            diff = 100 * (np.mean(f1[ours]) - np.mean(f1[ref]))
            print(f"weighted F1 {ours} - {ref}: {diff:+.2f} points")
    print("mean weighted F1: " + ", ".join(f"{k} {100 * np.mean(v):.2f}" for k, v in f1.items()))
    if agreement:
        print(f"torch vs sklearn prediction agreement: {100 * np.mean(agreement):.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", choices=sorted(SCALES), default="chula")
    parser.add_argument("--n", type=int, default=0, help="override the number of cells")
    parser.add_argument("--folds", type=int, default=5, help="time only the first N of the 5 folds")
    parser.add_argument("--no-sklearn", dest="sklearn", action="store_false", help="skip the sklearn probe")
    parser.add_argument(
        "--dtype", choices=("float64", "float32"), default="float32", help="torch probe dtype"
    )
    parser.add_argument("--no-precondition", dest="precondition", action="store_false", help="raw L-BFGS")
    parser.add_argument("--ks", type=int, nargs="*", default=[1, 20], help="k-NN sizes ('--ks' alone: none)")
    parser.add_argument("--tol", type=float, default=TORCH_TOL, help="torch L-BFGS gradient tolerance")
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared, loaded box")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        run(args)


if __name__ == "__main__":
    main()
