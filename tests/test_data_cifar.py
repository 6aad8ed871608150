"""agr_optim.data.cifar: CIFAR-10 and CIFAR-100 folders written here in the real pickle format, and hostile pickles."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_files import (
    as_chw,
    cifar_images,
    load_in_subprocess,
    stats,
    tree_state,
    write_cifar10,
    write_cifar100,
    write_cifar_pickle,
)

from agr_optim.data import Dataset, DatasetError, load_dataset


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return write_cifar10(tmp_path)


@pytest.fixture
def cifar100_dir(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return write_cifar100(tmp_path)


def test_cifar10_loads_what_was_written(cifar10_dir, tmp_path: Path) -> None:
    folder, x_train, y_train, x_test, y_test = cifar10_dir
    before = tree_state(tmp_path)
    data = load_dataset("cifar10", folder)
    assert tree_state(tmp_path) == before  # nothing written
    assert isinstance(data, Dataset) and data.num_classes == 10
    assert (data.in_channels, data.image_size) == (3, 32)
    assert data.x_train.dtype == torch.uint8 and data.y_train.dtype == torch.int64
    np.testing.assert_array_equal(data.x_train.numpy(), as_chw(x_train))
    np.testing.assert_array_equal(data.y_train.numpy(), y_train)
    np.testing.assert_array_equal(data.x_test.numpy(), as_chw(x_test))
    np.testing.assert_array_equal(data.y_test.numpy(), y_test)
    mean, std = stats(as_chw(x_train))
    np.testing.assert_allclose(data.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(data.std, std, rtol=1e-12)
    # The parent folder works too, and gives the same data.
    again = load_dataset("cifar10", str(folder.parent))
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_test, data.y_test)


def test_cifar100_loads_the_fine_labels(cifar100_dir) -> None:
    folder, x_train, y_train, x_test, y_test = cifar100_dir
    for where in (folder, folder.parent):
        data = load_dataset("cifar100", where)
        assert data.num_classes == 100
        np.testing.assert_array_equal(data.x_train.numpy(), as_chw(x_train))
        np.testing.assert_array_equal(data.y_train.numpy(), y_train)
        np.testing.assert_array_equal(data.x_test.numpy(), as_chw(x_test))
        np.testing.assert_array_equal(data.y_test.numpy(), y_test)


def test_cifar_pickles_written_by_python3_load_too(tmp_path: Path) -> None:
    """A folder re-saved with Python 3's pickle (str keys, numpy 2 names) is read the same way."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x, y = cifar_images(rng, 20), list(range(20))
    for split in ("train", "test"):
        with open(folder / split, "wb") as f:
            pickle.dump({"data": x, "fine_labels": y, "coarse_labels": [0] * 20}, f)
    data = load_dataset("cifar100", folder)
    np.testing.assert_array_equal(data.x_test.numpy(), as_chw(x))


def test_missing_batch_is_named(cifar10_dir) -> None:
    folder = cifar10_dir[0]
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"lacks data_batch_3; expected the cifar-10-batches-py folder"):
        load_dataset("cifar10", folder)


def test_corrupt_pickle(cifar10_dir) -> None:
    folder = cifar10_dir[0]
    path = folder / "data_batch_2"
    path.write_bytes(path.read_bytes()[:5000])  # truncated download
    with pytest.raises(DatasetError, match=r"cifar10: '.*data_batch_2' is corrupt or not a CIFAR pickle"):
        load_dataset("cifar10", folder)
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(DatasetError, match=r"data_batch_2' is corrupt or not a CIFAR pickle"):
        load_dataset("cifar10", folder)


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_pickle_that_runs_code_is_refused_without_running_it(cifar10_dir, tmp_path: Path) -> None:
    folder = cifar10_dir[0]
    target = tmp_path / "pwned"
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(str(target)), b"labels": []}, f, protocol=2)
    with pytest.raises(DatasetError, match=r"test_batch' is corrupt or not a CIFAR pickle .*which a CIFAR file never"):
        load_dataset("cifar10", folder)
    assert not target.exists()


