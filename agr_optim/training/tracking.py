r"""Experiment trackers of ``agr-train`` (``--log tensorboard,wandb``): the epochs' rows, and the
running figures, as TensorBoard event files and a W&B run. ``metrics.csv`` stays the record.

One class per backend, one small interface (:class:`Tracker`): :meth:`~Tracker.open`,
:meth:`~Tracker.log_epoch` (a row of :data:`~agr_optim.training.engine.METRIC_COLUMNS`),
:meth:`~Tracker.log_running` (the running loss and robust accuracy the engine reads every
:data:`~agr_optim.training.engine.PROGRESS_SECONDS`: no extra device read) and
:meth:`~Tracker.close`; :func:`open_trackers` opens the configured ones behind one object.

The axes. An epoch's figures go under ``epoch/<column>`` (the ``metrics.csv`` column names;
empty cells are not logged) at step = the 0-based epoch; the running figures under
``running/train_loss`` and ``running/train_robust_acc`` (the epoch's means so far) at step = the
0-based index of the optimizer step (``epoch * steps_per_epoch + batch``). TensorBoard takes one
step axis per event folder, so the two live in ``tensorboard/epochs`` and ``tensorboard/steps``
under ``--out``; W&B takes one run with explicit steps (an epoch's row at its last step, with
``epoch`` as the x-axis of ``epoch/*``), in ``--out``/``wandb``, its run id kept in
``tracking.json``.

Resume without holes or repeats. A row is logged *before* the epoch's checkpoint is written, so
every checkpointed epoch is in the trackers; a run resumed after ``k`` epochs repeats what the
trackers may already hold beyond them (the epoch whose checkpoint was not written, the running
figures of a stopped epoch) and so erases it first: TensorBoard's ``purge_step`` (``k`` and
``k * steps_per_epoch``: the readers drop the older events from that step on); W&B resumes the same
run id with the same explicit steps (a resumed run is bit for bit the stopped one on CPU: a
repeated step holds the same figures, and W&B keeps one row per step).

Only the main process logs (rank 0 under ``torch.distributed``). The packages are imported when a
tracker opens (TensorBoard's import costs about a second): ``pip install "agr_optim[tracking]"``.
"""

from __future__ import annotations

import abc
import contextlib
import glob
import importlib.util
import json
import os
import secrets
import time
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

from . import run_folder

if TYPE_CHECKING:
    from .config import TrainConfig
    from .engine import Progress

__all__ = [
    "TRACKERS",
    "TRACKING_EXTRA",
    "TensorBoardTracker",
    "Tracker",
    "Tracking",
    "WandbTracker",
    "is_main_process",
    "missing_package",
    "open_trackers",
]

#: The ``pip`` extra that installs every tracker's package.
TRACKING_EXTRA = 'pip install "agr_optim[tracking]"'
#: What the engine's running read holds, by the names it gets in the trackers (``running/...``).
_RUNNING = ("train_loss", "train_robust_acc")


def is_main_process() -> bool:
    """Whether this process logs: always, except on a rank other than 0 of an initialized
    ``torch.distributed`` group (every rank has the same figures there)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _numbers(row: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The row's numeric cells (``None``, an empty CSV cell, is left out; booleans as 0/1)."""
    return {k: float(v) for k, v in row.items() if k not in skip and isinstance(v, (int, float))}


class Tracker(abc.ABC):
    """One backend. ``open`` may refuse with :class:`~agr_optim.training.config.ConfigError`
    (one line naming ``--log``); the others are called only after it opened."""

    name: ClassVar[str]
    package: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def open(cls, cfg: TrainConfig, *, epochs_done: int, steps_per_epoch: int, resume: bool) -> Tracker:
        """Start logging the run in ``cfg.out`` that has ``epochs_done`` epochs in its checkpoint."""

    @abc.abstractmethod
    def log_epoch(self, row: dict[str, Any]) -> None:
        """An epoch's row (:data:`~agr_optim.training.engine.METRIC_COLUMNS`), on disk when it returns
        as far as the backend allows."""

    @abc.abstractmethod
    def log_running(self, values: dict[str, float], step: int) -> None:
        """The running figures after the 0-based optimizer step ``step``."""

    @abc.abstractmethod
    def close(self, failed: bool = False) -> None:
        """Flush and close (``failed``: the run stopped on an exception)."""


