"""The 131,072-prototype head step alone, dense vs chunked: wall time and peak memory, side by side.

Usage (results, machine and date: ``benchmarks/head_step.md``)::

    .venv/bin/python -m benchmarks.head_step                       # M=4096, K=131072, D=256
    .venv/bin/python -m benchmarks.head_step --tokens 512 --prototypes 8192 --repeats 1   # a quick look

One step = teacher targets (Sinkhorn-Knopp, 3 iterations) + the student's iBOT cross-entropy forward
and backward, from the heads' bottleneck features (the MLPs and the backbone are left out: they are
the same in both paths). Each path runs in its own child process, so its peak resident set size is
its own; the figure reported is that peak minus the resident size after the inputs were made.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date

import torch

from reddino.ssl.centering import SinkhornKnoppCentering, sinkhorn_knopp
from reddino.ssl.chunked_head import chunked_ibot_loss, chunked_targets
from reddino.ssl.losses import ibot_patch_loss

TEMP, STUDENT_TEMP, N_ITER = 0.04, 0.1, 3


def rss_bytes() -> int:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def inputs(tokens: int, prototypes: int, dim: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)  # noqa: E731
    return {
        "z_teacher": unit(tokens, dim),
        "z_student": unit(tokens, dim).requires_grad_(True),
        "w_teacher": unit(prototypes, dim),
        "w_student": unit(prototypes, dim).requires_grad_(True),
        "weights": torch.rand(tokens, generator=gen),
    }


def dense_step(x: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
    del chunk
    with torch.no_grad():
        targets = sinkhorn_knopp(x["z_teacher"] @ x["w_teacher"].T, TEMP, N_ITER)
    loss = ibot_patch_loss(x["z_student"] @ x["w_student"].T, targets, x["weights"], 64, STUDENT_TEMP)
    loss.backward()
    return loss.detach()


def chunked_step(x: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
    targets = chunked_targets(SinkhornKnoppCentering(N_ITER), x["z_teacher"], x["w_teacher"], TEMP, chunk)
    loss = chunked_ibot_loss(x["z_student"], x["w_student"], targets, x["weights"], 64, STUDENT_TEMP, chunk)
    loss.backward()
    return loss.detach()


def child(path: str, tokens: int, prototypes: int, dim: int, chunk: int, repeats: int) -> dict:
    """One path in this process: best wall time over ``repeats`` and the peak memory above the inputs."""
    x = inputs(tokens, prototypes, dim)
    base = rss_bytes()
    step = dense_step if path == "dense" else chunked_step
    times, loss = [], None
    for _ in range(repeats):
        for t in ("z_student", "w_student"):
            x[t].grad = None
        tic = time.perf_counter()
        loss = step(x, chunk)
        times.append(time.perf_counter() - tic)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "path": path,
        "seconds": min(times),
        "seconds_all": times,
        "peak_above_inputs_mb": (peak - base) / 2**20,
        "loss": float(loss),
        "grad_norm": float(x["z_student"].grad.norm()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="masked tokens M")
    parser.add_argument("--prototypes", type=int, default=131_072, help="K")
    parser.add_argument("--dim", type=int, default=256, help="bottleneck D")
    parser.add_argument("--chunk", type=int, default=512, help="rows per chunk (chunked path)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=("dense", "chunked"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.tokens, args.prototypes, args.dim, args.chunk, args.repeats)
    if args.child:
        print(json.dumps(child(args.child, *shape)))
        return
    print(f"date {date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; M={args.tokens} K={args.prototypes} D={args.dim} "
          f"chunk={args.chunk}")  # fmt: skip
    rows = []
    for path in ("dense", "chunked"):
        cmd = [sys.executable, "-m", "benchmarks.head_step", "--child", path, "--tokens", str(args.tokens),
               "--prototypes", str(args.prototypes), "--dim", str(args.dim), "--chunk", str(args.chunk),
               "--repeats", str(args.repeats)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| path | seconds (best) | all runs | peak memory above inputs (MB) | loss | grad norm |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        runs = ", ".join(f"{t:.2f}" for t in r["seconds_all"])
        print(f"| {r['path']} | {r['seconds']:.2f} | {runs} | {r['peak_above_inputs_mb']:.0f} | "
              f"{r['loss']:.6f} | {r['grad_norm']:.6g} |")  # fmt: skip
    dense, chunked = rows
    print(f"chunked / dense: time {chunked['seconds'] / dense['seconds']:.2f}x, "
          f"peak memory {chunked['peak_above_inputs_mb'] / dense['peak_above_inputs_mb']:.3f}x")  # fmt: skip


if __name__ == "__main__":
    main()
