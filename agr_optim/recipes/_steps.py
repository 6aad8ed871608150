r"""One training step per adversarial-training method, with the two-gradient dance of AGR.

Every step function has the same shape: attack the batch, then

1. the *clean pass*: if ``optimizer`` is an :class:`~agr_optim.AGROptimizer` and
   :attr:`~agr_optim.AGROptimizer.active`, backward the *clean objective* (cross-entropy on the
   natural inputs) and :meth:`~agr_optim.AGROptimizer.stash_clean`;
2. backward the method's *adversarial objective*;
3. ``optimizer.step()`` (``scaler.step(optimizer)`` and ``scaler.update()`` with a
   :class:`torch.amp.GradScaler`).

``clean_pass`` says when the clean forward pass runs:

- ``"needed"`` (the default): only when AGR needs the clean gradient. During AGR's warm start,
  or with a plain ``torch.optim`` optimizer, the step is exactly the plain method and costs what
  the plain method costs.
- ``"always"``: the AGR authors' order (``train.py`` of RUIYUN-ML/AGR). The clean batch goes
  through the model in train mode on *every* step, AGR or not, so BatchNorm's running statistics
  are updated with the clean batch, then the adversarial one, in every arm and every epoch. When
  the clean gradient is not needed (plain optimizer, warm start) no clean backward is run: the
  authors compute that gradient and throw it away (plain arm: ``zero_grad`` before the
  adversarial backward; AGR arm before its start epoch: only its statistics are logged), so the
  update is the same.
- ``"gradient"``: as ``"always"``, and with an :class:`~agr_optim.AGROptimizer` the clean
  gradient is also taken and stashed during its warm start, as the AGR authors' AGR arm does: the
  warm-start step then fills :attr:`~agr_optim.AGROptimizer.last_stats` (the statistics AGR would
  have had, for logging) and still applies the adversarial gradient alone. It costs the clean
  backward pass of every warm-start step.

TRADES and MART compute the clean logits for their objective anyway, so for them ``"needed"``
and ``"always"`` give the same step.

``authors=True`` runs the AGR authors' published step (the body of the training loop of their
``train.py``, with ``attack.py``, ``mart.py`` and ``awp.py``) with its quirks, for comparisons with
the paper's tables; the default is this library's step, which fixes them. Each step's docstring
lists its departures; ``docs/reproducing.rst`` measures them. In short: their PGD does not clamp
its iterates to [0, 1] (:class:`PGD` ``authors=True``, the default attack then); the clean forward
pass runs on every step (``clean_pass`` defaults to ``"gradient"``, their AGR arm; ``"always"``
is accepted, ``"needed"`` refused); MART and AVmixup run the extra train-mode forward passes that
move BatchNorm's running statistics; AWP takes the clean gradient with the weights already
perturbed, steps at the perturbed weights (weight decay acting on them) and subtracts the
perturbation afterwards. What the authors log is in :class:`StepOutput`: their training loss is
the last batch's ``loss`` and ``clean_loss`` (not an epoch mean), their training accuracy the
argmax of ``logits_adv``. With the same weights, batches and random draws the step is theirs bit
for bit without AGR and in AGR's warm start, and within rounding with AGR on (the reconstruction
is computed in another order), as ``tests/test_authors_step.py`` checks against an independent
re-implementation of their code.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from .._optimizer import AGROptimizer
from ._attacks import PGD, Attack, resolve_attack
from ._awp import perturbed_weights, weight_perturbation, weight_perturbation_authors
from ._losses import mart_loss, mart_loss_authors, trades_loss
from ._sharding import per_example

__all__ = ["StepOutput", "CLEAN_PASSES", "pgd_at_step", "trades_step", "mart_step", "awp_step", "avmixup_step"]

#: The values of ``clean_pass``: see the module docstring (``None``: ``"needed"``, or
#: ``"gradient"`` with ``authors=True``).
CLEAN_PASSES = ("needed", "always", "gradient")


class StepOutput(NamedTuple):
    """What a step function returns (tensors detached from the graph)."""

    #: The adversarial objective that was minimised (a scalar): the authors' ``loss_train_adv``.
    loss: Tensor
    #: The clean cross-entropy (the authors' ``loss_train_clean``), or ``None`` with
    #: ``clean_pass="needed"`` when no clean gradient was taken (AGR inactive or a plain optimizer).
    clean_loss: Tensor | None
    #: The adversarial inputs the attack produced.
    x_adv: Tensor
    #: The logits of the adversarial objective's forward pass, for the training accuracy: on
    #: ``x_adv`` (at the perturbed weights for AWP); for AVmixup on the mixed inputs it trains on.
    logits: Tensor
    #: The logits of the train-mode forward pass on ``x_adv`` that the authors count their
    #: training accuracy on (``output_adv``): ``logits`` itself, except for MART with
    #: ``authors=True`` (their separate pass, equal in value) and AVmixup (their extra pass with
    #: ``authors=True``; ``None`` in the default step, which does not run it).
    logits_adv: Tensor | None = None


def _wants_clean(optimizer: Optimizer, clean_pass: str) -> bool:
    return isinstance(optimizer, AGROptimizer) and (optimizer.active or clean_pass == "gradient")


def _check_options(clean_pass: object, scaler: object, authors: object = False) -> str:
    """Validate the common options; return ``clean_pass`` resolved (``None``: by ``authors``)."""
    if not isinstance(authors, bool):
        raise TypeError(f"authors must be True or False, got {authors!r}")
    if clean_pass is None:
        clean_pass = "gradient" if authors else "needed"
    if clean_pass not in CLEAN_PASSES:
        raise ValueError(f"Invalid clean_pass: {clean_pass!r}; expected None or one of {CLEAN_PASSES}")
    if authors and clean_pass == "needed":
        raise ValueError(
            "clean_pass='needed' skips the clean forward pass that the authors' step runs on every step; "
            "with authors=True pass clean_pass='gradient' (their AGR arm, the default) or 'always'"
        )
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    return clean_pass  # type: ignore[return-value]


def _attack_for(attack: Attack | None, model: nn.Module, authors: bool, default: Callable[[], PGD]) -> Attack:
    """The given attack (adapted), else the method's default: with ``authors=True`` their PGD."""
    if attack is not None:
        return resolve_attack(attack, model)
    return PGD(authors=True) if authors else default()


