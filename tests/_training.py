"""Shared by the tests of ``agr-train`` (tests/test_training_*.py, tests/test_run_folder.py):
running the command in the test process, small data folders in the real formats, comparisons."""

from __future__ import annotations

import csv
import math
import pickle
from pathlib import Path

import numpy as np
import torch

from agr_optim.training import cli

# A cheap run: PGD-2 for training, PGD-3 for evaluation, batch 32.
CHEAP = ["--attack-steps", "2", "--eval-steps", "3", "--batch-size", "32", "--threads", "1"]


def run(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(stderr: str) -> str:
    """``stderr`` if it is one ``agr-train: error:`` line (a refusal or a stop), else fail."""
    assert stderr.count("\n") == 1 and stderr.startswith("agr-train: error:"), stderr
    return stderr


def cli_args(*switches: str, **flags: object) -> list:
    """``--switch`` for each switch, ``--key value`` for each keyword (``_`` as ``-``), then CHEAP."""
    argv = [f"--{name}" for name in switches]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv + CHEAP


def read_metrics(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------- data in the real formats
def write_cifar(root: Path, classes: int, n_train: int = 80, n_test: int = 32, seed: int = 0) -> Path:
    """A CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``) pickle folder."""
    rng = np.random.default_rng(seed)
    folder = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    key = b"labels" if classes == 10 else b"fine_labels"

    def dump(name: str, n: int) -> None:
        labels = rng.integers(0, classes, n)
        # Learnable: the class sets the mean brightness of the red channel.
        data = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.float64)
        data[:, 0] = data[:, 0] * 0.3 + (labels[:, None, None] * 170 / max(classes - 1, 1))
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data.clip(0, 255).astype(np.uint8).reshape(n, -1), key: labels.tolist()}, f)

    if classes == 10:
        for i in range(1, 6):
            dump(f"data_batch_{i}", n_train // 5)
        dump("test_batch", n_test)
    else:
        dump("train", n_train)
        dump("test", n_test)
    return folder


def write_tiny_imagenet(root: Path, wnids=("n01", "n02", "n03"), per_class: int = 6, seed: int = 0) -> Path:
    """A ``tiny-imagenet-200`` tree: wnids.txt, train/<wnid>/images/*.JPEG, val/images + annotations."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    lines = []
    for k, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(images / f"{wnid}_{i}.JPEG", quality=90)
        for i in range(2):
            name = f"val_{k}_{i}.JPEG"
            Image.fromarray(rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(folder / "val" / "images" / name)
            lines.append(f"{name}\t{wnid}\t0\t0\t63\t63\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    return folder


# ---------------------------------------------------------------------- comparing runs
def comparable(state: dict) -> dict:
    """A checkpoint without the wall-clock figures."""
    state = dict(state)
    strip = lambda row: {k: v for k, v in row.items() if k not in ("seconds", "eval_seconds")}
    state["metrics"] = [strip(r) for r in state["metrics"]]
    state["best"] = None if state["best"] is None else strip(state["best"])
    return state


def assert_same(a, b, where="checkpoint"):
    """Equal nested states: tensors bit for bit (same dtype), floats equal or both NaN."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), where
