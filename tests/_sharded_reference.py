"""The single-process reference of ``agr-train`` under torchrun (tests/test_training_distributed.py).

One process trains PGD-AT (AGR from ``agr_start``) on every global batch by accumulating over the
shards N processes would take, as docs/distributed.rst defines the run:

- the global order (``randperm`` of the order stream) and the augmentation of the whole global
  batch (the augmentation stream), then rows ``tensor_split(N)`` per shard;
- the random starts drawn for the whole global batch from the global stream, each shard its rows;
- per shard, from the BatchNorm buffers every process holds: the attack in eval mode, the clean
  forward pass in train mode (with its gradient in AGR epochs), the adversarial forward and
  backward pass; the shard's BatchNorm statistics and buffer updates are its own;
- the clean and the adversarial gradients summed over shards, each weighted by its rows / global
  rows (in rank order), the buffers averaged over shards; then one step: SGD on the adversarial
  sum, or AGR on the two sums;
- the epoch's loss and accuracy from sums over every shard; the evaluation on blocks of 256 test
  images, the random starts drawn block after block from the evaluation seed.

Written from that definition, not from ``agr_optim.training``: it uses the library's model
builder, data loader, augmentation and :class:`~agr_optim.AGROptimizer` (the rule itself is
tested elsewhere against float64 numpy) and writes the rest here (PGD, the shards, the weighting,
BatchNorm's averaging, the sums, the AGR statistics in numpy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agr_optim import AGROptimizer
from agr_optim.data import augment, load_dataset
from agr_optim.models import build_model


@dataclass(frozen=True)
class Protocol:
    """The flags of the run the reference stands for (agr-train's names)."""

    seed: int = 0
    epochs: int = 2
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_gamma: float = 0.1
    agr_start_epoch: int = 1
    clip_norm: float = 0.1
    eps: float = 0.1
    attack_step: float = 0.025
    attack_steps: int = 2
    eval_steps: int = 3
    crop_padding: int = 1

    def flags(self) -> list[str]:
        return [
            "--dataset", "digits", "--model", "smallcnn", "--method", "at", "--seed", str(self.seed),
            "--epochs", str(self.epochs), "--batch-size", str(self.batch_size), "--lr", str(self.lr),
            "--agr-start-epoch", str(self.agr_start_epoch), "--clip-norm", str(self.clip_norm),
            "--eps", str(self.eps), "--attack-step", str(self.attack_step),
            "--attack-steps", str(self.attack_steps), "--eval-steps", str(self.eval_steps),
            "--crop-padding", str(self.crop_padding), "--eval-every", "1", "--threads", "1",
        ]


def _pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, p: Protocol, steps: int):
    """L-inf PGD from ``x + noise`` (CE summed over the batch), in eval mode."""
    project = lambda z: torch.minimum(torch.maximum(z, x - p.eps), x + p.eps).clamp(0.0, 1.0)  # noqa: E731
    x_adv = project(x + noise)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        x_adv = project(x_adv.detach() + p.attack_step * g.sign())
    return x_adv.detach()


def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    """BatchNorm's running statistics and counts (every shard counts the same batches)."""
    return [
        b
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
        for b in (m.running_mean, m.running_var, m.num_batches_tracked)
    ]


def _cosines(adversarial: list[torch.Tensor], clean: list[torch.Tensor]) -> float:
    """The AGR code's per-step mean over parameter tensors of cos(a, c), in float64 numpy."""
    values = []
    for a, c in zip(adversarial, clean, strict=True):
        a, c = a.double().flatten().numpy(), c.double().flatten().numpy()
        values.append(a @ c / (np.linalg.norm(a) * np.linalg.norm(c) + 1e-20))
    return float(np.mean(values))


