"""agr_optim.data.dataset: the Dataset record, load_dataset's arguments, resizing, the old module path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agr_optim.data import DATASETS, Dataset, DatasetError, load_dataset


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



def test_the_old_module_path_has_the_same_names() -> None:
    import agr_optim.data
    import agr_optim.datasets

    assert agr_optim.datasets.__all__ == ["DATASETS", "Dataset", "DatasetError", "augment", "authors_cutout",
                                          "batches", "cutout", "load_dataset", "random_crop", "random_flip"]
    for name in agr_optim.datasets.__all__:
        assert getattr(agr_optim.datasets, name) is getattr(agr_optim.data, name), name
    assert set(agr_optim.datasets.__all__) <= set(agr_optim.data.__all__)
    assert all(hasattr(agr_optim.data, name) for name in agr_optim.data.__all__)


@pytest.mark.parametrize("bad", [True, 1, 0, -3, 100_001, 10.0, "10"])
def test_num_classes_is_checked_before_anything_is_read(bad: object) -> None:
    with pytest.raises(DatasetError, match=r"^digits: num_classes must be None or an integer in \[2, 100,000\], got "):
        load_dataset("digits", num_classes=bad)  # type: ignore[arg-type]


def test_a_declared_count_must_match_a_fixed_dataset(tmp_path: Path) -> None:
    assert load_dataset("digits", num_classes=10).num_classes == 10
    with pytest.raises(DatasetError, match=r"^digits: num_classes=12 disagrees with the dataset's 10 classes; pass 10 "
                                           r"or leave it out$"):
        load_dataset("digits", num_classes=12)
    with pytest.raises(DatasetError, match=r"^mnist5k: num_classes=9 disagrees with the dataset's 10 classes"):
        load_dataset("mnist5k", num_classes=9)
    # Before the folder is looked at: nothing to read for a count that cannot be right.
    with pytest.raises(DatasetError, match=r"^cifar100: num_classes=10 disagrees with the dataset's 100 classes"):
        load_dataset("cifar100", tmp_path / "nowhere", num_classes=10)


def test_image_size_is_at_least_the_smallest_side() -> None:
    with pytest.raises(DatasetError, match=r"^digits: image_size must be None or an integer >= 4, got 3$"):
        load_dataset("digits", image_size=3)
    assert load_dataset("digits", image_size=4).image_size == 4
