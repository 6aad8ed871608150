r"""What ``agr-train`` shows and writes about a run, from its rows: lines, ``metrics.csv``,
``summary.json``, ``curves.png``.

Every function here takes the settings and the epochs' rows (:meth:`Trainer.train_epoch
<agr_optim.training.engine.Trainer.train_epoch>`'s, keys :data:`~agr_optim.training.engine.METRIC_COLUMNS`),
never a trainer: a tracker (TensorBoard, W&B) is one more consumer of the same rows. Files go
through :mod:`~agr_optim.training.run_folder` (atomic, durable); tqdm and matplotlib are imported
only when used.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .config import METHOD_NAMES, TrainConfig
from .engine import METRIC_COLUMNS, Progress
from .run_folder import atomic_write, write_json, write_text

__all__ = [
    "MOSTLY_CLIPPED",
    "clip_note",
    "config_lines",
    "epoch_progress",
    "metrics_csv",
    "plot_curves",
    "screen_line",
    "summary",
    "write_outputs",
]


def config_lines(cfg: TrainConfig, sources: dict[str, str]) -> list[str]:
    """The run's header: the method, the preset, and every setting with where it came from."""
    lines = [f"agr-train: {METHOD_NAMES[cfg.method]}{' + AGR' if cfg.agr else ''}, preset {cfg.preset}; every setting:"]
    for key, value in cfg.to_json().items():
        lines.append(f"  {key:<20} {value!r:<28} ({sources.get(key, 'default')})")
    return lines


def screen_line(cfg: TrainConfig, row: dict[str, Any]) -> str:
    """One epoch on one line: lr, loss, accuracies (%) and, with statistics, AGR's means."""

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


def epoch_progress(epoch: int) -> tuple[Progress, Any]:
    """The epoch's progress: a tqdm bar on a terminal, else a plain line on stderr at every read of
    the running figures (every :data:`~agr_optim.training.engine.PROGRESS_SECONDS`: an epoch of
    silence reads as a hang). Returns the callback and the bar to close (or ``None``)."""
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


def metrics_csv(rows: Sequence[dict[str, Any]]) -> str:
    """``metrics.csv``: a header of :data:`~agr_optim.training.engine.METRIC_COLUMNS`, one line
    per row, ``None`` as an empty field."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in METRIC_COLUMNS})
    return buffer.getvalue()


def summary(
    cfg: TrainConfig, rows: Sequence[dict[str, Any]], best: dict[str, Any] | None, autoattack: dict[str, Any] | None
) -> dict[str, Any]:
    """``summary.json``: the final and the best row (PGD robust accuracy) overall, the best since
    AGR started (``best_agr``: among the AGR epochs; ``None`` without AGR or before an evaluated
    AGR epoch) and whether the best overall predates AGR (its checkpoint is ``checkpoint_best.pt``),
    AutoAttack's result, the mean epoch time."""
    evaluated_agr = [r for r in rows if r.get("agr_active") and r.get("test_robust_acc") is not None]
    best_agr = max(evaluated_agr, key=lambda r: r["test_robust_acc"], default=None)  # the first of equals
    return {
        "method": cfg.method,
        "agr": cfg.agr,
        "agr_start_epoch": cfg.agr_start_epoch if cfg.agr else None,
        "epochs_done": len(rows),
        "epochs": cfg.epochs,
        "complete": len(rows) == cfg.epochs,
        "final": rows[-1] if rows else None,
        "best": best,
        "best_agr": best_agr,
        "best_predates_agr": None if best is None or not cfg.agr else not best.get("agr_active"),
        "autoattack": autoattack,
        "seconds_per_epoch": (sum(r["seconds"] for r in rows) / len(rows)) if rows else None,
    }


#: ``agr-train`` notes an epoch in which more than this fraction of the segments was clipped.
MOSTLY_CLIPPED = 0.5


def clip_note(cfg: TrainConfig, row: dict[str, Any]) -> str | None:
    """A one-line note when most segments of an AGR epoch were clipped (``None`` otherwise)."""
    rate = row.get("agr_clip_rate")
    if not row.get("agr_active") or rate is None or cfg.clip_norm is None or rate <= MOSTLY_CLIPPED:
        return None
    return (
        f"agr-train: note: AGR clipped {100 * rate:.0f} % of the segments in epoch {row['epoch']} "
        f"(--clip-norm {cfg.clip_norm:g}): the clip then sets most steps' size; see 'clip_norm with "
        "Adam-family optimizers' in the tutorials for choosing it from the clip rate"
    )


def plot_curves(cfg: TrainConfig, rows: Sequence[dict[str, Any]], path: str) -> bool:
    """``curves.png``: accuracies (left) and AGR's cosine and projection rate (right) per epoch,
    the AGR start and the lr milestones marked. Returns ``False`` without matplotlib."""
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


def write_outputs(
    cfg: TrainConfig,
    rows: Sequence[dict[str, Any]],
    best: dict[str, Any] | None,
    autoattack: dict[str, Any] | None = None,
    *,
    curves: bool = True,
) -> bool:
    """``metrics.csv``, ``summary.json`` and (with ``curves``) ``curves.png`` in ``cfg.out``,
    from the rows: every epoch writes the first two, a resumed run rebuilds them from its
    checkpoint before it trains, and every run draws the curves at its end. Returns whether
    matplotlib drew them."""
    write_text(os.path.join(cfg.out, "metrics.csv"), metrics_csv(rows))
    write_json(os.path.join(cfg.out, "summary.json"), summary(cfg, rows, best, autoattack))
    if not curves or not rows:
        return True
    return plot_curves(cfg, rows, os.path.join(cfg.out, "curves.png"))

