"""``agr-demo``: adversarial training with and without AGR, on your machine, in one command.

Trains a small CNN on scikit-learn's embedded handwritten digits (8x8, 1797 images, no download)
with an adversarial-training method (PGD-AT by default), once with the plain SGD optimizer and once
with :class:`~agr_optim.AGROptimizer` around the same SGD, under the same seed, data order,
schedule and budget, for several seeds. Then it evaluates clean accuracy and robust accuracy
under a fresh PGD-20 attack (stronger than the 10-step training attack), prints a table and writes
``results.json`` and ``tradeoff.png`` to ``--out``.

As in the paper (AGR from epoch 155 of 200, after the last learning-rate decay at 150), AGR is
switched on late: from epoch ``floor(agr_start * epochs)`` (``--agr-start``, default 0.775).
Until then both arms take bit-for-bit the same steps.

Run ``python -m agr_optim.demo --help``. Needs the ``demo`` extras
(``pip install "agr_optim[demo]"``: scikit-learn, matplotlib, tqdm), imported only here.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from . import AGROptimizer
from .recipes import PGD, awp_step, mart_step, pgd_at_step, trades_step

__all__ = ["main", "SmallCNN", "load_digits_data"]

METHODS = ("at", "trades", "mart", "awp")
METHOD_NAMES = {"at": "PGD-AT", "trades": "TRADES", "mart": "MART", "awp": "AWP"}
DEFAULT_EPOCHS = 20
DEFAULT_SEEDS = 5
DEFAULT_EPS = 0.1
SPLIT_SEED = 0  # the train/test split is the same for every seed: seeds vary init, order, attacks


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _build_parser() -> _Parser:
    parser = _Parser(
        prog="agr-demo",
        description="Adversarial training with and without AGR (same seeds, schedule, budget): "
        "clean vs PGD-20 robust accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--method", default="at", help=f"adversarial-training method, one of {', '.join(METHODS)}")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs per run")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="seeds 0..K-1, each run with and without AGR")
    parser.add_argument("--eps", type=float, default=DEFAULT_EPS, help="L-inf radius in (0, 1], data in [0, 1]")
    parser.add_argument("--out", default="agr_demo_results", help="folder for results.json and tradeoff.png")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--agr-start",
        type=float,
        default=0.775,
        help="AGR starts at epoch floor(AGR_START * epochs); 0.775 = the paper's 155/200, 0 = from the start",
    )
    parser.add_argument("--clip-norm", type=float, default=0.1, help="AGR per-tensor clip norm (0: no clipping)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (x0.1 at 50%% and 75%% of epochs)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; the tiny CNN gains nothing from more, 1 avoids OpenMP spin-waits on a busy machine",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="optional local .npz with x_train, y_train, x_test, y_test (images in [0, 1] or uint8); "
        "default: scikit-learn's digits. Nothing is ever downloaded.",
    )
    return parser


@dataclass(frozen=True)
class Config:
    method: str
    epochs: int
    seeds: int
    eps: float
    out: str
    device: torch.device
    agr_start: float
    clip_norm: float | None
    lr: float
    batch_size: int
    data: str | None
    threads: int = 1

    @property
    def agr_start_epoch(self) -> int:
        """First epoch (0-based) whose steps use AGR."""
        return min(int(math.floor(self.agr_start * self.epochs)), self.epochs - 1)


def _validate(parser: _Parser, args: argparse.Namespace) -> Config:
    """Check every argument, and that --out can be written, before anything is created."""
    if args.method not in METHODS:
        parser.error(f"unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if not (math.isfinite(args.eps) and 0 < args.eps <= 1):
        parser.error(f"--eps must be in (0, 1] (the data are scaled to [0, 1]), got {args.eps}")
    if not (math.isfinite(args.agr_start) and 0 <= args.agr_start < 1):
        parser.error(f"--agr-start must be in [0, 1), got {args.agr_start}")
    if not (math.isfinite(args.clip_norm) and args.clip_norm >= 0):
        parser.error(f"--clip-norm must be >= 0 (0: no clipping), got {args.clip_norm}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as error:
        parser.error(f"invalid --device {args.device!r}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device!r}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        parser.error(f"--device {args.device!r}: MPS is not available on this machine")
    if args.data is not None and not os.path.isfile(args.data):
        parser.error(f"--data {args.data!r} is not a file")
    problem = _unwritable(args.out)
    if problem:
        parser.error(f"cannot write to --out {args.out!r}: {problem}")
    return Config(
        method=args.method,
        epochs=args.epochs,
        seeds=args.seeds,
        eps=args.eps,
        out=args.out,
        device=device,
        agr_start=args.agr_start,
        clip_norm=args.clip_norm or None,
        lr=args.lr,
        batch_size=args.batch_size,
        data=args.data,
        threads=args.threads,
    )


def _unwritable(out: str) -> str | None:
    """Why ``out`` cannot be (created and) written, or ``None``; creates nothing."""
    path = os.path.abspath(out)
    if os.path.exists(path):
        if not os.path.isdir(path):
            return "it exists and is not a folder"
        probe_dir = path
    else:
        probe_dir = os.path.dirname(path)
        while not os.path.exists(probe_dir):
            probe_dir = os.path.dirname(probe_dir)
        if not os.path.isdir(probe_dir):
            return f"{probe_dir!r} is not a folder"
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        return f"no write permission in {probe_dir!r}"
    try:  # os.access is not the whole truth (read-only mounts, ACLs): try a file
        with tempfile.TemporaryFile(dir=probe_dir):
            pass
    except OSError as error:
        return error.strerror or str(error)
    return None


def _import_extras() -> tuple[Any, Any, Any]:
    """scikit-learn's ``datasets``, matplotlib's ``pyplot`` (Agg) and ``tqdm``, or a clear exit."""
    try:
        import matplotlib
        import sklearn.datasets  # noqa: F401
        import tqdm
    except ImportError as error:
        sys.stderr.write(
            f"agr-demo: error: the demo needs the 'demo' extras (scikit-learn, matplotlib, tqdm): "
            f'pip install "agr_optim[demo]" (missing: {error.name})\n'
        )
        raise SystemExit(2) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return sklearn.datasets, plt, tqdm.tqdm


# ---------------------------------------------------------------------- data and model
@dataclass(frozen=True)
class Data:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def load_digits_data() -> Data:
    """scikit-learn's digits as ``[N, 1, 8, 8]`` float32 in [0, 1]; a fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    index = torch.arange(len(y)).numpy()
    train, test = train_test_split(index, test_size=0.25, random_state=SPLIT_SEED, stratify=digits.target)
    return Data("digits (sklearn, 8x8)", x[train], y[train], x[test], y[test])