def reference_run(p: Protocol, world_sizes: list[int]) -> dict:
    """Train ``p`` with ``world_sizes[e]`` shards in epoch ``e``; returns the final weights and
    buffers, the momentum buffers, and per epoch the metrics agr-train writes. One CPU thread, as
    the runs (``--threads 1``): CPU results depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_run(p, world_sizes)
    finally:
        torch.set_num_threads(threads)


def _reference_run(p: Protocol, world_sizes: list[int]) -> dict:
    data = load_dataset("digits", None, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        model = build_model("smallcnn", num_classes=data.num_classes, in_channels=data.in_channels,
                            image_size=data.image_size)
        training_stream = torch.random.get_rng_state()  # the global stream after the initialisation
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    agr = AGROptimizer(sgd, clip_norm=p.clip_norm, start_step=0)
    order = torch.Generator().manual_seed(p.seed + 1)
    augmentation = torch.Generator().manual_seed(p.seed + 2)
    milestones = sorted({m for m in (p.epochs // 2, 3 * p.epochs // 4) if m > 0})
    n = data.y_train.shape[0]
    rows = []
    for epoch, shards in enumerate(world_sizes):
        for group in sgd.param_groups:
            group["lr"] = p.lr * p.lr_gamma ** sum(epoch >= m for m in milestones)
        with_agr = epoch >= p.agr_start_epoch
        loss_n = correct = seen = 0.0
        cosines = []
        with torch.random.fork_rng(devices=[]):
            torch.random.set_rng_state(training_stream)
            perm = torch.randperm(n, generator=order)
            for start in range(0, n, p.batch_size):
                idx = perm[start : start + p.batch_size]
                x = augment(data.x_train[idx].to(torch.float32).div_(255.0), padding=p.crop_padding, flip=False,
                            cutout=None, generator=augmentation)
                y = data.y_train[idx]
                noise = torch.empty_like(x).uniform_(-p.eps, p.eps)  # the whole global batch's starts
                before = [b.clone() for b in _bn_buffers(model)]
                clean_sum: list[torch.Tensor] | None = None
                adversarial_sum: list[torch.Tensor] | None = None
                after = []
                for part in torch.arange(x.shape[0]).tensor_split(shards):
                    lo, hi = int(part[0]), int(part[-1]) + 1
                    weight = (hi - lo) / x.shape[0]
                    with torch.no_grad():
                        for b, value in zip(_bn_buffers(model), before, strict=True):
                            b.copy_(value)
                    xs, ys = x[lo:hi], y[lo:hi]
                    model.eval()
                    x_adv = _pgd(model, xs, ys, noise[lo:hi], p, p.attack_steps)
                    model.train()
                    if with_agr:
                        clean = torch.autograd.grad(F.cross_entropy(model(xs), ys), params)
                    else:
                        with torch.no_grad():
                            model(xs)  # BatchNorm sees the clean shard (clean_pass "always")
                    logits = model(x_adv)
                    loss = F.cross_entropy(logits, ys)
                    adversarial = torch.autograd.grad(loss, params)
                    # The shard's part of the all-reduced sums (in rank order, as the ring adds them).
                    add = lambda total, g, w=weight: [gi * w for gi in g] if total is None else [  # noqa: E731
                        t + gi * w for t, gi in zip(total, g, strict=True)
                    ]
                    adversarial_sum = add(adversarial_sum, adversarial)
                    if with_agr:
                        clean_sum = add(clean_sum, clean)
                    after.append([b.clone() for b in _bn_buffers(model)])
                    loss_n += float(loss.detach().double()) * (hi - lo)
                    correct += float((logits.argmax(dim=1) == ys).sum())
                    seen += hi - lo
                with torch.no_grad():
                    for i, b in enumerate(_bn_buffers(model)):
                        total = after[0][i]
                        for other in after[1:]:
                            total = total + other[i]
                        b.copy_(total / shards if b.is_floating_point() else after[0][i])
                assert adversarial_sum is not None
                sgd.zero_grad()
                if with_agr:
                    assert clean_sum is not None
                    cosines.append(_cosines(adversarial_sum, clean_sum))
                    for param, g in zip(params, clean_sum, strict=True):
                        param.grad = g.clone()
                    agr.stash_clean()
                    for param, g in zip(params, adversarial_sum, strict=True):
                        param.grad = g.clone()
                    agr.step()
                else:
                    for param, g in zip(params, adversarial_sum, strict=True):
                        param.grad = g.clone()
                    sgd.step()
            training_stream = torch.random.get_rng_state()
        clean_acc, robust_acc = _evaluate(model, data, p)
        rows.append({
            "train_loss": loss_n / seen, "train_robust_acc": correct / seen, "test_clean_acc": clean_acc,
            "test_robust_acc": robust_acc, "agr_cosine": float(np.mean(cosines)) if cosines else None,
        })
    momentum = [sgd.state[q]["momentum_buffer"] for q in params]
    return {"model": {k: v.clone() for k, v in model.state_dict().items()}, "momentum": momentum, "rows": rows}


def _evaluate(model: nn.Module, data, p: Protocol) -> tuple[float, float]:
    """Clean and PGD accuracy on the test set, in blocks of 256, starts from the evaluation seed."""
    model.eval()
    clean = robust = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10_000 + p.seed)
        for i in range(0, data.y_test.shape[0], 256):
            x = data.x_test[i : i + 256].to(torch.float32).div_(255.0)
            y = data.y_test[i : i + 256]
            with torch.no_grad():
                clean += int((model(x).argmax(dim=1) == y).sum())
            x_adv = _pgd(model, x, y, torch.empty_like(x).uniform_(-p.eps, p.eps), p, p.eval_steps)
            with torch.no_grad():
                robust += int((model(x_adv).argmax(dim=1) == y).sum())
    model.train()
    n = data.y_test.shape[0]
    return clean / n, robust / n
