"""agr_optim.data.tiny_imagenet: a tiny-imagenet-200 tree of JPEGs written with Pillow, and hostile trees."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_files import WNIDS, load_in_subprocess, pil_rgb, stats, tree_state, write_jpeg, write_tiny_imagenet

from agr_optim.data import DatasetError, load_dataset


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return write_tiny_imagenet(tmp_path)


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



# ---------------------------------------------------------------------- hostile trees (issue 14, item 10)
def a_tree(tmp_path: Path, label: str) -> Path:
    (tmp_path / label).mkdir()
    return write_tiny_imagenet(tmp_path / label)


def test_fifos_in_the_tree_are_refused_not_waited_on(tmp_path: Path) -> None:
    """The issue's case: a FIFO named *.JPEG blocked the loader forever (as would a FIFO wnids.txt)."""
    trees = [a_tree(tmp_path, label) for label in ("train", "val", "wnids")]
    fifos = [trees[0] / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_9.JPEG",
             trees[1] / "val" / "images" / "val_0.JPEG", trees[2] / "wnids.txt"]
    for fifo in fifos:
        if fifo.exists():
            fifo.unlink()
        os.mkfifo(fifo)
    lines = load_in_subprocess("tiny-imagenet", *trees)
    assert len(lines) == 3, lines
    for line, fifo in zip(lines, fifos, strict=True):
        assert line == (f"DatasetError: tiny-imagenet: {str(fifo)!r} is a FIFO (named pipe), not a regular file; "
                        f"the loader reads regular files only: remove it"), line