def _load_npz(path: str) -> Data:
    """A local .npz: x_* as [N, H, W] or [N, C, H, W], float in [0, 1] or uint8; y_* integer labels."""
    import numpy as np

    with np.load(path) as arrays:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
        if missing:
            raise ValueError(f"{path!r} lacks {', '.join(missing)}")
        parts = {k: arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    xs = []
    for key in ("x_train", "x_test"):
        x = parts[key]
        x = torch.from_numpy(x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0))
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or not (x.min() >= 0 and x.max() <= 1):
            raise ValueError(f"{key} must be [N, H, W] or [N, C, H, W] with values in [0, 1] (or uint8)")
        xs.append(x)
    ys = [torch.from_numpy(parts[k].astype(np.int64)).reshape(-1) for k in ("y_train", "y_test")]
    if len(ys[0]) != len(xs[0]) or len(ys[1]) != len(xs[1]) or min(ys[0].min(), ys[1].min()) < 0:
        raise ValueError("labels must be integers >= 0, one per image")
    return Data(os.path.basename(path), xs[0], ys[0], xs[1], ys[1])


class SmallCNN(nn.Sequential):
    """conv16-conv32-pool-conv32-pool-fc64-fc with batch norm: about 20 k parameters.

    Batch norm matters here: without it, adversarial training from scratch at lr 0.1 often
    stays at chance level for the first epochs.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 2 * 2, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )


# ---------------------------------------------------------------------- training
@dataclass
class RunResult:
    method: str
    agr: bool
    seed: int
    epochs: int
    clean_acc: float
    robust_acc: float
    seconds: float
    seconds_per_epoch: float
    agr_start_epoch: int | None
    eps: float


def _step_fn(cfg: Config) -> Callable[..., Any]:
    """The recipe step with the demo's training attack (PGD-10, step eps/4)."""
    if cfg.method == "trades":
        attack = PGD(cfg.eps, cfg.eps / 4, 10, loss="kl", random_start="normal")
        return lambda m, o, x, y: trades_step(m, o, x, y, attack=attack)
    attack = PGD(cfg.eps, cfg.eps / 4, 10)
    step = {"at": pgd_at_step, "mart": mart_step, "awp": awp_step}[cfg.method]
    return lambda m, o, x, y: step(m, o, x, y, attack=attack)


