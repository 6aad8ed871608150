r"""The AGR authors' training step, re-implemented from their published code (torch only).

An independent statement of what `RUIYUN-ML/AGR <https://github.com/RUIYUN-ML/AGR>`_ (the code of
Tong et al., ACM MM 2024) does in one step, for ``tests/test_authors_step.py`` to hold
``agr_optim.recipes``' ``authors=True`` against. It does not import ``agr_optim`` (the recipes
must not be checked against themselves). Each piece follows one of their files, in their order
and with their arithmetic, quirks included, so that a reader can check it line by line:

- :class:`PGD`: ``attack.py``, ``class PGD``, ``forward``;
- :func:`kl_div`, :func:`label_smoothing`: ``tools.py``;
- :func:`mart_loss`: ``mart.py``, ``mart_loss`` (the MART authors' code);
- :func:`diff_in_weights`, :func:`add_into_weights`, :class:`AdvWeightPerturb` (``calc_awp``,
  ``perturb``, ``restore``): ``awp.py``;
- :func:`get_gradient`, :func:`get_cos_similarity`, :func:`get_l2_distance`: ``AGR.py``,
  ``class AGR``;
- :class:`Authors` (``__init__``: the model, ``optim``, the AWP proxy and its optimizer;
  :meth:`Authors.step`: the body of ``for data in train_dataloader:``): ``train.py``.

What is substituted, and why (nothing else is):

- ``i >= args.AGR_epoch`` (an epoch count) is ``step >= agr_start_step`` (a step count), as
  ``AGROptimizer(start_step=...)`` counts.
- AVmixup's ``np.random.beta(1, 1, [B, 1, 1, 1])`` (then ``.float()``) is ``mix_draw((B, 1, 1, 1))``,
  a callable the test gives: the recipes draw :math:`\lambda` with ``torch.rand`` from a generator
  (Beta(1, 1) is the uniform law; the draws themselves cannot be the same).
- The device moves (``.to(device)``) are left out: one device.
- The proxy model of AWP is a deep copy of the model made in :class:`Authors` (theirs: a second
  ``model.PreActResNet18``), loaded from the model's state dict on every step as theirs is.

The optimizer is theirs: ``torch.optim.SGD(lr, momentum, weight_decay)``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import grad

EPS = 1e-20  # awp.py


# ---------------------------------------------------------------------- attack.py
class PGD:
    """``attack.PGD``: eps 8/255, alpha 2/255, 10 steps, uniform start by default."""

    def __init__(self, eps: float = 8 / 255, alpha: float = 2 / 255, step: int = 10, random_start: bool = True):
        self.eps = eps
        self.alpha = alpha
        self.step = step
        self.random_start = random_start

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model.eval()
        image = x.clone().detach()
        target = y.clone().detach()
        loss_fn = nn.CrossEntropyLoss()
        # 'start at a uniform point'
        image_adv = x.clone().detach()
        if self.random_start:
            image_adv = image_adv + torch.empty_like(image_adv).uniform_(-self.eps, self.eps)
            image_adv = torch.clamp(image_adv, min=0.0, max=1.0).detach()

        for _ in range(self.step):
            image_adv.requires_grad = True
            output = model(image_adv)
            loss = loss_fn(output, target)
            g = grad(loss, image_adv, retain_graph=False, create_graph=False)[0].sign()

            image_adv = image_adv + self.alpha * g
            delta = (image_adv - image).clamp_(min=-self.eps, max=self.eps).detach()
            image_adv = image + delta
            image_adv.clamp(0.0, 1.0).detach_()  # their line: the clamped copy is discarded
        return (image + delta).clamp(min=0.0, max=1.0)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward(model, x, y)


# ---------------------------------------------------------------------- tools.py
def kl_div(logit1: torch.Tensor, logit2: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(logit1, dim=1), F.softmax(logit2, dim=1), reduction="batchmean")


def label_smoothing(onehot: torch.Tensor, n_classes: int, factor: float) -> torch.Tensor:
    return onehot * factor + (onehot - 1) * ((factor - 1) / (n_classes - 1))


# ---------------------------------------------------------------------- mart.py
def mart_loss(model, img, img_adv, target, optimizer, beta: float = 6.0):
    kl = nn.KLDivLoss(reduction="none")

    x = img.clone().detach()
    x_adv = img_adv.clone().detach()
    y = target.clone().detach()
    batch_size = len(x)

    optimizer.zero_grad()

    logits = model(x)

    logits_adv = model(x_adv)

    adv_probs = F.softmax(logits_adv, dim=1)

    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]

    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])

    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)

    nat_probs = F.softmax(logits, dim=1)

    true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()

    loss_robust = (1.0 / batch_size) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs)
    )

    return loss_adv, beta * loss_robust


# ---------------------------------------------------------------------- awp.py
def diff_in_weights(model: nn.Module, proxy: nn.Module) -> OrderedDict:
    diff_dict: OrderedDict = OrderedDict()
    model_state_dict = model.state_dict()
    proxy_state_dict = proxy.state_dict()
    for (old_k, old_w), (_new_k, new_w) in zip(model_state_dict.items(), proxy_state_dict.items(), strict=True):
        if len(old_w.size()) <= 1:
            continue
        if "weight" in old_k:
            diff_w = new_w - old_w
            diff_dict[old_k] = old_w.norm() / (diff_w.norm() + EPS) * diff_w
    return diff_dict


def add_into_weights(model: nn.Module, diff: OrderedDict, coeff: float = 1.0) -> None:
    names_in_diff = diff.keys()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in names_in_diff:
                param.data += coeff * diff[name]


class AdvWeightPerturb:
    def __init__(self, model: nn.Module, proxy: nn.Module, proxy_optim: torch.optim.Optimizer, gamma: float):
        self.model = model
        self.proxy = proxy
        self.proxy_optim = proxy_optim
        self.gamma = gamma

    def calc_awp(self, inputs_adv: torch.Tensor, targets: torch.Tensor) -> OrderedDict:
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()

        loss = -F.cross_entropy(self.proxy(inputs_adv), targets)

        self.proxy_optim.zero_grad()
        loss.backward()
        self.proxy_optim.step()

        # the adversary weight perturb
        diff = diff_in_weights(self.model, self.proxy)
        return diff

    def perturb(self, diff: OrderedDict) -> None:
        add_into_weights(self.model, diff, coeff=1.0 * self.gamma)

    def restore(self, diff: OrderedDict) -> None:
        add_into_weights(self.model, diff, coeff=-1.0 * self.gamma)


# ---------------------------------------------------------------------- AGR.py
def get_gradient(optim: torch.optim.Optimizer, loss: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Compute the gradient, return the gradient as a one-dimensional vector."""
    grad_list = []
    params = list(model.parameters())
    optim.zero_grad()
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    for g in grads:
        grad_list.append(g.view(-1))
    return torch.cat(grad_list)