def test_pickle_of_the_wrong_content(cifar10_dir) -> None:
    folder = cifar10_dir[0]
    write_cifar_pickle(folder / "data_batch_1", {b"data": np.zeros((4, 1024), np.uint8), b"labels": [0] * 4})
    with pytest.raises(DatasetError, match=r"data_batch_1': b'data' must be a uint8 array \[N, 3072\]"):
        load_dataset("cifar10", folder)
    write_cifar_pickle(folder / "data_batch_1", {b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0] * 4})
    with pytest.raises(DatasetError, match=r"data_batch_1' has keys .*it is a cifar100 file: use --dataset cifar100"):
        load_dataset("cifar10", folder)
    write_cifar_pickle(folder / "data_batch_1", {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3})
    with pytest.raises(DatasetError, match=r"b'labels' must be 4 integer labels \(one per image\)"):
        load_dataset("cifar10", folder)
    write_cifar_pickle(folder / "data_batch_1", [1, 2, 3])
    with pytest.raises(DatasetError, match=r"holds a list, expected a CIFAR dict"):
        load_dataset("cifar10", folder)


def test_labels_out_of_range(cifar10_dir) -> None:
    folder = cifar10_dir[0]
    write_cifar_pickle(folder / "data_batch_4", {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 10, 2]})
    with pytest.raises(DatasetError, match=r"data_batch_4': labels in \[0, 10\], expected 0..9"):
        load_dataset("cifar10", folder)



# ---------------------------------------------------------------------- hostile pickles (issue 14, item 9)
def labels_bomb(levels: int = 9) -> list:
    """10^levels labels in a few hundred bytes of pickle: each level is 10 references to the one below."""
    bomb: list = [0] * 10
    for _ in range(levels - 1):
        bomb = [bomb] * 10
    return bomb


def test_a_labels_bomb_is_refused_before_numpy_walks_it(cifar10_dir) -> None:
    """The issue's file: numpy.asarray walked its 10^9 elements for 171 s and 3.7 GB, then raised."""
    folder = cifar10_dir[0]
    write_cifar_pickle(folder.parent / "bomb_alone", labels_bomb())
    assert (folder.parent / "bomb_alone").stat().st_size < 300  # "about 250 bytes"
    write_cifar_pickle(folder / "test_batch", {b"data": np.zeros((10, 3072), np.uint8), b"labels": labels_bomb()})
    # The first item a list, or the tenth, or a top level as long as the data: each one line, at once.
    write_cifar_pickle(folder / "batches.meta", {b"data": np.zeros((10, 3072), np.uint8),
                                                 b"labels": [0] * 9 + [labels_bomb(8)]})
    other = folder.parent / "other" / "cifar-10-batches-py"
    other.mkdir(parents=True)
    for batch in (*[f"data_batch_{i}" for i in range(1, 6)], "test_batch"):
        (other / batch).write_bytes((folder / ("batches.meta" if batch == "data_batch_1" else "data_batch_2"))
                                    .read_bytes())
    lines = load_in_subprocess("cifar10", folder, other)
    assert len(lines) == 2, lines
    assert re.fullmatch(r"DatasetError: cifar10: '.*test_batch': b'labels' must be 10 integer labels \(one per "
                        r"image\) in a flat list, got a list whose item 0 is a list", lines[0]), lines[0]
    assert re.fullmatch(r"DatasetError: cifar10: '.*other/cifar-10-batches-py/data_batch_1': b'labels' must be 10 "
                        r"integer labels \(one per image\) in a flat list, got a list whose item 9 is a list",
                        lines[1]), lines[1]


