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


#: The AGR code's ``--lr_proxy`` default: the step of its proxy optimizer. It cancels in the
#: normalised perturbation and matters to rounding only.
AUTHORS_PROXY_LR = 0.01


def weight_perturbation_authors(
    model: nn.Module, x_adv: Tensor, y: Tensor, *, gamma: float
) -> list[tuple[Tensor, Tensor]]:
    r"""The perturbation of ``awp.py`` of RUIYUN-ML/AGR, operation for operation, for ``awp_step(authors=True)``.

    Their ``calc_awp`` copies the model into a proxy, takes one SGD step of the proxy (learning
    rate :data:`AUTHORS_PROXY_LR`) on :math:`-\mathrm{CE}(f(x'), y)` in train mode, and
    ``diff_in_weights`` turns the move :math:`d = (w + \eta g) - w` of every state-dict entry
    with more than one dimension and ``"weight"`` in its name into
    :math:`\lVert w\rVert / (\lVert d\rVert + 10^{-20})\, d`; ``perturb`` adds :math:`\gamma`
    times that. The same :math:`v` as :func:`weight_perturbation` up to rounding (and the
    :math:`10^{-20}`, which guards :math:`\lVert d\rVert` here), for parameters named ``*weight*``.
    Here the proxy's gradient is the model's own (``torch.autograd.grad``, ``.grad`` untouched),
    with copies of its buffers for the forward pass to update (the proxy's), so the model's are
    not written to: a graph already built on them (the clean pass) stays valid.
    Returns ``[(parameter, v)]``.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    proxy_buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    with torch.enable_grad():
        loss = -F.cross_entropy(torch.func.functional_call(model, proxy_buffers, (x_adv,), strict=False), y)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    perturbation: list[tuple[Tensor, Tensor]] = []
    with torch.no_grad():
        for (name, w), g in zip(named, grads, strict=True):
            if w.dim() <= 1 or "weight" not in name or g is None:
                continue  # the proxy's SGD skips a None gradient: d = 0, so v = 0
            old = w.detach()
            new = old.clone().add_(g, alpha=-AUTHORS_PROXY_LR)  # torch.optim.SGD's param.add_(grad, alpha=-lr)
            d = new - old
            perturbation.append((w, gamma * (old.norm() / (d.norm() + _EPS) * d)))
    return perturbation
