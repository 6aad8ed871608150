r"""One training step per adversarial-training method, with the two-gradient dance of AGR.

Every step function has the same shape: attack the batch, then

1. if ``optimizer`` is an :class:`~agr_optim.AGROptimizer` and :attr:`~agr_optim.AGROptimizer.active`:
   backward the *clean objective* (cross-entropy on the natural inputs) and
   :meth:`~agr_optim.AGROptimizer.stash_clean`;
2. backward the method's *adversarial objective*;
3. ``optimizer.step()``.

During AGR's warm start, or with a plain ``torch.optim`` optimizer, step 1 is skipped and the
step is exactly the plain method (no extra forward pass is paid).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from .._optimizer import AGROptimizer
from ._attacks import PGD, Attack
from ._awp import perturbed_weights, weight_perturbation
from ._losses import mart_loss, trades_loss

__all__ = ["StepOutput", "pgd_at_step", "trades_step", "mart_step", "awp_step"]


class StepOutput(NamedTuple):
    """What a step function returns (tensors detached from the graph)."""

    #: The adversarial objective that was minimised (a scalar).
    loss: Tensor
    #: The clean cross-entropy, or ``None`` when no clean gradient was needed (AGR inactive).
    clean_loss: Tensor | None
    #: The adversarial inputs the attack produced.
    x_adv: Tensor


def _wants_clean(optimizer: Optimizer) -> bool:
    return isinstance(optimizer, AGROptimizer) and optimizer.active


def _clean_pass(
    model: nn.Module, optimizer: Optimizer, x: Tensor, y: Tensor, logits_clean: Tensor | None = None
) -> Tensor | None:
    """``zero_grad``; with an active AGR optimizer also the clean backward and the stash.

    Returns the clean cross-entropy (detached), or ``None`` when no clean gradient is needed.
    ``logits_clean``, if given, is reused (and its graph kept for the adversarial objective).
    """
    optimizer.zero_grad()
    if not _wants_clean(optimizer):
        return None
    clean_loss = F.cross_entropy(model(x) if logits_clean is None else logits_clean, y)
    clean_loss.backward(retain_graph=logits_clean is not None)
    optimizer.stash_clean()  # type: ignore[attr-defined]
    return clean_loss.detach()


def _check_beta(beta: float) -> None:
    if not isinstance(beta, numbers.Real) or isinstance(beta, bool) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"Invalid beta: {beta!r}; expected a finite number >= 0")


def pgd_at_step(
    model: nn.Module, optimizer: Optimizer, x: Tensor, y: Tensor, *, attack: Attack | None = None
) -> StepOutput:
    r"""One step of PGD adversarial training (Madry et al., *Towards Deep Learning Models Resistant
    to Adversarial Attacks*, ICLR 2018).

    Clean objective :math:`\mathrm{CE}(f(x), y)`; adversarial objective :math:`\mathrm{CE}(f(x'), y)`
    with :math:`x' = \mathrm{attack}(f, x, y)` (default :class:`PGD` with eps 8/255, step 2/255,
    10 steps, cross-entropy).

    Example:
        >>> import torch
        >>> from agr_optim import AGROptimizer
        >>> from agr_optim.recipes import PGD, pgd_at_step
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> x, y = torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
        >>> out = pgd_at_step(model, opt, x, y, attack=PGD(eps=0.1, alpha=0.025, steps=3))
        >>> opt.step_count, out.clean_loss is not None
        (1, True)
    """
    attack = PGD() if attack is None else attack
    x_adv = attack(model, x, y)
    clean_loss = _clean_pass(model, optimizer, x, y)
    loss = F.cross_entropy(model(x_adv), y)
    loss.backward()
    optimizer.step()
    return StepOutput(loss.detach(), clean_loss, x_adv)


def trades_step(
    model: nn.Module,
    optimizer: Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    beta: float = 6.0,
    attack: Attack | None = None,
) -> StepOutput:
    r"""One step of TRADES (Zhang et al., *Theoretically Principled Trade-off between Robustness
    and Accuracy*, ICML 2019).

    Clean objective :math:`\mathrm{CE}(f(x), y)`; adversarial objective
    :func:`trades_loss` :math:`= \mathrm{CE}(f(x), y) + \beta\,\mathrm{KL}(p(x)\Vert p(x'))`, as the
    AGR code uses for TRADES. The default attack maximises the KL term
    (``PGD(loss="kl", random_start="normal")``, as the TRADES code does). With AGR the clean
    logits are computed once and shared by both objectives.
    """
    _check_beta(beta)
    attack = PGD(loss="kl", random_start="normal") if attack is None else attack
    x_adv = attack(model, x, y)
    return _regularised_step(model, optimizer, x, x_adv, y, lambda lc, la: trades_loss(lc, la, y, beta=beta))


def mart_step(
    model: nn.Module,
    optimizer: Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    beta: float = 6.0,
    attack: Attack | None = None,
) -> StepOutput:
    r"""One step of MART (Wang et al., *Improving Adversarial Robustness Requires Revisiting
    Misclassified Examples*, ICLR 2020).

    Clean objective :math:`\mathrm{CE}(f(x), y)`; adversarial objective :func:`mart_loss`
    (boosted cross-entropy on :math:`x'` plus :math:`\beta` times the KL weighted by
    :math:`1 - p_y(x)`). Default attack: :class:`PGD` on the cross-entropy, as in the MART code.
    """
    _check_beta(beta)
    attack = PGD() if attack is None else attack
    x_adv = attack(model, x, y)
    return _regularised_step(model, optimizer, x, x_adv, y, lambda lc, la: mart_loss(lc, la, y, beta=beta))


def _regularised_step(
    model: nn.Module,
    optimizer: Optimizer,
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    objective: Callable[[Tensor, Tensor], Tensor],
) -> StepOutput:
    """The step of an objective of the clean and the adversarial logits (TRADES, MART)."""
    logits_clean = model(x)
    clean_loss = _clean_pass(model, optimizer, x, y, logits_clean)
    loss = objective(logits_clean, model(x_adv))
    loss.backward()
    optimizer.step()
    return StepOutput(loss.detach(), clean_loss, x_adv)


def awp_step(
    model: nn.Module,
    optimizer: Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    gamma: float = 5e-3,
    attack: Attack | None = None,
) -> StepOutput:
    r"""One step of PGD-AT with adversarial weight perturbation (Wu et al., *Adversarial Weight
    Perturbation Helps Robust Generalization*, NeurIPS 2020).

    Clean objective :math:`\mathrm{CE}(f_w(x), y)` at the current weights :math:`w`;
    adversarial objective :math:`\mathrm{CE}(f_{w+v}(x'), y)` at the perturbed weights, with
    :math:`v` from :func:`weight_perturbation` (:math:`\gamma = 5\cdot10^{-3}` as in the AWP paper;
    the AGR code uses 0.01). The perturbation is removed, by copying the saved weights back,
    *before* ``optimizer.step()``, so the update is applied to :math:`w` exactly (the AWP code
    subtracts :math:`v` after the step; for plain SGD that is the same update up to rounding,
    but weight decay would act on :math:`w + v`).
    """
    attack = PGD() if attack is None else attack
    x_adv = attack(model, x, y)
    clean_loss = _clean_pass(model, optimizer, x, y)
    perturbation = weight_perturbation(model, x_adv, y, gamma=gamma)
    with perturbed_weights(perturbation):
        loss = F.cross_entropy(model(x_adv), y)
        loss.backward()
    optimizer.step()
    return StepOutput(loss.detach(), clean_loss, x_adv)