def _sgd(cfg: Config, model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)


def _lr_at(cfg: Config, epoch: int) -> float:
    """Piecewise-constant schedule: x0.1 at 50% and 75% of the epochs (the paper: 100, 150 of 200)."""
    return cfg.lr * 0.1 ** sum(epoch >= int(f * cfg.epochs) for f in (0.5, 0.75) if int(f * cfg.epochs) > 0)


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, attack: PGD | None, batch: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        if attack is not None:
            xb = attack(model, xb, yb)
        correct += int((model(xb).argmax(1) == yb).sum())
    return correct / len(y)


def _eval_attack(cfg: Config) -> PGD:
    """PGD-20 with step eps/8 and a random start: twice the training attack's steps."""
    return PGD(cfg.eps, cfg.eps / 8, 20)


class _Trainer:
    """Model, optimizer and random streams of one run; ``fork`` copies them for the AGR arm."""

    def __init__(self, cfg: Config, data: Data, seed: int) -> None:
        self.cfg, self.data = cfg, data
        torch.manual_seed(seed)
        self.model = SmallCNN(data.x_train.shape[1], data.num_classes).to(cfg.device)
        self.opt: torch.optim.Optimizer = _sgd(cfg, self.model)
        self.order = torch.Generator().manual_seed(seed)  # data order
        self.rng = torch.get_rng_state()  # attack random starts (the global stream)
        self.seconds = 0.0
        self.x_train, self.y_train = data.x_train.to(cfg.device), data.y_train.to(cfg.device)
        self.step = _step_fn(cfg)

    def fork_with_agr(self) -> _Trainer:
        """A copy that continues with AGR from here: same weights, momentum, RNG states, time spent."""
        twin = copy.copy(self)
        twin.model = copy.deepcopy(self.model)
        sgd = _sgd(self.cfg, twin.model)
        sgd.load_state_dict(self.opt.state_dict())
        twin.opt = AGROptimizer(sgd, clip_norm=self.cfg.clip_norm)
        twin.order = torch.Generator().set_state(self.order.get_state())
        return twin

    def train_epoch(self, epoch: int) -> None:
        cfg, n = self.cfg, len(self.y_train)
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(cfg, epoch)
        torch.set_rng_state(self.rng)
        self.model.train()
        start = time.perf_counter()
        perm = torch.randperm(n, generator=self.order).to(cfg.device)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            self.step(self.model, self.opt, self.x_train[idx], self.y_train[idx])
        if cfg.device.type == "cuda":
            torch.cuda.synchronize(cfg.device)
        self.seconds += time.perf_counter() - start
        self.rng = torch.get_rng_state()

    def result(self, seed: int, agr: bool) -> RunResult:
        cfg = self.cfg
        torch.manual_seed(10_000 + seed)  # both arms are evaluated with the same attack starts
        x_test, y_test = self.data.x_test.to(cfg.device), self.data.y_test.to(cfg.device)
        return RunResult(
            method=cfg.method,
            agr=agr,
            seed=seed,
            epochs=cfg.epochs,
            clean_acc=_accuracy(self.model, x_test, y_test, None),
            robust_acc=_accuracy(self.model, x_test, y_test, _eval_attack(cfg)),
            seconds=self.seconds,
            seconds_per_epoch=self.seconds / cfg.epochs,
            agr_start_epoch=cfg.agr_start_epoch if agr else None,
            eps=cfg.eps,
        )


def train_pair(
    cfg: Config, data: Data, seed: int, on_epoch: Callable[[str], None] | None = None
) -> tuple[RunResult, RunResult]:
    """The plain run and the AGR run of one seed.

    Until AGR starts, the AGR arm would take bit-for-bit the same steps as the plain arm (AGR's
    warm start is the plain adversarial step), so those epochs are trained once and the state
    (weights, momentum, data order and attack random streams) is forked: the AGR arm equals a
    from-scratch ``AGROptimizer(sgd, start_step=agr_start_epoch * batches)`` run, at a fraction
    of the cost. The shared epochs' time counts for both arms.
    """
    plain = _Trainer(cfg, data, seed)
    for epoch in range(cfg.agr_start_epoch):
        plain.train_epoch(epoch)
        if on_epoch is not None:
            on_epoch("shared")
    with_agr = plain.fork_with_agr()
    for arm, trainer in (("plain", plain), ("agr", with_agr)):
        for epoch in range(cfg.agr_start_epoch, cfg.epochs):
            trainer.train_epoch(epoch)
            if on_epoch is not None:
                on_epoch(arm)
    return plain.result(seed, agr=False), with_agr.result(seed, agr=True)


