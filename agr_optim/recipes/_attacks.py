r"""The L-inf PGD attack used for training and evaluation (Madry et al., ICLR 2018).

Starting from a random point of the :math:`\epsilon`-ball around :math:`x` (clamped to the data
range), each step moves by :math:`\alpha` along the sign of the gradient of the attack loss and
projects back onto the ball and the data range:

.. math::

    x_{t+1} = \operatorname{clip}_{[lo, hi]}\Big(\Pi_{\lVert x' - x\rVert_\infty \le \epsilon}
        \big(x_t + \alpha\,\operatorname{sign}\nabla_{x_t} L(f(x_t), y)\big)\Big).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PGD", "Attack"]

#: Any callable ``attack(model, x, y) -> x_adv`` (for example a torchattacks attack's ``forward``).
Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]

_LOSSES = ("ce", "kl")
_STARTS = ("uniform", "normal", "none")


class PGD:
    r"""L-inf projected gradient descent, a callable ``attack(model, x, y) -> x_adv``.

    Args:
        eps: radius :math:`\epsilon \ge 0` of the L-inf ball (in data units).
        alpha: step size :math:`\alpha > 0`.
        steps: number of sign-gradient steps (0 returns the random start).
        loss: what the attack maximizes: ``"ce"``, the cross-entropy with the labels (PGD-AT,
            MART, AWP, evaluation), or ``"kl"``, the TRADES objective
            :math:`\mathrm{KL}(p(x)\,\Vert\,p(x'))` to the clean prediction (labels unused).
        random_start: ``"uniform"`` in the ball (Madry et al.), ``"normal"``:
            :math:`0.001\cdot\mathcal N(0, 1)` as in the TRADES code (the KL has zero gradient at
            :math:`x' = x`, so the start must differ from :math:`x`), or ``"none"``.
        bounds: the data range ``(lo, hi)`` that adversarial inputs are clamped to.

    The model is put in eval mode for the attack (batch-norm statistics untouched, dropout off)
    and every submodule's mode is restored afterwards, also on error. Gradients are taken with
    respect to the input only, so the parameters' ``.grad`` are left as they were.

    Example:
        >>> import torch
        >>> from agr_optim.recipes import PGD
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).train()
        >>> x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
        >>> x_adv = PGD(eps=0.1, alpha=0.025, steps=10)(model, x, y)
        >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6), model.training
        (True, True)
    """

    def __init__(
        self,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 10,
        *,
        loss: str = "ce",
        random_start: str = "uniform",
        bounds: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        if not _is_real(eps) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"Invalid eps: {eps!r}; expected a finite number >= 0")
        if not _is_real(alpha) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"Invalid alpha: {alpha!r}; expected a finite number > 0")
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"Invalid steps: {steps!r}; expected an integer >= 0")
        if loss not in _LOSSES:
            raise ValueError(f"Invalid loss: {loss!r}; expected one of {_LOSSES}")
        if random_start not in _STARTS:
            raise ValueError(f"Invalid random_start: {random_start!r}; expected one of {_STARTS}")
        lo, hi = bounds
        if not lo < hi:
            raise ValueError(f"Invalid bounds: {bounds!r}; expected (lo, hi) with lo < hi")
        self.eps, self.alpha, self.steps = float(eps), float(alpha), int(steps)
        self.loss, self.random_start, self.bounds = loss, random_start, (float(lo), float(hi))

    def __repr__(self) -> str:
        return (
            f"PGD(eps={self.eps:.4g}, alpha={self.alpha:.4g}, steps={self.steps}, loss={self.loss!r}, "
            f"random_start={self.random_start!r}, bounds={self.bounds})"
        )

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            return self._attack(model, x.detach(), y)
        finally:
            for module, training in modes:
                module.training = training

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        lo, hi = self.bounds
        p_clean = None
        if self.loss == "kl":
            with torch.no_grad():
                p_clean = F.softmax(model(x), dim=1)
        if self.random_start == "uniform":
            x_adv = x + torch.empty_like(x).uniform_(-self.eps, self.eps)
        elif self.random_start == "normal":
            x_adv = x + 0.001 * torch.randn_like(x)
        else:
            x_adv = x.clone()
        x_adv = self._project(x_adv, x, lo, hi)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                logits = model(x_adv)
                if p_clean is None:
                    objective = F.cross_entropy(logits, y, reduction="sum")
                else:
                    objective = F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")
                # autograd.grad (not backward): the parameters' .grad stay untouched.
                (grad,) = torch.autograd.grad(objective, x_adv)
            x_adv = self._project(x_adv.detach() + self.alpha * grad.sign(), x, lo, hi)
        return x_adv.detach()

    def _project(self, x_adv: Tensor, x: Tensor, lo: float, hi: float) -> Tensor:
        return torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps).clamp_(lo, hi)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
