"""Tiny-ImageNet from the ``tiny-imagenet-200`` folder: JPEGs decoded with Pillow, the ``val`` set as the test set.

The tree is read defensively, since such folders are downloaded, shared and synced:

- regular files only. A FIFO, socket, device or folder where an image or a text file should be
  is refused, naming it (a FIFO named ``*.JPEG`` used to block the loader forever): skipping it
  would silently train on another dataset than the folder's, and the fix, removing the entry, is
  the user's one-line job. Files are opened non-blocking and checked again on the open file, so
  an entry swapped after the listing cannot block either.
- symbolic links are followed only within the dataset folder (links that loop, dangle or leave
  the folder are refused, naming the link and its target); ``data_dir`` itself may be a link.
- sizes are checked before decoding: a file of more than :data:`MAX_FILE_BYTES` is refused
  unread, and an image's dimensions are read from its header (Pillow's lazy open) before any
  pixel is decoded: 64x64 (or, with ``image_size``, at most :data:`MAX_PIXELS` pixels).
- names from the text files (the wnids, the val file names) must be plain names, not paths.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ._folders import dataset_folder
from .dataset import Dataset, DatasetError, fixed_classes, make

__all__ = ["MAX_FILE_BYTES", "MAX_PIXELS", "read_tiny_imagenet"]

_NAME = "tiny-imagenet"
_SIZE = 64
#: The largest image file read (bytes). Tiny-ImageNet's 64x64 JPEGs are 1 to 3 KB; a 12-megapixel
#: photo is about 5 MB; ten times that is not an image meant for this loader.
MAX_FILE_BYTES = 10 * 2**20
#: The most pixels a source image may have when ``image_size`` resizes (4096x4096: 50 MB decoded
#: per decoding thread), checked from the header before decoding.
MAX_PIXELS = 4096 * 4096
_MAX_TEXT_BYTES = 16 * 2**20  # val_annotations.txt: 10,000 lines, 0.3 MB
# Opening a FIFO for reading waits for a writer unless non-blocking (a regular file ignores it).
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def read_tiny_imagenet(
    data_dir: str | os.PathLike[str] | None, *, seed: int, image_size: int | None, num_classes: int | None
) -> Dataset:
    """The ``train`` images (500 per class) and the labelled ``val`` images (the test set).

    Labels are the index of the wnid in sorted order, as the authors' loader (sorted train
    folders). ``image_size`` resizes while decoding (Pillow bilinear); ``None`` requires 64x64.
    """
    folder = dataset_folder(_NAME, data_dir, ("wnids.txt", "train", "val/val_annotations.txt", "val/images"))
    root = folder.resolve()
    wnids_file = folder / "wnids.txt"
    wnids = [line.strip() for line in _read_text(root, wnids_file).splitlines() if line.strip()]
    if len(wnids) < 2 or len(set(wnids)) != len(wnids):
        raise DatasetError(
            f"{_NAME}: {str(wnids_file)!r} must list >= 2 distinct class ids (WordNet ids, one a line), "
            f"got {len(wnids)} lines, {len(set(wnids))} distinct"
        )
    for wnid in wnids:
        if not _plain(wnid):
            raise DatasetError(f"{_NAME}: {str(wnids_file)!r} lists {wnid[:80]!r}, not a folder name (a WordNet id)")
    classes = fixed_classes(_NAME, num_classes, len(wnids), f" (the lines of {str(wnids_file)!r})")
    index = {wnid: i for i, wnid in enumerate(sorted(wnids))}
    train_files: list[Path] = []
    train_labels: list[int] = []
    for wnid in sorted(wnids):
        images = folder / "train" / wnid / "images"
        if not _folder_in(root, images):
            raise DatasetError(f"{_NAME}: {str(images)!r} is missing; expected train/<wnid>/images/*.JPEG per class")
        files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
        if not files:
            raise DatasetError(f"{_NAME}: {str(images)!r} holds no .JPEG images")
        for file in files:
            _check_entry(root, file, MAX_FILE_BYTES)
        train_files += files
        train_labels += [index[wnid]] * len(files)
    test_files, test_labels = _val(root, folder, index)
    size = image_size or _SIZE
    x_train = _decode_images(train_files, size, resize=image_size is not None)
    x_test = _decode_images(test_files, size, resize=image_size is not None)
    return make(_NAME, f"{_NAME} ({folder})", x_train, np.array(train_labels), x_test, np.array(test_labels), classes)


def _val(root: Path, folder: Path, index: dict[str, int]) -> tuple[list[Path], list[int]]:
    """The validation images (the test set) and labels from ``val/val_annotations.txt``."""
    annotations, images = folder / "val" / "val_annotations.txt", folder / "val" / "images"
    lines = _read_text(root, annotations).splitlines()
    if not _folder_in(root, images):
        raise DatasetError(f"{_NAME}: {str(images)!r} is missing; expected val/images/*.JPEG")
    files, labels = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index or not _plain(fields[0]):
            raise DatasetError(
                f"{_NAME}: {str(annotations)!r} line {number}: expected '<file>\\t<wnid>\\t...' with a file name "
                f"of val/images and a wnid of wnids.txt, got {line[:80]!r}"
            )
        image = images / fields[0]
        if not os.path.lexists(image):
            raise DatasetError(f"{_NAME}: {str(image)!r} (line {number} of {str(annotations)!r}) is missing")
        _check_entry(root, image, MAX_FILE_BYTES)
        files.append(image)
        labels.append(index[fields[1]])
    if not files:
        raise DatasetError(f"{_NAME}: {str(annotations)!r} lists no images")
    return files, labels


# ---------------------------------------------------------------------- entries of the tree
def _plain(name: str) -> bool:
    """A single path component: no separator, not ``.`` or ``..``."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _resolved(root: Path, path: Path) -> Path:
    """``path`` with its links followed, refused if they loop, dangle or lead out of ``root``."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as error:  # RuntimeError: a link loop, before Python 3.13 (then ELOOP)
        raise DatasetError(
            f"{_NAME}: {str(path)!r} is a symbolic link that loops or leads nowhere ({error}); "
            f"replace it by the file"
        ) from None
    if not real.is_relative_to(root):
        raise DatasetError(
            f"{_NAME}: {str(path)!r} leads to {str(real)!r}, outside the dataset folder {str(root)!r}; "
            f"links are followed only within it: copy the file in, or point data_dir at the real folder"
        )
    return real


def _folder_in(root: Path, path: Path) -> bool:
    """Whether ``path`` is a folder inside ``root`` (links followed within it); False if missing."""
    if not os.path.lexists(path):
        return False
    return _resolved(root, path).is_dir()


def _check_entry(root: Path, path: Path, limit: int) -> None:
    """Refuse ``path`` unless it is (a link within ``root`` to) a regular file of at most ``limit`` bytes."""
    try:
        st = os.lstat(path)
    except OSError as error:
        raise DatasetError(f"{_NAME}: cannot read {str(path)!r}: {error.strerror or error}") from None
    if stat.S_ISLNK(st.st_mode):
        st = os.stat(_resolved(root, path))
    _check_stat(path, st, limit)


def _check_stat(path: Path, st: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a folder" if stat.S_ISDIR(st.st_mode) else "not a file")
        raise DatasetError(
            f"{_NAME}: {str(path)!r} is {kind}, not a regular file; the loader reads regular files only: remove it"
        )
    if st.st_size > limit:
        raise DatasetError(
            f"{_NAME}: {str(path)!r} has {st.st_size:,} bytes, more than the {limit:,} a file of this dataset "
            f"may have; remove it"
        )


def _open(path: Path, limit: int) -> int:
    """A file descriptor on ``path``, opened without waiting and checked again on the open file."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as error:
        raise DatasetError(f"{_NAME}: cannot read {str(path)!r}: {error.strerror or error}") from None
    try:
        _check_stat(path, os.fstat(fd), limit)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_text(root: Path, path: Path) -> str:
    _check_entry(root, path, _MAX_TEXT_BYTES)
    try:
        with os.fdopen(_open(path, _MAX_TEXT_BYTES), "rb") as f:
            return f.read(_MAX_TEXT_BYTES + 1).decode()
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{_NAME}: cannot read {str(path)!r}: {error}") from None


