"""The seeded stratified train/test split of the sets that have no test set of their own."""

from __future__ import annotations

import numpy as np

from .dataset import DatasetError


def stratified_split(name: str, y: np.ndarray, seed: int, test_size: float | int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded stratified train/test split (scikit-learn's ``train_test_split``).

    ``test_size``: a fraction of the images or a count, as ``train_test_split`` takes it.
    """
    try:
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DatasetError(f"{name}: the train/test split needs scikit-learn: pip install scikit-learn") from None
    try:
        train, test = train_test_split(np.arange(len(y)), test_size=test_size, random_state=seed, stratify=y)
    except ValueError as error:  # e.g. a class with a single image cannot be stratified
        raise DatasetError(f"{name}: cannot split {len(y)} images into train and test: {error}") from None
    return train, test
