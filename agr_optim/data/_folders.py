"""Where a dataset's files are: ``data_dir`` checked, the dataset's own folder found, hints on a wrong layout."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .dataset import DatasetError

#: The folder each dataset is distributed as (``data_dir`` may be it or its parent).
FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "tiny-imagenet": "tiny-imagenet-200"}
_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz",
             "tiny-imagenet": "tiny-imagenet-200.zip"}


def given_path(name: str, data_dir: str | os.PathLike[str] | None, what: str) -> Path:
    """``data_dir`` as a path (``~`` expanded); ``what`` says what it should be when it is missing."""
    if data_dir is None:
        raise DatasetError(f"{name}: data_dir is required ({what}); nothing is downloaded")
    return Path(os.fspath(data_dir)).expanduser()


def no_data_dir(name: str, data_dir: str | os.PathLike[str] | None, package: str) -> None:
    """Refuse a ``data_dir`` for a dataset that ships inside ``package``."""
    if data_dir is not None:
        raise DatasetError(
            f"{name}: the images ship with the {package} package; data_dir must be None (got {os.fspath(data_dir)!r})"
        )


def dataset_folder(name: str, data_dir: str | os.PathLike[str] | None, required: Sequence[str]) -> Path:
    """The dataset's own folder: ``data_dir`` itself or ``data_dir / <canonical folder name>``."""
    folder = FOLDERS[name]
    path = given_path(name, data_dir, f"the {folder} folder or the folder that holds it")
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
    looks = {other: found or (path / FOLDERS[other]).is_dir() for other, found in looks.items()}
    others = [other for other, found in looks.items() if found and other != name]
    return f"; it looks like {others[0]}: use --dataset {others[0]}" if others else ""
