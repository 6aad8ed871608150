r"""``agr-train``: the paper's adversarial-training experiments end to end, from local data.

One command trains a model with an adversarial-training method (PGD-AT, TRADES, MART, AWP or
AVmixup), with or without :class:`~agr_optim.AGROptimizer`, in the protocol of the AGR code
(``train.py`` of RUIYUN-ML/AGR; Tong et al., *Balancing Generalization and Robustness in
Adversarial Training via Steering through Clean and Adversarial Gradient Directions*, ACM MM
2024), evaluates clean and PGD-20 accuracy, logs the AGR statistics and checkpoints every epoch::

    agr-train --preset paper --dataset cifar10 --data-dir ~/data/cifar-10-batches-py \
              --model preactresnet18 --method at --agr --device cuda --out runs/at_agr
    agr-train --out runs/at_agr --resume          # continues a stopped run exactly

``--preset paper`` is the authors' protocol (:data:`PRESETS`); ``--preset quick`` (the default) is
the same shape on a short schedule, on scikit-learn's digits with a small CNN. Every value is
printed and saved in ``config.json``; any flag overrides the preset.

The training step, per batch (the authors' order): the attack (PGD in eval mode), then in train
mode the clean forward pass (BatchNorm sees the clean batch in every arm and every epoch,
``clean_pass="always"`` of :mod:`agr_optim.recipes`), the method's adversarial objective, and the
step: with AGR from ``--agr-start-epoch`` (0-based) on, the AGR update of the clean and the
adversarial gradients; before it, and with ``--no-agr``, the adversarial gradient alone (no clean
backward pass is paid then).

Outputs in ``--out``: ``config.json``, ``metrics.csv`` (one row per epoch, epochs 0-based),
``summary.json`` (final and best figures, AutoAttack), ``curves.png``, ``checkpoint_last.pt``
(every epoch, written atomically: model, optimizer with its AGR state, scheduler, GradScaler, every
random stream, metrics so far) and ``checkpoint_best.pt`` (best PGD robust test accuracy).

The Python entry points are :func:`main`, :func:`resolve`, :class:`Trainer` and :func:`train`;
``agr-demo`` (:mod:`agr_optim.demo`) is a paired study on the same :class:`Trainer`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, NoReturn

import torch
from torch import Tensor

from . import AGROptimizer, StatsAccumulator
from .datasets import DATASETS
from .models import MODELS, build_model
from .recipes import PGD, avmixup_step, awp_step, mart_step, pgd_at_step, trades_step
from .training import run_folder
from .training.run_folder import (  # re-exported: agr-demo and earlier callers import them from here
    RunFolderError,
    WriteError,
    atomic_write,
    unwritable,
    write_json,
    write_text,
)

__all__ = ["PRESETS", "TrainConfig", "Trainer", "ConfigError", "resolve", "train", "main", "METRIC_COLUMNS"]

METHODS = ("at", "trades", "mart", "awp", "avmixup")
METHOD_NAMES = {"at": "PGD-AT", "trades": "TRADES", "mart": "MART", "awp": "AWP", "avmixup": "AVmixup"}
AMP_MODES = ("none", "bf16", "fp16")
PAPER_AGR_START_FRACTION = 155 / 200  # AGR from epoch 155 of 200, after the last lr decay (150)
# Bounds that keep a run from crashing after it started (issue 14): every image is held in memory
# at --image-size (256 is already 9.8 GB for CIFAR-10's 50,000 train images); torch's generators
# take seeds below 2**64 and the run adds small offsets to the seed; torch.set_num_threads takes
# an int32, and more threads than 1024 is not a machine this runs on.
MAX_IMAGE_SIDE = 256
MAX_SEED = 2**32 - 1
MAX_THREADS = 1024
#: The datasets' image sides, to refuse a --crop-padding before anything is loaded (the loaded
#: data are checked again: ``npz`` has no fixed side).
NATIVE_SIDES = {"digits": 8, "mnist5k": 28, "cifar10": 32, "cifar100": 32, "tiny-imagenet": 64}

#: The presets' values. ``lr_milestones`` and ``agr_start_epoch`` may be ``None``: they then
#: follow ``epochs`` (x0.1 at 50 % and 75 %, AGR from 77.5 %: the paper's 100, 150, 155 of 200).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "dataset": "cifar10",
        "model": "preactresnet18",
        "method": "at",
        "agr": True,
        "epochs": 200,
        "batch_size": 128,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "lr_milestones": None,
        "lr_gamma": 0.1,
        "agr_start_epoch": None,
        "clip_norm": 0.1,
        "eps": 8 / 255,
        "attack_step": 2 / 255,
        "attack_steps": 10,
        "eval_steps": 20,
        "eval_every": 1,
        "crop_padding": 4,
        "flip": True,
        "cutout": "authors",
        "image_size": 32,
        "clean_pass": "always",
        "warm_start_stats": True,
        "trades_attack": "ce",
        "beta": 6.0,
        "awp_gamma": 0.01,
        "autoattack_samples": 1000,
    },
}
PRESETS["quick"] = {
    **PRESETS["paper"],
    "dataset": "digits",
    "model": "smallcnn",
    "epochs": 20,
    "batch_size": 64,
    "eps": 0.1,
    "attack_step": 0.025,
    "eval_every": 5,
    "crop_padding": 1,
    "flip": False,  # digits are not mirror-symmetric
    "cutout": None,
    "image_size": None,
    "warm_start_stats": False,
    "autoattack_samples": 0,
}

#: The columns of ``metrics.csv``; the AGR columns are empty in epochs without AGR statistics
#: (before the AGR start epoch, unless ``warm_start_stats``), the test columns in epochs without
#: evaluation.
METRIC_COLUMNS = (
    "epoch",
    "lr",
    "agr_active",
    "train_loss",
    "train_robust_acc",
    "test_clean_acc",
    "test_robust_acc",
    "agr_cosine",
    "agr_projection_rate",
    "agr_norm_adversarial",
    "agr_norm_clean",
    "agr_norm_difference",
    "agr_l2_distance",
    "agr_clip_rate",
    "agr_projection_rate_nonzero",
    "seconds",
    "eval_seconds",
)


class ConfigError(ValueError):
    """A bad setting; the message names the flag and says what to do."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one run (what ``config.json`` holds). Epochs are 0-based."""

    out: str
    preset: str = "quick"
    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "smallcnn"
    method: str = "at"
    agr: bool = True
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_milestones: tuple[int, ...] = (10, 15)
    lr_gamma: float = 0.1
    agr_start_epoch: int = 15
    clip_norm: float | None = 0.1
    eps: float = 0.1
    attack_step: float = 0.025
    attack_steps: int = 10
    eval_steps: int = 20
    eval_every: int = 5
    crop_padding: int = 1
    flip: bool = True
    cutout: int | str | None = None
    image_size: int | None = None
    clean_pass: str = "always"
    warm_start_stats: bool = False
    trades_attack: str = "ce"
    beta: float = 6.0
    awp_gamma: float = 0.01
    autoattack_samples: int = 0
    seed: int = 0
    device: str = "cpu"
    amp: str = "none"
    compile: bool = False
    threads: int | None = 1  # None (configs of earlier versions): torch's default

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"config.json has unknown settings {unknown}; was it written by another version?")
        d = dict(d)
        d["lr_milestones"] = tuple(d.get("lr_milestones", ()))
        return TrainConfig(**d)

    def lr_at(self, epoch: int) -> float:
        """The learning rate of ``epoch``: ``lr * lr_gamma ** (milestones <= epoch)``."""
        return self.lr * self.lr_gamma ** sum(epoch >= m for m in self.lr_milestones)

    def agr_on(self, epoch: int) -> bool:
        return self.agr and epoch >= self.agr_start_epoch

    def evaluates(self, epoch: int) -> bool:
        return (epoch + 1) % self.eval_every == 0 or epoch == self.epochs - 1


