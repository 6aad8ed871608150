"""CIFAR-10 and CIFAR-100 from the python pickle folders, through a restricted unpickler.

A CIFAR file is a pickle of a dict with ``b"data"``, a uint8 array ``[N, 3072]``, and the labels,
a flat list of ``N`` ints (``b"labels"`` or ``b"fine_labels"``). Two kinds of hostile file are
refused before they cost anything:

- code: :class:`_CifarUnpickler` resolves only the globals such a file names (numpy's array and
  scalar reconstructors, ``numpy.dtype``, ``_codecs.encode``); an array is built only empty and
  then filled from the file's own bytes, so a file cannot make numpy allocate more than it holds;
- size: pickle's memo lets ~250 bytes of nested lists that share one another stand for 10^9
  elements, which ``numpy.asarray`` would walk for minutes. The labels' *structure* is checked
  first (a list of exactly ``N`` ints, or a 1-D integer array), in time linear in ``N``.
"""

from __future__ import annotations

import codecs
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._checks import describe
from ._folders import dataset_folder
from .dataset import Dataset, DatasetError, fixed_classes, make

__all__ = ["read_cifar10", "read_cifar100"]

_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))

_NUMPY_RECONSTRUCT: Any = np.ndarray.__reduce__(np.empty(0))[0]
_NUMPY_SCALAR = np.int64(0).__reduce__()[0]
class _NdarrayToken:
    """What a pickle gets for the global ``numpy.ndarray``: ``_reconstruct``'s argument, never called.

    Called from a pickle, ``numpy.ndarray((10**6, 3072), "u1")`` would hand back 3 GB of
    uninitialised memory as images.
    """

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise pickle.UnpicklingError(f"it calls numpy.ndarray{args!r:.80}, which a CIFAR file never does")


_NDARRAY = _NdarrayToken()


def _reconstruct(subtype: object, shape: object, dtype: object) -> np.ndarray:
    """numpy's ``_reconstruct`` for what a pickled array starts as: empty, filled by BUILD from the file's bytes."""
    if subtype is not _NDARRAY or shape != (0,):
        raise pickle.UnpicklingError(f"it reconstructs an array as {shape!r}, which a CIFAR file never does")
    return _NUMPY_RECONSTRUCT(np.ndarray, shape, dtype)


# A CIFAR pickle holds a dict of str/bytes, lists of ints and one uint8 array: these globals
# only. A full unpickler would run any code a tampered file names.
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # files written with numpy 1.x
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # and with numpy 2.x
    ("numpy.core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy._core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes pickled by Python 3 at protocol <= 2
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR file never does") from None


def read_cifar10(
    data_dir: str | os.PathLike[str] | None, *, seed: int, image_size: int | None, num_classes: int | None
) -> Dataset:
    """``cifar-10-batches-py``: five train batches and ``test_batch``, 10 classes (``image_size``: the caller's)."""
    classes = fixed_classes("cifar10", num_classes, 10)
    folder = dataset_folder("cifar10", data_dir, (*_CIFAR10_TRAIN, "test_batch"))
    return _read_cifar("cifar10", folder, _CIFAR10_TRAIN, "test_batch", "labels", classes)


def read_cifar100(
    data_dir: str | os.PathLike[str] | None, *, seed: int, image_size: int | None, num_classes: int | None
) -> Dataset:
    """``cifar-100-python``: ``train`` and ``test`` with the 100 fine labels (``image_size``: the caller's)."""
    classes = fixed_classes("cifar100", num_classes, 100)
    folder = dataset_folder("cifar100", data_dir, ("train", "test"))
    return _read_cifar("cifar100", folder, ("train",), "test", "fine_labels", classes)


def _read_cifar(name: str, folder: Path, train: Sequence[str], test: str, label_key: str, classes: int) -> Dataset:
    parts = [_read_cifar_pickle(name, folder / f, label_key, classes) for f in (*train, test)]
    x_train = np.concatenate([x for x, _ in parts[:-1]])
    y_train = np.concatenate([y for _, y in parts[:-1]])
    return make(name, f"{name} ({folder})", x_train, y_train, parts[-1][0], parts[-1][1], classes)


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
    data = content.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            f"{name}: {str(path)!r}: b'data' must be a uint8 array [N, 3072] (32x32 RGB, channel-major), "
            f"got {describe(data)}"
        )
    labels = _labels(f"{name}: {str(path)!r}", label_key, content[label_key], len(data), num_classes)
    return data.reshape(-1, 3, 32, 32), labels


def _labels(where: str, key: str, value: object, n: int, num_classes: int) -> np.ndarray:
    """``value`` as ``n`` int64 labels in ``[0, num_classes)``; its structure is checked before numpy sees it."""
    if isinstance(value, np.ndarray):  # filled from the file's own bytes: no larger than the file
        got = "" if value.ndim == 1 and len(value) == n and value.dtype.kind in "iu" else describe(value)
    elif isinstance(value, list) and len(value) != n:
        got = f"a list of {len(value)} items"
    elif isinstance(value, list):
        # Each item an int (type(v) is int: not a bool, and not one of the nested lists sharing
        # one another by which ~250 bytes of pickle stand for 10^9 elements).
        bad = next((i for i, v in enumerate(value) if type(v) is not int and not isinstance(v, np.integer)), None)
        got = "" if bad is None else f"a list whose item {bad} is a {type(value[bad]).__name__}"
    else:
        got = type(value).__name__
    if got:
        raise DatasetError(f"{where}: b'{key}' must be {n} integer labels (one per image) in a flat list, got {got}")
    labels: list[int] | np.ndarray = value  # type: ignore[assignment]  # checked just above
    if n == 0:  # an empty batch: the dataset refuses an empty split, naming it
        return np.zeros(0, dtype=np.int64)
    # As Python ints (min/max of the list, or the array's as Python ints): no overflow into range.
    low, high = int(min(labels)), int(max(labels))
    if low < 0 or high >= num_classes:
        first = next(i for i, v in enumerate(labels) if not 0 <= int(v) < num_classes)
        raise DatasetError(
            f"{where}: labels in [{low}, {high}], expected 0..{num_classes - 1} "
            f"(b'{key}'[{first}] is {int(labels[first])})"
        )
    return np.array(labels, dtype=np.int64)