def _estimate_seconds(cfg: Config, data: Data) -> float:
    """Time a few training steps (plain and AGR) and one evaluation batch; extrapolate."""
    torch.manual_seed(12345)
    model = SmallCNN(data.x_train.shape[1], data.num_classes).to(cfg.device)
    xb = data.x_train[: cfg.batch_size].to(cfg.device)
    yb = data.y_train[: cfg.batch_size].to(cfg.device)
    step = _step_fn(cfg)
    batches = math.ceil(len(data.y_train) / cfg.batch_size)

    def per_step(opt: torch.optim.Optimizer, repeats: int = 3) -> float:
        step(model, opt, xb, yb)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            step(model, opt, xb, yb)
        return (time.perf_counter() - start) / repeats

    plain = per_step(torch.optim.SGD(model.parameters(), lr=1e-4))
    with_agr = per_step(AGROptimizer(torch.optim.SGD(model.parameters(), lr=1e-4)))
    start = time.perf_counter()
    _accuracy(model, data.x_test[:256].to(cfg.device), data.y_test[:256].to(cfg.device), _eval_attack(cfg))
    evaluation = (time.perf_counter() - start) * len(data.y_test) / min(256, len(data.y_test))
    agr_epochs = cfg.epochs - cfg.agr_start_epoch
    per_seed = batches * (cfg.epochs * plain + agr_epochs * with_agr) + 2 * evaluation
    return per_seed * cfg.seeds


# ---------------------------------------------------------------------- report
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _arm_label(cfg: Config, agr: bool) -> str:
    name = METHOD_NAMES[cfg.method]
    return f"{name}+AGR" if agr else name


