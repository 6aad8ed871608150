r"""The adversarial objectives of TRADES and MART, as their authors' code computes them.

Both take logits (not probabilities) and mean over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["trades_loss", "mart_loss"]


def trades_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, *, beta: float = 6.0) -> Tensor:
    r"""TRADES (Zhang et al., ICML 2019): cross-entropy on clean inputs plus a KL robustness term.

    .. math::

        L = \frac1B\sum_i \Big[\mathrm{CE}(f(x_i), y_i)
            + \beta \sum_k p_k(x_i) \big(\log p_k(x_i) - \log p_k(x'_i)\big)\Big],

    with :math:`p = \mathrm{softmax}\circ f`. This is ``F.kl_div(log_softmax(adv), softmax(clean),
    reduction="batchmean")`` as in the TRADES and AGR code (often written "KL(adv || clean)" after
    the argument order of ``kl_div``; mathematically :math:`\mathrm{KL}(p(x)\Vert p(x'))`).
    Gradients flow through both the clean and the adversarial logits.

    Example:
        >>> import torch
        >>> from agr_optim.recipes import trades_loss
        >>> z = torch.tensor([[2.0, 0.0]])
        >>> round(float(trades_loss(z, z, torch.tensor([0]))), 4)  # equal logits: only CE(clean) = log(1 + e^-2)
        0.1269
    """
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
    return F.cross_entropy(logits_clean, y) + beta * kl


def mart_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, *, beta: float = 6.0) -> Tensor:
    r"""MART (Wang et al., ICLR 2020): boosted CE on adversarial inputs plus a misclassification-weighted KL.

    With :math:`p = \mathrm{softmax}\circ f`, :math:`x'` the adversarial input and
    :math:`\tilde y_i = \arg\max_{k \ne y_i} p_k(x'_i)`,

    .. math::

        L = \frac1B\sum_i \Big[\mathrm{CE}(f(x'_i), y_i) - \log\big(1.0001 - p_{\tilde y_i}(x'_i)\big)
            + \beta\, \mathrm{KL}\big(p(x_i)\,\Vert\,p(x'_i)\big)\,\big(1 - p_{y_i}(x_i)\big)\Big],

    with the small constants of the MART code (``1e-12`` inside the logarithms, ``1.0000001``
    in the weight).
    """
    batch_size = logits_clean.shape[0]
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    # The most likely wrong class: the top class, or the runner-up where the top one is y.
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    boosted_ce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), wrong)
    clean_probs = F.softmax(logits_clean, dim=1)
    true_probs = clean_probs.gather(1, y.unsqueeze(1)).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), clean_probs, reduction="none").sum(dim=1)
    return boosted_ce + beta * (kl * (1.0000001 - true_probs)).sum() / batch_size


def mart_loss_authors(logits: Tensor, logits_adv: Tensor, y: Tensor, *, beta: float = 6.0) -> Tensor:
    """:func:`mart_loss` with the AGR code's arithmetic, for ``mart_step(authors=True)``.

    ``mart_loss`` of their ``mart.py`` returns ``loss_adv, beta * loss_robust`` with
    ``loss_robust = (1.0 / batch_size) * sum(...)`` and ``train.py`` adds them as
    ``loss_mart + loss_adv``: the same value as :func:`mart_loss` up to the rounding of the robust
    term (``(1/B) * S`` there, ``S / B`` here), kept so that the authors' step is bit for bit theirs.
    """
    batch_size = len(logits)
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), wrong)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1).long()).squeeze()
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none")
    loss_robust = (1.0 / batch_size) * torch.sum(torch.sum(kl, dim=1) * (1.0000001 - true_probs))
    return beta * loss_robust + loss_adv