def _backward(loss: Tensor, scaler: torch.amp.GradScaler | None, *, retain_graph: bool = False) -> None:
    (loss if scaler is None else scaler.scale(loss)).backward(retain_graph=retain_graph)


def _optimizer_step(optimizer: Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is None:
        optimizer.step()
    else:
        # AGROptimizer sets _step_supports_amp_scaling: both gradients are unscaled in its step.
        scaler.step(optimizer)
        scaler.update()


def _clean_pass(
    model: nn.Module,
    optimizer: Optimizer,
    x: Tensor,
    y: Tensor,
    clean_pass: str,
    scaler: torch.amp.GradScaler | None,
    logits_clean: Tensor | None = None,
) -> Tensor | None:
    """``zero_grad``; the clean forward if ``clean_pass`` asks for it; with an active AGR
    optimizer the clean backward and the stash.

    Returns the clean cross-entropy (detached), or ``None`` when no clean forward ran.
    ``logits_clean``, if given, is reused (and its graph kept for the adversarial objective).
    """
    optimizer.zero_grad()
    if not _wants_clean(optimizer, clean_pass):
        if clean_pass == "needed":
            return None
        if logits_clean is not None:
            return F.cross_entropy(logits_clean.detach(), y)
        with torch.no_grad():  # the forward pass for BatchNorm's statistics; no gradient is needed
            return F.cross_entropy(model(x), y)
    retain = logits_clean is not None
    clean_loss = F.cross_entropy(model(x) if logits_clean is None else logits_clean, y)
    _backward(clean_loss, scaler, retain_graph=retain)
    optimizer.stash_clean()  # type: ignore[attr-defined]
    return clean_loss.detach()


def _check_beta(beta: float) -> None:
    if not isinstance(beta, numbers.Real) or isinstance(beta, bool) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"Invalid beta: {beta!r}; expected a finite number >= 0")


def _finish(
    optimizer: Optimizer,
    scaler: torch.amp.GradScaler | None,
    loss: Tensor,
    clean_loss: Tensor | None,
    x_adv: Tensor,
    logits: Tensor,
) -> StepOutput:
    _backward(loss, scaler)
    _optimizer_step(optimizer, scaler)
    logits = logits.detach()
    return StepOutput(loss=loss.detach(), clean_loss=clean_loss, x_adv=x_adv, logits=logits, logits_adv=logits)


