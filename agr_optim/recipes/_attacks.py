r"""The L-inf PGD attack used for training and evaluation (Madry et al., ICLR 2018).

Starting from a random point of the :math:`\epsilon`-ball around :math:`x` (clamped to the data
range), each step moves by :math:`\alpha` along the sign of the gradient of the attack loss and
projects back onto the ball and the data range:

.. math::

    x_{t+1} = \operatorname{clip}_{[lo, hi]}\Big(\Pi_{\lVert x' - x\rVert_\infty \le \epsilon}
        \big(x_t + \alpha\,\operatorname{sign}\nabla_{x_t} L(f(x_t), y)\big)\Big).
"""

from __future__ import annotations

import inspect
import math
import numbers
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._sharding import per_example

__all__ = ["PGD", "Attack", "as_attack"]

#: What the recipes call: ``attack(model, x, y) -> x_adv`` (:class:`PGD` is one). The recipes also
#: take a torchattacks attack built on the trained model as it is; any other attack bound to a
#: model, ``attack(x, y) -> x_adv``, goes through :func:`as_attack`.
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
        authors: ``True``: ``attack.PGD`` of the AGR authors' code (RUIYUN-ML/AGR) exactly, for
            comparisons with the paper's tables (:doc:`/reproducing`). It departs
            from the default in one way that matters: the iterates are *not* clamped to the data
            range. Their loop reads

            .. code-block:: python

                image_adv = image_adv + self.alpha * g
                delta = (image_adv - image).clamp_(min=-self.eps, max=self.eps).detach()
                image_adv = image + delta
                image_adv.clamp(0., 1.).detach_()   # clamps a copy, which is thrown away

            so the model is attacked, and its gradient taken, at points outside [0, 1] near the
            edges of the range, and only the returned point ``(image + delta).clamp(0, 1)`` is in
            range (the random start is clamped too). Two rounding-level details follow their
            code as well: the projection acts on :math:`\delta = x_t - x` (then :math:`x + \delta`)
            rather than on :math:`x_t`, and the attack loss is the *mean* cross-entropy (its sign
            gradient is that of the sum). Only ``loss="ce"`` with ``random_start="uniform"``
            (their ``random_start=True``) or ``"none"`` exists there; other settings are refused.

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
        authors: bool = False,
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
        if not isinstance(authors, bool):
            raise TypeError(f"authors must be True or False, got {authors!r}")
        if authors and (loss != "ce" or random_start == "normal"):
            raise ValueError(
                f"PGD(authors=True) is the AGR code's attack.PGD: cross-entropy with a uniform start or none; "
                f"got loss={loss!r}, random_start={random_start!r}"
            )
        self.eps: float = float(eps)
        self.alpha: float = float(alpha)
        self.steps: int = int(steps)
        self.loss: str = loss
        self.random_start: str = random_start
        self.bounds: tuple[float, float] = (float(lo), float(hi))
        self.authors: bool = authors

    def __repr__(self) -> str:
        return (
            f"PGD(eps={self.eps:.4g}, alpha={self.alpha:.4g}, steps={self.steps}, loss={self.loss!r}, "
            f"random_start={self.random_start!r}, bounds={self.bounds}"
            + (", authors=True)" if self.authors else ")")
        )

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            attack = self._attack_authors if self.authors else self._attack
            return attack(model, x.detach(), y)
        finally:
            for module, training in modes:
                module.training = training

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        lo, hi = self.bounds
        p_clean = None
        if self.loss == "kl":
            with torch.no_grad():
                p_clean = F.softmax(model(x), dim=1)
        noise = self._start_noise(x)
        if noise is None:
            x_adv = x.clone()
        else:
            x_adv = x + (noise if self.random_start == "uniform" else 0.001 * noise)
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

    def _attack_authors(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """``attack.PGD.forward`` of RUIYUN-ML/AGR, operation for operation (see ``authors``)."""
        lo, hi = self.bounds
        x_adv = x.clone()
        if self.random_start == "uniform":
            noise = self._start_noise(x_adv)
            assert noise is not None  # a uniform start
            x_adv = torch.clamp(x_adv + noise, lo, hi)
        if self.steps == 0:  # their loop sets delta, so they cannot run 0 steps: the start
            return x_adv
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(x_adv), y)
                (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + self.alpha * grad.sign()
            delta = (x_adv - x).clamp_(-self.eps, self.eps)
            x_adv = x + delta  # not clamped to [lo, hi]: their clamp(0., 1.).detach_() is discarded
        return (x + delta).clamp(lo, hi)

    def _start_noise(self, x: Tensor) -> Tensor | None:
        """The random start's draw for ``x`` from the global stream (uniform in the ball, or
        standard normal), ``None`` without one; a shard of a larger batch draws the larger batch's
        and keeps its rows (:mod:`agr_optim.recipes._sharding`). A sharded evaluation calls it for
        the batches another process attacks, to leave the stream where one process would."""
        if self.random_start == "uniform":
            return per_example(x, lambda t: torch.empty_like(t).uniform_(-self.eps, self.eps))
        if self.random_start == "normal":
            return per_example(x, torch.randn_like)
        return None

    def _project(self, x_adv: Tensor, x: Tensor, lo: float, hi: float) -> Tensor:
        return torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps).clamp_(lo, hi)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# ---------------------------------------------------------------------- attacks bound to a model
