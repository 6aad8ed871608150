"""Adversarial-training recipes for AGR: a PGD attack and one training step per method.

Each step function (:func:`pgd_at_step`, :func:`trades_step`, :func:`mart_step`,
:func:`awp_step`, :func:`avmixup_step`) attacks the batch, backpropagates the clean objective and
stashes it when the optimizer is an active :class:`~agr_optim.AGROptimizer`, backpropagates the
method's adversarial objective and steps. With a plain ``torch.optim`` optimizer, or during AGR's warm start, it is the
plain method; ``clean_pass="always"`` runs the clean forward pass on every step, as the AGR
authors' code does (BatchNorm statistics then see clean and adversarial batches in every arm).
Any attack can be passed as a callable ``attack(model, x, y) -> x_adv``; a torchattacks attack
built on the trained model as it is (``attack=torchattacks.PGD(model, ...)``), and another
``attack(x, y)`` bound to the model through :func:`as_attack`.

Only torch is imported here.
"""

from ._attacks import PGD, Attack, as_attack
from ._awp import perturbed_weights, weight_perturbation
from ._losses import mart_loss, trades_loss
from ._steps import CLEAN_PASSES, StepOutput, avmixup_step, awp_step, mart_step, pgd_at_step, trades_step

__all__ = [
    "PGD",
    "Attack",
    "as_attack",
    "StepOutput",
    "CLEAN_PASSES",
    "pgd_at_step",
    "trades_step",
    "mart_step",
    "awp_step",
    "avmixup_step",
    "trades_loss",
    "mart_loss",
    "weight_perturbation",
    "perturbed_weights",
]