# ---------------------------------------------------------------------- TensorBoard
def _after_older_events(folder: str, wait_at_most: float = 2.0) -> None:
    """Wait until an event file opened now sorts after ``folder``'s older ones.

    TensorBoard reads a folder's event files in name order, ``events.out.tfevents.<10-digit
    seconds>.<host>.<pid>.<counter>``: within one second the pid and the counter (not zero-padded)
    decide, and a resumed run's ``purge_step`` must come after the events it purges. A run resumed
    within the second of its stop waits for the next second (at most ``wait_at_most``: a clock
    set back further is the clock's problem)."""
    stamps = []
    for path in glob.glob(os.path.join(glob.escape(folder), "events.out.tfevents.*")):
        parts = os.path.basename(path).split(".")
        if len(parts) > 3 and parts[3].isdigit():
            stamps.append(int(parts[3]))
    if stamps:
        wait = max(stamps) + 1 - time.time()
        if wait > 0:
            time.sleep(min(wait, wait_at_most))


class TensorBoardTracker(Tracker):
    """Event files in ``--out/tensorboard/epochs`` (step: the epoch) and ``.../steps`` (step: the
    optimizer step), through :class:`torch.utils.tensorboard.SummaryWriter`."""

    name, package = "tensorboard", "tensorboard"
    FOLDER = "tensorboard"  # (one of run_folder.TRACKER_FOLDERS)

    def __init__(self, epochs: Any, steps: Any) -> None:
        self.epochs, self.steps = epochs, steps

    @contextlib.contextmanager
    def _writing(self, writer: Any) -> Iterator[None]:
        """A failed write of the event files (TensorBoard's writer thread raises it at the next
        call: a full disk) as the run's :class:`~agr_optim.training.run_folder.WriteError`: one
        line, exit status 4, the folder resumes."""
        try:
            yield
        except OSError as error:
            raise run_folder.write_error(error, writer.get_logdir()) from error

    @classmethod
    def open(cls, cfg: TrainConfig, *, epochs_done: int, steps_per_epoch: int, resume: bool) -> TensorBoardTracker:
        SummaryWriter = _imported(cls, "torch.utils.tensorboard").SummaryWriter
        writers = []
        try:
            for sub, purge in (("epochs", epochs_done), ("steps", epochs_done * steps_per_epoch)):
                folder = os.path.join(cfg.out, cls.FOLDER, sub)
                os.makedirs(folder, exist_ok=True)
                _after_older_events(folder)
                # purge_step: the readers drop every older event from this step on (what a stopped
                # run logged beyond its checkpoint); 0 for a run started over.
                writers.append(SummaryWriter(folder, purge_step=purge))
        except OSError as error:
            for writer in writers:
                writer.close()
            raise _refused(cls.name, f"cannot write {error.filename or cfg.out}: {error.strerror or error}") from None
        return cls(*writers)

    def log_epoch(self, row: dict[str, Any]) -> None:
        with self._writing(self.epochs):
            for key, value in _numbers(row, skip=("epoch",)).items():
                self.epochs.add_scalar(f"epoch/{key}", value, row["epoch"])
            # On disk before the checkpoint is written (a kill then loses nothing of this epoch).
            self.epochs.flush()
        with self._writing(self.steps):
            self.steps.flush()

    def log_running(self, values: dict[str, float], step: int) -> None:
        with self._writing(self.steps):
            for key, value in values.items():
                self.steps.add_scalar(f"running/{key}", value, step)

    def close(self, failed: bool = False) -> None:
        with self._writing(self.epochs):
            self.epochs.close()
        with self._writing(self.steps):
            self.steps.close()


