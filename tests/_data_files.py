"""Datasets written here in their real formats, for the tests of ``agr_optim.data`` (moved from test_datasets.py).

The CIFAR folders are written as the real files are: pickle protocol 2 dicts whose keys and
array data are Python 2 ``str`` (``SHORT_BINSTRING``/``BINSTRING`` opcodes) and whose arrays
refer to ``numpy.core.multiarray``. Tiny-ImageNet is a tree of JPEGs written with Pillow.
Every comparison is against what the test wrote (or Pillow's own decoding of it), computed here.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


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



def write_cifar10(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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



def write_cifar100(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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



# ---------------------------------------------------------------------- Tiny-ImageNet
WNIDS = ["n02124075", "n01443537", "n09999999"]  # deliberately unsorted in wnids.txt


def write_jpeg(path: Path, rng: np.random.Generator, size: int = 64, gray: bool = False) -> None:
    shape = (size, size) if gray else (size, size, 3)
    # Smooth images: JPEG keeps them close, so the test also checks the pixels are the image's.
    base = rng.integers(0, 256, (4, 4) + shape[2:]).astype(np.uint8)
    image = np.asarray(Image.fromarray(base).resize((size, size), Image.Resampling.BILINEAR))
    Image.fromarray(image).save(path, format="JPEG", quality=95)



def write_tiny_imagenet(tmp_path: Path) -> Path:
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



# ---------------------------------------------------------------------- npz and batches
def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)



# ---------------------------------------------------------------------- a loader that may block
_LOAD = """
import sys
from agr_optim.datasets import DatasetError, load_dataset
for path in sys.argv[2:]:
    try:
        load_dataset(sys.argv[1], path)
        print("loaded")
    except DatasetError as error:
        print(f"DatasetError: {error}")
"""


def load_in_subprocess(name: str, *paths: Path, timeout: float = 90.0) -> list[str]:
    """``load_dataset(name, path)`` for each path in a fresh process: one line per path, the error or "loaded".

    A loader that blocks (on a FIFO) or walks a bomb for minutes fails the test after ``timeout``
    seconds instead of hanging the suite (the child is killed). Through the old module path
    ``agr_optim.datasets``, so the same test runs on the code before the package existed.
    """
    import agr_optim

    root = str(Path(agr_optim.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        run = subprocess.run([sys.executable, "-c", _LOAD, name, *map(str, paths)], capture_output=True,
                             text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"load_dataset({name!r}, ...) did not return within {timeout} s (killed)")
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.splitlines()
