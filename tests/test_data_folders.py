"""agr_optim.data._folders: finding the dataset's folder, and the hints on a wrong one."""

from __future__ import annotations

from pathlib import Path

import pytest
from _data_files import write_cifar10, write_cifar100

from agr_optim.data import DatasetError, load_dataset


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"cifar10: '.*nowhere' does not exist; expected the cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match=r"tiny-imagenet: '.*file' is not a folder"):
        load_dataset("tiny-imagenet", tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"cifar100: '.*empty' lacks train, test; expected the cifar-100-python"):
        load_dataset("cifar100", empty)
    with pytest.raises(DatasetError, match=r"cifar10: data_dir is required"):
        load_dataset("cifar10")
    (empty / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"cifar-10-python.tar.gz' is there: unpack it \(tar xzf\)"):
        load_dataset("cifar10", empty)


def test_wrong_layout_names_the_right_dataset(tmp_path: Path) -> None:
    cifar10_dir, cifar100_dir = write_cifar10(tmp_path), write_cifar100(tmp_path)
    with pytest.raises(DatasetError, match=r"cifar10: .*cifar-100-python' lacks data_batch_1.*use --dataset cifar100"):
        load_dataset("cifar10", cifar100_dir[0])
    with pytest.raises(DatasetError, match=r"cifar100: .*batches-py' lacks train, test.*use --dataset cifar10"):
        load_dataset("cifar100", cifar10_dir[0])


def test_cifar_folder_given_as_tiny_imagenet(tmp_path: Path) -> None:
    cifar10_dir = write_cifar10(tmp_path)
    with pytest.raises(DatasetError, match=r"tiny-imagenet: .* lacks wnids.txt.*use --dataset cifar10"):
        load_dataset("tiny-imagenet", cifar10_dir[0])