def as_attack(attack: Callable[[Tensor, Tensor], Tensor], *, model: nn.Module | None = None) -> Attack:
    r"""Adapt an attack bound to a model, ``attack(x, y) -> x_adv``, to the recipes' ``attack(model, x, y)``.

    Args:
        attack: a torchattacks attack (an instance of ``torchattacks.attack.Attack``; its model is
            its ``.model``), or any callable ``attack(x, y) -> x_adv`` that attacks ``model``.
        model: the model ``attack`` is bound to; required unless ``attack`` is a torchattacks attack
            (then, if given, it must be the attack's model).

    The adapter refuses to run against any other model (``ValueError`` naming the argument): an
    attack on one network used to train another is a silent, plausible-looking wrong result.
    Models are the same when they are the same object once the wrappers that only distribute or
    compile a model are looked through (``DistributedDataParallel``, ``DataParallel``,
    ``torch.compile``'s ``OptimizedModule``, Lightning Fabric's module wrapper); a model wrapped in
    anything else (a normalisation layer in front, say) is a different model.

    Every submodule's train/eval mode is put back after the attack, also on error. This matters
    for torchattacks: its ``__call__`` switches the model to eval mode and afterwards calls
    ``model.train()`` if the model was training, which also switches to training the submodules
    that were in eval mode (frozen batch norms); and it leaves the model in eval mode when the
    attack raises. The adapter returns ``x_adv`` detached, with the shape of ``x``.

    The recipes do this adaptation themselves for torchattacks attacks (``attack=atk``); call
    ``as_attack`` for another ``attack(x, y)`` callable, or to use a torchattacks attack in a
    hand-written loop with the mode handling above.

    Example:
        >>> import torch
        >>> from agr_optim.recipes import as_attack
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5)).train()
        >>> model[1].eval()                       # a submodule frozen in eval mode
        Dropout(p=0.5, inplace=False)
        >>> def fgsm(x, y):                      # bound to `model`
        ...     x = x.clone().requires_grad_(True)
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     (g,) = torch.autograd.grad(loss, x)
        ...     return (x + 0.1 * g.sign()).clamp(0, 1)
        >>> attack = as_attack(fgsm, model=model)
        >>> x_adv = attack(model, torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1]))
        >>> x_adv.shape, model.training, model[1].training
        (torch.Size([5, 4]), True, False)
    """
    if isinstance(attack, _BoundAttack):
        if model is not None:
            _check_same_model(attack.model, model, "model")
        return attack
    if _is_torchattacks_attack(attack):
        bound = getattr(attack, "model", None)
        if not isinstance(bound, nn.Module):
            raise TypeError(
                f"attack is a torchattacks {type(attack).__name__} without a model (its .model is "
                f"{type(bound).__name__}); build it on the model you train"
            )
        if model is not None:
            _check_same_model(bound, model, "model")
        return _BoundAttack(attack, bound, torchattacks=True)
    if not callable(attack):
        raise TypeError(f"attack must be callable as attack(x, y) -> x_adv, got {type(attack).__name__}")
    if model is None:
        raise TypeError(
            "as_attack(attack) needs model=: the model that attack(x, y) attacks (only a torchattacks "
            "attack knows its model)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _binds(attack, 2) is False:
        raise TypeError(f"attack must be callable as attack(x, y) -> x_adv; its signature is {_signature(attack)}")
    return _BoundAttack(attack, model, torchattacks=False)


class _BoundAttack:
    """``attack(x, y)`` bound to ``model``, called as ``attack(model, x, y)`` (see :func:`as_attack`)."""

    def __init__(self, attack: Callable[[Tensor, Tensor], Tensor], model: nn.Module, *, torchattacks: bool) -> None:
        self.attack, self.model, self.torchattacks = attack, model, torchattacks

    def __repr__(self) -> str:
        return f"as_attack({self.attack!r})"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        _check_same_model(self.model, model, "attack")
        if self.torchattacks:
            _check_torchattacks_device(self.attack, model)
        modules = {id(m): m for m in (*self.model.modules(), *model.modules())}
        modes = [(m, m.training) for m in modules.values()]
        try:
            x_adv = self.attack(x, y)
        finally:
            for module, training in modes:
                module.training = training
        if not isinstance(x_adv, Tensor) or x_adv.shape != x.shape:
            got = tuple(x_adv.shape) if isinstance(x_adv, Tensor) else type(x_adv).__name__
            raise RuntimeError(f"attack returned {got}; expected a tensor of the inputs' shape {tuple(x.shape)}")
        return x_adv.detach()


def resolve_attack(attack: object, model: nn.Module) -> Attack:
    """The recipes' ``attack=`` argument as an ``attack(model, x, y)``, checked against ``model``.

    A torchattacks attack is adapted (:func:`as_attack`); an ``attack(x, y)`` callable is refused
    with the way to adapt it; anything else callable is used as it is.
    """
    if isinstance(attack, _BoundAttack) or _is_torchattacks_attack(attack):
        adapted = as_attack(attack)  # type: ignore[arg-type]
        _check_same_model(adapted.model, model, "attack")  # type: ignore[attr-defined]
        return adapted
    if not callable(attack):
        raise TypeError(f"attack must be callable as attack(model, x, y) -> x_adv, got {type(attack).__name__}")
    owner = getattr(attack, "__self__", None)
    if _is_torchattacks_attack(owner):
        raise TypeError(
            f"attack is the bound method {getattr(attack, '__name__', '?')} of a torchattacks "
            f"{type(owner).__name__}: pass the attack itself (attack=atk), not atk.forward"
        )
    if _binds(attack, 3) is False:
        if _binds(attack, 2):
            raise TypeError(
                f"attack takes (x, y) (signature {_signature(attack)}); the recipes call attack(model, x, y): "
                "pass agr_optim.recipes.as_attack(attack, model=model)"
            )
        raise TypeError(
            f"attack must be callable as attack(model, x, y) -> x_adv; its signature is {_signature(attack)}"
        )
    return attack  # type: ignore[return-value]


def _is_torchattacks_attack(obj: object) -> bool:
    # No import: if torchattacks was never imported, no torchattacks attack can exist.
    module = sys.modules.get("torchattacks.attack")
    base = getattr(module, "Attack", None)
    return isinstance(base, type) and isinstance(obj, base)


def _unwrap(model: nn.Module) -> nn.Module:
    """Look through the wrappers that only distribute or compile a model."""
    wrappers: list[tuple[type, str]] = [
        (nn.parallel.DistributedDataParallel, "module"),
        (nn.DataParallel, "module"),
    ]
    for module_name, class_name, attribute in (
        ("torch._dynamo.eval_frame", "OptimizedModule", "_orig_mod"),
        ("lightning.fabric.wrappers", "_FabricModule", "_original_module"),
        ("lightning_fabric.wrappers", "_FabricModule", "_original_module"),
    ):
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type):
            wrappers.append((cls, attribute))
    while True:
        for cls, attribute in wrappers:
            inner = getattr(model, attribute, None) if isinstance(model, cls) else None
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def _check_same_model(bound: nn.Module, model: nn.Module, argument: str) -> None:
    if _unwrap(bound) is not _unwrap(model):
        raise ValueError(
            f"{argument}: the attack is bound to another model ({type(bound).__name__} at {id(bound):#x}) than "
            f"the one being trained ({type(model).__name__} at {id(model):#x}); build the attack on the "
            "trained model (for torchattacks: torchattacks.PGD(model, ...); for inputs that the model "
            "normalises, attack.set_normalization_used(mean, std) rather than a wrapper model)"
        )


def _check_torchattacks_device(attack: object, model: nn.Module) -> None:
    """torchattacks moves the inputs to the device it read from the model when it was built."""
    device = getattr(attack, "device", None)
    param = next(model.parameters(), None)
    if device is None or param is None:
        return
    device = torch.device(device)
    if device.type != param.device.type or None not in (device.index, param.device.index) and device != param.device:
        raise RuntimeError(
            f"attack: the torchattacks {type(attack).__name__} sends inputs to {device} but the model is on "
            f"{param.device} (it was moved after the attack was built); call attack.set_device({str(param.device)!r})"
        )


def _signature(fn: object) -> str:
    try:
        return str(inspect.signature(fn))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(unknown)"


def _binds(fn: object, count: int) -> bool | None:
    """Whether ``fn`` accepts ``count`` positional arguments (``None``: its signature is unknown)."""
    try:
        signature = inspect.signature(fn)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*range(count))
    except TypeError:
        return False
    return True