# ---------------------------------------------------------------------- the authors' step
def _authors_clean(model: nn.Module, optimizer: Optimizer, x: Tensor, y: Tensor, clean_pass: str) -> Tensor:
    """``zero_grad`` and their ``outputs = Model(imgs)``: the clean forward pass of every step, with
    its graph when the clean gradient is taken. Returns the clean cross-entropy."""
    optimizer.zero_grad()
    with torch.set_grad_enabled(_wants_clean(optimizer, clean_pass)):
        return F.cross_entropy(model(x), y)


def _authors_update(
    optimizer: Optimizer, scaler: torch.amp.GradScaler | None, clean_pass: str, clean_loss: Tensor, loss: Tensor
) -> None:
    """Their two arms, then the step: AGR (``AGR.get_gradient`` of both losses; here
    :meth:`~agr_optim.AGROptimizer.backward`), or ``optim.zero_grad(); loss_train_adv.backward()``."""
    if _wants_clean(optimizer, clean_pass):
        scale = (lambda t: t) if scaler is None else scaler.scale
        optimizer.backward(clean=scale(clean_loss), adversarial=scale(loss))  # type: ignore[attr-defined]
    else:
        _backward(loss, scaler)
    _optimizer_step(optimizer, scaler)


def _authors_output(loss: Tensor, clean_loss: Tensor, x_adv: Tensor, logits: Tensor, logits_adv: Tensor) -> StepOutput:
    return StepOutput(
        loss=loss.detach(), clean_loss=clean_loss.detach(), x_adv=x_adv, logits=logits.detach(),
        logits_adv=logits_adv.detach(),
    )