def test_other_entries_that_are_not_files_are_refused(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = tiny_dir / "train" / WNIDS[0] / "images"
    (images / "folder.JPEG").mkdir()
    with pytest.raises(DatasetError, match=r"folder.JPEG' is a folder, not a regular file; the loader reads regular"):
        load_dataset("tiny-imagenet", tiny_dir)
    (images / "folder.JPEG").rmdir()
    monkeypatch.chdir(images)  # a socket's path must be short: bind it by its relative name
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("socket.JPEG")
        with pytest.raises(DatasetError, match=r"socket.JPEG' is a socket, not a regular file"):
            load_dataset("tiny-imagenet", tiny_dir)


def test_links_within_the_folder_are_followed(tiny_dir: Path) -> None:
    link = tiny_dir / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_3.JPEG"
    target = tiny_dir / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_0.JPEG"
    link.unlink()
    link.symlink_to(Path("..", "..", WNIDS[1], "images", target.name))
    data = load_dataset("tiny-imagenet", tiny_dir)
    row = sorted(WNIDS).index(WNIDS[0]) * 4 + 3
    np.testing.assert_array_equal(data.x_train[row].numpy(), pil_rgb(target))


def link_out(tree: Path, outside: Path) -> str:
    (tree / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_9.JPEG").symlink_to(outside / "photo.JPEG")
    return rf"{WNIDS[0]}_9.JPEG' leads to '.*outside/photo.JPEG', outside the dataset folder '.*'; links are"


def folder_out(tree: Path, outside: Path) -> str:
    (outside / "images").mkdir()
    (outside / "photo.JPEG").rename(outside / "images" / "x.JPEG")
    images = tree / "train" / WNIDS[2] / "images"
    for f in images.iterdir():
        f.unlink()
    images.rmdir()
    images.symlink_to(outside / "images")
    return rf"{WNIDS[2]}/images' leads to '.*outside/images', outside the dataset folder"


def loop(tree: Path, outside: Path) -> str:
    images = tree / "train" / WNIDS[0] / "images"
    (images / "a.JPEG").symlink_to(images / "b.JPEG")
    (images / "b.JPEG").symlink_to(images / "a.JPEG")
    return r"a.JPEG' is a symbolic link that loops or leads nowhere"


def dangling(tree: Path, outside: Path) -> str:
    (tree / "val" / "images" / "val_5.JPEG").unlink()
    (tree / "val" / "images" / "val_5.JPEG").symlink_to(tree / "val" / "images" / "gone.JPEG")
    return r"val_5.JPEG' is a symbolic link that loops or leads nowhere"


@pytest.mark.parametrize("plant", [link_out, folder_out, loop, dangling])
def test_links_that_leave_the_folder_loop_or_dangle_are_refused(tiny_dir: Path, tmp_path: Path, plant) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    write_jpeg(outside / "photo.JPEG", np.random.default_rng(3))  # a valid image: only the place is wrong
    message = plant(tiny_dir, outside)
    with pytest.raises(DatasetError, match=r"^tiny-imagenet: '.*" + message):
        load_dataset("tiny-imagenet", tiny_dir)


def test_a_file_too_large_is_refused_unread(tiny_dir: Path) -> None:
    big = tiny_dir / "train" / WNIDS[2] / "images" / f"{WNIDS[2]}_0.JPEG"
    with open(big, "r+b") as f:  # a valid JPEG, then zeros (a sparse file): Pillow would decode it
        f.truncate(10 * 2**20 + 1)
    with pytest.raises(DatasetError, match=r"_0.JPEG' has 10,485,761 bytes, more than the 10,485,760 a file of this"):
        load_dataset("tiny-imagenet", tiny_dir)


def claim_dimensions(path: Path, width: int, height: int) -> None:
    """Rewrite the size in a baseline JPEG's frame header (SOF0); the pixel data stays 64x64's."""
    data = bytearray(path.read_bytes())
    frame = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, frame + 5, height, width)
    path.write_bytes(bytes(data))


def test_image_dimensions_are_read_from_the_header_before_decoding(tiny_dir: Path) -> None:
    image = tiny_dir / "val" / "images" / "val_2.JPEG"
    claim_dimensions(image, 9000, 9000)  # decoding would need 243 MB, and fail on the short data
    with pytest.raises(DatasetError, match=r"val_2.JPEG' is 9000x9000, expected 64x64 \(pass image_size"):
        load_dataset("tiny-imagenet", tiny_dir)
    claim_dimensions(image, 20000, 20000)  # Pillow's own decompression-bomb limit stays on
    with pytest.raises(DatasetError, match=r"cannot decode '.*val_2.JPEG': Image size \(400000000 pixels\) exceeds"):
        load_dataset("tiny-imagenet", tiny_dir)
    claim_dimensions(image, 5000, 4000)  # under Pillow's own bomb limit, over this loader's
    with pytest.raises(DatasetError, match=r"val_2.JPEG' is 5000x4000, more than the 16,777,216 pixels an image"):
        load_dataset("tiny-imagenet", tiny_dir, image_size=32)


def test_names_in_the_text_files_must_be_names_not_paths(tiny_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.JPEG"
    write_jpeg(outside, np.random.default_rng(4))
    annotations = tiny_dir / "val" / "val_annotations.txt"
    for name in (str(outside), f"../../train/{WNIDS[0]}/images/{WNIDS[0]}_0.JPEG"):
        annotations.write_text(f"{name}\t{WNIDS[0]}\t0\t0\t63\t63\n")
        with pytest.raises(DatasetError, match=r"val_annotations.txt' line 1: expected '<file>\\t<wnid>\\t...' with "
                                               r"a file name of val/images"):
            load_dataset("tiny-imagenet", tiny_dir)
    evil = tmp_path / "evil" / "images"  # reached by train/../../evil/images
    evil.mkdir(parents=True)
    write_jpeg(evil / "x.JPEG", np.random.default_rng(5))
    (tiny_dir / "wnids.txt").write_text("\n".join([*WNIDS, "../../evil"]) + "\n")
    with pytest.raises(DatasetError, match=r"wnids.txt' lists '../../evil', not a folder name \(a WordNet id\)"):
        load_dataset("tiny-imagenet", tiny_dir)


def test_a_declared_count_must_match_the_wnids(tiny_dir: Path) -> None:
    assert torch.equal(load_dataset("tiny-imagenet", tiny_dir, num_classes=3).x_test,
                       load_dataset("tiny-imagenet", tiny_dir).x_test)
    with pytest.raises(DatasetError, match=r"^tiny-imagenet: num_classes=200 disagrees with the dataset's 3 classes "
                                           r"\(the lines of '.*wnids.txt'\); pass 3 or leave it out$"):
        load_dataset("tiny-imagenet", tiny_dir, num_classes=200)