def format_table(cfg: Config, data: Data, results: Sequence[RunResult]) -> str:
    """The stdout table: mean +- std over seeds per arm, and the paired AGR - plain difference."""
    lines = [
        f"{METHOD_NAMES[cfg.method]} on {data.name}: {len(data.y_train)} train / {len(data.y_test)} test, "
        f"eps={cfg.eps:g}, {cfg.epochs} epochs, AGR from epoch {cfg.agr_start_epoch + 1} "
        f"(clip_norm={cfg.clip_norm}), seeds 0..{cfg.seeds - 1}; mean +- std over seeds",
        f"{'arm':<14} {'clean acc %':>16} {'robust acc % (PGD-20)':>22} {'s/epoch':>8}",
    ]
    by_arm = {agr: sorted((r for r in results if r.agr == agr), key=lambda r: r.seed) for agr in (False, True)}
    for agr, runs in by_arm.items():
        if not runs:
            continue
        c_mean, c_std = _mean_std([100 * r.clean_acc for r in runs])
        r_mean, r_std = _mean_std([100 * r.robust_acc for r in runs])
        s_epoch = statistics.fmean(r.seconds_per_epoch for r in runs)
        lines.append(
            f"{_arm_label(cfg, agr):<14} {c_mean:>9.2f} +- {c_std:<4.2f} "
            f"{r_mean:>15.2f} +- {r_std:<4.2f} {s_epoch:>8.2f}"
        )
    if by_arm[False] and len(by_arm[False]) == len(by_arm[True]):
        dc = [100 * (b.clean_acc - a.clean_acc) for a, b in zip(by_arm[False], by_arm[True], strict=True)]
        dr = [100 * (b.robust_acc - a.robust_acc) for a, b in zip(by_arm[False], by_arm[True], strict=True)]
        (dc_mean, dc_std), (dr_mean, dr_std) = _mean_std(dc), _mean_std(dr)
        lines.append(f"{'AGR - plain':<14} {dc_mean:>+9.2f} +- {dc_std:<4.2f} {dr_mean:>+15.2f} +- {dr_std:<4.2f}")
        lines.append(f"(AGR - plain: per-seed paired differences, in percentage points; {len(dc)} seed(s))")
    return "\n".join(lines)


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write to a temporary file beside ``path``, then rename: never a half-written file."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _plot(plt: Any, cfg: Config, results: Sequence[RunResult], path: str) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    colours = {False: "tab:blue", True: "tab:orange"}
    plain = {r.seed: r for r in results if not r.agr}
    for r in results:  # thin lines join the two arms of the same seed
        if r.agr and r.seed in plain:
            p = plain[r.seed]
            ax.plot([100 * p.clean_acc, 100 * r.clean_acc], [100 * p.robust_acc, 100 * r.robust_acc], c="0.8", lw=0.8)
    for agr in (False, True):
        runs = [r for r in results if r.agr == agr]
        if not runs:
            continue
        cs, rs = [100 * r.clean_acc for r in runs], [100 * r.robust_acc for r in runs]
        label = _arm_label(cfg, agr)
        ax.scatter(cs, rs, c=colours[agr], alpha=0.55, s=28, label=f"{label} (one run per seed)")
        (cm, csd), (rm, rsd) = _mean_std(cs), _mean_std(rs)
        ax.errorbar(
            cm,
            rm,
            xerr=csd,
            yerr=rsd,
            fmt="D",
            ms=9,
            c=colours[agr],
            mec="black",
            capsize=3,
            label=f"{label} mean +- std",
        )
    ax.set_xlabel("clean test accuracy (%)")
    ax.set_ylabel(f"robust test accuracy, PGD-20 eps={cfg.eps:g} (%)")
    ax.set_title(f"{METHOD_NAMES[cfg.method]} with and without AGR ({cfg.epochs} epochs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns 0. Bad arguments: a one-line error on stderr and ``SystemExit(2)``."""
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        # --threads is for this run only: a caller in the same process keeps its setting.
        torch.set_num_threads(threads)


def _main(argv: Sequence[str] | None) -> int:
    parser = _build_parser()
    cfg = _validate(parser, parser.parse_args(argv))
    _, plt, tqdm = _import_extras()
    torch.set_num_threads(cfg.threads)
    try:
        data = _load_npz(cfg.data) if cfg.data else load_digits_data()
    except (OSError, ValueError) as error:
        parser.error(f"cannot read --data {cfg.data!r}: {error}")

    estimate = _estimate_seconds(cfg, data)
    print(
        f"agr-demo: {METHOD_NAMES[cfg.method]} with and without AGR, {cfg.seeds} seed(s) x {cfg.epochs} epochs "
        f"on {data.name}, device {cfg.device}; expected time about {_human(estimate)}",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()
    results: list[RunResult] = []
    epochs_per_seed = cfg.epochs + (cfg.epochs - cfg.agr_start_epoch)  # shared prefix trained once
    names = {"shared": f"{METHOD_NAMES[cfg.method]} (shared warm start)", "plain": _arm_label(cfg, False)}
    names["agr"] = _arm_label(cfg, True)
    with tqdm(total=cfg.seeds * epochs_per_seed, unit="epoch", file=sys.stderr, dynamic_ncols=True) as bar:

        def tick(arm: str) -> None:
            bar.set_description(f"seed {seed} {names[arm]}", refresh=False)
            bar.update(1)

        for seed in range(cfg.seeds):
            bar.set_description(f"seed {seed}")
            results.extend(train_pair(cfg, data, seed, on_epoch=tick))
            bar.set_postfix_str(
                f"last seed clean {results[-2].clean_acc:.3f}/{results[-1].clean_acc:.3f}, "
                f"robust {results[-2].robust_acc:.3f}/{results[-1].robust_acc:.3f} (plain/AGR)"
            )

    os.makedirs(cfg.out, exist_ok=True)
    json_path, png_path = os.path.join(cfg.out, "results.json"), os.path.join(cfg.out, "tradeoff.png")

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
            f.write("\n")

    _atomic_write(json_path, write_json)
    _atomic_write(png_path, lambda tmp: _plot(plt, cfg, results, tmp))
    print(format_table(cfg, data, results))
    print(
        f"agr-demo: done in {_human(time.perf_counter() - started)} (expected {_human(estimate)}); "
        f"wrote {json_path} and {png_path}",
        file=sys.stderr,
    )
    return 0


def _human(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


if __name__ == "__main__":
    sys.exit(main())