# ---------------------------------------------------------------------- Weights & Biases
class WandbTracker(Tracker):
    """A W&B run in ``--out/wandb`` (``WANDB_MODE=offline`` writes it for ``wandb sync``; the
    project is ``$WANDB_PROJECT`` or ``agr-train``, the run's name the folder's). Its id is kept
    in ``--out/tracking.json``: a resumed run resumes the same W&B run."""

    name, package = "wandb", "wandb"
    FOLDER = "wandb"  # (one of run_folder.TRACKER_FOLDERS: wandb.init(dir=out) writes out/wandb)

    def __init__(self, run: Any, steps_per_epoch: int) -> None:
        self.run, self.steps_per_epoch = run, steps_per_epoch

    @classmethod
    def open(cls, cfg: TrainConfig, *, epochs_done: int, steps_per_epoch: int, resume: bool) -> WandbTracker:
        wandb = _imported(cls, "wandb")
        run_id = _recorded_id(cfg.out) if resume else None
        if run_id is None:  # a new run, or a run started over: a new W&B run
            run_id = secrets.token_hex(6)
            run_folder.write_json(os.path.join(cfg.out, run_folder.TRACKING), {"wandb": {"id": run_id}})
        try:
            run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "agr-train",
                name=os.path.basename(os.path.abspath(cfg.out)),
                id=run_id,
                resume="allow",
                dir=cfg.out,
                config=cfg.to_json(),
                # agr-train's lines are the logged figures; capturing them would wrap its streams.
                settings=wandb.Settings(console="off"),
            )
        except Exception as error:  # wandb's errors: no API key, no network, a bad project name
            raise _refused(
                cls.name,
                f"cannot start the W&B run: {str(error).splitlines()[0] if str(error) else type(error).__name__} "
                f"(WANDB_MODE=offline logs without an account)",
            ) from None
        run.define_metric("epoch")
        run.define_metric("epoch/*", step_metric="epoch")
        return cls(run, steps_per_epoch)

    def log_epoch(self, row: dict[str, Any]) -> None:
        epoch = int(row["epoch"])
        values = {f"epoch/{k}": v for k, v in _numbers(row, skip=("epoch",)).items()}
        # At the epoch's last step: after its running figures, before the next epoch's.
        self.run.log({"epoch": epoch, **values}, step=(epoch + 1) * self.steps_per_epoch - 1)

    def log_running(self, values: dict[str, float], step: int) -> None:
        self.run.log({f"running/{k}": v for k, v in values.items()}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _recorded_id(out: str) -> str | None:
    """The W&B run id in ``out/tracking.json`` (``None``: none recorded, or unreadable)."""
    try:
        recorded = json.loads(run_folder.read_regular_file(os.path.join(out, run_folder.TRACKING)))
        run_id = recorded["wandb"]["id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return run_id if isinstance(run_id, str) and run_id else None


# ---------------------------------------------------------------------- the configured ones
_BACKENDS: dict[str, type[Tracker]] = {t.name: t for t in (TensorBoardTracker, WandbTracker)}
#: The names ``--log`` takes.
TRACKERS = tuple(_BACKENDS)


def _refused(name: str, why: str) -> Exception:
    from .config import ConfigError

    return ConfigError(f"--log {name}: {why}; nothing was trained: fix it and run the same command again")


def _imported(tracker: type[Tracker], module: str) -> Any:
    """``module``, imported when the tracker opens. Installed is not importable: a package whose
    dependencies are broken (W&B's protobuf, say) is refused in one line, not a traceback."""
    try:
        return importlib.import_module(module)
    except Exception as error:  # ImportError, or whatever the package's own imports raise
        why = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise _refused(tracker.name, f"the {tracker.package} package is installed but does not import ({why}): "
                       f"reinstall it ({TRACKING_EXTRA}) or drop --log {tracker.name}") from None


def missing_package(name: str) -> str | None:
    """The one-line refusal for ``--log name`` when its package is not installed, else ``None``
    (looked up without importing it)."""
    package = _BACKENDS[name].package
    if importlib.util.find_spec(package) is not None:
        return None
    return f"--log {name} needs the {package} package: {TRACKING_EXTRA} (or pip install {package}), or drop it"


class Tracking:
    """The opened trackers behind one :class:`Tracker`-like object (none: every call does
    nothing); a context manager that closes them (a W&B run ends as failed after an exception)."""

    def __init__(self, trackers: list[Tracker], steps_per_epoch: int) -> None:
        self.trackers, self.steps_per_epoch = trackers, steps_per_epoch

    def log_epoch(self, row: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_epoch(row)

    def log_running(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_running(values, step)

    def watch(self, epoch: int, progress: Progress) -> Progress:
        """``progress`` that also logs each running read of ``epoch`` (unchanged without trackers)."""
        if not self.trackers:
            return progress

        def both(done: int, total: int, running: tuple[float, float] | None) -> None:
            progress(done, total, running)
            if running is not None:
                self.log_running(dict(zip(_RUNNING, running, strict=True)), epoch * total + done - 1)

        return both

    def close(self, failed: bool = False) -> None:
        with contextlib.ExitStack() as closing:  # every one closed, also when one fails
            for tracker in self.trackers:
                if failed:  # the run stops for its own reason: a tracker that cannot close must not hide it
                    closing.enter_context(contextlib.suppress(Exception))
                closing.callback(tracker.close, failed)

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close(failed=kind is not None)


def open_trackers(cfg: TrainConfig, *, epochs_done: int, steps_per_epoch: int, resume: bool) -> Tracking:
    """The trackers of ``cfg.log`` for a run with ``epochs_done`` epochs in its checkpoint (0 for
    a new one); none on a process other than the main one. ``resume``: continue the recorded W&B
    run. One that fails to open closes the ones opened before it."""
    if not cfg.log or not is_main_process():
        return Tracking([], steps_per_epoch)
    opened: list[Tracker] = []
    try:
        for name in cfg.log:
            opened.append(
                _BACKENDS[name].open(cfg, epochs_done=epochs_done, steps_per_epoch=steps_per_epoch, resume=resume)
            )
    except BaseException:
        Tracking(opened, steps_per_epoch).close(failed=True)
        raise
    return Tracking(opened, steps_per_epoch)

