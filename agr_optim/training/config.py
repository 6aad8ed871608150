r"""Every setting of an ``agr-train`` run, written once: :class:`TrainConfig`.

A setting is one field of :class:`TrainConfig`: its default is the quick preset's value, and its
metadata holds the flag's help text, type and choices. From the fields come the command line
(:func:`build_parser`: one flag per field, ``--X``/``--no-X`` for the switches), ``config.json``
(:meth:`TrainConfig.to_json`) and the printout of every value with where it came from. The
paper preset is a dict of overrides of those defaults (:data:`PRESETS`); :func:`resolve` applies
a preset and the flags, and :func:`validate` checks every value (one line naming the flag per
refusal). nanoGPT's one source of settings, as a dataclass.

>>> from agr_optim.training import resolve
>>> cfg, sources = resolve({"out": "runs/x", "epochs": 40})
>>> cfg.lr_milestones, cfg.agr_start_epoch, cfg.flip
((20, 30), 31, False)
>>> sources["epochs"], sources["lr"], sources["seed"], sources["lr_milestones"]
('flag', 'preset quick', 'default', 'derived from epochs (50 %, 75 %)')
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, NoReturn

import torch

from ..data import DATASETS, MAX_CLASSES, MIN_IMAGE_SIDE
from ..models import MODELS, build_model
from .tracking import TRACKERS, missing_package

__all__ = [
    "AMP_MODES",
    "MAX_IMAGE_SIDE",
    "MAX_SEED",
    "MAX_THREADS",
    "METHODS",
    "METHOD_NAMES",
    "NATIVE_SIDES",
    "PAPER_AGR_START_FRACTION",
    "PRESETS",
    "ConfigError",
    "OneLineParser",
    "SettingsParser",
    "TrainConfig",
    "build_parser",
    "resolve",
    "validate",
    "validate_data",
]

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
#: data are checked again by :func:`validate_data`: ``npz`` has no fixed side).
NATIVE_SIDES = {"digits": 8, "mnist5k": 28, "cifar10": 32, "cifar100": 32, "tiny-imagenet": 64}

#: The presets, as overrides of :class:`TrainConfig`'s defaults. Those defaults *are* the quick
#: preset (the paper's protocol on a short schedule, on scikit-learn's digits with a small CNN);
#: ``paper`` sets the values of the authors' ``train.py``. Only protocol settings (fields with
#: ``protocol`` in their metadata) are a preset's to set; ``lr_milestones`` and
#: ``agr_start_epoch`` are ``None`` in both: they follow ``epochs`` (x0.1 at 50 % and 75 %, AGR
#: from 77.5 %: the paper's 100, 150, 155 of 200).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {},
    "paper": {
        "dataset": "cifar10",
        "model": "preactresnet18",
        "epochs": 200,
        "batch_size": 128,
        "eps": 8 / 255,
        "attack_step": 2 / 255,
        "eval_every": 1,
        "crop_padding": 4,
        "flip": True,
        "cutout": "authors",
        "image_size": 32,
        "warm_start_stats": True,  # the authors' AGR arm logs its statistics from epoch 0
        "autoattack_samples": 1000,
    },
}
#: ``authors``: the paper's protocol with the AGR authors' own step, quirks included (the recipes'
#: ``authors=True``: their PGD, AWP's order, MART's and AVmixup's extra BatchNorm forwards) and
#: their logging; ``paper`` keeps the fixes (docs/reproducing.rst gives each with its size).
PRESETS["authors"] = {**PRESETS["paper"], "authors_step": True}


class ConfigError(ValueError):
    """A bad setting; the message names the flag and says what to do."""


def _cutout_flag(text: str) -> int | str:
    if text == "authors":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'authors' or an integer, got {text!r}") from None


def _names_flag(text: str) -> tuple[str, ...]:
    """``--log``'s comma-separated names, in order, each once (checked by :func:`validate`)."""
    return tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))