# ---------------------------------------------------------------------- flags
def _cutout_flag(text: str) -> int | str:
    if text == "authors":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'authors' or an integer, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> _Parser:
    p = _Parser(
        prog="agr-train",
        description="Adversarial training with or without AGR, in the paper's protocol, from local data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,  # unset flags keep the preset's value
        epilog=" ".join(
            f"--preset {name}: " + ", ".join(f"{k}={v!r}" for k, v in values.items()) + "."
            for name, values in PRESETS.items()
        )
        + " lr_milestones/agr_start_epoch None: 50 %/75 % and 77.5 % of the epochs. Epochs are 0-based.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="the protocol's values (default: quick)")
    p.add_argument("--dataset", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-dir", help="dataset folder (CIFAR pickles, tiny-imagenet-200) or the .npz file")
    p.add_argument("--model", help=f"one of {', '.join(MODELS)}")
    p.add_argument("--method", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--agr", action=argparse.BooleanOptionalAction, help="AGROptimizer from --agr-start-epoch on")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="SGD learning rate (momentum 0.9, weight decay 5e-4 in both presets)")
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--lr-milestones", help="comma-separated 0-based epochs where lr is multiplied by 0.1")
    p.add_argument("--agr-start-epoch", type=int, help="first 0-based epoch with AGR steps (the paper: 155)")
    p.add_argument("--clip-norm", type=float, help="AGR per-tensor clip norm (0: no clipping)")
    p.add_argument("--eps", type=float, help="L-inf radius, data in [0, 1]")
    p.add_argument("--attack-step", type=float, help="PGD step size (training and evaluation)")
    p.add_argument("--attack-steps", type=int, help="PGD steps for training")
    p.add_argument("--eval-steps", type=int, help="PGD steps for evaluation")
    p.add_argument("--eval-every", type=int, help="evaluate every N epochs (and after the last)")
    p.add_argument("--crop-padding", type=int, help="random-crop padding in pixels (0: no crop)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flip")
    p.add_argument(
        "--cutout", type=_cutout_flag, help="Cutout: 'authors' (torchtoolbox's rectangle), a square side, 0: none"
    )
    p.add_argument("--image-size", type=int, help="resize images to this side (the authors: 32, also Tiny-ImageNet)")
    p.add_argument(
        "--clean-pass", choices=("always", "needed"), help="the clean forward pass on every step or only for AGR"
    )
    p.add_argument(
        "--warm-start-stats",
        action=argparse.BooleanOptionalAction,
        help="with --agr, also take the clean gradient before --agr-start-epoch to log the AGR statistics "
        "(the authors do; one more backward pass per step; the update is unchanged)",
    )
    p.add_argument(
        "--trades-attack", choices=("ce", "kl"), help="TRADES training attack: cross-entropy (AGR code) or KL"
    )
    p.add_argument("--beta", type=float, help="TRADES/MART regularization weight")
    p.add_argument("--awp-gamma", type=float, help="AWP weight-perturbation size")
    p.add_argument(
        "--autoattack-samples", type=int, help="AutoAttack (torchattacks) on this many test images at the end"
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="torch device: cpu, cuda, cuda:1, mps")
    p.add_argument("--amp", choices=AMP_MODES, help="autocast dtype on CUDA (fp16 with a GradScaler)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default 1: more oversubscribe a busy machine, see the docs; on CPU the "
        "results depend on it, so it is saved in config.json)",
    )
    p.add_argument("--out", help="output folder (must be new or empty, unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    return p


_FLAG_FIELDS = {f.name for f in fields(TrainConfig)} - {"preset"}


def resolve(args: dict[str, Any]) -> tuple[TrainConfig, dict[str, str]]:
    """Preset + flags -> a validated :class:`TrainConfig` and where each value came from.

    ``args`` maps :class:`TrainConfig` field names to flag values (unset flags absent).
    Raises :class:`ConfigError` naming the flag; touches nothing on disk.
    """
    preset_name = args.get("preset", "quick")
    if preset_name not in PRESETS:
        raise ConfigError(f"unknown --preset {preset_name!r}; choose one of {', '.join(sorted(PRESETS))}")
    values: dict[str, Any] = dict(PRESETS[preset_name])
    sources = {k: f"preset {preset_name}" for k in values}
    unknown = sorted(set(args) - _FLAG_FIELDS - {"preset"})
    if unknown:
        raise ConfigError(f"unknown settings {unknown}")
    for key, value in args.items():
        if key != "preset":
            values[key] = value
            sources[key] = "flag"
    if "out" not in values:
        raise ConfigError("--out is required: the folder for the metrics, checkpoints and plots")
    if isinstance(values.get("lr_milestones"), str):
        try:
            values["lr_milestones"] = tuple(int(v) for v in values["lr_milestones"].split(",") if v.strip())
        except ValueError:
            raise ConfigError(
                f"--lr-milestones must be comma-separated integers, got {values['lr_milestones']!r}"
            ) from None
    epochs = values["epochs"]
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"--epochs must be an integer >= 1, got {epochs!r}")
    if values["lr_milestones"] is None:
        values["lr_milestones"] = tuple(sorted({m for m in (epochs // 2, (3 * epochs) // 4) if m > 0}))
        sources["lr_milestones"] = "derived from epochs (50 %, 75 %)"
    if values["agr_start_epoch"] is None:
        values["agr_start_epoch"] = min(math.floor(PAPER_AGR_START_FRACTION * epochs), epochs - 1)
        sources["agr_start_epoch"] = "derived from epochs (77.5 %, the paper's 155 of 200)"
    if values.get("clip_norm") == 0:
        values["clip_norm"] = None
    if values.get("cutout") == 0:
        values["cutout"] = None
    values["lr_milestones"] = tuple(values["lr_milestones"])
    cfg = TrainConfig(preset=preset_name, **values)
    _validate(cfg)
    for f in fields(TrainConfig):
        sources.setdefault(f.name, "default")
    return cfg, sources


def _validate(cfg: TrainConfig) -> None:
    def need(ok: bool, flag: str, what: str, value: object) -> None:
        if not ok:
            raise ConfigError(f"--{flag} must be {what}, got {value!r}")

    def finite(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def integer(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    need(cfg.dataset in DATASETS, "dataset", f"one of {', '.join(DATASETS)}", cfg.dataset)
    need(cfg.model in MODELS, "model", f"one of {', '.join(MODELS)}", cfg.model)
    need(cfg.method in METHODS, "method", f"one of {', '.join(METHODS)}", cfg.method)
    need(cfg.amp in AMP_MODES, "amp", f"one of {', '.join(AMP_MODES)}", cfg.amp)
    need(integer(cfg.batch_size) and cfg.batch_size >= 1, "batch-size", "an integer >= 1", cfg.batch_size)
    need(finite(cfg.lr) and cfg.lr > 0, "lr", "> 0", cfg.lr)
    need(finite(cfg.momentum) and 0 <= cfg.momentum < 1, "momentum", "in [0, 1)", cfg.momentum)
    need(finite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight-decay", ">= 0", cfg.weight_decay)
    need(all(integer(m) and 0 < m for m in cfg.lr_milestones), "lr-milestones", "epochs > 0", cfg.lr_milestones)
    need(finite(cfg.lr_gamma) and 0 < cfg.lr_gamma <= 1, "lr-gamma", "in (0, 1]", cfg.lr_gamma)
    need(
        integer(cfg.agr_start_epoch) and 0 <= cfg.agr_start_epoch < cfg.epochs,
        "agr-start-epoch",
        f"a 0-based epoch in [0, {cfg.epochs - 1}] (--epochs {cfg.epochs})",
        cfg.agr_start_epoch,
    )
    need(cfg.clip_norm is None or (finite(cfg.clip_norm) and cfg.clip_norm > 0), "clip-norm", ">= 0", cfg.clip_norm)
    need(finite(cfg.eps) and 0 < cfg.eps <= 1, "eps", "in (0, 1] (data are in [0, 1])", cfg.eps)
    need(finite(cfg.attack_step) and cfg.attack_step > 0, "attack-step", "> 0", cfg.attack_step)
    need(integer(cfg.attack_steps) and cfg.attack_steps >= 1, "attack-steps", "an integer >= 1", cfg.attack_steps)
    need(integer(cfg.eval_steps) and cfg.eval_steps >= 1, "eval-steps", "an integer >= 1", cfg.eval_steps)
    need(integer(cfg.eval_every) and cfg.eval_every >= 1, "eval-every", "an integer >= 1", cfg.eval_every)
    need(
        cfg.cutout in (None, "authors") or (isinstance(cfg.cutout, int) and integer(cfg.cutout) and cfg.cutout > 0),
        "cutout",
        "'authors' or an integer >= 0",
        cfg.cutout,
    )
    need(
        cfg.image_size is None or (integer(cfg.image_size) and 2 <= cfg.image_size <= MAX_IMAGE_SIDE),
        "image-size",
        f"an integer in [2, {MAX_IMAGE_SIDE}] (every image is held in memory at this side)",
        cfg.image_size,
    )
    side = cfg.image_size or NATIVE_SIDES.get(cfg.dataset, MAX_IMAGE_SIDE)
    need(
        integer(cfg.crop_padding) and 0 <= cfg.crop_padding < side,
        "crop-padding",
        f"an integer in [0, {side - 1}], below the image side {side} of --dataset {cfg.dataset}"
        f"{'' if cfg.image_size is None else f' --image-size {cfg.image_size}'}",
        cfg.crop_padding,
    )
    need(cfg.clean_pass in ("always", "needed"), "clean-pass", "always or needed", cfg.clean_pass)
    need(isinstance(cfg.warm_start_stats, bool), "warm-start-stats", "True or False", cfg.warm_start_stats)
    need(cfg.trades_attack in ("ce", "kl"), "trades-attack", "ce or kl", cfg.trades_attack)
    need(finite(cfg.beta) and cfg.beta >= 0, "beta", ">= 0", cfg.beta)
    need(finite(cfg.awp_gamma) and cfg.awp_gamma >= 0, "awp-gamma", ">= 0", cfg.awp_gamma)
    need(
        integer(cfg.autoattack_samples) and cfg.autoattack_samples >= 0,
        "autoattack-samples",
        ">= 0",
        cfg.autoattack_samples,
    )
    need(integer(cfg.seed) and 0 <= cfg.seed <= MAX_SEED, "seed", f"an integer in [0, {MAX_SEED}]", cfg.seed)
    need(
        cfg.threads is None or (integer(cfg.threads) and 1 <= cfg.threads <= MAX_THREADS),
        "threads",
        f"an integer in [1, {MAX_THREADS}]",
        cfg.threads,
    )
    need(isinstance(cfg.out, str) and cfg.out != "" and "\0" not in cfg.out, "out", "a folder path", cfg.out)
    need(
        cfg.dataset not in ("cifar10", "cifar100", "tiny-imagenet", "npz") or cfg.data_dir is not None,
        "data-dir",
        f"given for --dataset {cfg.dataset} (nothing is downloaded)",
        cfg.data_dir,
    )
    need(
        isinstance(cfg.device, str) and re.fullmatch(r"cpu|mps|cuda(:\d+)?", cfg.device) is not None,
        "device",
        "cpu, cuda, cuda:INDEX or mps",
        cfg.device,
    )
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device!r}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {cfg.device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {cfg.device!r}: MPS is not available on this machine; use --device cpu")
    if cfg.amp != "none" and device.type != "cuda":
        raise ConfigError(f"--amp {cfg.amp} needs --device cuda (got {cfg.device!r}); use --amp none")
    if cfg.autoattack_samples > 0:
        try:
            import torchattacks  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"--autoattack-samples {cfg.autoattack_samples} needs torchattacks: "
                'pip install --no-deps "torchattacks==3.5.1", or pass --autoattack-samples 0'
            ) from None


# ---------------------------------------------------------------------- files
def metrics_csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in METRIC_COLUMNS})
    return buffer.getvalue()


# ---------------------------------------------------------------------- the engine
def _step_function(cfg: TrainConfig, generator: torch.Generator, clean_pass: str) -> Callable[..., Any]:
    """The recipe step with the configured attack, as a function ``(model, opt, x, y, scaler)``."""
    attack = PGD(cfg.eps, cfg.attack_step, cfg.attack_steps)
    common: dict[str, Any] = {"clean_pass": clean_pass}
    if cfg.method == "at":
        return lambda m, o, x, y, s: pgd_at_step(m, o, x, y, attack=attack, scaler=s, **common)
    if cfg.method == "trades":
        if cfg.trades_attack == "kl":
            attack = PGD(cfg.eps, cfg.attack_step, cfg.attack_steps, loss="kl", random_start="normal")
        return lambda m, o, x, y, s: trades_step(m, o, x, y, beta=cfg.beta, attack=attack, scaler=s, **common)
    if cfg.method == "mart":
        return lambda m, o, x, y, s: mart_step(m, o, x, y, beta=cfg.beta, attack=attack, scaler=s, **common)
    if cfg.method == "awp":
        return lambda m, o, x, y, s: awp_step(m, o, x, y, gamma=cfg.awp_gamma, attack=attack, scaler=s, **common)
    return lambda m, o, x, y, s: avmixup_step(m, o, x, y, attack=attack, generator=generator, scaler=s, **common)


class Diverged(ArithmeticError):
    """Training produced a NaN or an infinity: ``what``, in 0-based ``epoch`` at 0-based ``step``
    (``None``: found after the epoch's last step). The trainer's state is then unusable."""

    def __init__(self, what: str, epoch: int, step: int | None, steps: int) -> None:
        where = f"after the last step of epoch {epoch}" if step is None else f"at epoch {epoch}, step {step}"
        super().__init__(f"{what} is not finite {where} (0-based; {steps} steps per epoch)")
        self.what, self.epoch, self.step = what, epoch, step


class _EpochSums:
    """Per-epoch sums kept on the device (no host read per step); read every few seconds.

    The AGR figures are :class:`~agr_optim.StatsAccumulator`'s with ``min_norm_ratio=None``: the
    AGR code's means over every parameter tensor and step. The projection rate without the
    near-zero segments (conv biases before BatchNorm, whose cosine is rounding noise) is logged
    beside it. The first step whose loss is not finite is recorded on the device too, so that
    divergence is found at the next read without a host read per step.
    """

    def __init__(self, device: torch.device) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        # loss * n, correct, n, 1 + the first step with a non-finite loss (0: none yet)
        self.train = torch.zeros(4, dtype=dtype, device=device)
        self.agr = StatsAccumulator(min_norm_ratio=None)
        self.agr_without_near_zero = StatsAccumulator()

    def add_batch(self, loss: Tensor, logits: Tensor, y: Tensor, step: int) -> None:
        loss = loss.detach().to(self.train.dtype)
        n = torch.full((), y.shape[0], dtype=self.train.dtype, device=self.train.device)
        correct = (logits.argmax(dim=1) == y).sum().to(self.train.dtype)
        seen = self.train[3]
        first = torch.where((seen == 0) & ~torch.isfinite(loss), step + 1, seen)
        self.train += torch.stack([loss * n, correct, n, first - seen])

    def add_agr(self, optimizer: AGROptimizer) -> None:
        self.agr.update(optimizer)
        self.agr_without_near_zero.update(optimizer)

    def read(self) -> tuple[float, float, int | None]:
        """Running loss and robust accuracy, and the first step with a non-finite loss (or
        ``None``): one host read."""
        loss_n, correct, n, bad = self.train.tolist()
        first_bad = int(bad) - 1 if bad else None
        return (loss_n / n, correct / n, first_bad) if n else (math.nan, math.nan, first_bad)

    def finish(self) -> dict[str, float | None]:
        loss, acc, _ = self.read()
        row: dict[str, float | None] = {"train_loss": loss, "train_robust_acc": acc}
        counted = self.agr.steps > 0
        means = self.agr.compute() if counted else {}
        for column, key in _AGR_COLUMNS.items():
            row[column] = means[key] if counted else None
        row["agr_projection_rate_nonzero"] = (
            self.agr_without_near_zero.compute()["projection_rate"] if counted else None
        )
        return row


_AGR_COLUMNS = {
    "agr_cosine": "cosine",
    "agr_projection_rate": "projection_rate",
    "agr_norm_adversarial": "norm_adversarial",
    "agr_norm_clean": "norm_clean",
    "agr_norm_difference": "norm_difference",
    "agr_l2_distance": "l2_distance",
    "agr_clip_rate": "clip_rate",
}


def load_data(cfg: TrainConfig) -> Any:
    """Load ``cfg.dataset`` from local files, its tensors moved to ``cfg.device`` (an
    :class:`agr_optim.datasets.Dataset`; raises :class:`agr_optim.datasets.DatasetError`)."""
    from .datasets import load_dataset

    ds = load_dataset(cfg.dataset, cfg.data_dir, seed=0, image_size=cfg.image_size)
    device = torch.device(cfg.device)
    moved = {k: getattr(ds, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test")}
    return replace(ds, **moved)


#: ``progress(done, total, running)``: see :meth:`Trainer.train_epoch`.
Progress = Callable[[int, int, "tuple[float, float] | None"], None]
#: Seconds of wall time between two reads of the running figures (progress and divergence).
PROGRESS_SECONDS = 5.0


class Trainer:
    """Model, optimizer, schedule and random streams of one run; one epoch at a time.

    Every random stream is the trainer's own (the global streams are swapped in for its epochs
    and saved after), so several trainers in one process (``agr-demo``'s arms) do not disturb
    each other, and :meth:`state_dict` / :meth:`load_state_dict` resume exactly.
    """

    def __init__(self, cfg: TrainConfig, data: Any) -> None:
        self.cfg, self.data = cfg, data
        self.device = torch.device(cfg.device)
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            torch.manual_seed(cfg.seed)
            self.module = build_model(
                cfg.model, num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size
            ).to(self.device)
            self.rng_cpu = torch.random.default_generator.get_state()
            self.rng_cuda = torch.cuda.get_rng_state(self.device) if cuda else None
        if cuda:
            self.module = self.module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model: Any = torch.compile(self.module) if cfg.compile else self.module
        self.sgd = torch.optim.SGD(
            self.module.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        # AGR from its first epoch on; before it the inner SGD steps alone (the warm start).
        self.agr = AGROptimizer(self.sgd, clip_norm=cfg.clip_norm, start_step=0) if cfg.agr else None
        # --warm-start-stats: a second wrapper of the same SGD that never reconstructs; given the
        # clean gradient it fills last_stats and steps on the adversarial gradient (the authors'
        # AGR arm before its start epoch). Stateless: nothing of it needs saving.
        warm = cfg.agr and cfg.warm_start_stats
        self.agr_warm = AGROptimizer(self.sgd, clip_norm=cfg.clip_norm, start_step=2**62) if warm else None
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.sgd, list(cfg.lr_milestones), gamma=cfg.lr_gamma)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        self.order = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)  # data order
        self.augment_rng = torch.Generator(device=self.device).manual_seed(cfg.seed + 2)  # crops, flips, AVmixup
        self.epoch = 0  # epochs done
        self.metrics: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self._step = _step_function(cfg, self.augment_rng, cfg.clean_pass)
        self._warm_step = _step_function(cfg, self.augment_rng, "gradient")

    # ------------------------------------------------------------------ state
    def optimizer_for(self, epoch: int) -> torch.optim.Optimizer:
        """The optimizer of ``epoch``: the AGROptimizer from the AGR start epoch on, else the SGD
        (or, with ``warm_start_stats``, the wrapper that only logs)."""
        if self.agr is not None and self.cfg.agr_on(epoch):
            return self.agr
        return self.agr_warm if self.agr_warm is not None else self.sgd

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (what ``checkpoint_last.pt`` holds); tensors not copied."""
        return {
            "epoch": self.epoch,
            "model": self.module.state_dict(),
            "optimizer": (self.agr if self.agr is not None else self.sgd).state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": {
                "cpu": self.rng_cpu,
                "cuda": self.rng_cuda,
                "order": self.order.get_state(),
                "augment": self.augment_rng.get_state(),
            },
            "metrics": copy.deepcopy(self.metrics),
            "best": copy.deepcopy(self.best),
        }

    def load_state_dict(self, state: dict[str, Any], *, optimizer: bool = True) -> None:
        """Restore :meth:`state_dict` (``optimizer=False``: all but the optimizer's state)."""
        self.module.load_state_dict(state["model"])
        if optimizer:
            (self.agr if self.agr is not None else self.sgd).load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        self.rng_cpu = rng["cpu"].clone()
        self.rng_cuda = None if rng["cuda"] is None else rng["cuda"].clone()
        self.order.set_state(rng["order"])
        self.augment_rng.set_state(rng["augment"])
        self.epoch = int(state["epoch"])
        self.metrics = copy.deepcopy(state["metrics"])
        self.best = copy.deepcopy(state["best"])

    def fork(self, **changes: Any) -> Trainer:
        """A copy of this run's state with other settings (``agr=True`` for the AGR arm of a
        shared warm start): same weights, momentum, schedule, random streams and metrics."""
        twin = Trainer(replace(self.cfg, **changes), self.data)
        # Deep copies: Optimizer.load_state_dict keeps the given momentum tensors when their dtype
        # and device already fit, and this arm's next step would then move the twin's momentum.
        twin.load_state_dict(copy.deepcopy(self.state_dict()), optimizer=False)
        twin.sgd.load_state_dict(copy.deepcopy(self.sgd.state_dict()))
        return twin

    @contextlib.contextmanager
    def _own_streams(self) -> Iterator[None]:
        """Swap this trainer's streams into the global generators for the block; save them after."""
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            torch.random.default_generator.set_state(self.rng_cpu)
            if self.rng_cuda is not None:
                torch.cuda.set_rng_state(self.rng_cuda, self.device)
            yield
            self.rng_cpu = torch.random.default_generator.get_state()
            if cuda:
                self.rng_cuda = torch.cuda.get_rng_state(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.cfg.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _prepare(self, x: Tensor) -> Tensor:
        x = x.to(torch.float32).div_(255.0)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # ------------------------------------------------------------------ one epoch
    def training_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """An epoch's augmented training batches ``(x in [0, 1], y)`` on the device, drawn from this
        trainer's order and augmentation generators (call inside :meth:`_own_streams`)."""
        from .datasets import augment, batches

        cfg = self.cfg
        for xb, yb in batches(self.data.x_train, self.data.y_train, cfg.batch_size, shuffle=True, generator=self.order):
            x = augment(
                self._prepare(xb),
                padding=cfg.crop_padding,
                flip=cfg.flip,
                cutout=cfg.cutout,  # type: ignore[arg-type]  # validated: None, "authors" or an int
                generator=self.augment_rng,
            )
            yield x, yb

    def train_epoch(self, progress: Progress | None = None) -> dict[str, Any]:
        """Train epoch ``self.epoch`` (and evaluate it if due); returns its metrics row.

        The running loss and robust accuracy are read from the device every
        :data:`PROGRESS_SECONDS` of wall time (a read waits for the device: never per step) and
        after the last step. ``progress(done, total, running)`` is called after every step,
        ``running`` being ``(loss, robust accuracy)`` after such a read and ``None`` otherwise.

        Raises :class:`Diverged` at the first read that finds a non-finite loss (naming the first
        such step), or after the epoch when a weight, a buffer, a momentum or an epoch mean is not
        finite; the trainer is then unusable, and nothing of the epoch was recorded.
        """
        cfg, epoch = self.cfg, self.epoch
        opt = self.optimizer_for(epoch)
        step = self._warm_step if opt is self.agr_warm else self._step
        sums = _EpochSums(self.device)
        n = self.data.y_train.shape[0]
        total = (n + cfg.batch_size - 1) // cfg.batch_size
        lr = self.sgd.param_groups[0]["lr"]
        start = time.perf_counter()
        read_at = start + PROGRESS_SECONDS

        def read() -> tuple[float, float]:
            loss, acc, bad = sums.read()
            if bad is not None:
                raise Diverged("the training loss", epoch, bad, total)
            return loss, acc

        with self._own_streams():
            self.model.train()
            for i, (x, yb) in enumerate(self.training_batches()):
                with self._autocast():
                    out = step(self.model, opt, x, yb, self.scaler)
                sums.add_batch(out.loss, out.logits, yb, i)
                if isinstance(opt, AGROptimizer):
                    sums.add_agr(opt)
                running = None
                if time.perf_counter() >= read_at:  # wall time: a host clock, no device read
                    running = read()
                    read_at = time.perf_counter() + PROGRESS_SECONDS
                if progress is not None:
                    progress(i + 1, total, running)
            read()
        self._check_finite(epoch, total)
        self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        row: dict[str, Any] = {"epoch": epoch, "lr": lr, "agr_active": int(opt is self.agr)}
        row.update(sums.finish())
        for column, value in row.items():  # what metrics.csv and summary.json will hold
            if isinstance(value, float) and not math.isfinite(value):
                raise Diverged(f"the epoch's {column}", epoch, None, total)
        row.update({"test_clean_acc": None, "test_robust_acc": None, "seconds": seconds, "eval_seconds": None})
        if cfg.evaluates(epoch):
            start = time.perf_counter()
            row["test_clean_acc"], row["test_robust_acc"] = self.evaluate()
            row["eval_seconds"] = time.perf_counter() - start
            if self.best is None or row["test_robust_acc"] > self.best["test_robust_acc"]:
                self.best = dict(row)
        self.metrics.append(row)
        self.epoch += 1
        return row

    def _check_finite(self, epoch: int, steps: int) -> None:
        """:class:`Diverged` naming the first weight, buffer or momentum with a NaN or an infinity
        (one host read for all of them: once per epoch)."""
        named = [(f"the model's {k}", t) for k, t in self.module.state_dict().items() if t.is_floating_point()]
        for i, state in enumerate(self.sgd.state.values()):
            named += [(f"the optimizer's {k} of parameter {i}", t) for k, t in state.items() if torch.is_tensor(t)]
        named = [(name, t) for name, t in named if t.is_floating_point()]
        if not named:
            return
        finite = torch.stack([torch.isfinite(t).all() for _, t in named])
        if not bool(finite.all()):
            raise Diverged(named[int((~finite).nonzero()[0, 0])][0], epoch, None, steps)

    def evaluate(self, *, batch_size: int = 256) -> tuple[float, float]:
        """Clean and PGD (``eval_steps``) test accuracy; attack starts from a seed of their own,
        the same for every epoch and both arms of a study, so training streams are untouched."""
        cfg = self.cfg
        attack = PGD(cfg.eps, cfg.attack_step, cfg.eval_steps)
        cuda = self.device.type == "cuda"
        counts = torch.zeros(2, dtype=torch.int64, device=self.device)
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            torch.manual_seed(10_000 + cfg.seed)
            self.model.eval()
            for i in range(0, self.data.y_test.shape[0], batch_size):
                x = self._prepare(self.data.x_test[i : i + batch_size])
                y = self.data.y_test[i : i + batch_size]
                with self._autocast():
                    with torch.no_grad():
                        clean = self.model(x).argmax(dim=1)
                    x_adv = attack(self.model, x, y)
                    with torch.no_grad():
                        robust = self.model(x_adv).argmax(dim=1)
                counts += torch.stack([(clean == y).sum(), (robust == y).sum()])
            self.model.train()
        clean_correct, robust_correct = counts.tolist()
        n = self.data.y_test.shape[0]
        return clean_correct / n, robust_correct / n


# ---------------------------------------------------------------------- a run with its files
def _screen_line(cfg: TrainConfig, row: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "   -  " if v is None else f"{100 * v:6.2f}"

    text = (
        f"epoch {row['epoch']:>3}/{cfg.epochs - 1} lr {row['lr']:.4g} loss {row['train_loss']:.4f} "
        f"train-rob {pct(row['train_robust_acc'])} test clean {pct(row['test_clean_acc'])} "
        f"rob {pct(row['test_robust_acc'])}"
    )
    if row["agr_cosine"] is not None:
        text += (
            f" | AGR cos {row['agr_cosine']:+.4f} proj {row['agr_projection_rate']:.3f} "
            f"|a| {row['agr_norm_adversarial']:.4f} |c| {row['agr_norm_clean']:.4f} "
            f"diff {row['agr_norm_difference']:+.4f} l2 {row['agr_l2_distance']:.4f}"
        )
    return text + f" | {row['seconds']:.1f} s"


def _progress(epoch: int) -> tuple[Progress, Any]:
    """The epoch's progress: a tqdm bar on a terminal, else a plain line on stderr at every read of
    the running figures (every :data:`PROGRESS_SECONDS`: an epoch of silence reads as a hang).
    Returns the callback and the bar to close (or ``None``)."""
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            bar = tqdm(
                total=None, desc=f"epoch {epoch}", unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True
            )

            def update(done: int, total: int, running: tuple[float, float] | None) -> None:
                bar.total = total
                if running is not None:
                    bar.set_postfix_str(f"loss {running[0]:.4f} train-rob {100 * running[1]:.2f}", refresh=False)
                bar.update(done - bar.n)

            return update, bar
    start = time.perf_counter()

    def line(done: int, total: int, running: tuple[float, float] | None) -> None:
        if running is not None:
            print(
                f"agr-train: epoch {epoch}: batch {done}/{total}, loss {running[0]:.4f}, "
                f"train-rob {100 * running[1]:.2f} %, {time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    return line, None


def _plot_curves(cfg: TrainConfig, rows: Sequence[dict[str, Any]], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    epochs = [r["epoch"] for r in rows]
    for key, label in (
        ("train_robust_acc", "train robust"),
        ("test_clean_acc", "test clean"),
        ("test_robust_acc", f"test PGD-{cfg.eval_steps}"),
    ):
        pts = [(r["epoch"], 100 * r[key]) for r in rows if r[key] is not None]
        if pts:
            left.plot(*zip(*pts, strict=True), marker="." if len(pts) < 30 else None, label=label)
    left.set_xlabel("epoch (0-based)")
    left.set_ylabel("accuracy (%)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    for key, label in (("agr_cosine", "mean cosine"), ("agr_projection_rate", "projection rate")):
        pts = [(r["epoch"], r[key]) for r in rows if r[key] is not None]
        if pts:
            right.plot(*zip(*pts, strict=True), marker=".", label=label)
    for ax in (left, right):
        if cfg.agr:
            ax.axvline(cfg.agr_start_epoch, color="0.5", ls="--", lw=0.8)
        for m in cfg.lr_milestones:
            ax.axvline(m, color="0.8", ls=":", lw=0.8)
    right.set_xlabel("epoch (0-based)")
    right.set_title("AGR statistics (epoch means)" if cfg.agr else "no AGR in this run", fontsize=9)
    right.grid(alpha=0.3)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    left.set_xlim(-0.5, max(epochs[-1], cfg.epochs - 1) + 0.5)
    fig.suptitle(f"{METHOD_NAMES[cfg.method]}{'+AGR' if cfg.agr else ''} on {cfg.dataset}, {cfg.model}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return True


def _autoattack(trainer: Trainer, best_state: dict[str, Any] | None) -> dict[str, Any]:
    """AutoAttack (torchattacks, standard L-inf) on the first samples of the test set, on the best
    checkpoint's weights (the last ones when nothing was evaluated, or when ``checkpoint_best.pt``
    is missing or holds another epoch than the run's best: the summary says which)."""
    import torchattacks

    cfg = trainer.cfg
    model = copy.deepcopy(trainer.module)
    which = "last"
    want = None if trainer.best is None else trainer.best["epoch"]
    if best_state is not None and best_state.get("epoch") == want:
        model.load_state_dict(best_state["model"])
        which = f"best (epoch {want})"
    elif want is not None:
        found = "none" if best_state is None else f"epoch {best_state.get('epoch')}"
        which = f"last (the best epoch is {want}, {run_folder.CHECKPOINT_BEST} holds {found})"
    model.eval()
    n = min(cfg.autoattack_samples, trainer.data.y_test.shape[0])
    atk = torchattacks.AutoAttack(
        model, norm="Linf", eps=cfg.eps, version="standard", n_classes=trainer.data.num_classes, seed=cfg.seed
    )
    correct = 0
    start = time.perf_counter()
    for i in range(0, n, 256):
        x = trainer.data.x_test[i : min(i + 256, n)].to(torch.float32) / 255.0
        y = trainer.data.y_test[i : min(i + 256, n)]
        x_adv = atk(x, y)
        with torch.no_grad():
            correct += int((model(x_adv).argmax(dim=1) == y).sum())
    return {"checkpoint": which, "samples": n, "robust_acc": correct / n, "seconds": time.perf_counter() - start}


def _summary(trainer: Trainer, autoattack: dict[str, Any] | None) -> dict[str, Any]:
    cfg = trainer.cfg
    return {
        "method": cfg.method,
        "agr": cfg.agr,
        "agr_start_epoch": cfg.agr_start_epoch if cfg.agr else None,
        "epochs_done": trainer.epoch,
        "epochs": cfg.epochs,
        "complete": trainer.epoch == cfg.epochs,
        "final": trainer.metrics[-1] if trainer.metrics else None,
        "best": trainer.best,
        "autoattack": autoattack,
        "seconds_per_epoch": (sum(r["seconds"] for r in trainer.metrics) / len(trainer.metrics))
        if trainer.metrics
        else None,
    }


def _write_outputs(trainer: Trainer, autoattack: dict[str, Any] | None = None, *, curves: bool = True) -> bool:
    """``metrics.csv``, ``summary.json`` and (with ``curves``) ``curves.png`` from the trainer's
    history: a resumed run rebuilds the first two from its checkpoint before it trains, and every
    run draws the curves at its end. Returns whether matplotlib drew them."""
    out = trainer.cfg.out
    write_text(os.path.join(out, "metrics.csv"), metrics_csv(trainer.metrics))
    write_json(os.path.join(out, "summary.json"), _summary(trainer, autoattack))
    if not curves or not trainer.metrics:
        return True
    return _plot_curves(trainer.cfg, trainer.metrics, os.path.join(out, "curves.png"))


def _best_checkpoint(trainer: Trainer, state: dict[str, Any]) -> dict[str, Any] | None:
    """What ``checkpoint_best.pt`` holds when ``state`` (after its last epoch) is the best."""
    best = trainer.best
    if best is None or best["epoch"] != trainer.epoch - 1:
        return None
    return {"epoch": best["epoch"], "model": state["model"], "metrics": best}


def _save_epoch(trainer: Trainer, checkpoints: run_folder.Checkpoints, saved: _Saved) -> None:
    """The epoch's checkpoints (checksummed, the last one before the best one), then the
    metrics and the summary: a kill anywhere leaves a folder that resumes (tests/test_run_folder.py)."""
    settings = {k: v for k, v in trainer.cfg.to_json().items() if k != "out"}  # a folder may be moved
    state = {**trainer.state_dict(), "config": settings}
    try:
        checkpoints.save(state, trainer.epoch - 1, _best_checkpoint(trainer, state))
    finally:  # what checkpoint_last.pt holds now, also when writing the best one failed
        saved.epoch = checkpoints.recorded_epoch(run_folder.CHECKPOINT_LAST)
    write_text(os.path.join(trainer.cfg.out, "metrics.csv"), metrics_csv(trainer.metrics))
    write_json(os.path.join(trainer.cfg.out, "summary.json"), _summary(trainer, None))


def _print_config(cfg: TrainConfig, sources: dict[str, str], log: Callable[[str], None]) -> None:
    log(f"agr-train: {METHOD_NAMES[cfg.method]}{' + AGR' if cfg.agr else ''}, preset {cfg.preset}; every setting:")
    for key, value in cfg.to_json().items():
        log(f"  {key:<20} {value!r:<28} ({sources.get(key, 'default')})")


# ---------------------------------------------------------------------- a run's life in its folder
#: Exit statuses of ``agr-train`` (docs/agr_train.rst).
EXIT_REFUSED, EXIT_DIVERGED, EXIT_WRITE_FAILED, EXIT_INTERRUPTED = 2, 3, 4, 130


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`; the message says what is saved and how to go on."""


class RunStopped(RuntimeError):
    """The run stopped before its end: ``code`` :data:`EXIT_DIVERGED` or
    :data:`EXIT_WRITE_FAILED`; the message (one line) says why, what is saved and what to do."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Saved:
    """How far the run's folder goes, for the message when the run stops early."""

    def __init__(self, out: str, resume: bool) -> None:
        self.out, self.resume, self.started = out, resume, False
        self.epoch: int | None = None  # the last 0-based epoch in checkpoint_last.pt

    def where(self) -> str:
        out, command = self.out, f"agr-train --out {shlex.quote(self.out)} --resume"
        if not self.started and self.resume:
            return f"{out} is as it was: run the same command again"
        if not self.started:
            return f"nothing of the run was written to {out}: run the same command again"
        if self.epoch is None:
            return f"no epoch was saved yet: {command} starts the run from epoch 0"
        epochs = "epoch 0 is" if self.epoch == 0 else f"epochs 0..{self.epoch} are"
        return f"{epochs} saved in {out}: continue with {command}"


def _read_config(out: str) -> TrainConfig:
    """``out/config.json`` (a regular file of at most 1 MiB: a FIFO would block the read)."""
    settings = json.loads(run_folder.read_regular_file(os.path.join(out, run_folder.CONFIG)))
    if not isinstance(settings, dict):
        raise ValueError("not a JSON object of settings")
    return TrainConfig.from_json(settings)


def _fresh_folder(out: str) -> bool:
    """Refuse (:class:`ConfigError`) an ``--out`` that holds anything but what a run stopped
    before its first checkpoint leaves; ``True`` when it holds such a run's ``config.json``."""
    if not os.path.isdir(out):
        return False
    names = {name for name in os.listdir(out) if not run_folder.is_temporary(name)}
    if names - run_folder.PRE_CHECKPOINT_FILES:
        if names & {run_folder.CHECKPOINT_LAST, run_folder.CHECKPOINT_PREV, "metrics.csv"}:
            raise ConfigError(
                f"--out {out!r} holds an agr-train run; pass --resume to continue it or choose a new folder"
            )
        raise ConfigError(f"--out {out!r} exists and is not empty; pass --resume to continue it or choose a new folder")
    if run_folder.CONFIG not in names:
        return False
    try:
        _read_config(out)
    except (OSError, ValueError, TypeError):
        raise ConfigError(
            f"--out {out!r} exists and is not empty (its config.json is not agr-train's); choose a new folder"
        ) from None
    return True


def _load(cfg: TrainConfig) -> Any:
    from .datasets import DatasetError

    try:
        data = load_data(cfg)
    except DatasetError as error:
        raise ConfigError(f"--dataset {cfg.dataset} --data-dir {cfg.data_dir!r}: {error}") from None
    if cfg.crop_padding >= data.image_size:
        raise ConfigError(
            f"--crop-padding must be below the image side {data.image_size} of {data.name}, got {cfg.crop_padding}"
        )
    return data


def _same_settings(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The settings (but ``out``: a run folder may be moved) in which two configs differ."""
    return sorted(k for k in set(a) | set(b) if k != "out" and a.get(k) != b.get(k))


def _resume_state(cfg: TrainConfig, checkpoints: run_folder.Checkpoints) -> dict[str, Any] | None:
    """The verified last checkpoint, or ``None`` for a run stopped before its first one; refuses
    a folder whose files do not belong together."""
    out = cfg.out
    try:
        on_disk = _read_config(out)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(f"--resume: cannot read {os.path.join(out, run_folder.CONFIG)!r}: {error}") from None
    changed = _same_settings(on_disk.to_json(), cfg.to_json())
    if changed:
        raise ConfigError(
            f"--resume continues the run as its config.json says, which differs in {', '.join(changed)}; "
            f"start a new run in another folder for other settings"
        )
    state = checkpoints.load(run_folder.CHECKPOINT_LAST, cfg.device)
    path = checkpoints.path(run_folder.CHECKPOINT_LAST)
    if state is None:
        others = sorted(
            name
            for name in os.listdir(out)
            if name not in run_folder.PRE_CHECKPOINT_FILES and not run_folder.is_temporary(name)
        )
        if others:
            raise RunFolderError(f"--resume: --out {out!r} has {', '.join(others)} but no {path}; it cannot go on")
        return None
    if not isinstance(state.get("config"), dict):
        raise RunFolderError(f"{path} has no copy of its settings: not a checkpoint of this agr-train")
    epoch, rows = state.get("epoch"), state.get("metrics")
    if not (isinstance(epoch, int) and 1 <= epoch <= cfg.epochs and isinstance(rows, list) and len(rows) == epoch):
        raise RunFolderError(f"{path} is not a checkpoint of this run (epoch {epoch!r} of {cfg.epochs})")
    changed = _same_settings(state["config"], cfg.to_json())
    if changed:
        raise RunFolderError(
            f"{os.path.join(out, run_folder.CONFIG)} differs from the settings saved in {path} "
            f"({', '.join(changed)}): it was changed after the run started; put it back"
        )
    return state


def _restore(trainer: Trainer, state: dict[str, Any], checkpoints: run_folder.Checkpoints) -> None:
    """Load the checkpoint, rebuild the outputs from its history, and make
    ``checkpoint_best.pt`` the run's best again if a kill fell between the two renames."""
    path = checkpoints.path(run_folder.CHECKPOINT_LAST)
    try:
        trainer.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
        raise RunFolderError(f"{path} does not fit its config.json: {str(error).splitlines()[0]}") from None
    best = checkpoints.load(run_folder.CHECKPOINT_BEST, "cpu")  # verified (and code-free) before training
    want = None if trainer.best is None else trainer.best["epoch"]
    if want is not None and (best is None or best.get("epoch") != want):
        rewritten = _best_checkpoint(trainer, state)
        if rewritten is not None:  # the best epoch is the last one: its weights are in state
            checkpoints.save(None, trainer.epoch - 1, rewritten)


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    sources: dict[str, str] | None = None,
    on_epoch: Callable[[Trainer, dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) the training in ``cfg.out``; returns the summary (also in ``summary.json``).

    Every check is done, and the data are loaded, before anything is written; the folder is
    locked for the whole run (:func:`~agr_optim.training.run_folder.lock_folder`). ``on_epoch``
    is called after each epoch's files are written. A resumed run rebuilds ``metrics.csv``,
    ``summary.json`` and ``curves.png`` from its checkpoint; a run stopped before its first
    checkpoint resumes from epoch 0, or starts over.

    Raises :class:`ConfigError` or :class:`~agr_optim.training.run_folder.RunFolderError`
    (refused: nothing written), :class:`RunStopped` (diverged, or a file could not be written:
    the folder resumes) and :class:`Interrupted` (Ctrl-C).
    """
    problem = unwritable(cfg.out)
    if problem:
        raise ConfigError(f"cannot write to --out {cfg.out!r}: {problem}")
    run_folder.arm_fault_hook()
    saved = _Saved(cfg.out, resume)
    try:
        return _run(cfg, resume, sources or {}, on_epoch, log, saved)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {saved.where()}") from None
    except WriteError as error:
        raise RunStopped(f"{error} (the files written before are intact); {saved.where()}", EXIT_WRITE_FAILED) from None


def _run(
    cfg: TrainConfig,
    resume: bool,
    sources: dict[str, str],
    on_epoch: Callable[[Trainer, dict[str, Any]], None] | None,
    log: Callable[[str], None],
    saved: _Saved,
) -> dict[str, Any]:
    out = cfg.out
    checkpoints = run_folder.Checkpoints(out)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    with contextlib.ExitStack() as held:
        if resume:
            if not os.path.isdir(out):
                raise ConfigError(f"--resume: --out {out!r} does not exist; start the run without --resume")
            note = held.enter_context(run_folder.lock_folder(out))
            state = _resume_state(cfg, checkpoints)
            saved.started, saved.epoch = True, None if state is None else int(state["epoch"]) - 1
            run_folder.remove_stray_temporaries(out)
            data = _load(cfg)
        else:
            _fresh_folder(out)
            data = _load(cfg)
            os.makedirs(out, exist_ok=True)
            note = held.enter_context(run_folder.lock_folder(out))
            started_over = _fresh_folder(out)  # again, holding the lock
            run_folder.remove_stray_temporaries(out)
            state = None
        if note:
            log(f"agr-train: {note}")
        trainer = Trainer(cfg, data)
        if state is not None:
            _restore(trainer, state, checkpoints)
            log(f"agr-train: resuming {out} after epoch {trainer.epoch - 1} (0-based) of {cfg.epochs}")
            _write_outputs(trainer, curves=False)  # a kill may have left them behind the checkpoint
        elif resume:
            log(f"agr-train: {out} has no checkpoint yet: starting its run from epoch 0, as its config.json says")
        else:
            _print_config(cfg, sources, log)
            if started_over:
                log(f"agr-train: {out} held a run stopped before its first checkpoint: starting over")
            write_json(os.path.join(out, run_folder.CONFIG), cfg.to_json())
            saved.started = True
        agr_text = f"from epoch {cfg.agr_start_epoch} (0-based)" if cfg.agr else "off"
        log(
            f"agr-train: {data.name}: {data.y_train.shape[0]} train / {data.y_test.shape[0]} test images, "
            f"{data.num_classes} classes; AGR {agr_text}"
        )
        while trainer.epoch < cfg.epochs:
            progress, bar = _progress(trainer.epoch)
            try:
                row = trainer.train_epoch(progress)
            except Diverged as error:
                raise _diverged(error, trainer, saved) from None
            finally:
                if bar is not None:
                    bar.close()
            _save_epoch(trainer, checkpoints, saved)
            log(_screen_line(cfg, row))
            if on_epoch is not None:
                on_epoch(trainer, row)
        autoattack = None
        if cfg.autoattack_samples > 0:
            best = checkpoints.load(run_folder.CHECKPOINT_BEST, cfg.device)
            autoattack = _autoattack(trainer, best)
            log(
                f"agr-train: AutoAttack on {autoattack['samples']} test images ({autoattack['checkpoint']}): "
                f"{100 * autoattack['robust_acc']:.2f} %"
            )
        if not _write_outputs(trainer, autoattack):
            log("agr-train: matplotlib is not installed: no curves.png (pip install matplotlib)")
        return _summary(trainer, autoattack)


def _diverged(error: Diverged, trainer: Trainer, saved: _Saved) -> RunStopped:
    """The one-line stop of a diverged run; ``summary.json`` says where (only finite numbers)."""
    if saved.epoch is None:
        kept = "no checkpoint was written"
    else:
        summary = _summary(trainer, None)
        summary["diverged"] = {"what": error.what, "epoch": error.epoch, "step": error.step}
        write_json(os.path.join(trainer.cfg.out, "summary.json"), summary)
        kept = (
            f"{run_folder.CHECKPOINT_LAST} keeps epoch {saved.epoch}, the last good one (resuming repeats "
            f"the divergence)"
        )
    return RunStopped(
        f"diverged: {error}; {kept}. Lower --lr ({trainer.cfg.lr:g} now) and start a new run", EXIT_DIVERGED
    )


# ---------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """The ``agr-train`` command. Exit status 0 when done; 2 for a refused flag or folder (one
    line, nothing written); 3 when the training diverged; 4 when a file could not be written (a
    full disk); 130 on Ctrl-C. After 3, 4 and 130 the folder resumes with ``--resume``."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume", False)
    threads = torch.get_num_threads()
    try:
        if resume:
            if set(args) - {"out"}:
                parser.error(
                    f"--resume continues the run as configured in its config.json; drop "
                    f"{', '.join('--' + k.replace('_', '-') for k in sorted(set(args) - {'out'}))}"
                )
            if "out" not in args:
                parser.error("--resume needs --out, the folder of the run to continue")
            path = os.path.join(args["out"], run_folder.CONFIG)
            try:
                cfg = replace(_read_config(args["out"]), out=args["out"])
                _validate(cfg)
            except FileNotFoundError:
                parser.error(f"--resume: no {path!r}: the run never started; start it without --resume")
            except (OSError, ValueError, TypeError) as error:
                parser.error(f"--resume: cannot read {path!r}: {error}")
            sources: dict[str, str] = {}
        else:
            cfg, sources = resolve(args)
        summary = train(cfg, resume=resume, sources=sources, log=lambda s: print(s, flush=True))
    except (ConfigError, RunFolderError) as error:
        parser.error(str(error))
    except RunStopped as stop:
        print(f"agr-train: error: {stop}", file=sys.stderr)
        return stop.code
    except KeyboardInterrupt as stop:
        text = str(stop) if isinstance(stop, Interrupted) else "interrupted before the run started"
        print(f"\nagr-train: {text}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        torch.set_num_threads(threads)
    best = summary["best"]
    if best is not None:
        print(
            f"agr-train: done. best PGD-{cfg.eval_steps} robust {100 * best['test_robust_acc']:.2f} % at epoch "
            f"{best['epoch']} (clean {100 * best['test_clean_acc']:.2f} %); outputs in {cfg.out}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
