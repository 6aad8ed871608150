"""agr_optim.data.npz: .npz layouts, and truncated, forged and hostile archives."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_files import save_npz, stats
from PIL import Image

from agr_optim.data import DatasetError, load_dataset


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



# ---------------------------------------------------------------------- broken and hostile files (issue 14, item 8)
def npy(array: np.ndarray) -> bytes:
    """``array`` as numpy writes it into an .npz member."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def forged_npy(shape: tuple[int, ...], data: bytes, descr: str = "|u1") -> bytes:
    """A .npy header that declares ``shape`` of ``descr``, followed by ``data`` (whatever its length)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def write_zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def valid_arrays(n: int = 20, side: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(14)
    return {"x": rng.integers(0, 256, (n, side, side), dtype=np.uint8), "y": np.arange(n) % 2}


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, -1])
def test_a_truncated_npz_is_refused_naming_it(tmp_path: Path, keep: float) -> None:
    whole = save_npz(tmp_path / "whole.npz", **valid_arrays()).read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(whole[: int(len(whole) * keep)] if keep > 0 else whole[:keep])
    with pytest.raises(DatasetError, match=r"^npz: cannot read '.*cut.npz' as .npz: "):
        load_dataset("npz", cut)


def test_a_corrupt_member_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "flipped.npz", **valid_arrays())
    data = bytearray(path.read_bytes())
    start = data.index(b"y.npy")  # the local header of y; its data follows within a few hundred bytes
    data[start + 200 : start + 248] = bytes(48)  # 48 bytes of labels zeroed: the CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"^npz: cannot read the arrays of '.*flipped.npz': y: .*CRC"):
        load_dataset("npz", path)


def test_a_header_claiming_90_tib_is_refused_before_allocating(tmp_path: Path) -> None:
    """The issue's file: 1.9 KB whose x.npy header declares 1,500,000,000 x 256 x 256 bytes."""
    arrays = valid_arrays()
    members = {"x.npy": forged_npy((1_500_000_000, 256, 256), arrays["x"].tobytes()), "y.npy": npy(arrays["y"])}
    path = write_zip(tmp_path / "claims.npz", members)
    assert path.stat().st_size < 2000
    with pytest.raises(DatasetError, match=(
        r"^npz: '.*claims.npz': x: the .npy header declares shape \(1500000000, 256, 256\) of uint8, 89.4 TiB, "
        r"but the member holds 1,280 bytes of data: the file is truncated or forged$"
    )):
        load_dataset("npz", path)


def test_a_short_header_claim_is_refused_too(tmp_path: Path) -> None:
    """The other way round: a header declaring fewer bytes than the member holds is not an .npy numpy wrote."""
    arrays = valid_arrays()
    path = write_zip(tmp_path / "short.npz", {"x.npy": forged_npy((10, 8, 8), arrays["x"].tobytes()),
                                              "y.npy": npy(arrays["y"])})
    with pytest.raises(DatasetError, match=r"x: the .npy header declares shape \(10, 8, 8\) of uint8, 640 bytes, "
                                           r"but the member holds 1,280 bytes"):
        load_dataset("npz", path)


def forge_directory_size(path: Path, member: str, size: int) -> None:
    """Overwrite the uncompressed size the central directory records for ``member``."""
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the central directory's entries; the name follows 46 bytes in
    while data[entry + 46 : entry + 46 + len(member)] != member.encode():
        entry = data.index(b"PK\x01\x02", entry + 4)
    struct.pack_into("<I", data, entry + 24, size)
    path.write_bytes(bytes(data))


def test_a_forged_directory_is_refused(tmp_path: Path) -> None:
    arrays = valid_arrays()
    path = write_zip(tmp_path / "deflated.npz", {"x.npy": npy(arrays["x"]), "y.npy": npy(arrays["y"])},
                     zipfile.ZIP_DEFLATED)
    forge_directory_size(path, "x.npy", 2**32 - 1)  # 4 GiB from a few hundred deflated bytes: beyond 1032:1
    with pytest.raises(DatasetError, match=r"^npz: '.*deflated.npz': x: .* that would expand to 4.0 GiB .*: a "
                                           r"decompression bomb or a forged directory"):
        load_dataset("npz", path)
    path = write_zip(tmp_path / "stored.npz", {"x.npy": npy(arrays["x"]), "y.npy": npy(arrays["y"])})
    forge_directory_size(path, "x.npy", 2**32 - 1)
    with pytest.raises(DatasetError, match=r"x: a stored member of 1,408 bytes that claims 4,294,967,295"):
        load_dataset("npz", path)


