"""Pretraining throughput: images/s, model FLOP utilisation (MFU) and peak memory of one recipe.

Two modes, one process (the compiled model is shared):
- ``model``: model-bound. A few real batches are put on the device once and cycled, so only the training
  step is timed (teacher forward, student forward + losses, backward, clipping, AdamW, EMA). A second
  pass synchronises after every piece and prints the split.
- ``loader``: end to end. Every step takes the next batch from the real DataLoader (workers, augmentation,
  host-to-device copy and the datamodule's on-device transform), as ``reddino-pretrain`` does.

Model FLOPs are counted once, before compilation, with ``torch.utils.flop_counter.FlopCounterMode`` on one
real step: every matmul, convolution and attention of the student forward + backward, the teacher forward
and both heads (Sinkhorn-Knopp, softmax and the optimiser are not model FLOPs). MFU = counted FLOPs per
second / the device's dense bf16 peak.

    .venv/bin/python -m benchmarks.throughput --device cuda experiment=reddino_s data=real
    .venv/bin/python -m benchmarks.throughput debug=fast                     # tiny, CPU (the tests)
Trailing arguments are Hydra overrides of conf/pretrain.yaml.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import StepRunner, endless, pretrain_config, split_steps, to_device
from reddino.runtime.fast_path import FastPath, compile_blocks_
from reddino.workflows.pretraining import build_training

# dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device name; the first match wins
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def count_step_flops(runner: StepRunner, batch: dict) -> int:
    """FLOPs of one step's forward passes and the student backward (no optimiser step is taken)."""
    with FlopCounterMode(display=False) as counter:
        runner.losses(batch, step=0).backward()
    runner.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def timed_steps(runner: StepRunner, batches, steps: int, first_step: int) -> tuple[float, float]:
    """Seconds for ``steps`` steps (synchronised only at both ends) and the seconds spent waiting for data."""
    waiting = 0.0
    runner.sync()
    start = time.perf_counter()
    for step in range(first_step, first_step + steps):
        before = time.perf_counter()
        batch = next(batches)
        waiting += time.perf_counter() - before
        runner.step(batch, step)
    runner.sync()
    return time.perf_counter() - start, waiting


def profile_kernels(runner: StepRunner, batches, steps: int, first_step: int, path: Path) -> None:
    """Device-time table of the kernels of a few steps (what bounds the step), written to ``path``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if runner.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for step in range(first_step, first_step + steps):
            runner.step(next(batches), step)
        runner.sync()
    sort = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default="model,loader", help="comma-separated: model, loader")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode (after --warmup)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, workers)")
    parser.add_argument("--cached-batches", type=int, default=4, help="batches cycled in model mode")
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: by device name")
    parser.add_argument("--profile", type=Path, default=None, help="write a kernel table of 3 steps here")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--heads",
        default="config",
        help="comma-separated head paths, measured one after the other: dense, chunked "
        "(ssl.head.chunked=false/true); 'config' = as the overrides say",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/pretrain.yaml")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - {"model", "loader"}:
        raise SystemExit(f"unknown modes {sorted(unknown)}: use model and/or loader")
    heads = [h for h in args.heads.split(",") if h]
    if unknown := set(heads) - {"config", "dense", "chunked"}:
        raise SystemExit(f"unknown head paths {sorted(unknown)}: use dense and/or chunked")
    reports, flops = {}, None
    for head in heads:
        extra = [] if head == "config" else [f"ssl.head.chunked={head == 'chunked'}"]
        print(f"## head path: {head}")
        reports[head] = measure(args, [*args.overrides, *extra], modes, flops)
        flops = reports[head]["flops_per_step"]  # model FLOPs: counted once, on the first path
    if args.json is not None:
        report = reports[heads[0]] if len(heads) == 1 else {"heads": reports}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def measure(args: argparse.Namespace, overrides: list[str], modes: list[str], flops: int | None) -> dict:
    """Every mode for one config; ``flops`` = model FLOPs per step when already counted (the chunked
    head recomputes logits, which a counter would count as extra work, not extra model)."""
    cfg = pretrain_config(overrides)
    device = torch.device(args.device)
    bf16 = device.type == "cuda" and "bf16" in str(cfg.trainer.precision)
    fast = FastPath.from_config(cfg.fast_path, "cuda" if device.type == "cuda" else "cpu")
    # build uncompiled so FLOPs are counted on plain aten ops; compile afterwards as the fast path says
    uncompiled = pretrain_config([*overrides, "fast_path.compile_blocks=false"])
    datamodule, module, _ = build_training(uncompiled)
    datamodule.setup("fit")
    runner = StepRunner(module, datamodule.batch_size, device, bf16)
    first = iter(datamodule.train_dataloader())
    cached = [to_device(next(first), datamodule, device) for _ in range(args.cached_batches)]
    del first
    flops = count_step_flops(runner, cached[0]) if flops is None else flops
    if fast.compile_blocks:
        for nets in (module.student, module.teacher):
            compile_blocks_(nets["backbone"])

    batch = datamodule.batch_size
    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report: dict = {
        "device": name,
        "date": str(date.today()),
        "torch": torch.__version__,
        "overrides": overrides,
        "fast_path": fast.__dict__,
        "batch": batch,
        "global_crops": int(cfg.augment.n_global),
        "local_crops": int(cfg.crops.n_local),
        "loader_workers": int(cfg.data.loader.num_workers),
        "flops_per_step": flops,
        "flops_per_image": flops / batch,
        "peak_tflops": peak,
        "modes": {},
    }
    print(f"# throughput, {device} ({name}), {date.today()}, torch {torch.__version__}")
    print(f"overrides: {overrides}")
    print(f"batch {batch} x {cfg.augment.n_global} global crops, fast path {fast}")
    print(f"model FLOPs: {flops / 1e12:.3f} TFLOP per step, {flops / batch / 1e9:.2f} GFLOP per image")

    step = 0
    for mode in modes:
        if mode == "model":
            batches = itertools.cycle(cached)
        else:
            batches = (to_device(b, datamodule, device) for b in endless(datamodule.train_dataloader))
        timed_steps(runner, batches, args.warmup, step)  # compilation, worker start-up, allocator
        step += args.warmup
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, waiting = timed_steps(runner, batches, args.steps, step)
        step += args.steps
        rate = args.steps * batch / seconds
        figures = {
            "step_ms": 1000 * seconds / args.steps,
            "images_per_s": rate,
            "data_wait_share": waiting / seconds,
            "achieved_tflops": flops * args.steps / seconds / 1e12,
        }
        if peak is not None:
            figures["mfu"] = figures["achieved_tflops"] / peak
        if device.type == "cuda":
            figures["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if mode == "model":
            figures["split_ms"] = split_steps(runner, batches, args.steps, step)
            step += args.steps
            if args.profile is not None:
                profile_kernels(runner, batches, 3, step, args.profile)
                step += 3
        report["modes"][mode] = figures
        mfu = f", MFU {100 * figures['mfu']:.1f} % of {peak:.0f} TFLOP/s" if "mfu" in figures else ""
        memory = f", peak memory {figures['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in figures else ""
        print(
            f"{mode:6s} step {figures['step_ms']:8.1f} ms  {rate:8.1f} images/s  "
            f"{figures['achieved_tflops']:.3f} TFLOP/s{mfu}{memory}  "
            f"data wait {100 * waiting / seconds:.1f} %"
        )
        for piece, ms in figures.get("split_ms", {}).items():
            print(f"    {piece:22s} {ms:9.1f} ms")
    return report


if __name__ == "__main__":
    main()