def get_cos_similarity(clean_gradient: torch.Tensor, adv_gradient: torch.Tensor) -> float:
    flat_norm1 = clean_gradient
    flat_norm2 = adv_gradient
    norm1 = torch.norm(flat_norm1, 2)
    norm2 = torch.norm(flat_norm2, 2)
    dot_product = torch.dot(flat_norm1, flat_norm2)
    similarity = dot_product / (norm1 * norm2 + 1e-20)
    return similarity.item()


def get_l2_distance(clean_gradient: torch.Tensor, adv_gradient: torch.Tensor) -> float:
    norm_dis = torch.norm(clean_gradient - adv_gradient, p=2)
    return norm_dis.item()


# ---------------------------------------------------------------------- train.py
#: Their ``--method`` values, by the names the recipes use.
METHODS = {"at": "AT", "trades": "trades", "mart": "mart", "awp": "awp", "avmixup": "Avmixup"}


@dataclass
class StepRecord:
    """What one step of their loop leaves behind that they log."""

    loss_train_clean: torch.Tensor
    loss_train_adv: torch.Tensor
    output_adv: torch.Tensor
    imgs_adv: torch.Tensor
    #: Per parameter tensor, in ``Model.parameters()`` order (AGR arm only): their ``cs``, and
    #: whether the projection branch (``cs <= 0``) was taken.
    cosines: list[float] = field(default_factory=list)
    projected: list[bool] = field(default_factory=list)
    l2_distances: list[float] = field(default_factory=list)