def test_a_decompression_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    """300 MiB of zeros deflate to 0.3 MiB (1000:1, within deflate's ceiling): refused as a bomb."""
    n = 300 * 2**20 // 64
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        info = zipfile.ZipInfo("x.npy")
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False,
                                                          "shape": (n, 8, 8)})
            for _ in range(75):
                member.write(bytes(4 * 2**20))
        archive.writestr("y.npy", npy(np.arange(4) % 2))
    assert path.stat().st_size < 2**20
    with pytest.raises(DatasetError, match=r"^npz: '.*bomb.npz': x: \d+.\d KiB that would expand to 300.0 MiB "
                                           r"\([\d,]+:1\): a decompression bomb"):
        load_dataset("npz", path)


def test_a_compressed_npz_loads_as_the_stored_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(15)
    arrays = {"x": rng.integers(0, 256, (60, 3, 8, 8), dtype=np.uint8), "y": np.arange(60) % 3}
    stored = load_dataset("npz", save_npz(tmp_path / "stored.npz", **arrays), seed=2)
    np.savez_compressed(tmp_path / "deflated.npz", **arrays)
    deflated = load_dataset("npz", tmp_path / "deflated.npz", seed=2)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(stored, field), getattr(deflated, field)), field
    # And zeros, which deflate 1000:1, are not a bomb while they are small.
    zeros = {"x": np.zeros((40, 8, 8), np.uint8), "y": np.arange(40) % 2}
    np.savez_compressed(tmp_path / "zeros.npz", **zeros)
    assert load_dataset("npz", tmp_path / "zeros.npz").x_train.sum() == 0


@pytest.mark.parametrize("side", [1, 2, 3])
def test_images_smaller_than_the_models_take_are_refused(tmp_path: Path, side: int) -> None:
    path = save_npz(tmp_path / "tiny.npz", x=np.zeros((20, side, side), np.uint8), y=np.arange(20) % 2)
    with pytest.raises(DatasetError, match=rf"^npz: '.*tiny.npz': x: images are {side}x{side} pixels; the smallest "
                                           r"side taken is 4 \(agr_optim.data.MIN_IMAGE_SIDE"):
        load_dataset("npz", path)


def labelled(tmp_path: Path, y: np.ndarray, **more: np.ndarray) -> Path:
    return save_npz(tmp_path / "labels.npz", x=np.zeros((len(y), 8, 8), np.uint8), y=y, **more)


def test_a_stray_label_of_3_000_000_is_refused_not_a_3_000_001_class_model(tmp_path: Path) -> None:
    y = np.arange(20) % 2
    y[7] = 3_000_000
    with pytest.raises(DatasetError, match=r"^npz: '.*labels.npz': y\[7\] = 3000000 would make 3,000,001 classes, "
                                           r"more than 100,000; fix the label$"):
        load_dataset("npz", labelled(tmp_path, y))
    y[7] = 2**40  # used to end in an allocation traceback when the model was built
    with pytest.raises(DatasetError, match=r"y\[7\] = 1099511627776 would make 1,099,511,627,777 classes"):
        load_dataset("npz", labelled(tmp_path, y))
    y = np.full(20, 2**64 - 1, dtype=np.uint64)  # was taken as -1 (cast to int64)
    y[::2] = 0
    with pytest.raises(DatasetError, match=r"y\[1\] = 18446744073709551615 would make"):
        load_dataset("npz", labelled(tmp_path, y))


def test_sparse_labels_are_refused_saying_how_to_declare_the_count(tmp_path: Path) -> None:
    y = np.where(np.arange(20) % 2 == 0, 0, 500)
    with pytest.raises(DatasetError, match=(
        r"^npz: '.*labels.npz': the labels of y are sparse: 2 of the classes 0..500 appear \(the first missing is "
        r"1\), so their count cannot be inferred; declare the class count: a key num_classes in the file, or "
        r"load_dataset\(num_classes=\) \(agr-train --num-classes\)$"
    )):
        load_dataset("npz", labelled(tmp_path, y))
    # Declared, in the file or as the keyword, the count is taken; labels beyond it are refused.
    assert load_dataset("npz", labelled(tmp_path, y), num_classes=501).num_classes == 501
    assert load_dataset("npz", labelled(tmp_path, y, num_classes=np.array(600))).num_classes == 600
    with pytest.raises(DatasetError, match=r"y\[1\] = 500 is outside \[0, 400\) \(num_classes=400\)"):
        load_dataset("npz", labelled(tmp_path, y), num_classes=400)
    with pytest.raises(DatasetError, match=r"y\[1\] = 500 is outside \[0, 10\) \(the file's num_classes = 10\)"):
        load_dataset("npz", labelled(tmp_path, y, num_classes=np.array([10])))


