"""``agr-train`` as a package: settings, engine, reporting, the command, the run folder.

One module per job, as timm splits its ``train.py`` from what it reuses:

- :mod:`.config`: :class:`TrainConfig`, the one source of every setting (its defaults are the
  quick preset; each field carries its flag), :data:`PRESETS` (the paper preset as overrides),
  the generated parser (:func:`build_parser`), :func:`resolve` and :func:`validate`;
- :mod:`.engine`: :class:`Trainer` (model, optimizer, schedule, random streams; one epoch at a
  time; evaluation), the step functions and the epoch sums. It prints nothing and writes no file;
- :mod:`.reporting`: screen lines, progress, ``metrics.csv``, ``summary.json``, ``curves.png``,
  from the epochs' rows;
- :mod:`.cli`: :func:`main` (the ``agr-train`` command) and :func:`train` (a run with its folder);
- :mod:`.run_folder`: the folder's file safety (atomic durable writes, checksummed checkpoints,
  the lock, the test-only fault hook);
- :mod:`.tracking`: ``--log tensorboard,wandb``, the rows and running figures sent to trackers;
- :mod:`.checkpoint_io`: ``--init-from``, a new run's weights from a file, checked against the model;
- :mod:`.distributed`: a run under ``torchrun`` (DDP, each process's shard of the global batch,
  rank 0 alone with the folder; ``docs/distributed.rst``).

``agr_optim.train`` is the old path of the same names (and ``python -m agr_optim.train``).
``agr-demo`` (:mod:`agr_optim.demo`) and ``benchmarks/train_cost.py`` use the names below.
"""

from . import run_folder
from .cli import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_REFUSED, EXIT_WRITE_FAILED, Interrupted, RunStopped, main, train
from .config import (
    AMP_MODES,
    MAX_IMAGE_SIDE,
    MAX_SEED,
    MAX_THREADS,
    METHOD_NAMES,
    METHODS,
    NATIVE_SIDES,
    PAPER_AGR_START_FRACTION,
    PRESETS,
    ConfigError,
    OneLineParser,
    SettingsParser,
    TrainConfig,
    build_parser,
    resolve,
    validate,
    validate_data,
)
from .engine import METRIC_COLUMNS, PROGRESS_SECONDS, Diverged, EpochSums, Progress, Trainer, load_data, step_function
from .reporting import config_lines, epoch_progress, metrics_csv, plot_curves, screen_line, summary, write_outputs

__all__ = [
    # config
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
    # engine
    "METRIC_COLUMNS",
    "PROGRESS_SECONDS",
    "Diverged",
    "EpochSums",
    "Progress",
    "Trainer",
    "load_data",
    "step_function",
    # reporting
    "config_lines",
    "epoch_progress",
    "metrics_csv",
    "plot_curves",
    "screen_line",
    "summary",
    "write_outputs",
    # the command
    "EXIT_DIVERGED",
    "EXIT_INTERRUPTED",
    "EXIT_REFUSED",
    "EXIT_WRITE_FAILED",
    "Interrupted",
    "RunStopped",
    "main",
    "train",
    # the run folder
    "run_folder",
]
