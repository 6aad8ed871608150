r"""Adversarial weight perturbation (Wu et al., NeurIPS 2020), as the AWP and AGR code computes it.

For every weight matrix or kernel :math:`w` (parameters with more than one dimension; biases and
norm scales are left alone), with :math:`g = \nabla_w \mathrm{CE}(f_w(x'), y)` on the adversarial
batch,

.. math::

    v = \gamma\, \lVert w\rVert \frac{g}{\lVert g\rVert},

one normalised ascent step of the AWP proxy optimizer, rescaled layer-wise to :math:`\gamma` times
the weight's norm. The adversarial pass then runs at :math:`w + v`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["weight_perturbation", "perturbed_weights"]

_EPS = 1e-20  # the AWP code's guard against a zero gradient


def weight_perturbation(model: nn.Module, x_adv: Tensor, y: Tensor, *, gamma: float = 5e-3) -> dict[Tensor, Tensor]:
    r"""The AWP perturbation :math:`v` of each weight (parameters with ``dim() > 1``).

    Computed with ``torch.autograd.grad``, so ``.grad`` is untouched, and with the model's
    buffers (batch-norm running statistics) restored afterwards: the AWP code runs this forward
    pass on a throwaway proxy copy of the model. Returns ``{parameter: perturbation}``.
    """
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"Invalid gamma: {gamma!r}; expected a finite number >= 0")
    weights = [p for p in model.parameters() if p.dim() > 1 and p.requires_grad]
    if not weights:
        return {}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv), y)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    perturbation: dict[Tensor, Tensor] = {}
    with torch.no_grad():
        for w, g in zip(weights, grads, strict=True):
            if g is not None:
                perturbation[w] = g * (gamma * w.norm() / (g.norm() + _EPS))
    return perturbation


@contextlib.contextmanager
def perturbed_weights(perturbation: dict[Tensor, Tensor]) -> Iterator[None]:
    """Add each perturbation to its parameter inside the block; restore the exact weights after.

    The weights are copied back (not ``w + v - v``, which rounds), also when the block raises.
    The parameters' ``.grad`` are left as the block made them.
    """
    saved = [(p, p.detach().clone()) for p in perturbation]
    try:
        with torch.no_grad():
            for p, v in perturbation.items():
                p.add_(v)
        yield
    finally:
        with torch.no_grad():
            for p, w in saved:
                p.copy_(w)