class Authors:
    """Their training loop's state (``Model``, ``optim``, the AWP proxy) and one step of it.

    Args:
        model: their ``Model`` (trained in place).
        method: ``"at"``, ``"trades"``, ``"mart"``, ``"awp"`` or ``"avmixup"``.
        agr: their ``--AGR`` flag (the AGR arm).
        agr_start_step: their ``--AGR_epoch``, in steps.
        attack: their ``PGD`` (default: :class:`PGD` with its defaults).
        mix_draw: AVmixup's draws of :math:`\\lambda`, ``mix_draw(shape) -> tensor``.
        lr, momentum, weight_decay, gamma, lr_proxy, clip_norm, num_classes: their arguments
            (``--lr`` ... ``--clip_norm``), defaults theirs.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str,
        *,
        agr: bool,
        agr_start_step: int = 0,
        attack: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        mix_draw: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        gamma: float = 0.01,
        lr_proxy: float = 0.01,
        clip_norm: float = 0.1,
        num_classes: int = 10,
    ) -> None:
        self.Model = model
        self.method = METHODS[method]
        self.agr = agr
        self.agr_start_step = agr_start_step
        self.PGD = PGD() if attack is None else attack
        self.mix_draw = mix_draw
        self.clip_norm = clip_norm
        self.num_classes = num_classes
        self.optim = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        if self.method == "awp":
            self.proxy = copy.deepcopy(model)
            self.proxy_opt = torch.optim.SGD(self.proxy.parameters(), lr=lr_proxy)
            self.awp_adv = AdvWeightPerturb(model=model, proxy=self.proxy, proxy_optim=self.proxy_opt, gamma=gamma)
        self.steps = 0

    def step(self, imgs: torch.Tensor, targets: torch.Tensor) -> StepRecord:
        """One pass of ``for data in train_dataloader:`` (``i >= args.AGR_epoch`` is
        ``self.steps >= agr_start_step``)."""
        Model, optim, method = self.Model, self.optim, self.method
        active = self.steps >= self.agr_start_step

        imgs_adv = self.PGD(Model, imgs, targets)

        Model.train()

        outputs = Model(imgs)

        if method == "mart":
            loss_adv, loss_mart = mart_loss(Model, imgs, imgs_adv, targets, optim)

        loss_train_clean = F.cross_entropy(outputs, targets)  # loss_fc = nn.CrossEntropyLoss()

        if method == "awp":
            awp_p = self.awp_adv.calc_awp(inputs_adv=imgs_adv, targets=targets)
            self.awp_adv.perturb(awp_p)

        output_adv = Model(imgs_adv)

        if method == "AT":
            loss_train_adv = F.cross_entropy(output_adv, targets)
        elif method == "trades":
            loss_train_adv = 6 * kl_div(output_adv, outputs) + F.cross_entropy(outputs, targets)
        elif method == "awp":
            loss_train_adv = F.cross_entropy(output_adv, targets)
        elif method == "mart":
            loss_train_adv = loss_mart + loss_adv
        elif method == "Avmixup":
            onehot = torch.eye(self.num_classes)[targets]
            pert = (imgs_adv - imgs) * 2.0
            x_av = imgs + pert
            x_av = x_av.clamp(0.0, 1.0)
            y_nat = label_smoothing(onehot, self.num_classes, 0.5)
            y_ver = label_smoothing(onehot, self.num_classes, 0.7)
            assert self.mix_draw is not None, "Avmixup needs mix_draw"
            policy_x = self.mix_draw((imgs.size(0), 1, 1, 1))  # theirs: np.random.beta(1, 1, [B, 1, 1, 1])
            policy_y = policy_x.view(imgs.size(0), -1)
            x = policy_x * imgs + (1 - policy_x) * x_av
            _y = policy_y * y_nat + (1 - policy_y) * y_ver  # computed, never used (they train on targets)
            out = Model(x)
            loss_train_adv = F.cross_entropy(out, targets)

        record = StepRecord(loss_train_clean.detach(), loss_train_adv.detach(), output_adv.detach(), imgs_adv)
        # Conduct the AGR algorithm
        if self.agr:
            clean_g = get_gradient(optim, loss_train_clean, Model)
            ori_adv_gradient = get_gradient(optim, loss_train_adv, Model)
            pointer = 0
            for param in Model.parameters():
                num_param = param.numel()
                g1 = ori_adv_gradient[pointer : pointer + num_param]
                g2 = clean_g[pointer : pointer + num_param]
                norm_g2 = torch.norm(g2)
                cs = get_cos_similarity(g1, g2)
                record.l2_distances.append(get_l2_distance(g1, g2))
                record.cosines.append(cs)
                record.projected.append(cs <= 0)
                if cs <= 0:
                    dot_product = torch.dot(g1, g2)
                    PV = (dot_product / (norm_g2**2)) * g2
                    if active:
                        clip_grad_norm = self.clip_norm / torch.norm(g1 - PV)
                        grad_ = (g1 - PV) * torch.min(torch.ones_like(clip_grad_norm), clip_grad_norm)
                    else:
                        grad_ = g1
                    param.grad = (grad_).view_as(param).clone()
                else:
                    if active:
                        grad_ = (cs) * g2 + (1 - cs) * g1
                        clip_grad_norm = self.clip_norm / torch.norm(grad_)
                        grad_ = grad_ * torch.min(torch.ones_like(clip_grad_norm), clip_grad_norm)
                    else:
                        grad_ = g1
                    param.grad = (grad_).view_as(param).clone()
                pointer += num_param
        else:
            optim.zero_grad()
            loss_train_adv.backward()
        optim.step()

        if method == "awp":
            self.awp_adv.restore(awp_p)
        self.steps += 1
        return record
