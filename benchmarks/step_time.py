"""Pretraining step time split into data / teacher forward / student forward+loss / backward /
optimiser / EMA, for any recipe (tiny CPU model by default; a GPU run gives the real figures).

The pieces are the LightningModule's own (``teacher_targets``, ``student_losses``, ``ema_step``) and the
fast path is applied exactly as ``reddino-pretrain`` applies it; CUDA is synchronised around each piece.

    .venv/bin/python benchmarks/step_time.py                                   # embedded default, CPU
    .venv/bin/python benchmarks/step_time.py --device cuda experiment=reddino_s trainer=gpu
Trailing arguments are Hydra overrides of conf/pretrain.yaml.
"""

from __future__ import annotations

import argparse
import platform
from datetime import date

import torch

from benchmarks.common import PIECES, StepRunner, endless, pretrain_config, split_steps, to_device
from reddino.workflows.pretraining import build_training


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/pretrain.yaml")
    args = parser.parse_args()
    cfg = pretrain_config(args.overrides)
    device = torch.device(args.device)
    bf16 = device.type == "cuda" and "bf16" in str(cfg.trainer.precision)

    datamodule, module, _ = build_training(cfg)
    datamodule.setup("fit")
    runner = StepRunner(module, datamodule.batch_size, device, bf16)
    batches = (to_device(b, datamodule, device) for b in endless(datamodule.train_dataloader))
    split_steps(runner, batches, args.warmup, 0)
    times = split_steps(runner, batches, args.steps, args.warmup)

    images = datamodule.batch_size
    step_ms = sum(times.values())
    print(f"# step time, {device} ({platform.processor() or platform.machine()}), {date.today()}")
    print(f"overrides: {args.overrides}; batch {images} units x {cfg.augment.n_global} global crops")
    print(f"threads {torch.get_num_threads()}, loader workers {cfg.data.loader.num_workers}")
    for name in PIECES:
        ms = times[name]
        print(f"  {name:22s} {ms:9.1f} ms  {100 * ms / step_ms:5.1f} %")
    print(f"  {'total':22s} {step_ms:9.1f} ms  ({1000 * images / step_ms:.1f} units/s)")


if __name__ == "__main__":
    main()
