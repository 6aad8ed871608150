"""Hand-written AGR training for the integration tests: both gradients from autograd on the whole
batch, AGR in float64 numpy (``_asserts.reference_agr``), SGD with momentum written out."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from _asserts import reference_agr
from torch import nn


def reference_sgd_training(
    make_model: Callable[[], nn.Module],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    momentum: float,
    clip_norm: float | None,
    segments: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Parameters after AGR + SGD(momentum) over ``(x, x_adv, y)`` batches, MSE loss."""
    model = make_model()
    params = list(model.parameters())
    segments = list(range(len(params))) if segments is None else list(segments)
    buffers: list[np.ndarray | None] = [None] * len(params)
    for x, x_adv, y in batches:
        clean = torch.autograd.grad(F.mse_loss(model(x), y), params)
        adversarial = torch.autograd.grad(F.mse_loss(model(x_adv), y), params)
        r, _ = reference_agr(adversarial, clean, clip_norm=clip_norm, segments=segments)
        with torch.no_grad():
            for i, p in enumerate(params):
                buffers[i] = r[i] if buffers[i] is None else momentum * buffers[i] + r[i]
                p -= torch.from_numpy(lr * buffers[i]).to(p.dtype)
    return [p.detach().clone() for p in params]
