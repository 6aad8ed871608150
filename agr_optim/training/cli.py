r"""The ``agr-train`` command (:func:`main`) and a run with its folder (:func:`train`).

This module owns the run folder: it checks ``--out`` before anything is written, holds the lock
(:mod:`~agr_optim.training.run_folder`), writes ``config.json``, the checksummed checkpoints and
(through :mod:`~agr_optim.training.reporting`) the outputs after every epoch, resumes a stopped run
bit for bit, and turns every way a run can stop into one line and an exit status.

Exit statuses: 0 done; 2 a refused flag or folder (one line, nothing written); 3 the training
diverged; 4 a file could not be written (a full disk); 130 Ctrl-C. After 3, 4 and 130 the folder
resumes with ``--resume``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from ..data import DatasetError
from . import checkpoint_io, distributed, reporting, run_folder, tracking
from .config import ConfigError, TrainConfig, build_parser, resolve, validate, validate_data
from .distributed import ONE, ProcessWorld, Stopped, World
from .engine import Diverged, Trainer, load_data
from .run_folder import RunFolderError, WriteError, unwritable, write_json

__all__ = [
    "EXIT_DIVERGED",
    "EXIT_INTERRUPTED",
    "EXIT_REFUSED",
    "EXIT_WRITE_FAILED",
    "Interrupted",
    "RunStopped",
    "main",
    "train",
]

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


# ---------------------------------------------------------------------- the folder before a run
def _read_config(out: str) -> TrainConfig:
    """``out/config.json`` (a regular file of at most 1 MiB: a FIFO would block the read)."""
    settings = json.loads(run_folder.read_regular_file(os.path.join(out, run_folder.CONFIG)))
    if not isinstance(settings, dict):
        raise ValueError("not a JSON object of settings")
    settings.pop("world_size", None)  # the number of processes the run started with: a record, not a setting
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


def _load(cfg: TrainConfig, world: World = ONE) -> Any:
    """The data, or a :class:`ConfigError` naming the flags that chose them (or a batch that
    would leave one of the ``world``'s processes without images)."""
    try:
        data = load_data(cfg)
    except DatasetError as error:
        declared = "" if cfg.num_classes is None else f" --num-classes {cfg.num_classes}"
        raise ConfigError(f"--dataset {cfg.dataset} --data-dir {cfg.data_dir!r}{declared}: {error}") from None
    validate_data(cfg, data, 1 if cfg.sync_bn else world.size)  # SyncBatchNorm counts the whole batch
    world.check_data(cfg, data.y_train.shape[0])
    return data


def _same_settings(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The settings (but ``out``: a run folder may be moved) in which two configs differ; one
    missing from a side (a config.json or checkpoint written before the setting existed) counts
    as its default, as :meth:`TrainConfig.from_json` reads it."""
    defaults = TrainConfig(out="-").to_json()
    return sorted(k for k in set(a) | set(b) if k != "out" and a.get(k, defaults.get(k)) != b.get(k, defaults.get(k)))


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


# ---------------------------------------------------------------------- checkpoints
def _best_checkpoint(trainer: Trainer, state: dict[str, Any]) -> dict[str, Any] | None:
    """What ``checkpoint_best.pt`` holds when ``state`` (after its last epoch) is the best."""
    best = trainer.best
    if best is None or best["epoch"] != trainer.epoch - 1:
        return None
    return {"epoch": best["epoch"], "model": state["model"], "metrics": best}


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


def _save_epoch(trainer: Trainer, checkpoints: run_folder.Checkpoints, saved: _Saved) -> None:
    """The epoch's checkpoints (checksummed, the last one before the best one), then the
    metrics and the summary: a kill anywhere leaves a folder that resumes (tests/test_run_folder.py)."""
    settings = {k: v for k, v in trainer.cfg.to_json().items() if k != "out"}  # a folder may be moved
    state = {**trainer.state_dict(), "config": settings}
    try:
        checkpoints.save(state, trainer.epoch - 1, _best_checkpoint(trainer, state))
    finally:  # what checkpoint_last.pt holds now, also when writing the best one failed
        saved.epoch = checkpoints.recorded_epoch(run_folder.CHECKPOINT_LAST)
    reporting.write_outputs(trainer.cfg, trainer.metrics, trainer.best, curves=False)


def _autoattack(trainer: Trainer, best_state: dict[str, Any] | None) -> dict[str, Any]:
    """AutoAttack on the best checkpoint's weights (the last ones when nothing was evaluated, or
    when ``checkpoint_best.pt`` is missing or holds another epoch than the run's best: the
    result's ``checkpoint`` says which)."""
    which, weights = "last", None
    want = None if trainer.best is None else trainer.best["epoch"]
    if best_state is not None and best_state.get("epoch") == want:
        which, weights = f"best (epoch {want})", best_state["model"]
    elif want is not None:
        found = "none" if best_state is None else f"epoch {best_state.get('epoch')}"
        which = f"last (the best epoch is {want}, {run_folder.CHECKPOINT_BEST} holds {found})"
    return {"checkpoint": which, **trainer.autoattack(weights)}


# ---------------------------------------------------------------------- a run's life in its folder
def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    sources: dict[str, str] | None = None,
    on_epoch: Callable[[Trainer, dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = print,
    world: World = ONE,
) -> dict[str, Any]:
    """Run (or resume) the training in ``cfg.out``; returns the summary (also in ``summary.json``).

    Every check is done, and the data are loaded, before anything is written; the folder is
    locked for the whole run (:func:`~agr_optim.training.run_folder.lock_folder`). ``on_epoch``
    is called after each epoch's files are written. A resumed run rebuilds ``metrics.csv``,
    ``summary.json`` and ``curves.png`` from its checkpoint; a run stopped before its first
    checkpoint resumes from epoch 0, or starts over.

    Raises :class:`~agr_optim.training.config.ConfigError` or
    :class:`~agr_optim.training.run_folder.RunFolderError` (refused: nothing written),
    :class:`RunStopped` (diverged, or a file could not be written: the folder resumes) and
    :class:`Interrupted` (Ctrl-C). Under torchrun this is rank 0's part (``world``: the settings
    go to every process first; the others run :func:`_follow`).
    """
    world.send_config(cfg, resume)
    problem = unwritable(cfg.out)
    if problem:
        raise ConfigError(f"cannot write to --out {cfg.out!r}: {problem}")
    run_folder.arm_fault_hook()
    saved = _Saved(cfg.out, resume)
    try:
        return _run(cfg, resume, sources or {}, on_epoch, log, saved, world)
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
    world: World,
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
            data = _load(cfg, world)
            # --init-from only for a run without a checkpoint yet: resuming reads the run's own.
            init = checkpoint_io.read_init(cfg, data) if state is None and cfg.init_from else None
            world.ready()  # every process has its data, before anything is written
        else:
            _fresh_folder(out)
            data = _load(cfg, world)
            init = checkpoint_io.read_init(cfg, data) if cfg.init_from else None
            world.ready()  # every process has its data, before anything is written
            os.makedirs(out, exist_ok=True)
            note = held.enter_context(run_folder.lock_folder(out))
            started_over = _fresh_folder(out)  # again, holding the lock
            run_folder.remove_stray_temporaries(out)
            state = None
        if note:
            log(f"agr-train: {note}")
        trainer = Trainer(cfg, data, world)
        if init is not None:
            checkpoint_io.apply_init(trainer.module, init)
        if state is not None:
            _restore(trainer, state, checkpoints)
            log(f"agr-train: resuming {out} after epoch {trainer.epoch - 1} (0-based) of {cfg.epochs}")
            # a kill may have left them behind the checkpoint
            reporting.write_outputs(cfg, trainer.metrics, trainer.best, curves=False)
        elif resume:
            log(f"agr-train: {out} has no checkpoint yet: starting its run from epoch 0, as its config.json says")
        else:
            for line in reporting.config_lines(cfg, sources):
                log(line)
            log(f"  {'world_size':<20} {world.size!r:<28} (processes: torchrun's WORLD_SIZE, else 1)")
            if started_over:
                log(f"agr-train: {out} held a run stopped before its first checkpoint: starting over")
            write_json(os.path.join(out, run_folder.CONFIG), {**cfg.to_json(), "world_size": world.size})
            saved.started = True
        if init is not None:
            log(init.line())
        agr_text = f"from epoch {cfg.agr_start_epoch} (0-based)" if cfg.agr else "off"
        log(
            f"agr-train: {data.name}: {data.y_train.shape[0]} train / {data.y_test.shape[0]} test images, "
            f"{data.num_classes} classes; AGR {agr_text}"
        )
        processes = world.describe(cfg)
        if processes is not None:
            log(processes)
        steps_per_epoch = -(-data.y_train.shape[0] // cfg.batch_size)
        tracker = held.enter_context(
            tracking.open_trackers(cfg, epochs_done=trainer.epoch, steps_per_epoch=steps_per_epoch, resume=resume)
        )
        world.start(trainer)  # the other processes take this trainer's state (and the model is wrapped)
        while trainer.epoch < cfg.epochs:
            progress, bar = reporting.epoch_progress(trainer.epoch)
            progress = tracker.watch(trainer.epoch, progress)
            try:
                row = trainer.train_epoch(progress)
            except Diverged as error:
                world.stopping()  # every process stops at this step: the others may exit first
                raise _diverged(error, trainer, saved) from None
            finally:
                if bar is not None:
                    bar.close()
            world.epoch_trained()
            tracker.log_epoch(row)  # before the checkpoint: a resumed run purges what it repeats
            _save_epoch(trainer, checkpoints, saved)
            log(reporting.screen_line(cfg, row))
            note = reporting.clip_note(cfg, row)
            if note is not None:
                log(note)
            if on_epoch is not None:
                on_epoch(trainer, row)
            world.epoch_saved()
        traffic = world.traffic()
        if traffic is not None:
            log(traffic)
        autoattack = None
        if cfg.autoattack_samples > 0:
            best = checkpoints.load(run_folder.CHECKPOINT_BEST, cfg.device)
            autoattack = _autoattack(trainer, best)
            log(
                f"agr-train: AutoAttack on {autoattack['samples']} test images ({autoattack['checkpoint']}): "
                f"{100 * autoattack['robust_acc']:.2f} %"
            )
        if not reporting.write_outputs(cfg, trainer.metrics, trainer.best, autoattack):
            log("agr-train: matplotlib is not installed: no curves.png (pip install matplotlib)")
        return reporting.summary(cfg, trainer.metrics, trainer.best, autoattack)


def _diverged(error: Diverged, trainer: Trainer, saved: _Saved) -> RunStopped:
    """The one-line stop of a diverged run; ``summary.json`` says where (only finite numbers)."""
    if saved.epoch is None:
        kept = "no checkpoint was written"
    else:
        summary = reporting.summary(trainer.cfg, trainer.metrics, trainer.best, None)
        summary["diverged"] = {"what": error.what, "epoch": error.epoch, "step": error.step}
        write_json(os.path.join(trainer.cfg.out, "summary.json"), summary)
        kept = (
            f"{run_folder.CHECKPOINT_LAST} keeps epoch {saved.epoch}, the last good one (resuming repeats "
            f"the divergence)"
        )
    return RunStopped(
        f"diverged: {error}; {kept}. Lower --lr ({trainer.cfg.lr:g} now) and start a new run", EXIT_DIVERGED
    )


# ---------------------------------------------------------------------- the command
def main(argv: Sequence[str] | None = None) -> int:
    """The ``agr-train`` command. Exit status 0 when done; 2 for a refused flag or folder (one
    line, nothing written); 3 when the training diverged; 4 when a file could not be written (a
    full disk); 130 on Ctrl-C. After 3, 4 and 130 the folder resumes with ``--resume``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) rank 0 runs the command as one process does and the
    others follow it (:func:`_follow`): rank 0 alone reads the flags and the folder, writes and
    prints; every process exits with the run's status."""
    world = distributed.join()
    if not isinstance(world, ProcessWorld):
        return _lead(argv, world)
    if world.main:
        try:
            code: int | str | None = _lead(argv, world)
        except SystemExit as exit_:  # a refused flag (printed), --help
            code = exit_.code
        except BaseException:
            world.leave(1)  # the others stop; Python prints the traceback
            raise
    else:
        code = _follow(world)
    world.exit(code)  # leaves the group, then the process (see ProcessWorld.exit)


def _follow(world: ProcessWorld) -> int:
    """A process of a torchrun job other than rank 0: the settings, the trainer's state and each
    epoch's end come from rank 0 (:mod:`~agr_optim.training.distributed`); it reads and writes no
    file of the run and prints nothing; its exit status is the run's."""
    try:
        _follow_run(world)
        return 0
    except Stopped as stop:
        return stop.code
    except Diverged:  # every process finds it at the same step; rank 0 says where
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _follow_run(world: ProcessWorld) -> None:
    # A function of its own: the trainer (and its DDP wrapper, which holds the process group) is
    # released when it returns or raises, before _follow leaves the group; one left to the
    # interpreter's exit aborts the process in gloo's teardown.
    cfg, _ = world.receive_config()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        data = _load(cfg, world)
    except ConfigError as error:  # rank 0 prints it, naming this process, before it writes a file
        world.fail(EXIT_REFUSED, error)
    world.ready()
    trainer = Trainer(cfg, data, world)
    world.start(trainer)
    while trainer.epoch < cfg.epochs:
        trainer.train_epoch()
        world.wait_for_epoch()


def _lead(argv: Sequence[str] | None, world: World) -> int:
    """:func:`main` of one process, or of rank 0 under torchrun."""
    parser = build_parser()
    args = parser.parse_flags(argv)
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
                validate(cfg)
            except FileNotFoundError:
                parser.error(f"--resume: no {path!r}: the run never started; start it without --resume")
            except ConfigError as error:  # read, but refused here (a package or a device this machine lacks)
                parser.error(
                    f"--resume: the settings in {path!r} are refused here: {error} (a resumed run keeps the "
                    f"settings it started with: continue it where they hold)"
                )
            except (OSError, ValueError, TypeError) as error:
                parser.error(f"--resume: cannot read {path!r}: {error}")
            sources: dict[str, str] = {}
        else:
            cfg, sources = resolve(args)
        summary = train(cfg, resume=resume, sources=sources, log=lambda s: print(s, flush=True), world=world)
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