def _setting(
    default: Any = MISSING,
    help: str = "",
    *,
    parse: Callable[[str], Any] | type = str,
    choices: Sequence[str] | None = None,
    protocol: bool = False,
    shown: str | None = None,
    repeatable: bool = False,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A :class:`TrainConfig` field with its flag: ``parse`` the flag's type (``bool``: a switch,
    ``--X``/``--no-X``), ``protocol`` whether presets set it, ``shown`` the default in ``--help``
    when the value alone would not say it, ``repeatable`` a flag given several times adds up
    (``parse`` gives a tuple), ``aliases`` other spellings of the flag."""
    metadata = {
        "help": help,
        "parse": parse,
        "choices": choices,
        "protocol": protocol,
        "shown": shown,
        "repeatable": repeatable,
        "aliases": aliases,
    }
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one run (what ``config.json`` holds); the defaults are the quick preset.
    Epochs are 0-based. ``lr_milestones`` and ``agr_start_epoch`` left ``None`` follow
    ``epochs`` (x0.1 at 50 % and 75 %, AGR from 77.5 %), as in both presets."""

    out: str = _setting(help="output folder (must be new or empty, unless --resume)")
    preset: str = _setting("quick", "the protocol's values", choices=tuple(sorted(PRESETS)))
    dataset: str = _setting("digits", f"one of {', '.join(DATASETS)}", protocol=True)
    data_dir: str | None = _setting(None, "dataset folder (CIFAR pickles, tiny-imagenet-200) or the .npz file")
    num_classes: int | None = _setting(
        None,
        "the number of classes: an .npz's class count (labels in [0, N)), a check of the others' fixed count",
        parse=int,
        shown="inferred",
    )
    model: str = _setting("smallcnn", f"one of {', '.join(MODELS)}", protocol=True)
    method: str = _setting("at", f"one of {', '.join(METHODS)}", protocol=True)
    agr: bool = _setting(True, "AGROptimizer from --agr-start-epoch on", parse=bool, protocol=True)
    epochs: int = _setting(20, "training epochs", parse=int, protocol=True)
    batch_size: int = _setting(64, "training batch size", parse=int, protocol=True)
    lr: float = _setting(0.1, "SGD learning rate", parse=float, protocol=True)
    momentum: float = _setting(0.9, "SGD momentum", parse=float, protocol=True)
    weight_decay: float = _setting(5e-4, "SGD weight decay", parse=float, protocol=True)
    lr_milestones: tuple[int, ...] = _setting(
        None,
        "comma-separated 0-based epochs where lr is multiplied by --lr-gamma",
        protocol=True,
        shown="50 % and 75 % of --epochs",
    )
    lr_gamma: float = _setting(0.1, "the lr factor at each milestone", parse=float, protocol=True)
    agr_start_epoch: int = _setting(
        None,
        "first 0-based epoch with AGR steps (the paper: 155)",
        parse=int,
        protocol=True,
        shown="77.5 % of --epochs",
    )
    clip_norm: float | None = _setting(0.1, "AGR per-tensor clip norm (0: no clipping)", parse=float, protocol=True)
    eps: float = _setting(0.1, "L-inf radius, data in [0, 1]", parse=float, protocol=True)
    attack_step: float = _setting(0.025, "PGD step size (training and evaluation)", parse=float, protocol=True)
    attack_steps: int = _setting(10, "PGD steps for training", parse=int, protocol=True)
    eval_steps: int = _setting(20, "PGD steps for evaluation", parse=int, protocol=True)
    eval_every: int = _setting(5, "evaluate every N epochs (and after the last)", parse=int, protocol=True)
    crop_padding: int = _setting(1, "random-crop padding in pixels (0: no crop)", parse=int, protocol=True)
    # Off by default: the quick preset's digits are not mirror-symmetric.
    flip: bool = _setting(False, "random horizontal flip", parse=bool, protocol=True)
    cutout: int | str | None = _setting(
        None,
        "Cutout: 'authors' (torchtoolbox's rectangle), a square side, 0: none",
        parse=_cutout_flag,
        protocol=True,
    )
    image_size: int | None = _setting(
        None,
        "resize images to this side (the authors: 32, also Tiny-ImageNet)",
        parse=int,
        protocol=True,
        shown="the native side",
    )
    clean_pass: str = _setting(
        "always",
        "the clean forward pass on every step or only for AGR",
        choices=("always", "needed"),
        protocol=True,
    )
    warm_start_stats: bool = _setting(
        False,
        "with --agr, also take the clean gradient before --agr-start-epoch to log the AGR statistics "
        "(the authors do; one more backward pass per step; the update is unchanged)",
        parse=bool,
        protocol=True,
    )
    trades_attack: str = _setting(
        "ce", "TRADES training attack: cross-entropy (AGR code) or KL", choices=("ce", "kl"), protocol=True
    )
    authors_step: bool = _setting(
        False,
        "the AGR authors' step with its quirks (their PGD without the iterate clamp, AWP's order, MART's and "
        "AVmixup's extra BatchNorm forwards) and their logging (the last batch's loss, the accuracy on the "
        "adversarial inputs); --preset authors",
        parse=bool,
        protocol=True,
    )
    beta: float = _setting(6.0, "TRADES/MART regularization weight", parse=float, protocol=True)
    awp_gamma: float = _setting(0.01, "AWP weight-perturbation size", parse=float, protocol=True)
    autoattack_samples: int = _setting(
        0, "AutoAttack (torchattacks) on this many test images at the end", parse=int, protocol=True
    )
    seed: int = _setting(0, "seed of the initialization, data order, augmentation and attacks", parse=int)
    device: str = _setting("cpu", "torch device: cpu, cuda, cuda:1, mps")
    amp: str = _setting("none", "autocast dtype on CUDA (fp16 with a GradScaler)", choices=AMP_MODES)
    compile: bool = _setting(False, "torch.compile the model", parse=bool)
    sync_bn: bool = _setting(
        False,
        "under torchrun, SyncBatchNorm: batch statistics of the whole global batch (CUDA only; off: each "
        "process normalises with its shard's, see docs/distributed.rst)",
        parse=bool,
    )
    threads: int | None = _setting(  # None (configs of earlier versions): torch's default
        1,
        "torch CPU threads (more oversubscribe a busy machine, see the docs; on CPU the results "
        "depend on it, so it is saved in config.json)",
        parse=int,
    )
    log: tuple[str, ...] = _setting(
        (),
        f"experiment trackers besides metrics.csv: {', '.join(TRACKERS)}, comma-separated or the flag repeated "
        '(pip install "agr_optim[tracking]"; W&B: WANDB_MODE=offline without an account; under torchrun write '
        "--trackers: torchrun's own parser takes --log for an abbreviation of its --log-dir and stops)",
        parse=_names_flag,
        repeatable=True,
        shown="none",
        # torchrun parses every argument with abbreviations allowed, also the script's: --log
        # prefixes its --log-dir and --logs-specs ("ambiguous option"), --trackers nothing.
        aliases=("--trackers",),
    )
    init_from: str | None = _setting(
        None,
        "start a new run from these weights: a state dict (also DDP's module.-prefixed), {'state_dict': ...}, or "
        "an agr-train checkpoint; the optimizer and the schedule start fresh, and --resume reads the run's own "
        "checkpoint instead",
    )

    def __post_init__(self) -> None:
        # None follows --epochs. (Frozen: set through object. An invalid epochs is left for
        # validate() to name.)
        epochs = self.epochs
        if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1:
            if self.lr_milestones is None:
                milestones = tuple(sorted({m for m in (epochs // 2, 3 * epochs // 4) if m > 0}))
                object.__setattr__(self, "lr_milestones", milestones)
            if self.agr_start_epoch is None:
                start = min(math.floor(PAPER_AGR_START_FRACTION * epochs), epochs - 1)
                object.__setattr__(self, "agr_start_epoch", start)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        d["log"] = list(self.log)
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> TrainConfig:
        unknown = sorted(set(d) - _FIELDS)
        if unknown:
            raise ConfigError(f"config.json has unknown settings {unknown}; was it written by another version?")
        d = dict(d)
        d["lr_milestones"] = tuple(d.get("lr_milestones", ()))
        if isinstance(d.get("log"), list):
            d["log"] = tuple(d["log"])
        return TrainConfig(**d)

    def lr_at(self, epoch: int) -> float:
        """The learning rate of ``epoch``: ``lr * lr_gamma ** (milestones <= epoch)``."""
        return self.lr * self.lr_gamma ** sum(epoch >= m for m in self.lr_milestones)

    def agr_on(self, epoch: int) -> bool:
        return self.agr and epoch >= self.agr_start_epoch

    def evaluates(self, epoch: int) -> bool:
        return (epoch + 1) % self.eval_every == 0 or epoch == self.epochs - 1


_FIELDS = frozenset(f.name for f in fields(TrainConfig))
#: The settings a preset sets; the others (where the data are, the device, the seed, ...) are
#: the run's own, "default" unless a flag gives them.
_PROTOCOL = tuple(f.name for f in fields(TrainConfig) if f.metadata["protocol"])
_DERIVED = {
    "lr_milestones": "derived from epochs (50 %, 75 %)",
    "agr_start_epoch": "derived from epochs (77.5 %, the paper's 155 of 200)",
}


# ---------------------------------------------------------------------- preset + flags
def resolve(args: dict[str, Any]) -> tuple[TrainConfig, dict[str, str]]:
    """Preset + flags -> a validated :class:`TrainConfig` and where each value came from.

    ``args`` maps :class:`TrainConfig` field names to flag values (unset flags absent;
    ``lr_milestones`` may be the flag's comma-separated text, ``clip_norm`` and ``cutout`` 0 for
    none). Raises :class:`ConfigError` naming the flag; touches nothing on disk.
    """
    preset_name = args.get("preset", "quick")
    if preset_name not in PRESETS:
        raise ConfigError(f"unknown --preset {preset_name!r}; choose one of {', '.join(sorted(PRESETS))}")
    unknown = sorted(set(args) - _FIELDS)
    if unknown:
        raise ConfigError(f"unknown settings {unknown}")
    values: dict[str, Any] = {**PRESETS[preset_name], **args, "preset": preset_name}
    sources = {f.name: f"preset {preset_name}" if f.name in _PROTOCOL else "default" for f in fields(TrainConfig)}
    sources.update({key: "flag" for key in args})
    if "out" not in values:
        raise ConfigError("--out is required: the folder for the metrics, checkpoints and plots")
    if isinstance(values.get("lr_milestones"), str):
        try:
            values["lr_milestones"] = tuple(int(v) for v in values["lr_milestones"].split(",") if v.strip())
        except ValueError:
            raise ConfigError(
                f"--lr-milestones must be comma-separated integers, got {values['lr_milestones']!r}"
            ) from None
    if values.get("lr_milestones") is not None:
        values["lr_milestones"] = tuple(values["lr_milestones"])
    if isinstance(values.get("log"), str):
        values["log"] = _names_flag(values["log"])
    elif isinstance(values.get("log"), list):
        values["log"] = tuple(values["log"])
    if values.get("clip_norm") == 0:
        values["clip_norm"] = None
    if values.get("cutout") == 0:
        values["cutout"] = None
    cfg = TrainConfig(**values)
    validate(cfg)
    for name, how in _DERIVED.items():
        if values.get(name) is None:
            sources[name] = how
    return cfg, sources


# ---------------------------------------------------------------------- validation
def validate(cfg: TrainConfig) -> None:
    """Every check of a config that needs no data: :class:`ConfigError`, one line naming the flag.
    Touches nothing on disk (the device is only asked whether it exists)."""

    def need(ok: bool, flag: str, what: str, value: object) -> None:
        if not ok:
            raise ConfigError(f"--{flag} must be {what}, got {value!r}")

    def finite(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def integer(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    need(integer(cfg.epochs) and cfg.epochs >= 1, "epochs", "an integer >= 1", cfg.epochs)
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
    # The loader's own minimum (agr_optim.data.MIN_IMAGE_SIDE), checked before anything is loaded.
    need(
        cfg.image_size is None or (integer(cfg.image_size) and MIN_IMAGE_SIDE <= cfg.image_size <= MAX_IMAGE_SIDE),
        "image-size",
        f"an integer in [{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}] (every image is held in memory at this side)",
        cfg.image_size,
    )
    need(
        cfg.num_classes is None or (integer(cfg.num_classes) and 2 <= cfg.num_classes <= MAX_CLASSES),
        "num-classes",
        f"an integer in [2, {MAX_CLASSES}]",
        cfg.num_classes,
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
    need(isinstance(cfg.authors_step, bool), "authors-step", "True or False", cfg.authors_step)
    if cfg.authors_step:  # what the authors' step is: refused here rather than in the first step
        need(cfg.clean_pass == "always", "clean-pass", "always with --authors-step (their clean forward runs "
             "on every step)", cfg.clean_pass)
        need(cfg.trades_attack == "ce", "trades-attack", "ce with --authors-step (their TRADES attack is their "
             "cross-entropy PGD)", cfg.trades_attack)
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
        isinstance(cfg.log, tuple) and all(name in TRACKERS for name in cfg.log) and len(set(cfg.log)) == len(cfg.log),
        "log",
        f"names among {', '.join(TRACKERS)}, each once",
        ",".join(map(str, cfg.log)) if isinstance(cfg.log, tuple) else cfg.log,
    )
    for name in cfg.log:  # before anything is written, not when the tracker opens
        missing = missing_package(name)
        if missing:
            raise ConfigError(missing)
    # The file is read (and checked against the model) once the data are loaded: it matters only
    # for a run without a checkpoint yet (agr_optim.training.checkpoint_io).
    need(
        cfg.init_from is None or (isinstance(cfg.init_from, str) and cfg.init_from != "" and "\0" not in cfg.init_from),
        "init-from",
        "a file path",
        cfg.init_from,
    )
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
    if cfg.sync_bn is not False and (cfg.sync_bn is not True or device.type != "cuda"):
        raise ConfigError(
            f"--sync-bn needs --device cuda (got {cfg.device!r}): torch's SyncBatchNorm runs on GPUs only; "
            "drop --sync-bn for BatchNorm per process"
        )
    if cfg.autoattack_samples > 0:
        try:
            import torchattacks  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"--autoattack-samples {cfg.autoattack_samples} needs torchattacks: "
                'pip install --no-deps "torchattacks==3.5.1", or pass --autoattack-samples 0'
            ) from None


#: The fewest classes AutoAttack's standard version takes: APGD-T's targeted DLR loss reads the
#: fourth-largest logit (torchattacks raised an IndexError after the whole training otherwise).
AUTOATTACK_MIN_CLASSES = 4


def _trains_on_one_image(cfg: TrainConfig, data: Any) -> bool:
    """Whether ``cfg.model`` can take a training step on one image of ``data``: BatchNorm in train
    mode needs more than one value per channel, and small images reach some models' last
    BatchNorm as 1x1 maps (PreActResNet-18 at sides up to 8, WideResNet at 4). Tried on the meta
    device: no memory, no compute, no random draw."""
    with torch.device("meta"):
        model = build_model(
            cfg.model, num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size
        ).train()
        try:
            model(torch.empty(1, data.in_channels, data.image_size, data.image_size))
        except ValueError:  # torch's "Expected more than 1 value per channel when training"
            return False
    return True


def validate_data(cfg: TrainConfig, data: Any, processes: int = 1) -> None:
    """The checks that need the loaded data (an :class:`agr_optim.data.Dataset`): a crop padding
    below the loaded image side (an ``.npz`` has no fixed side), enough classes for AutoAttack, and
    no training batch whose smallest part (of ``processes`` under torchrun) is one image that the
    model cannot train on (a traceback at the epoch's last step otherwise)."""
    n = data.y_train.shape[0]
    smallest = min(cfg.batch_size, n % cfg.batch_size or cfg.batch_size)
    if smallest // processes == 1 and not _trains_on_one_image(cfg, data):  # tensor_split's smallest part
        which = "a batch" if smallest == cfg.batch_size else f"the last batch ({n} images mod {cfg.batch_size})"
        per = "" if processes == 1 else f" in one of the {processes} processes"
        raise ConfigError(
            f"--batch-size {cfg.batch_size}: {which} leaves one image{per}, and --model {cfg.model} on "
            f"{data.image_size}x{data.image_size} images cannot train on one (its BatchNorm then sees one value per "
            "channel); choose a --batch-size that leaves every process at least 2 images of every batch, or a "
            "larger --image-size"
        )
    if cfg.crop_padding >= data.image_size:
        raise ConfigError(
            f"--crop-padding must be below the image side {data.image_size} of {data.name}, got {cfg.crop_padding}"
        )
    if cfg.autoattack_samples > 0 and data.num_classes < AUTOATTACK_MIN_CLASSES:
        raise ConfigError(
            f"--autoattack-samples {cfg.autoattack_samples}: AutoAttack (its targeted APGD-T) needs at least "
            f"{AUTOATTACK_MIN_CLASSES} classes and {data.name} has {data.num_classes}; pass --autoattack-samples 0"
        )


# ---------------------------------------------------------------------- the command line
class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (``PROG: error: MESSAGE (see --help)``, no usage block) and
    exit status 2: the parser of ``agr-train`` and ``agr-demo``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


_GIVEN = "_flags_given"


def _note_given(namespace: argparse.Namespace, dest: str) -> None:
    vars(namespace).setdefault(_GIVEN, set()).add(dest)


class _Flag(argparse.Action):
    """Store the value (``const`` for ``nargs=0``) and note that the flag was given."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        _note_given(namespace, self.dest)


class _Repeated(argparse.Action):
    """A flag that may be given several times: the values of every use, in order, each once."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        before = getattr(namespace, self.dest) if self.dest in vars(namespace).get(_GIVEN, set()) else ()
        setattr(namespace, self.dest, tuple(dict.fromkeys((*before, *values))))
        _note_given(namespace, self.dest)


class _Switch(argparse.BooleanOptionalAction):
    """``--X``/``--no-X``, noting that the flag was given."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        super().__call__(parser, namespace, values, option_string)
        _note_given(namespace, self.dest)


class SettingsParser(OneLineParser):
    """The parser :func:`build_parser` makes: ``parse_args`` gives every setting (the defaults
    for unset flags), :meth:`parse_flags` only the flags given."""

    def parse_flags(self, argv: Sequence[str] | None = None) -> dict[str, Any]:
        """The flags given in ``argv`` by field name (and ``resume``), for :func:`resolve`: the
        unset ones are absent, so that they keep the preset's values."""
        values = vars(self.parse_args(argv))
        return {dest: values[dest] for dest in sorted(values.pop(_GIVEN, set()))}


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _help(f: Field[Any]) -> str:
    """The field's help, its default and what each preset sets (``%`` escaped for argparse)."""
    text = f.metadata["help"]
    if f.default is not MISSING:
        notes = [f"default: {f.metadata['shown'] or _shown(f.default)}"]
        by_value: dict[str, list[str]] = {}  # presets that set the same value share a note
        for name, values in PRESETS.items():
            if f.name in values:
                by_value.setdefault(_shown(values[f.name]), []).append(name)
        notes += [f"--preset {', '.join(names)}: {value}" for value, names in by_value.items()]
        # Inside the help's own closing parenthesis, if it ends with one.
        text = f"{text[:-1]}; {'; '.join(notes)})" if text.endswith(")") else f"{text} ({'; '.join(notes)})"
    return text.replace("%", "%%")


def build_parser() -> SettingsParser:
    """The ``agr-train`` command line, generated from :class:`TrainConfig`'s fields: one flag per
    field (``--batch-size`` for ``batch_size``), each with its default, plus ``--resume``."""
    p = SettingsParser(
        prog="agr-train",
        description="Adversarial training with or without AGR, in the paper's protocol, from local data.",
        epilog="The defaults are --preset quick: the paper's protocol on a short schedule, on scikit-learn's "
        "digits with a small CNN. --preset paper sets the authors' values (listed with each flag it changes). "
        "Any flag overrides the preset; every value is printed and saved in config.json. Epochs are 0-based.",
    )
    for f in fields(TrainConfig):
        flags = ["--" + f.name.replace("_", "-"), *f.metadata["aliases"]]
        default = None if f.default is MISSING else f.default
        parse = f.metadata["parse"]
        if parse is bool:
            action = p.add_argument(*flags, action=_Switch, default=default)
        elif f.metadata["repeatable"]:
            action = p.add_argument(*flags, action=_Repeated, type=parse, default=default)
        else:
            action = p.add_argument(*flags, action=_Flag, type=parse, choices=f.metadata["choices"], default=default)
        action.help = _help(f)
    p.add_argument(
        "--resume", action=_Flag, nargs=0, const=True, default=False,
        help="continue the run in --out from its last checkpoint",
    )
    return p