def pgd_at_step(
    model: nn.Module,
    optimizer: Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    attack: Attack | None = None,
    clean_pass: str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    authors: bool = False,
) -> StepOutput:
    r"""One step of PGD adversarial training (Madry et al., *Towards Deep Learning Models Resistant
    to Adversarial Attacks*, ICLR 2018).

    Clean objective :math:`\mathrm{CE}(f(x), y)`; adversarial objective :math:`\mathrm{CE}(f(x'), y)`
    with :math:`x' = \mathrm{attack}(f, x, y)` (default :class:`PGD` with eps 8/255, step 2/255,
    10 steps, cross-entropy). ``clean_pass``: ``"needed"`` (the default), ``"always"`` (the AGR
    authors' order) or ``"gradient"`` (see :mod:`agr_optim.recipes`); ``scaler``: a
    :class:`torch.amp.GradScaler` for float16.

    ``authors=True``, the AGR authors' step: the default attack is ``PGD(authors=True)``, whose
    iterates are not clamped to [0, 1], and ``clean_pass`` defaults to ``"gradient"`` (the clean
    forward pass on every step; the clean gradient whenever the optimizer is an
    :class:`~agr_optim.AGROptimizer`, as in their AGR arm). Nothing else differs: their PGD-AT
    step is this one with that attack.

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
    clean_pass = _check_options(clean_pass, scaler, authors)
    attack = _attack_for(attack, model, authors, PGD)
    x_adv = attack(model, x, y)
    clean_loss = _clean_pass(model, optimizer, x, y, clean_pass, scaler)
    logits = model(x_adv)
    return _finish(optimizer, scaler, F.cross_entropy(logits, y), clean_loss, x_adv, logits)


def trades_step(
    model: nn.Module,
    optimizer: Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    beta: float = 6.0,
    attack: Attack | None = None,
    clean_pass: str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    authors: bool = False,
) -> StepOutput:
    r"""One step of TRADES (Zhang et al., *Theoretically Principled Trade-off between Robustness
    and Accuracy*, ICML 2019).

    Clean objective :math:`\mathrm{CE}(f(x), y)`; adversarial objective
    :func:`trades_loss` :math:`= \mathrm{CE}(f(x), y) + \beta\,\mathrm{KL}(p(x)\Vert p(x'))`, as the
    AGR code uses for TRADES. The default attack maximises the KL term
    (``PGD(loss="kl", random_start="normal")``, as the TRADES code does). The AGR authors attack
    with the cross-entropy PGD of their other methods instead: pass ``attack=PGD()`` (``agr-train
    --preset paper`` does). The clean logits are computed once and shared by both objectives, so
    ``clean_pass`` changes nothing here (it is accepted for a uniform signature).

    ``authors=True``, the AGR authors' step: the default attack is ``PGD(authors=True)`` (their
    cross-entropy PGD, iterates not clamped to [0, 1]); their objective
    ``6*kl_div(output_adv, outputs) + loss_fc(outputs, targets)`` is :func:`trades_loss` bit for
    bit. Nothing else differs.
    """
    _check_beta(beta)
    clean_pass = _check_options(clean_pass, scaler, authors)
    attack = _attack_for(attack, model, authors, lambda: PGD(loss="kl", random_start="normal"))
    x_adv = attack(model, x, y)
    objective = lambda lc, la: trades_loss(lc, la, y, beta=beta)
    return _regularised_step(model, optimizer, x, x_adv, y, objective, clean_pass, scaler)


def mart_step(
    model: nn.Module,
    optimizer: Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    beta: float = 6.0,
    attack: Attack | None = None,
    clean_pass: str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    authors: bool = False,
) -> StepOutput:
    r"""One step of MART (Wang et al., *Improving Adversarial Robustness Requires Revisiting
    Misclassified Examples*, ICLR 2020).

    Clean objective :math:`\mathrm{CE}(f(x), y)`; adversarial objective :func:`mart_loss`
    (boosted cross-entropy on :math:`x'` plus :math:`\beta` times the KL weighted by
    :math:`1 - p_y(x)`). Default attack: :class:`PGD` on the cross-entropy, as in the MART code.
    The clean logits are shared by both objectives, so ``clean_pass`` changes nothing here (the
    AGR code runs two more forward passes, clean and adversarial, inside its MART loss; here each
    batch goes through BatchNorm once).

    ``authors=True``, the AGR authors' step: the default attack is ``PGD(authors=True)``
    (iterates not clamped to [0, 1]), ``clean_pass`` defaults to ``"gradient"``, and the batches
    go through the model in train mode four times, as in their ``train.py``: the clean batch
    (``outputs``, the clean objective), the clean and the adversarial batch again inside their
    ``mart_loss`` (the MART objective's gradient flows through these two), and the adversarial
    batch once more (``output_adv``, only for their training accuracy: ``logits_adv``). The
    gradients are the same as the default step's; BatchNorm's running statistics see each batch
    twice (``num_batches_tracked`` grows by 4 per step), which changes the eval-mode model the
    next attack runs on. The loss is computed in their order (``(1/B) * sum``, then ``beta *``),
    equal to :func:`mart_loss` up to rounding.
    """
    _check_beta(beta)
    clean_pass = _check_options(clean_pass, scaler, authors)
    attack = _attack_for(attack, model, authors, PGD)
    x_adv = attack(model, x, y)
    if authors:
        clean_loss = _authors_clean(model, optimizer, x, y, clean_pass)
        logits_nat, logits = model(x), model(x_adv)  # inside their mart_loss: both batches again
        loss = mart_loss_authors(logits_nat, logits, y, beta=beta)
        with torch.no_grad():
            logits_adv = model(x_adv)  # their output_adv, for the training accuracy; BatchNorm sees x' again
        _authors_update(optimizer, scaler, clean_pass, clean_loss, loss)
        return _authors_output(loss, clean_loss, x_adv, logits, logits_adv)
    objective = lambda lc, la: mart_loss(lc, la, y, beta=beta)
    return _regularised_step(model, optimizer, x, x_adv, y, objective, clean_pass, scaler)


def _regularised_step(
    model: nn.Module,
    optimizer: Optimizer,
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    objective: Callable[[Tensor, Tensor], Tensor],
    clean_pass: str,
    scaler: torch.amp.GradScaler | None,
) -> StepOutput:
    """The step of an objective of the clean and the adversarial logits (TRADES, MART)."""
    logits_clean = model(x)
    clean_loss = _clean_pass(model, optimizer, x, y, clean_pass, scaler, logits_clean)
    logits = model(x_adv)
    return _finish(optimizer, scaler, objective(logits_clean, logits), clean_loss, x_adv, logits)


def awp_step(
    model: nn.Module,
    optimizer: Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    gamma: float = 5e-3,
    attack: Attack | None = None,
    clean_pass: str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    authors: bool = False,
) -> StepOutput:
    r"""One step of PGD-AT with adversarial weight perturbation (Wu et al., *Adversarial Weight
    Perturbation Helps Robust Generalization*, NeurIPS 2020).

    Clean objective :math:`\mathrm{CE}(f_w(x), y)` at the current weights :math:`w`;
    adversarial objective :math:`\mathrm{CE}(f_{w+v}(x'), y)` at the perturbed weights, with
    :math:`v` from :func:`weight_perturbation` (:math:`\gamma = 5\cdot10^{-3}`, the AWP paper's
    value for AT-AWP; the AGR code uses 0.01, which ``agr-train --preset paper`` uses). The
    perturbation is removed, by copying the saved weights back, *before* ``optimizer.step()``, so
    the update is applied to :math:`w` exactly (the AWP code subtracts :math:`v` after the step;
    for plain SGD that is the same update up to rounding, but weight decay would act on
    :math:`w + v`). The clean gradient is taken at :math:`w` (the AGR code backpropagates its
    clean loss after perturbing the weights in place, so part of its clean gradient is computed
    with :math:`w + v`).

    ``authors=True``, the AGR authors' step (``train.py`` with ``awp.py``): the default attack is
    ``PGD(authors=True)`` (iterates not clamped to [0, 1]), ``clean_pass`` defaults to
    ``"gradient"``, and their order is kept:

    1. the clean forward pass at :math:`w`;
    2. :math:`v` by their proxy model and optimizer (``weight_perturbation_authors`` in
       ``recipes/_awp.py``: :func:`weight_perturbation`'s :math:`v` up to rounding, for the
       parameters whose name contains ``weight``), added in place through
       ``param.data`` (no autograd version bump);
    3. the adversarial forward pass at :math:`w + v`;
    4. the clean and the adversarial backward passes (AGR arm) or the adversarial one: the clean
       backward pass multiplies by the weights as they are now, :math:`w + v`, while its
       activations were computed at :math:`w`, so their clean gradient is a mix of both;
    5. ``optimizer.step()`` at :math:`w + v` (weight decay acts on :math:`w + v`, and enters the
       momentum buffer so);
    6. :math:`v` subtracted (``w + v - update - v`` rounds: the weights are not restored exactly).
    """
    _check_gamma(gamma)
    clean_pass = _check_options(clean_pass, scaler, authors)
    attack = _attack_for(attack, model, authors, PGD)
    x_adv = attack(model, x, y)
    if authors:
        return _awp_authors(model, optimizer, x, x_adv, y, gamma, clean_pass, scaler)
    clean_loss = _clean_pass(model, optimizer, x, y, clean_pass, scaler)
    perturbation = weight_perturbation(model, x_adv, y, gamma=gamma)
    with perturbed_weights(perturbation):
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        _backward(loss, scaler)
    _optimizer_step(optimizer, scaler)
    logits = logits.detach()
    return StepOutput(loss=loss.detach(), clean_loss=clean_loss, x_adv=x_adv, logits=logits, logits_adv=logits)


def _awp_authors(
    model: nn.Module,
    optimizer: Optimizer,
    x: Tensor,
    x_adv: Tensor,
    y: Tensor,
    gamma: float,
    clean_pass: str,
    scaler: torch.amp.GradScaler | None,
) -> StepOutput:
    """:func:`awp_step` with ``authors=True``: steps 1-6 of its docstring."""
    clean_loss = _authors_clean(model, optimizer, x, y, clean_pass)
    perturbation = weight_perturbation_authors(model, x_adv, y, gamma=gamma)
    for p, v in perturbation:
        p.data.add_(v)  # their param.data += ...: invisible to autograd, so the clean graph now holds w + v
    try:
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        _authors_update(optimizer, scaler, clean_pass, clean_loss, loss)
    finally:
        for p, v in perturbation:
            p.data.sub_(v)  # their restore, after the step: param.data += -gamma * diff
    return _authors_output(loss, clean_loss, x_adv, logits, logits)


def _check_gamma(gamma: object) -> None:
    if not isinstance(gamma, numbers.Real) or isinstance(gamma, bool) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"Invalid gamma: {gamma!r}; expected a finite number >= 0")


def avmixup_step(
    model: nn.Module,
    optimizer: Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    gamma: float = 2.0,
    label_smoothing: tuple[float, float] | None = None,
    attack: Attack | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
    clean_pass: str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    authors: bool = False,
) -> StepOutput:
    r"""One step of AVmixup (Lee et al., *Adversarial Vertex Mixup: Toward Better Adversarially
    Robust Generalization*, CVPR 2020), as the AGR code trains it.

    With :math:`x' = \mathrm{attack}(f, x, y)`, the *adversarial vertex*
    :math:`x_{av} = \operatorname{clip}_{[lo, hi]}\big(x + \gamma (x' - x)\big)` (:math:`\gamma = 2`,
    as in the AVmixup paper for CIFAR and the AGR code) and, per example,
    :math:`\lambda \sim \mathrm{Beta}(1, 1)` (uniform on [0, 1], drawn from ``generator``, which
    must live on ``x``'s device; ``None``: the global stream),

    .. math::

        \tilde x = \lambda x + (1 - \lambda)\, x_{av}, \qquad
        L = \mathrm{CE}\big(f(\tilde x), y\big).

    Clean objective :math:`\mathrm{CE}(f(x), y)`. The AGR code computes the AVmixup paper's soft
    labels (label smoothing 0.5 at :math:`x`, 0.7 at :math:`x_{av}`, mixed by :math:`\lambda`) but
    then trains on the hard labels :math:`y`; the default does what it does. Pass
    ``label_smoothing=(0.5, 0.7)`` for the AVmixup paper's objective: the target is
    :math:`\lambda\,s(y; 0.5) + (1 - \lambda)\,s(y; 0.7)` with
    :math:`s(y; q)_k = q` for :math:`k = y` and :math:`(1 - q)/(K - 1)` otherwise, and
    :math:`L` the cross-entropy with that target.

    ``authors=True``, the AGR authors' step: the default attack is ``PGD(authors=True)``
    (iterates not clamped to [0, 1]), ``clean_pass`` defaults to ``"gradient"``, and after the
    clean forward pass the model also runs in train mode on :math:`x'` (their ``output_adv =
    Model(imgs_adv)``, whose only uses are their training accuracy, ``logits_adv`` here, and,
    as a side effect, BatchNorm's running statistics: they see the clean, the adversarial and the
    mixed batch on every step), then on :math:`\tilde x`. ``label_smoothing`` must be ``None``
    (they compute the soft labels and train on the hard ones). :math:`\lambda` is drawn from
    ``generator`` as in the default step (theirs: ``np.random.beta(1, 1)``, the same law).
    """
    clean_pass = _check_options(clean_pass, scaler, authors)
    _check_gamma(gamma)
    if authors and label_smoothing is not None:
        raise ValueError(
            f"label_smoothing={label_smoothing!r} with authors=True: the authors' step trains on the hard labels; "
            "pass label_smoothing=None"
        )
    if label_smoothing is not None:
        if len(label_smoothing) != 2 or not all(isinstance(q, numbers.Real) and 0 <= q <= 1 for q in label_smoothing):
            raise ValueError(
                f"Invalid label_smoothing: {label_smoothing!r}; expected None or (q_clean, q_vertex) in [0, 1]"
            )
    lo, hi = bounds
    if not lo < hi:
        raise ValueError(f"Invalid bounds: {bounds!r}; expected (lo, hi) with lo < hi")
    attack = _attack_for(attack, model, authors, PGD)
    x_adv = attack(model, x, y)
    x_av = (x + gamma * (x_adv - x)).clamp(lo, hi)
    # Per example through _sharding: a process's shard of a batch takes its rows of the whole
    # batch's draw (agr-train under torchrun), the same whatever the number of processes.
    lam = per_example(
        x,
        lambda t: torch.rand((t.shape[0],) + (1,) * (t.dim() - 1), generator=generator, device=t.device, dtype=t.dtype),
    )
    x_mix = lam * x + (1 - lam) * x_av
    if authors:
        authors_clean = _authors_clean(model, optimizer, x, y, clean_pass)
        with torch.no_grad():
            logits_adv = model(x_adv)  # their output_adv: the training accuracy; BatchNorm sees x'
        logits = model(x_mix)
        loss = F.cross_entropy(logits, y)
        _authors_update(optimizer, scaler, clean_pass, authors_clean, loss)
        return _authors_output(loss, authors_clean, x_adv, logits, logits_adv)
    clean_loss = _clean_pass(model, optimizer, x, y, clean_pass, scaler)
    logits = model(x_mix)
    if label_smoothing is None:
        loss = F.cross_entropy(logits, y)
    else:
        num_classes = logits.shape[1]
        onehot = F.one_hot(y, num_classes).to(torch.float32)
        lam_y = lam.reshape(-1, 1).to(torch.float32)
        target = lam_y * _smoothed(onehot, label_smoothing[0]) + (1 - lam_y) * _smoothed(onehot, label_smoothing[1])
        loss = -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
    out = _finish(optimizer, scaler, loss, clean_loss, x_adv, logits)
    return out._replace(logits_adv=None)  # the default step runs no forward pass on x_adv alone


def _smoothed(onehot: Tensor, q: float) -> Tensor:
    """``q`` on the true class, ``(1 - q) / (K - 1)`` elsewhere (the AVmixup code's label_smoothing)."""
    k = onehot.shape[1]
    return onehot * q + (1 - onehot) * ((1 - q) / max(k - 1, 1))
