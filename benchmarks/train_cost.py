"""The cost of AGR itself in training: seconds per epoch with AGR on over off, in one process.

Run from the repository root::

    python -m benchmarks.train_cost                       # digits, SmallCNN, PGD-AT (PGD-10), 5 repeats
    python -m benchmarks.train_cost --dataset mnist5k --repeats 3 --out train_cost.json
    python -m benchmarks.train_cost --dataset cifar10 --data-dir ~/data --model preactresnet18 --device cuda

Three arms train the same model (same initialization, data order and attack) in the paper's
protocol (``agr-train``'s step with ``clean_pass="always"``: the clean forward pass is paid on
every step, AGR or not), epoch after epoch, interleaved (each repeat times one epoch of every arm,
in an order rotated from repeat to repeat, so drift of a noisy machine hits all alike):

- ``plain``: PGD-AT with plain SGD (``--no-agr``);
- ``floor``: plain SGD plus the clean backward pass, its gradient thrown away: the least any
  AGR step can cost over ``plain`` (one more backward pass per step: about 1/11 of a PGD-10
  step, whose attack alone is ten forward and backward passes);
- ``agr``: :class:`~agr_optim.AGROptimizer` around the same SGD from the first step
  (``--agr --agr-start-epoch 0``), the reconstruction included.

Reported: the median seconds per epoch of each arm, and the medians (with quartiles) over repeats
of the paired ratios ``agr / plain``, ``floor / plain`` and ``agr / floor`` (what the
reconstruction adds over the extra backward pass). A benchmark, not a test: no figure is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from agr_optim.recipes import PGD
from agr_optim.training import Trainer, load_data, resolve

ARMS = ("plain", "floor", "agr")


def _floor_step(model: Any, opt: Any, x: Any, y: Any, scaler: Any) -> None:
    """PGD-AT in the authors' order with the clean backward pass paid and thrown away."""
    x_adv = _floor_step.attack(model, x, y)  # type: ignore[attr-defined]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.zero_grad()  # the clean gradient is discarded: only its cost remains
    F.cross_entropy(model(x_adv), y).backward()
    opt.step()


def _epoch_seconds(trainer: Trainer, arm: str) -> float:
    """One training epoch of ``trainer`` (no evaluation), in seconds."""
    opt = trainer.optimizer_for(trainer.epoch)
    start = time.perf_counter()
    with trainer.own_streams():
        trainer.model.train()
        for x, yb in trainer.training_batches():
            if arm == "floor":
                with trainer.autocast():
                    _floor_step(trainer.model, opt, x, yb, trainer.scaler)
            else:
                trainer.train_step(x, yb)  # the step of agr-train's epoch, under its autocast
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    return time.perf_counter() - start


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default="smallcnn")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per arm (after one warm-up epoch)")
    parser.add_argument("--max-batches", type=int, default=None, help="cut each epoch to this many batches")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="none")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg, _ = resolve(
        {
            "preset": "quick",
            "out": "unused",
            "dataset": args.dataset,
            "data_dir": args.data_dir,
            "model": args.model,
            "batch_size": args.batch_size,
            "eps": args.eps,
            "attack_step": args.eps / 4,
            "attack_steps": args.attack_steps,
            "device": args.device,
            "amp": args.amp,
            "agr": True,
            "agr_start_epoch": 0,
            "epochs": 1000,
            "lr": 0.01,
        }
    )
    data = load_data(cfg)
    if args.max_batches is not None:
        n = args.max_batches * cfg.batch_size
        data = replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n])
    base = Trainer(replace(cfg, agr=False), data)
    trainers = {"plain": base, "floor": base.fork(), "agr": base.fork(agr=True)}
    _floor_step.attack = PGD(cfg.eps, cfg.attack_step, cfg.attack_steps)  # type: ignore[attr-defined]
    for arm, trainer in trainers.items():  # warm-up (allocator, caches, lazy state)
        _epoch_seconds(trainer, arm)
    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for repeat in range(args.repeats):
        order = ARMS[repeat % 3 :] + ARMS[: repeat % 3]
        for arm in order:
            seconds[arm].append(_epoch_seconds(trainers[arm], arm))
        print(f"repeat {repeat}: " + ", ".join(f"{arm} {seconds[arm][-1]:.2f} s" for arm in ARMS), file=sys.stderr)
    ratios = {
        "agr/plain": [a / p for a, p in zip(seconds["agr"], seconds["plain"], strict=True)],
        "floor/plain": [f / p for f, p in zip(seconds["floor"], seconds["plain"], strict=True)],
        "agr/floor": [a / f for a, f in zip(seconds["agr"], seconds["floor"], strict=True)],
    }
    steps = -(-data.y_train.shape[0] // cfg.batch_size)
    result = {
        "setup": {
            "dataset": args.dataset,
            "model": args.model,
            "batch_size": cfg.batch_size,
            "steps_per_epoch": steps,
            "attack_steps": cfg.attack_steps,
            "device": args.device,
            "amp": args.amp,
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "torch": torch.__version__,
            "machine": platform.platform(),
        },
        "seconds_per_epoch_median": {arm: statistics.median(v) for arm, v in seconds.items()},
        "seconds_per_epoch": seconds,
        "paired_ratio_quartiles": {k: _quartiles(v) for k, v in ratios.items()},
    }
    print(
        f"{args.dataset}, {args.model}, batch {cfg.batch_size}, {steps} steps/epoch, PGD-{cfg.attack_steps}, "
        f"{args.device}, {torch.get_num_threads()} thread(s), {args.repeats} repeats"
    )
    for arm in ARMS:
        print(f"  {arm:<6} {result['seconds_per_epoch_median'][arm]:8.3f} s/epoch (median)")
    for key, (q1, med, q3) in result["paired_ratio_quartiles"].items():
        print(f"  {key:<12} {med:.3f}  (quartiles {q1:.3f} .. {q3:.3f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
