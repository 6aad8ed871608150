r"""``agr-train``: the paper's adversarial-training experiments end to end, from local data.

One command trains a model with an adversarial-training method (PGD-AT, TRADES, MART, AWP or
AVmixup), with or without :class:`~agr_optim.AGROptimizer`, in the protocol of the AGR code
(``train.py`` of RUIYUN-ML/AGR; Tong et al., *Balancing Generalization and Robustness in
Adversarial Training via Steering through Clean and Adversarial Gradient Directions*, ACM MM
2024), evaluates clean and PGD-20 accuracy, logs the AGR statistics and checkpoints every epoch::

    agr-train --preset paper --dataset cifar10 --data-dir ~/data/cifar-10-batches-py \
              --model preactresnet18 --method at --agr --device cuda --out runs/at_agr
    agr-train --out runs/at_agr --resume          # continues a stopped run exactly

This module is the entry point (``agr-train`` and ``python -m agr_optim.train``) and the old
import path of the names that live in :mod:`agr_optim.training`: the settings
(:mod:`~agr_optim.training.config`), the engine (:mod:`~agr_optim.training.engine`), the outputs
(:mod:`~agr_optim.training.reporting`), the command (:mod:`~agr_optim.training.cli`) and the run
folder (:mod:`~agr_optim.training.run_folder`).
"""

from __future__ import annotations

import sys

from .training import (
    AMP_MODES,
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_REFUSED,
    EXIT_WRITE_FAILED,
    MAX_IMAGE_SIDE,
    MAX_SEED,
    MAX_THREADS,
    METHOD_NAMES,
    METHODS,
    METRIC_COLUMNS,
    NATIVE_SIDES,
    PAPER_AGR_START_FRACTION,
    PRESETS,
    PROGRESS_SECONDS,
    ConfigError,
    Diverged,
    Interrupted,
    Progress,
    RunStopped,
    TrainConfig,
    Trainer,
    build_parser,
    load_data,
    main,
    metrics_csv,
    resolve,
    train,
)
from .training.run_folder import RunFolderError, WriteError, atomic_write, unwritable, write_json, write_text

__all__ = [
    "AMP_MODES",
    "EXIT_DIVERGED",
    "EXIT_INTERRUPTED",
    "EXIT_REFUSED",
    "EXIT_WRITE_FAILED",
    "MAX_IMAGE_SIDE",
    "MAX_SEED",
    "MAX_THREADS",
    "METHODS",
    "METHOD_NAMES",
    "METRIC_COLUMNS",
    "NATIVE_SIDES",
    "PAPER_AGR_START_FRACTION",
    "PRESETS",
    "PROGRESS_SECONDS",
    "ConfigError",
    "Diverged",
    "Interrupted",
    "Progress",
    "RunFolderError",
    "RunStopped",
    "TrainConfig",
    "Trainer",
    "WriteError",
    "atomic_write",
    "build_parser",
    "load_data",
    "main",
    "metrics_csv",
    "resolve",
    "train",
    "unwritable",
    "write_json",
    "write_text",
]

if __name__ == "__main__":
    sys.exit(main())