def test_a_declared_count_above_the_labels_gives_that_many_classes(tmp_path: Path) -> None:
    y = np.arange(20) % 4
    data = load_dataset("npz", labelled(tmp_path, y), num_classes=7)
    assert data.num_classes == 7
    assert sorted(torch.cat([data.y_train, data.y_test]).tolist()) == sorted(y.tolist())
    assert load_dataset("npz", labelled(tmp_path, y)).num_classes == 4  # dense: inferred as before


@pytest.mark.parametrize(
    "value, keyword, message",
    [
        (np.array(1), None, r"num_classes is 1; expected an integer in \[2, 100,000\]"),
        (np.array(100_001), None, r"num_classes is 100001; expected an integer in \[2, 100,000\]"),
        (np.array(10.0), None, r"num_classes must be one integer \(np.savez\(..., num_classes=10\)\), got float64"),
        (np.array([4, 5]), None, r"num_classes must be one integer"),
        (np.array(True), None, r"num_classes must be one integer"),
        (np.array(10), 12, r"num_classes=12 disagrees with the file's num_classes \(10\); drop one"),
    ],
)
def test_the_files_num_classes_is_checked(tmp_path: Path, value: np.ndarray, keyword: int | None,
                                          message: str) -> None:
    with pytest.raises(DatasetError, match=r"^npz: '.*labels.npz': " + message):
        load_dataset("npz", labelled(tmp_path, np.arange(20) % 4, num_classes=value), num_classes=keyword)


def test_test_labels_outside_the_train_classes_are_refused(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "split.npz", x=np.zeros((8, 8, 8), np.uint8), y=np.arange(8) % 4,
                    x_test=np.zeros((3, 8, 8), np.uint8), y_test=np.array([0, 4, 1]))
    with pytest.raises(DatasetError, match=r"y_test\[1\] = 4 is outside \[0, 4\) \(y has the classes 0..3\)"):
        load_dataset("npz", path)
    assert load_dataset("npz", path, num_classes=5).num_classes == 5


@pytest.mark.parametrize(
    "y, message",
    [
        (np.array([0, 1, 0, -3] * 5), r"y: labels must be >= 0, got y\[3\] = -3"),
        (np.array([0.0, 1.0, np.nan, 1.0] * 5), r"y must be 20 integer labels .* got float64 array"),
        (np.array([0.5, 1.0, 0.0, 1.0] * 5), r"y must be 20 integer labels .* got float64 array"),
        (np.array([True, False] * 10), r"y must be 20 integer labels .* got bool array"),
        (np.array(["0", "1"] * 10), r"y must be 20 integer labels .* got <U1 array"),
    ],
)
def test_labels_that_are_not_class_indices_are_refused(tmp_path: Path, y: np.ndarray, message: str) -> None:
    with pytest.raises(DatasetError, match=r"^npz: '.*labels.npz': " + message):
        load_dataset("npz", labelled(tmp_path, y))


def test_archives_numpy_does_not_write_are_read_or_refused_plainly(tmp_path: Path) -> None:
    arrays = valid_arrays()
    members = {"x.npy": npy(arrays["x"]), "y.npy": npy(arrays["y"])}
    bzip2 = load_dataset("npz", write_zip(tmp_path / "bzip2.npz", members, zipfile.ZIP_BZIP2))
    assert torch.equal(bzip2.x_train, load_dataset("npz", write_zip(tmp_path / "plain.npz", members)).x_train)
    path = write_zip(tmp_path / "raw.npz", {"x.npy": arrays["x"].tobytes(), "y.npy": npy(arrays["y"])})
    with pytest.raises(DatasetError, match=r"^npz: cannot read the arrays of '.*raw.npz': x: "):
        load_dataset("npz", path)  # a member without the .npy header: numpy.load returned bytes