@pytest.mark.parametrize(
    "labels, got",
    [
        ([0, 1, True, 2], r"a list whose item 2 is a bool"),
        ([0, 1, 2.0, 2], r"a list whose item 2 is a float"),
        ([[0], [1], [2], [3]], r"a list whose item 0 is a list"),
        ([0, 1, 2], r"a list of 3 items"),
        ((0, 1, 2, 3), r"tuple"),
        (np.zeros((4, 1), np.int64), r"int64 array of shape \(4, 1\)"),
        (np.zeros(4, np.float32), r"float32 array of shape \(4,\)"),
    ],
)
def test_labels_must_be_a_flat_list_of_ints(cifar10_dir, labels: object, got: str) -> None:
    folder = cifar10_dir[0]
    write_cifar_pickle(folder / "data_batch_5", {b"data": np.zeros((4, 3072), np.uint8), b"labels": labels})
    with pytest.raises(DatasetError, match=r"^cifar10: '.*data_batch_5': b'labels' must be 4 integer labels "
                                           r"\(one per image\) in a flat list, got " + got + "$"):
        load_dataset("cifar10", folder)


def test_labels_as_numpy_integers_load_as_ints(cifar10_dir) -> None:
    folder, x_train, y_train, x_test, y_test = cifar10_dir
    with open(folder / "test_batch", "wb") as f:  # numpy scalars (the unpickler's scalar) and an int8 array
        pickle.dump({"data": x_test, "labels": [np.int64(v) for v in y_test]}, f, protocol=2)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": x_train[:40], "labels": np.asarray(y_train[:40], dtype=np.int8)}, f, protocol=2)
    data = load_dataset("cifar10", folder)
    np.testing.assert_array_equal(data.y_test.numpy(), y_test)
    np.testing.assert_array_equal(data.y_train.numpy(), y_train)


def test_a_label_beyond_int64_is_out_of_range_not_an_overflow(cifar10_dir) -> None:
    folder = cifar10_dir[0]
    write_cifar_pickle(folder / "data_batch_4", {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 2**70, 2]})
    with pytest.raises(DatasetError, match=r"data_batch_4': labels in \[0, 1180591620717411303424\], expected 0..9 "
                                           r"\(b'labels'\[1\] is 1180591620717411303424\)$"):
        load_dataset("cifar10", folder)


class _Call:
    """Pickles as ``function(*args)``: GLOBAL module name, then REDUCE."""

    def __init__(self, function: object, *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


@pytest.mark.parametrize(
    "call, says",
    [
        (_Call(np.ndarray, (4, 3072), "u1"), r"it calls numpy.ndarray\(\(4, 3072\), 'u1'\)"),
        (_Call(np.ndarray.__reduce__(np.empty(0))[0], np.ndarray, (4, 3072), b"B"),
         r"it reconstructs an array as \(4, 3072\)"),
    ],
)
def test_a_pickle_cannot_make_numpy_allocate_what_it_does_not_hold(cifar10_dir, call: _Call, says: str) -> None:
    """Arrays only start empty and take the file's bytes: no uninitialised memory loaded as images."""
    folder = cifar10_dir[0]
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({"data": call, "labels": [0, 1, 2, 3]}, f, protocol=2)
    with pytest.raises(DatasetError, match=r"data_batch_3' is corrupt or not a CIFAR pickle \(UnpicklingError: "
                                           + says + ", which a CIFAR file never does\\)"):
        load_dataset("cifar10", folder)


@pytest.mark.parametrize(
    "function, argument",
    [(eval, "__import__('os').mkdir({target!r})"), (os.system, "mkdir {target}"), (os.mkdir, "{target}"),
     (subprocess.call, ["mkdir", "{target}"]), (np.load, "{target}")],
    ids=["eval", "os.system", "os.mkdir", "subprocess.call", "numpy.load"],
)
def test_every_other_global_is_refused_without_running(cifar10_dir, tmp_path: Path, function, argument) -> None:
    folder, target = cifar10_dir[0], tmp_path / "pwned"
    if isinstance(argument, list):
        argument = [a.format(target=target) for a in argument]
    else:
        argument = argument.format(target=target)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": _Call(function, argument), "labels": []}, f, protocol=2)
    with pytest.raises(DatasetError, match=r"test_batch' is corrupt or not a CIFAR pickle \(UnpicklingError: it "
                                           r"refers to .*, which a CIFAR file never does\)"):
        load_dataset("cifar10", folder)
    assert not target.exists()
