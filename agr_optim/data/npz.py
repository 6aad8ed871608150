"""Your own data as an ``.npz`` (``numpy.savez`` or ``savez_compressed``), read as a hostile file would be.

Keys: ``x`` and ``y`` (or ``x_train`` and ``y_train``), optionally ``x_test`` and ``y_test`` and
``num_classes``; the layouts are in the docs' "Data and models" page. Before any array is read:

- the zip directory and each member's ``.npy`` header (read with :mod:`numpy.lib.format`, no data
  loaded) must agree: the bytes the header's shape and dtype need must be the bytes the member
  holds, and the member must lie inside the file. A truncated download or a 2 KB file whose header
  claims 90 TiB is refused, naming the file and the key, before numpy allocates anything;
- a deflated member may not expand beyond deflate's 1032:1 ceiling (a forged directory), and no
  compressed member by more than :data:`MAX_EXPANSION` once it exceeds :data:`SMALL_MEMBER_BYTES`
  (a decompression bomb: image data deflates by 10:1 at most); all arrays together must fit in
  the machine's memory. Object arrays (pickles) are refused (``allow_pickle=False``).

Then the labels: integers (not floats, bools or strings) in ``[0, num_classes)``, where the
class count is declared (a ``num_classes`` key in the file, or ``load_dataset(num_classes=)``,
``agr-train --num-classes``) or else inferred as ``max + 1`` only when the train labels are dense
(every class ``0..max`` present): a stray label of 3,000,000 would otherwise build a
3,000,001-way classifier. Refusals name the first bad index and its value.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np

from ._checks import describe
from ._folders import given_path
from ._split import stratified_split
from .dataset import MAX_CLASSES, MIN_IMAGE_SIDE, Dataset, DatasetError, make

__all__ = ["MAX_EXPANSION", "SMALL_MEMBER_BYTES", "read_npz"]

_NAME = "npz"
_NPY_MAGIC = b"\x93NUMPY"
#: How many times its stored size a deflated member larger than :data:`SMALL_MEMBER_BYTES` may
#: expand. Image data deflates 1.1x (CIFAR) to 5x (MNIST); only near-constant data goes further.
MAX_EXPANSION = 100
#: Below this expanded size (256 MiB) a deflated member may have any ratio up to deflate's
#: ceiling: a small test file of zeros is not a bomb.
SMALL_MEMBER_BYTES = 256 * 2**20
_DEFLATE_CEILING = 1032  # deflate's largest ratio: 258 bytes from a 2-bit code (RFC 1951)
_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)  # what zipfile reads
_TEST_FRACTION = 0.2


def read_npz(
    data_dir: str | os.PathLike[str] | None, *, seed: int, image_size: int | None, num_classes: int | None
) -> Dataset:
    """The arrays of one ``.npz``; without ``x_test``, a seeded stratified 20 % is the test set."""
    path = given_path(_NAME, data_dir, "the .npz file")
    if not path.is_file():
        raise DatasetError(f"{_NAME}: {str(path)!r} is missing or not a file; expected a .npz with arrays x and y")
    at = f"{_NAME}: {str(path)!r}"
    with _open_archive(path) as archive:
        members = {name[:-4] if name.endswith(".npy") else name: name for name in archive.namelist()}
        found = set(members)
        if {"x", "y"} & found and {"x_train", "y_train"} & found:
            raise DatasetError(f"{at} has both x/y and x_train/y_train; keep one pair")
        train_keys = ("x_train", "y_train") if {"x_train", "y_train"} & found else ("x", "y")
        missing = [k for k in train_keys if k not in found]
        if missing:
            raise DatasetError(
                f"{at} lacks {', '.join(missing)} (keys: {', '.join(sorted(found)) or 'none'}); "
                f"expected x and y (or x_train and y_train), optionally x_test and y_test"
            )
        if ("x_test" in found) != ("y_test" in found):
            raise DatasetError(f"{at} has only one of x_test and y_test; give both or neither")
        test_keys = ("x_test", "y_test") if "x_test" in found else None
        keys = [*train_keys, *(test_keys or ()), *(["num_classes"] if "num_classes" in found else [])]
        infos = {k: archive.getinfo(members[k]) for k in keys}
        total = sum(_check_member(archive, path, k, infos[k]) for k in keys)  # headers only: nothing loaded
        memory = _physical_memory()
        if memory is not None and total > memory:
            raise DatasetError(
                f"{at}: its arrays take {_size(total)}, more than this machine's memory ({_size(memory)})"
            )
        parts = {k: _read_member(archive, path, k, infos[k]) for k in keys}
    x = _images(f"{at}: {train_keys[0]}", parts[train_keys[0]])
    y = _labels(f"{at}: {train_keys[1]}", train_keys[1], parts[train_keys[1]], len(x))
    declared, source = num_classes, f"num_classes={num_classes}"
    if "num_classes" in parts:
        declared = _declared(at, parts["num_classes"], num_classes)
        source = f"the file's num_classes = {declared}"
    if test_keys is None:
        classes = _class_count(at, declared, source, (train_keys[1], y))
        train, test = stratified_split(_NAME, y, seed, _TEST_FRACTION)
        x, x_test, y, y_test = x[train], x[test], y[train], y[test]
    else:
        x_test = _images(f"{at}: x_test", parts["x_test"])
        y_test = _labels(f"{at}: y_test", "y_test", parts["y_test"], len(x_test))
        if x_test.shape[1:] != x.shape[1:]:
            raise DatasetError(
                f"{at}: x_test images are {x_test.shape[1:]} (C, H, W) but {train_keys[0]} images are {x.shape[1:]}"
            )
        classes = _class_count(at, declared, source, (train_keys[1], y), ("y_test", y_test))
    return make(_NAME, f"npz ({path})", x, y, x_test, y_test, classes)


# ---------------------------------------------------------------------- the archive, before loading
def _open_archive(path: Path) -> zipfile.ZipFile:
    try:
        with open(path, "rb") as f:
            if f.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
                raise DatasetError(f"{_NAME}: {str(path)!r} is a single array (.npy), expected a .npz with x and y")
        return zipfile.ZipFile(path)
    except DatasetError:
        raise
    except Exception as error:  # a truncated or corrupt zip fails in many ways (BadZipFile, OSError, ...)
        raise DatasetError(f"{_NAME}: cannot read {str(path)!r} as .npz: {error}") from None


def _check_member(archive: zipfile.ZipFile, path: Path, key: str, info: zipfile.ZipInfo) -> int:
    """The bytes the member ``key`` holds once read, after checking its header against the file."""
    at = f"{_NAME}: {str(path)!r}: {key}"
    file_bytes = path.stat().st_size
    if info.flag_bits & 0x1:
        raise DatasetError(f"{at} is encrypted; numpy.savez writes plain members")
    if info.compress_type not in _METHODS:
        raise DatasetError(
            f"{at} is compressed with zip method {info.compress_type}, which Python's zipfile does not read; "
            f"numpy.savez and savez_compressed write stored or deflated members"
        )
    if info.header_offset + info.compress_size > file_bytes:
        raise DatasetError(
            f"{at}: the zip directory puts {info.compress_size:,} bytes at offset {info.header_offset:,}, beyond "
            f"the end of the file ({file_bytes:,} bytes): the file is truncated or forged"
        )
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise DatasetError(
            f"{at}: a stored member of {info.compress_size:,} bytes that claims {info.file_size:,}: the file is forged"
        )
    if info.compress_type != zipfile.ZIP_STORED and (
        (info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > _DEFLATE_CEILING * info.compress_size + 1024)
        or info.file_size > max(MAX_EXPANSION * info.compress_size, SMALL_MEMBER_BYTES)
    ):
        raise DatasetError(
            f"{at}: {_size(info.compress_size)} that would expand to {_size(info.file_size)} "
            f"({info.file_size / max(info.compress_size, 1):,.0f}:1): a decompression bomb or a forged directory; "
            f"image data deflates by 10:1 at most"
        )
    try:
        with archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # 3.0 only for structured dtypes with non-latin-1 field names: never images or labels
                raise ValueError(f".npy format version {version[0]}.{version[1]} is not read here")
            header = f.tell()
    except Exception as error:  # a corrupt member fails in many ways (BadZipFile, ValueError, zlib.error, ...)
        raise DatasetError(f"{_NAME}: cannot read the arrays of {str(path)!r}: {key}: {error}") from None
    if dtype.hasobject:
        raise DatasetError(
            f"{_NAME}: cannot read the arrays of {str(path)!r}: {key} is an object array (a pickle), "
            f"which is refused (allow_pickle=False); save numbers"
        )
    data = math.prod(shape) * dtype.itemsize  # Python ints: a forged shape cannot overflow
    if header + data != info.file_size:
        raise DatasetError(
            f"{at}: the .npy header declares shape {shape} of {dtype}, {_size(data)}, but the member holds "
            f"{max(info.file_size - header, 0):,} bytes of data: the file is truncated or forged"
        )
    return data


def _read_member(archive: zipfile.ZipFile, path: Path, key: str, info: zipfile.ZipInfo) -> np.ndarray:
    """The array ``key``, read as ``numpy.load`` reads it (``allow_pickle=False``)."""
    try:
        with archive.open(info) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (OSError, ValueError, EOFError, MemoryError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{_NAME}: cannot read the arrays of {str(path)!r}: {key}: {error}") from None


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on this platform
        return None


def _size(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,} bytes"


# ---------------------------------------------------------------------- the arrays
def _images(where: str, x: np.ndarray) -> np.ndarray:
    """``x`` as uint8 ``[N, C, H, W]``: from ``[N, H, W]``, ``[N, C, H, W]`` or ``[N, H, W, C]``, uint8 or [0, 1]."""
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
    if x.shape[2] < MIN_IMAGE_SIDE:
        raise DatasetError(
            f"{where}: images are {x.shape[2]}x{x.shape[3]} pixels; the smallest side taken is {MIN_IMAGE_SIDE} "
            f"(agr_optim.data.MIN_IMAGE_SIDE: the models pool by 2 twice); resize them before saving"
        )
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise DatasetError(f"{where} is {x.dtype}; expected uint8 (0..255) or float in [0, 1]")
    if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
        raise DatasetError(f"{where}: float images must be finite and in [0, 1], got [{x.min()}, {x.max()}]")
    # Stored as uint8 like every dataset here: values are rounded to the nearest k / 255.
    return np.ascontiguousarray(np.rint(x.astype(np.float64) * 255.0).astype(np.uint8))


def _labels(where: str, key: str, y: np.ndarray, n: int) -> np.ndarray:
    """``y`` as ``n`` labels >= 0 of its own integer dtype, flat (the upper bound is the class count's)."""
    # Kinds i and u: bools, floats (NaN included), strings and objects are not labels.
    if y.dtype.kind not in "iu" or y.size != n or (y.ndim == 2 and y.shape[1] != 1) or y.ndim > 2:
        raise DatasetError(f"{where} must be {n} integer labels (shape [N] or [N, 1]), got {describe(y)}")
    y = y.reshape(-1)
    negative = y < 0
    if negative.any():
        i = int(np.argmax(negative))
        raise DatasetError(f"{where}: labels must be >= 0, got {key}[{i}] = {y[i]}")
    return y


def _declared(at: str, value: np.ndarray, keyword: int | None) -> int:
    """The file's ``num_classes``, checked, and against the keyword when both are given."""
    if value.dtype.kind not in "iu" or value.size != 1:
        raise DatasetError(
            f"{at}: num_classes must be one integer (np.savez(..., num_classes=10)), got {describe(value)}"
        )
    count = int(value.reshape(-1)[0])
    if not 2 <= count <= MAX_CLASSES:
        raise DatasetError(f"{at}: num_classes is {count}; expected an integer in [2, {MAX_CLASSES:,}]")
    if keyword is not None and keyword != count:
        raise DatasetError(f"{at}: num_classes={keyword} disagrees with the file's num_classes ({count}); drop one")
    return count


def _class_count(at: str, declared: int | None, source: str, train: tuple[str, np.ndarray],
                 test: tuple[str, np.ndarray] | None = None) -> int:
    """The number of classes: the declared one, or ``max + 1`` of dense train labels; every label checked against it."""
    how = (
        "declare the class count: a key num_classes in the file, or load_dataset(num_classes=) "
        "(agr-train --num-classes)"
    )
    if declared is None:
        key, y = train
        top = int(y.max())
        if top >= MAX_CLASSES:
            i = int(np.argmax(y))
            raise DatasetError(
                f"{at}: {key}[{i}] = {top} would make {top + 1:,} classes, more than {MAX_CLASSES:,}; fix the label"
            )
        present = np.bincount(y.astype(np.int64), minlength=top + 1) > 0  # top < MAX_CLASSES: small
        if not present.all():
            raise DatasetError(
                f"{at}: the labels of {key} are sparse: {int(present.sum()):,} of the classes 0..{top:,} appear (the "
                f"first missing is {int(np.argmin(present))}), so their count cannot be inferred; {how}"
            )
        if top < 1:
            raise DatasetError(f"{at}: the labels name a single class; need >= 2")
        count, source = top + 1, f"{key} has the classes 0..{top}"
    else:
        count = declared
    for key, y in (train, *([test] if test else [])):
        outside = y >= count
        if outside.any():
            i = int(np.argmax(outside))
            raise DatasetError(f"{at}: {key}[{i}] = {y[i]} is outside [0, {count}) ({source}); {how}")
    return count
