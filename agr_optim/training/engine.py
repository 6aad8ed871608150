r"""The engine of ``agr-train`` and ``agr-demo``: :class:`Trainer`, one epoch at a time.

The training step, per batch (the authors' order): the attack (PGD in eval mode), then in train
mode the clean forward pass (BatchNorm sees the clean batch in every arm and every epoch,
``clean_pass="always"`` of :mod:`agr_optim.recipes`), the method's adversarial objective, and the
step: with AGR from ``agr_start_epoch`` (0-based) on, the AGR update of the clean and the
adversarial gradients; before it, and without AGR, the adversarial gradient alone (no clean
backward pass is paid then).

The engine prints nothing and writes no file: :meth:`Trainer.train_epoch` returns the epoch's row
(the columns of :data:`METRIC_COLUMNS`) and reports progress through a callback;
:mod:`~agr_optim.training.reporting` turns rows into lines and files, and
:mod:`~agr_optim.training.cli` owns the run folder.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from .. import AGROptimizer, StatsAccumulator
from ..data import Dataset, augment, batches, load_dataset
from ..models import build_model
from ..recipes import PGD, StepOutput, avmixup_step, awp_step, mart_step, pgd_at_step, trades_step
from ..recipes._sharding import drawn_for
from .config import TrainConfig
from .distributed import ONE, World

__all__ = [
    "METRIC_COLUMNS",
    "PROGRESS_SECONDS",
    "Diverged",
    "EpochSums",
    "Progress",
    "Trainer",
    "load_data",
    "step_function",
]

#: The keys of an epoch's row (:meth:`Trainer.train_epoch`), the columns of ``metrics.csv``; the
#: AGR columns are ``None`` (empty) in epochs without AGR statistics (before the AGR start epoch,
#: unless ``warm_start_stats``), the test columns in epochs without evaluation.
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
_AGR_COLUMNS = {
    "agr_cosine": "cosine",
    "agr_projection_rate": "projection_rate",
    "agr_norm_adversarial": "norm_adversarial",
    "agr_norm_clean": "norm_clean",
    "agr_norm_difference": "norm_difference",
    "agr_l2_distance": "l2_distance",
    "agr_clip_rate": "clip_rate",
}

#: ``progress(done, total, running)``: see :meth:`Trainer.train_epoch`.
Progress = Callable[[int, int, "tuple[float, float] | None"], None]
#: Seconds of wall time between two reads of the running figures (progress and divergence).
PROGRESS_SECONDS = 5.0


def step_function(cfg: TrainConfig, generator: torch.Generator, clean_pass: str) -> Callable[..., StepOutput]:
    """The recipe step with the configured attack, as a function ``(model, opt, x, y, scaler)``."""
    attack = PGD(cfg.eps, cfg.attack_step, cfg.attack_steps, authors=cfg.authors_step)
    common: dict[str, Any] = {"clean_pass": clean_pass, "authors": cfg.authors_step}
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


class EpochSums:
    """Per-epoch sums kept on the device (no host read per step); read every few seconds.

    The AGR figures are :class:`~agr_optim.StatsAccumulator`'s with ``min_norm_ratio=None``: the
    AGR code's means over every parameter tensor and step. The projection rate without the
    near-zero segments (conv biases before BatchNorm, whose cosine is rounding noise) is logged
    beside it. The first step whose loss is not finite is recorded on the device too, so that
    divergence is found at the next read without a host read per step. ``last_loss``: the epoch's
    training loss is its last batch's (the AGR authors' logging), not the mean. Under torchrun the
    reads combine every process's sums (``world``: counts, not means of means).
    """

    def __init__(self, device: torch.device, *, last_loss: bool = False, world: World = ONE) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        # loss * n, correct, n, 1 + the first step with a non-finite loss (0: none yet)
        self.train = torch.zeros(4, dtype=dtype, device=device)
        self.last = torch.zeros(2, dtype=dtype, device=device) if last_loss else None  # loss, n
        self.world = world
        self.agr = StatsAccumulator(min_norm_ratio=None)
        self.agr_without_near_zero = StatsAccumulator()

    def add_batch(self, loss: Tensor, logits: Tensor, y: Tensor, step: int) -> None:
        loss = loss.detach().to(self.train.dtype)
        n = torch.full((), y.shape[0], dtype=self.train.dtype, device=self.train.device)
        correct = (logits.argmax(dim=1) == y).sum().to(self.train.dtype)
        seen = self.train[3]
        first = torch.where((seen == 0) & ~torch.isfinite(loss), step + 1, seen)
        self.train += torch.stack([loss * n, correct, n, first - seen])
        if self.last is not None:
            self.last.copy_(torch.stack([loss, n]))

    def add_agr(self, optimizer: AGROptimizer) -> None:
        self.agr.update(optimizer)
        self.agr_without_near_zero.update(optimizer)

    def read(self) -> tuple[float, float, int | None]:
        """Running loss and robust accuracy, and the first step with a non-finite loss (or
        ``None``): one host read."""
        loss_n, correct, n, bad = self.world.epoch_sums(self.train).tolist()
        first_bad = int(bad) - 1 if bad else None
        return (loss_n / n, correct / n, first_bad) if n else (math.nan, math.nan, first_bad)

    def finish(self) -> dict[str, float | None]:
        loss, acc, _ = self.read()
        if self.last is not None:
            loss = self.world.last_loss(self.last)
        row: dict[str, float | None] = {"train_loss": loss, "train_robust_acc": acc}
        counted = self.agr.steps > 0
        means = self.agr.compute() if counted else {}
        for column, key in _AGR_COLUMNS.items():
            row[column] = means[key] if counted else None
        row["agr_projection_rate_nonzero"] = (
            self.agr_without_near_zero.compute()["projection_rate"] if counted else None
        )
        return row


def load_data(cfg: TrainConfig) -> Dataset:
    """Load ``cfg.dataset`` from local files (with ``cfg.image_size`` and ``cfg.num_classes``),
    its tensors moved to ``cfg.device``; raises :class:`agr_optim.data.DatasetError`."""
    ds = load_dataset(cfg.dataset, cfg.data_dir, seed=0, image_size=cfg.image_size, num_classes=cfg.num_classes)
    device = torch.device(cfg.device)
    moved = {k: getattr(ds, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test")}
    return replace(ds, **moved)


class Trainer:
    """Model, optimizer, schedule and random streams of one run; one epoch at a time.

    Every random stream is the trainer's own (the global streams are swapped in for its epochs
    and saved after, :meth:`own_streams`), so several trainers in one process (``agr-demo``'s
    arms) do not disturb each other, and :meth:`state_dict` / :meth:`load_state_dict` resume
    exactly. An epoch is :meth:`training_batches` through :meth:`train_step` inside
    :meth:`own_streams`; :meth:`train_epoch` adds the sums, the checks and the evaluation.
    """

    def __init__(self, cfg: TrainConfig, data: Any, world: World = ONE) -> None:
        self.cfg, self.data, self.world = cfg, data, world
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
        self.eval_model: Any = self.model  # under torchrun: DDP trains, the module itself evaluates
        self._whole: tuple[Tensor, int, int] | None = None  # the global batch of the next step's shard
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
        self._step = step_function(cfg, self.augment_rng, cfg.clean_pass)
        self._warm_step = step_function(cfg, self.augment_rng, "gradient")

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
        twin = Trainer(replace(self.cfg, **changes), self.data, self.world)
        # Deep copies: Optimizer.load_state_dict keeps the given momentum tensors when their dtype
        # and device already fit, and this arm's next step would then move the twin's momentum.
        twin.load_state_dict(copy.deepcopy(self.state_dict()), optimizer=False)
        twin.sgd.load_state_dict(copy.deepcopy(self.sgd.state_dict()))
        return twin

    @contextlib.contextmanager
    def own_streams(self) -> Iterator[None]:
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

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The run's autocast (``--amp``), or a context that does nothing."""
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
        trainer's order and augmentation generators (call inside :meth:`own_streams`)."""
        cfg = self.cfg
        for xb, yb in batches(self.data.x_train, self.data.y_train, cfg.batch_size, shuffle=True, generator=self.order):
            x = augment(
                self._prepare(xb),
                padding=cfg.crop_padding,
                flip=cfg.flip,
                cutout=cfg.cutout,  # type: ignore[arg-type]  # validated: None, "authors" or an int
                generator=self.augment_rng,
            )
            yield self._shard(x, yb)

    def _shard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """This process's rows of a global batch (all of it in one process); the step then draws
        per example as on the whole batch (:mod:`agr_optim.recipes._sharding`)."""
        if self.world.size == 1:
            return x, y
        lo, hi = self.world.rows(y.shape[0])
        self._whole = (x, lo, hi)
        return x[lo:hi], y[lo:hi]

    def train_step(self, x: Tensor, y: Tensor) -> StepOutput:
        """One training step of epoch ``self.epoch`` on a batch of :meth:`training_batches`: the
        method's step with the epoch's optimizer (:meth:`optimizer_for`), under :meth:`autocast`
        (call inside :meth:`own_streams`, the model in train mode)."""
        opt = self.optimizer_for(self.epoch)
        step = self._warm_step if opt is self.agr_warm else self._step
        sharded = contextlib.nullcontext() if self._whole is None else drawn_for(*self._whole)
        with self.autocast(), sharded:
            out = step(self.model, opt, x, y, self.scaler)
        self.world.after_step()
        return out

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
        sums = EpochSums(self.device, last_loss=cfg.authors_step, world=self.world)
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

        with self.own_streams():
            self.model.train()
            for i, (x, yb) in enumerate(self.training_batches()):
                out = self.train_step(x, yb)
                # The authors count the training accuracy on their adversarial logits (AVmixup:
                # the attacked inputs, not the mixed ones).
                logits = out.logits_adv if cfg.authors_step and out.logits_adv is not None else out.logits
                sums.add_batch(out.loss, logits, yb, i)
                if isinstance(opt, AGROptimizer):
                    sums.add_agr(opt)
                running = None
                # Wall time: a host clock, no device read; rank 0's under torchrun (reads are collective).
                if self.world.agree(time.perf_counter() >= read_at):
                    running = read()
                    read_at = time.perf_counter() + PROGRESS_SECONDS
                if progress is not None:
                    progress(i + 1, total, running)
            read()
        self._check_finite(epoch, total)
        self.world.check_replicas(self)
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

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, *, batch_size: int = 256) -> tuple[float, float]:
        """Clean and PGD (``eval_steps``) test accuracy; attack starts from a seed of their own,
        the same for every epoch and both arms of a study, so training streams are untouched.
        Under torchrun each process attacks every N-th block of ``batch_size`` test images and draws
        the others' random starts too, so every block's start is one process's; the counts are
        summed over processes."""
        cfg = self.cfg
        attack = PGD(cfg.eps, cfg.attack_step, cfg.eval_steps, authors=cfg.authors_step)
        cuda = self.device.type == "cuda"
        counts = torch.zeros(2, dtype=torch.int64, device=self.device)
        model = self.eval_model
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            torch.manual_seed(10_000 + cfg.seed)
            model.eval()
            for block, i in enumerate(range(0, self.data.y_test.shape[0], batch_size)):
                x = self._prepare(self.data.x_test[i : i + batch_size])
                y = self.data.y_test[i : i + batch_size]
                if not self.world.owns(block):
                    attack._start_noise(x)  # another process attacks it: the stream moves on as there
                    continue
                with self.autocast():
                    with torch.no_grad():
                        clean = model(x).argmax(dim=1)
                    x_adv = attack(model, x, y)
                    with torch.no_grad():
                        robust = model(x_adv).argmax(dim=1)
                counts += torch.stack([(clean == y).sum(), (robust == y).sum()])
            model.train()
        clean_correct, robust_correct = self.world.total(counts).tolist()
        n = self.data.y_test.shape[0]
        return clean_correct / n, robust_correct / n

    def autoattack(self, weights: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """AutoAttack (torchattacks, standard L-inf) on the first ``autoattack_samples`` test
        images, on a copy of the model with ``weights`` (a state dict; ``None``: the current
        ones). Returns ``{"samples", "robust_acc", "seconds"}``; the trainer is untouched."""
        import torchattacks

        cfg = self.cfg
        model = copy.deepcopy(self.module)
        if weights is not None:
            model.load_state_dict(weights)
        model.eval()
        n = min(cfg.autoattack_samples, self.data.y_test.shape[0])
        atk = torchattacks.AutoAttack(
            model, norm="Linf", eps=cfg.eps, version="standard", n_classes=self.data.num_classes, seed=cfg.seed
        )
        correct = 0
        start = time.perf_counter()
        for i in range(0, n, 256):
            x = self.data.x_test[i : min(i + 256, n)].to(torch.float32) / 255.0
            y = self.data.y_test[i : min(i + 256, n)]
            x_adv = atk(x, y)
            with torch.no_grad():
                correct += int((model(x_adv).argmax(dim=1) == y).sum())
        return {"samples": n, "robust_acc": correct / n, "seconds": time.perf_counter() - start}
