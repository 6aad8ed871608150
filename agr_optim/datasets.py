"""The old path of :mod:`agr_optim.data`: the same public names, re-exported.

``from agr_optim.datasets import load_dataset`` keeps working; new code imports from
:mod:`agr_optim.data`, whose modules hold the readers (one per format), the transforms and the
batching.

>>> import agr_optim.data, agr_optim.datasets
>>> agr_optim.datasets.load_dataset is agr_optim.data.load_dataset
True
"""

from __future__ import annotations

from .data import (
    DATASETS,
    Dataset,
    DatasetError,
    augment,
    authors_cutout,
    batches,
    cutout,
    load_dataset,
    random_crop,
    random_flip,
)

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetError",
    "augment",
    "authors_cutout",
    "batches",
    "cutout",
    "load_dataset",
    "random_crop",
    "random_flip",
]
