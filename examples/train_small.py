"""Adversarial training of a small MLP on scikit-learn's digits with AGR, in seconds on a CPU.

    python3 examples/train_small.py               # 10 epochs (0-9), AGR from epoch 3 (seconds)
    python3 examples/train_small.py --epochs 2    # a quick look

Each step crafts PGD adversarial examples, then follows the AGROptimizer protocol: clean
backward, ``stash_clean()``, adversarial backward, ``step()``. The first ``--warm-start``
epochs train on the adversarial gradient alone (``start_step``), as in the paper. AGR clips
each reconstructed tensor gradient to norm 0.1, the paper's setting (``--clip-norm``). Every AGR
epoch prints the epoch's mean AGR statistics (``agr_optim.StatsAccumulator``: cosine, projection
rate, clip rate) and the clean accuracy on the held-out (test) split; at the end, the test split's
clean and PGD accuracy. Epochs count from 0, as in ``agr-train``.
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from agr_optim import AGROptimizer, StatsAccumulator


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits (8x8 images, 10 classes) scaled to [0, 1], split 80/20."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int) -> torch.Tensor:
    """L-infinity PGD in the [0, 1] box (step size 2.5 eps / steps, random start)."""
    alpha = 2.5 * eps / steps
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(x_adv), y), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--warm-start", type=int, default=3, help="epochs on the adversarial gradient alone")
    parser.add_argument("--eps", type=float, default=0.1, help="PGD radius (inputs in [0, 1])")
    parser.add_argument("--clip-norm", type=float, default=0.1, help="AGR clip per tensor (0: no clipping)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    # The matrices are tiny: one thread is fastest (several threads mostly wait on each other).
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_data(args.seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    steps_per_epoch = (len(x_train) + args.batch_size - 1) // args.batch_size
    opt = AGROptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
        clip_norm=args.clip_norm or None,
        start_step=args.warm_start * steps_per_epoch,
        granularity="tensor",
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    stats = StatsAccumulator(model)
    start = time.perf_counter()
    result: dict[str, float] = {}  # the last AGR epoch's statistics, then the test accuracies
    for epoch in range(args.epochs):
        phase = "AGR" if opt.active else "warm start"
        order = torch.randperm(len(x_train))
        for i in range(0, len(x_train), args.batch_size):
            x, y = x_train[order[i : i + args.batch_size]], y_train[order[i : i + args.batch_size]]
            x_adv = pgd(model, x, y, args.eps, steps=3)
            opt.zero_grad()
            if opt.active:  # False during the warm start: skip the clean pass
                loss_fn(model(x), y).backward()
                opt.stash_clean()
            loss_fn(model(x_adv), y).backward()
            opt.step()
            scheduler.step()
            stats.update(opt)  # on the device; skipped in the warm start (no clean pass, no statistics)
        line = (f"epoch {epoch}/{args.epochs - 1} ({phase}): test clean accuracy "
                f"{accuracy(model, x_test, y_test):.3f}")
        if stats.steps:
            logs = stats.compute()
            line += (f"; AGR: mean cosine {logs['cosine']:+.3f}, projection rate {logs['projection_rate']:.2f}, "
                     f"clip rate {logs['clip_rate']:.2f}")
            result.update({f"agr_{key}": value for key, value in logs.items() if "/" not in key})
        stats.reset()
        print(line)

    x_adv = pgd(model, x_test, y_test, args.eps, steps=10)
    result.update(clean_accuracy=accuracy(model, x_test, y_test), pgd_accuracy=accuracy(model, x_adv, y_test))
    print(f"test: clean accuracy {result['clean_accuracy']:.3f}, PGD-10 accuracy {result['pgd_accuracy']:.3f} "
          f"({time.perf_counter() - start:.1f} s)")
    return result


if __name__ == "__main__":
    main()