def _decode_images(files: Sequence[Path], size: int, *, resize: bool) -> np.ndarray:
    """Decode JPEGs into a uint8 ``[N, 3, size, size]`` array (RGB; grayscale converted), in order."""
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(files), 3, size, size), dtype=np.uint8)

    def decode(i: int) -> None:
        try:
            with os.fdopen(_open(files[i], MAX_FILE_BYTES), "rb") as f, Image.open(f) as image:
                # The header's dimensions, before a pixel is decoded.
                width, height = image.size
                if not resize and (width, height) != (size, size):
                    raise DatasetError(
                        f"{_NAME}: {str(files[i])!r} is {width}x{height}, expected {size}x{size} "
                        f"(pass image_size to resize)"
                    )
                if width * height > MAX_PIXELS:
                    raise DatasetError(
                        f"{_NAME}: {str(files[i])!r} is {width}x{height}, more than the {MAX_PIXELS:,} pixels "
                        f"an image may have here; remove it or shrink it"
                    )
                rgb = image.convert("RGB")
        except DatasetError:
            raise
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as error:  # the warning: Pillow's own limit, under -W error
            raise DatasetError(f"{_NAME}: cannot decode {str(files[i])!r}: {error}") from None
        if resize:
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(rgb).transpose(2, 0, 1)

    # Pillow decodes without the GIL: threads overlap the 110,000 decodes of the full set.
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        for _ in pool.map(decode, range(len(files))):  # in order: the first bad file is reported
            pass
    finally:  # after an error (or Ctrl-C), do not decode the rest
        pool.shutdown(wait=True, cancel_futures=True)
    return out
