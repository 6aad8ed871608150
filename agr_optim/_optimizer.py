"""``AGROptimizer``: AGR as a drop-in wrapper around any ``torch.optim.Optimizer``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._amp import (
    ScalerRequest,
    asked_by_grad_scaler,
    forget_scaler_request,
    read_scaler_request,
    show_stash,
    unscale_,
)
from ._checkpoint import SETTINGS, STATE_KEY, read_agr_state, strip_agr_state, validate_count
from ._compiled import reconstruct_rows_compiled
from ._device import reconstruct_rows, result_rows
from ._distributed import GradientChangeProbe, is_dtensor, local_tensor, refuse_flat_shards, replicas_may_reduce
from ._flat import layout_for
from ._gramian import LOW_PRECISION
from ._stash import ACCUMULATION_RECIPE, KINDS, Stash
from ._stats import NO_OUTPUT, ReconstructionStats
from .functional import (
    FUSED_SETTINGS,
    GRANULARITIES,
    _choose,
    _run,
    validate_clip_norm,
    validate_fused,
    validate_gradients,
    validate_granularity,
    validate_writable,
)

__all__ = ["AGROptimizer", "strip_agr_state"]
#: What a pickle or deepcopy keeps, as torch's Optimizer keeps only its defaults, state and
#: groups: hooks, a scheduler's patched ``step`` (it holds a weakref to the original) and the
#: stash are left behind.
_PICKLED = (
    "_optimizer", "_initializing", "_clip_norm", "_start_step", "_granularity", "_fused", "_step_count",
    "_last_stats", "_last_segment_params",
)
#: What a step does: reconstruct; the warm start (the adversarial gradient as it is); the state
#: initialisation step of ``torch.distributed.checkpoint`` (passed on, not counted); skip (an inf
#: under GradScaler).
Mode = Literal["reconstruct", "warm_start", "init", "skip"]
#: The implementations that compute on flat rows (the stash is kept as rows for them).
_ROW_IMPLEMENTATIONS = ("device", "compiled")


@dataclass(frozen=True)
class _Plan:
    """What one ``step()`` will do, decided before anything is written."""

    mode: Mode
    grads: list[tuple[Tensor, Tensor | None]]  # every parameter and the .grad its inner step gets
    params: list[Tensor]  # the parameters of the pairs, in order
    adversarial: list[Tensor]  # the pairs to reconstruct (or to describe, in the warm start)
    clean: list[Tensor | None]
    segment_ids: list[int]
    num_segments: int
    segment_params: tuple[tuple[Tensor, ...], ...]
    with_stats: bool
    inv_scale: Tensor | None  # GradScaler's: unscale every gradient in the pairs first
    implementation: str  # the functional implementation that computes the pairs


class AGROptimizer(Optimizer):
    r"""AGR (clean and adversarial gradient steering) around an inner optimizer.

    Tong et al., *Balancing Generalization and Robustness in Adversarial Training via Steering
    through Clean and Adversarial Gradient Directions*, ACM MM 2024.
    Each training step computes two gradients, the clean :math:`c` (loss on natural inputs)
    and the adversarial :math:`a` (loss on attacked inputs). One of them is stashed with
    :meth:`stash_clean` (or :meth:`stash_adversarial`), the other is left in ``.grad`` by the
    second backward pass, and :meth:`step` replaces ``.grad`` by, per segment,

    .. math::

        r = \begin{cases}
            a - \frac{\langle a, c\rangle}{\lVert c\rVert^2}\, c & \cos(a, c) \le 0\\
            \cos\cdot c + (1 - \cos)\cdot a & \cos(a, c) > 0
        \end{cases},
        \qquad r \leftarrow r\cdot\min\!\Big(1, \frac{\text{clip\_norm}}{\lVert r\rVert}\Big),

    then calls the inner optimizer's ``step()``, whose momentum, weight decay and learning
    rate act on :math:`r`. A parameter without an adversarial gradient gets ``.grad = None``
    and does not move. During the warm start (the first ``start_step`` steps) the update is
    :math:`a`, unchanged and unclipped, as in the paper, which starts AGR at epoch 155 of 200.

    With gradient accumulation, stash *both* gradients in every micro-batch (clean backward,
    :meth:`stash_clean`, adversarial backward, :meth:`stash_adversarial`): the stashes add up,
    and :meth:`step` reconstructs from the two sums.

    The wrapper shares the inner optimizer's ``param_groups``, ``state`` and ``defaults``
    (the objects, not copies), so LR schedulers, ``add_param_group`` and checkpoints act on
    the inner optimizer.

    Args:
        optimizer: the inner optimizer (SGD with momentum in the paper; any torch optimizer
            whose ``step()`` works without a closure).
        clip_norm: clip each segment's reconstructed gradient to this norm; ``None`` for no
            clipping. The paper's code uses 0.1 per tensor.
        start_step: number of initial steps that use the adversarial gradient alone.
        granularity: the segments: ``"tensor"`` (each parameter tensor, the paper),
            ``"group"`` (each param group) or ``"global"`` (all parameters at once).
        fused: ``True`` (default): the fused implementation, the host schedule on CPU and the
            accelerator schedule (flat rows, a fixed number of kernels, no host sync) elsewhere;
            ``"device"``: the accelerator schedule on any device; ``False``: the readable
            per-segment loop; ``"compile"`` (opt-in): the accelerator schedule through
            ``torch.compile`` (see :func:`agr_optim.functional.reconstruct`). With the accelerator
            schedule, :meth:`stash_clean` copies the gradient into the rows the step computes on.

    The four settings are also properties, validated on assignment with the constructor's
    messages (a refused value changes nothing). :meth:`load_state_dict` sets them from the
    checkpoint, as torch optimizers take their param groups' hyperparameters from it.

    Example:
        >>> import torch
        >>> from agr_optim import AGROptimizer
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.1), clip_norm=0.1)
        >>> x, x_adv, y = torch.randn(8, 3), torch.randn(8, 3), torch.randn(8, 1)
        >>> opt.zero_grad()
        >>> torch.nn.functional.mse_loss(model(x), y).backward()
        >>> opt.stash_clean()
        >>> torch.nn.functional.mse_loss(model(x_adv), y).backward()
        >>> opt.step()
        >>> opt.step_count, bool(opt.last_stats.clip_scale.le(1).all())
        (1, True)
    """

    #: GradScaler.step() then always calls step(), which unscales the stash too (see _amp.py).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        clip_norm: float | None = 0.1,
        start_step: int = 0,
        granularity: str = "tensor",
        fused: bool | str = True,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, AGROptimizer):
            raise TypeError("optimizer is already an AGROptimizer; wrap the inner optimizer once")
        if _requires_closure(optimizer):
            raise TypeError(
                f"optimizer {type(optimizer).__name__}'s step() requires a closure that re-evaluates the loss; "
                "AGR reconstructs one update from two given gradients per step, so it cannot wrap it"
            )
        validate_clip_norm(clip_norm)
        validate_count(start_step)
        validate_granularity(granularity, GRANULARITIES)
        validate_fused(fused)
        refuse_flat_shards([p for group in optimizer.param_groups for p in group["params"]], "AGROptimizer",
                           str(granularity))
        self._optimizer = optimizer
        self._initializing = True
        # Optimizer.__init__ sets up the hook dictionaries and wraps step() so that step
        # pre/post hooks fire; the throwaway group it builds is dropped right after.
        super().__init__([torch.empty(0)], {})
        self._initializing = False
        del self._init_groups, self._init_state, self._init_defaults
        # Plain Python (a numpy scalar would make the state dict unreadable with weights_only=True).
        self._clip_norm: float | None = _plain_clip_norm(clip_norm)
        self._start_step = int(start_step)
        self._granularity = str(granularity)
        self._fused = _fused_setting(fused)
        self._step_count = 0
        self._last_stats: ReconstructionStats | None = None
        self._last_segment_params: tuple[tuple[Tensor, ...], ...] | None = None
        self._reset_transient()

    def _reset_transient(self) -> None:
        self._stash = Stash()

    def _agr(self) -> AGROptimizer:
        """The instance holding the state: ``self``, or the AGROptimizer held by a wrapper whose
        class subclasses this one (Lightning's ``LightningOptimizer`` keeps it as ``_optimizer``)."""
        inner = self.__dict__.get("_optimizer")
        return inner._agr() if isinstance(inner, AGROptimizer) else self

    # ------------------------------------------------------------------ delegation
    # Keyed on the ``_initializing`` flag only while it is set: a wrapper instance or a copy
    # that lacks it delegates through its ``_optimizer`` (Lightning's reaches ours that way).
    @property
    def optimizer(self) -> Optimizer:
        """The inner optimizer."""
        return self._agr()._optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        mine = self.__dict__
        if mine.get("_initializing", False):
            return mine["_init_groups"]
        groups = self._optimizer.param_groups
        if mine.get("_stash") and asked_by_grad_scaler(_FORWARDING_CODE):
            return [*groups, self._show_stash_to_scaler()]  # a new list: nobody else sees it (_amp.py)
        return groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if self.__dict__.get("_initializing", False):
            self._init_groups = value
        else:
            self._optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        mine = self.__dict__
        return mine["_init_state"] if mine.get("_initializing", False) else self._optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        if self.__dict__.get("_initializing", False):
            self._init_state = value
        else:
            self._optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        mine = self.__dict__
        return mine["_init_defaults"] if mine.get("_initializing", False) else self._optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        if self.__dict__.get("_initializing", False):
            self._init_defaults = value
        else:
            self._optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer (and so to this wrapper)."""
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if params is not None and not isinstance(params, (Tensor, list, tuple, set)):  # torch refuses a set
            param_group["params"] = params = list(params)  # a generator is read once, here (as torch does)
        if params is not None:
            refuse_flat_shards([params] if isinstance(params, Tensor) else list(params), "add_param_group()",
                               self._agr().__dict__.get("_granularity"))
        if self.__dict__.get("_initializing", False):
            super().add_param_group(param_group)
        else:
            self._optimizer.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in _PICKLED if k in self.__dict__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = {(f"_{k}" if k in (*SETTINGS, "last_stats") else k): v for k, v in state.items()}
        state.setdefault("_last_stats", None)
        state.setdefault("_last_segment_params", None)
        # Optimizer.__setstate__ recreates the hook dictionaries and the step wrapper.
        super().__setstate__(state)
        self._reset_transient()

    def __repr__(self) -> str:
        return (
            f"AGROptimizer(clip_norm={self.clip_norm}, start_step={self.start_step}, "
            f"granularity={self.granularity!r}, fused={self.fused}, step_count={self.step_count})\n"
            f"  wrapping {self.optimizer!r}"
        )

    # ------------------------------------------------------------------ settings
    @property
    def clip_norm(self) -> float | None:
        """Clip each segment's reconstructed gradient to this norm (``None``: no clipping)."""
        return self._agr()._clip_norm

    @clip_norm.setter
    def clip_norm(self, value: float | None) -> None:
        validate_clip_norm(value)
        self._agr()._clip_norm = _plain_clip_norm(value)

    @property
    def start_step(self) -> int:
        """Number of initial steps whose update is the adversarial gradient alone."""
        return self._agr()._start_step

    @start_step.setter
    def start_step(self, value: int) -> None:
        validate_count(value)
        self._agr()._start_step = int(value)

    @property
    def granularity(self) -> str:
        """The segments: ``"tensor"``, ``"group"`` or ``"global"``."""
        return self._agr()._granularity

    @granularity.setter
    def granularity(self, value: str) -> None:
        self._agr()._granularity = str(validate_granularity(value, GRANULARITIES))

    @property
    def fused(self) -> bool | str:
        """The implementation: ``True`` (fused), ``"device"``, ``False`` (the loop) or ``"compile"``."""
        return self._agr()._fused

    @fused.setter
    def fused(self, value: bool | str) -> None:
        validate_fused(value)
        self._agr()._fused = _fused_setting(value)

    # ------------------------------------------------------------------ the AGR protocol
    @property
    def active(self) -> bool:
        """Whether the next :meth:`step` reconstructs (``False`` during the warm start)."""
        agr = self._agr()
        return agr._step_count >= agr._start_step

    @property
    def step_count(self) -> int:
        """Steps applied so far (saved and restored by the state dict).

        Assignable (an integer >= 0; a refused value changes nothing): a run that trained with a
        plain optimizer and continues with AGR sets it to the steps done, so that the warm start
        (``start_step``) counts from the run's beginning (see "Switching AGR on mid-run" in
        :doc:`/tutorials/index`).
        """
        return self._agr()._step_count

    @step_count.setter
    def step_count(self, value: int) -> None:
        validate_count(value, "step_count")
        agr = self._agr()
        if agr._stash:
            raise RuntimeError(
                "step_count cannot change while a gradient is stashed (the step it belongs to would change "
                "between warm start and AGR); set it before the first backward pass of a step, or after step()"
            )
        agr._step_count = int(value)

    @property
    def has_stash(self) -> bool:
        """Whether a gradient is stashed for the next :meth:`step`."""
        return bool(self._agr()._stash)

    @property
    def last_stats(self) -> ReconstructionStats | None:
        """:class:`~agr_optim.ReconstructionStats` of the last step that had both gradients.

        ``None`` before one. Set by every reconstructing step and, during the warm start, by
        every step that had a clean gradient too (stashed or current): then they describe the
        reconstruction AGR would have made, while the update stays the adversarial gradient,
        unclipped. Segments are listed by :attr:`last_segment_params`.
        """
        return self._agr()._last_stats

    @property
    def last_segment_params(self) -> tuple[tuple[Tensor, ...], ...] | None:
        """The parameters of each segment of :attr:`last_stats`, one tuple per segment, in order.

        ``"tensor"``: one parameter per segment, the parameters that had an adversarial gradient
        in ``param_groups`` order; ``"group"``: the parameters with one, per group that had any;
        ``"global"``: one tuple of them all. Set together with :attr:`last_stats`.
        """
        return self._agr()._last_segment_params

    def stash_clean(self) -> None:
        """Take the clean gradient out of ``.grad`` and keep it for :meth:`step`.

        Call after the clean backward pass and before the adversarial one; ``.grad`` is
        ``None`` afterwards, so the adversarial backward starts from zero. No copy is made:
        the gradient tensors themselves are kept (except gradients that are views into a
        shared buffer, like DDP's ``gradient_as_bucket_view``, which the next backward pass
        would overwrite). With gradient accumulation, call it in every micro-batch, followed
        by :meth:`stash_adversarial` after the adversarial backward pass: the stashes add up.
        """
        self._agr()._take_stash("clean")

    def stash_adversarial(self) -> None:
        """Like :meth:`stash_clean` for the adversarial gradient (the other order, or the second
        stash of a micro-batch under gradient accumulation)."""
        self._agr()._take_stash("adversarial")

    def backward(self, *, clean: Tensor | None, adversarial: Tensor) -> None:
        """Both backward passes in one call: the clean and the adversarial gradient of the two
        losses, stashed for :meth:`step` (the two-pass protocol, done by autograd).

        ``.grad`` is neither read nor left holding anything: whatever the training code did to it
        before (a loss function that calls ``zero_grad()`` or ``backward()`` inside) does not
        enter either gradient, and it is ``None`` afterwards, until :meth:`step` sets the update
        (tensors outside the optimizer, such as another optimizer's parameters, get both passes added
        in their ``.grad``, as from two ``backward()`` calls).
        The two losses may share a forward pass (TRADES and MART take the clean logits into the
        adversarial objective): the clean pass then keeps its graph for the second pass, with no
        ``retain_graph`` to pass (the clean graph's own part lives on as long as ``clean`` is
        referenced: drop the loss after the call); graphs that share nothing are freed by their
        own passes. Several calls before one :meth:`step`
        accumulate, like micro-batches (each loss already divided by their number, as for
        ``loss.backward()``); ``zero_grad()`` of this wrapper drops them (a loss function that calls
        it inside should get the inner optimizer, :attr:`optimizer`). Under ``GradScaler`` pass the
        scaled losses (``scaler.scale(loss)``) and step with ``scaler.step(opt)``. Both gradients
        are stashed, so clipping ``.grad`` before :meth:`step` (``clip_grad_norm_``) finds none:
        ``clip_norm`` is the clip. Not under ``DistributedDataParallel``: DDP synchronises one
        backward pass per forward, so the gradients of the pass after both forwards would stay per
        process; with more than one process the call checks (one host sync) that both passes were
        averaged or neither, and raises, with nothing changed, when only one was. Use the two-pass
        protocol there, each forward followed by its own backward pass. FSDP2 reduces every pass:
        there it works.

        ``clean=None`` (the warm start without a clean pass) leaves the adversarial gradient in
        ``.grad`` for the step, as the single backward pass of the warm start does; it too is
        independent of what was in ``.grad`` (the last step's update, an attack's backward pass
        through the model), and such calls before one :meth:`step` add up.

        Example:
            >>> import torch
            >>> from agr_optim import AGROptimizer
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
            >>> x, x_adv, y = torch.randn(8, 3), torch.randn(8, 3), torch.randn(8, 1)
            >>> logits = model(x)  # shared by both objectives
            >>> loss_c = torch.nn.functional.mse_loss(logits, y)
            >>> loss_a = torch.nn.functional.mse_loss(model(x_adv), logits.detach()) + loss_c
            >>> opt.backward(clean=loss_c, adversarial=loss_a)
            >>> opt.step()
            >>> opt.step_count
            1
        """
        agr = self._agr()
        for name, loss in (("clean", clean), ("adversarial", adversarial)):
            if loss is None and name == "clean":
                continue
            if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                got = (type(loss).__name__ if not isinstance(loss, Tensor)
                       else f"shape {tuple(loss.shape)}, requires_grad={loss.requires_grad}")
                raise ValueError(
                    f"backward(): {name} must be a scalar loss tensor that requires grad (got {got}); pass the "
                    "loss reduced to one element, computed with gradients enabled (not under torch.no_grad())"
                )
        agr._stash.refuse_if_interrupted("backward()")
        if clean is not None and agr._stash.passes.get("clean", 0) != agr._stash.passes.get("adversarial", 0):
            raise RuntimeError(
                "backward() found only one kind of gradient stashed (a stash_clean() or stash_adversarial() "
                "without its partner): finish that step, or call zero_grad(). Nothing was changed"
            )
        params = agr._unique_params()
        # Before the passes: autograd.grad on FSDP1's parameters fails inside FSDP with a storage error.
        refuse_flat_shards(params, "backward()", agr._granularity)
        set_aside = [p.grad for p in params]
        for p in params:
            p.grad = None  # what the training code left in .grad is not part of either gradient
        earlier = agr._stash.unstashed
        try:
            # Both passes and every check first, then the writes: a pass that fails or a refusal
            # leaves .grad and the stash as they were.
            if clean is None:
                adversarial_grads = _gradients_of(adversarial, "adversarial", params)
                _refuse_unlike(adversarial_grads, params, earlier)
            else:
                probe = replicas_may_reduce(params)
                clean_nodes, clean_leaves = _graph(clean)
                adversarial_nodes, adversarial_leaves = _graph(adversarial)
                # Each pass also probes parameters it reaches: a probe on unused ones sees nothing.
                with GradientChangeProbe(params if probe else [], reached=clean_leaves) as clean_probe:
                    clean_grads = _gradients_of(clean, "clean", params,
                                                retain_graph=not clean_nodes.isdisjoint(adversarial_nodes))
                with GradientChangeProbe(params if probe else [], reached=adversarial_leaves) as adversarial_probe:
                    adversarial_grads = _gradients_of(adversarial, "adversarial", params)
                if probe:
                    _refuse_one_pass_reduced(clean_probe.changed(clean_grads),
                                             adversarial_probe.changed(adversarial_grads))
                for kind, grads in (("clean", clean_grads), ("adversarial", adversarial_grads)):
                    agr._stash.refuse_unfit(kind, params, grads)
        except BaseException:
            for p, g in zip(params, set_aside, strict=True):
                p.grad = g
            raise
        if clean is None:  # the adversarial gradient stays in .grad, added to the earlier calls' only
            for p, g in zip(params, adversarial_grads, strict=True):
                before = earlier.get(p)
                p.grad = before if g is None else g if before is None else before.add_(g)
            agr._stash.unstashed = {p: p.grad for p in params if p.grad is not None}
            return
        for kind, grads in (("clean", clean_grads), ("adversarial", adversarial_grads)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            agr._take_stash(kind)

    def _take_stash(self, kind: str) -> None:
        params = self._unique_params()
        refuse_flat_shards(params, f"stash_{kind}()", self._granularity)
        # Rows for the accelerator schedule; bf16/fp16 gradients stay tensors (their rows are
        # float32: the step gathers them, and the stash keeps the gradients' own dtype).
        rows = self._implementation(params) in _ROW_IMPLEMENTATIONS and not any(
            p.grad is not None and p.grad.dtype in LOW_PRECISION for p in params
        )
        self._stash.take(kind, params, rows=rows)

    def _implementation(self, params: list[Tensor], statistics_only: bool = False) -> str:
        """The functional implementation that will compute this optimizer's gradients."""
        if not params or is_dtensor(params[0]):
            return "dtensor"
        return _choose(self._fused, params[0].device, statistics_only)[0]

    def _drop_stash(self) -> None:
        self._stash.drop()

    def _unique_params(self) -> list[Tensor]:
        """The parameters of the inner groups, each once (torch only warns on duplicates)."""
        seen: dict[int, Tensor] = {}
        for group in self._optimizer.param_groups:
            for p in group["params"]:
                seen.setdefault(id(p), p)
        return list(seen.values())

    def _show_stash_to_scaler(self) -> dict[str, Any]:
        current = tuple(p.grad for p in self._unique_params())
        view = show_stash(
            self._stash.scaler_view, self._stash.items(), self._optimizer.param_groups,  # type: ignore[arg-type]
            self._stash.version, current,
        )
        self._stash.scaler_view = view
        return view.group

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) the gradients through the inner optimizer, and drop any stash."""
        agr = self._agr()
        agr._stash.drop(by_zero_grad=True)
        agr._stash.interrupted = None
        agr._optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Reconstruct ``.grad`` from the stashed and the current gradient, then step.

        ``closure``, if given, is called first (with gradients enabled) and must run both
        backward passes and the stash itself; its return value is returned.

        Everything is checked before anything is written; the inner ``step()`` is called once.
        If it raises (or is interrupted), ``.grad`` already holds the reconstructed update, so
        ``step()`` and the stash are refused, with a message, until :meth:`zero_grad`.

        Under ``GradScaler.step(opt)`` (the wrapper sets ``_step_supports_amp_scaling``), both
        gradients are unscaled here, and an inf or NaN in either skips the whole step: the
        parameters, the inner state and the step count stay as they are, the stash is dropped.
        """
        agr = self._agr()
        if agr is not self:
            return agr.step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            plan = self._plan()
        except BaseException:
            forget_scaler_request(self)  # GradScaler does not clean up when step() raises
            raise
        stats = None
        if plan.mode != "skip":
            try:
                stats = self._apply(plan)
                self._optimizer.step()
            except BaseException as error:
                forget_scaler_request(self)
                self._stash.interrupted = type(error).__name__
                self._stash.drop()
                raise
        # Attribute writes come after the inner step: under torch.compile the inner step's
        # graph break drops the writes made before it (seen with torch 2.13); .grad writes stay.
        if plan.mode in ("reconstruct", "warm_start"):
            self._step_count += 1
        if stats is not None:
            self._last_stats, self._last_segment_params = stats, plan.segment_params
        self._stash.drop()
        return loss

    def _plan(self) -> _Plan:
        """Check everything and decide the step; writes nothing (see ``step``)."""
        self._stash.refuse_if_interrupted("step()")
        self._stash.check()
        params = self._unique_params()
        current = tuple(p.grad for p in params)
        if not self._stash and self._is_state_init_step(current):
            # torch.distributed.checkpoint initialises a fresh optimizer's state with a step
            # on zero gradients at lr 0; it moves nothing, so it is passed to the inner
            # optimizer and not counted.
            return _Plan(
                mode="init", grads=[], params=[], adversarial=[], clean=[], segment_ids=[], num_segments=0,
                segment_params=(), with_stats=False, inv_scale=self._scaler_request(current).inv_scale,
                implementation="none",
            )
        # Every step, the warm start's plain ones too: a run that would be refused at its first
        # reconstructing step (parameters swapped for FSDP1's after construction, as Accelerate's
        # prepare does) is refused before it has trained for the whole warm start.
        refuse_flat_shards(params, "step()", self._granularity)
        adversarial_of, clean_of = self._sources()
        mode: Mode = "reconstruct" if self.active else "warm_start"
        grads: list[tuple[Tensor, Tensor | None]] = []
        pairs: list[tuple[int, Tensor, Tensor | None]] = []  # (group index, parameter, clean)
        seen: set[int] = set()
        for group_index, group in enumerate(self._optimizer.param_groups):
            for p in group["params"]:
                if id(p) in seen:
                    continue  # listed twice: reconstructed once (its .grad is shared)
                seen.add(id(p))
                a = adversarial_of(p)
                grads.append((p, a))
                if a is not None:
                    pairs.append((group_index, p, clean_of(p)))
        adversarial = [a for _, a in grads if a is not None]
        clean = [c for _, _, c in pairs]
        pair_params = [p for _, p, _ in pairs]
        with_stats = mode == "reconstruct" or any(c is not None for c in clean)
        implementation = self._implementation(pair_params, statistics_only=mode != "reconstruct")
        if with_stats:
            try:
                validate_gradients(adversarial, clean)
            except ValueError as error:
                raise ValueError(f"cannot reconstruct: {error} (indices count parameters with a gradient)") from None
        in_place = mode == "reconstruct" and implementation not in _ROW_IMPLEMENTATIONS  # rows are copies
        overlapping = [a for a in adversarial if _overlaps(a)] if in_place else []
        if overlapping:
            # Reconstructed in place below, and torch refuses in-place writes into an expanded
            # tensor: such a gradient gets a dense copy. (The clean one is only read; an expanded
            # .grad under GradScaler is refused by GradScaler's own inf check first.)
            dense = {id(a): torch.empty_like(a, memory_format=torch.contiguous_format).copy_(a) for a in overlapping}
            adversarial = [dense.get(id(a), a) for a in adversarial]
            grads = [(p, a if a is None else dense.get(id(a), a)) for p, a in grads]
        if in_place:
            try:  # a gradient sharing memory with another would be read after being overwritten
                validate_writable(adversarial, clean)
            except ValueError as error:
                raise ValueError(f"cannot reconstruct: {error} (indices count parameters with a gradient)") from None
        segment_ids = self._segment_ids([group_index for group_index, _, _ in pairs])
        num_segments = max(segment_ids) + 1 if segment_ids else 0
        members: list[list[Tensor]] = [[] for _ in range(num_segments)]
        for segment, p in zip(segment_ids, pair_params, strict=True):
            members[segment].append(p)
        amp = self._scaler_request(current)
        return _Plan(
            mode="skip" if amp.found_inf else mode, grads=grads, params=pair_params, adversarial=adversarial,
            clean=clean, segment_ids=segment_ids, num_segments=num_segments,
            segment_params=tuple(map(tuple, members)), with_stats=with_stats, inv_scale=amp.inv_scale,
            implementation=implementation,
        )

    def _apply(self, plan: _Plan) -> ReconstructionStats | None:
        """Unscale, reconstruct, set every ``.grad`` (the writes of a step)."""
        if plan.inv_scale is not None:
            tensors = [*plan.adversarial, *(c for c in plan.clean if c is not None)]
            if plan.mode == "init":
                tensors = [p.grad for p in self._unique_params() if p.grad is not None]
            unique = {id(t): t for t in tensors}  # a parameter listed twice is unscaled once
            unscale_(list(unique.values()), plan.inv_scale)
        stats = None
        grads = plan.grads
        if plan.with_stats and plan.implementation in _ROW_IMPLEMENTATIONS:
            stats, grads = self._reconstruct_rows(plan)
        elif plan.with_stats:
            out = plan.adversarial if plan.mode == "reconstruct" else NO_OUTPUT  # warm start: statistics only
            _, stats = _run(
                plan.adversarial, plan.clean, plan.segment_ids, plan.num_segments, self._clip_norm, self._fused,
                out=out,
            )
        for p, g in grads:
            p.grad = g
        return stats

    def _reconstruct_rows(self, plan: _Plan) -> tuple[ReconstructionStats, list[tuple[Tensor, Tensor | None]]]:
        """The accelerator schedule: the pairs in rows (the stash's own, or gathered by one copy
        per kind), reconstructed in the adversarial rows, whose views become the ``.grad``."""
        layout = layout_for(plan.params)
        rows = {kind: self._stash.rows_for(kind, plan.params, layout) for kind in KINDS}
        a_views = plan.adversarial  # the stash's views when its rows are used
        a_rows = rows["adversarial"]
        if a_rows is None:
            a_rows, a_views = layout.gather_views(plan.adversarial)
        c_rows = rows["clean"] or layout.gather(plan.clean)
        # Everything is in the rows now: the stash (its tensors, GradScaler's view of them and of
        # the current gradients) goes before the schedule's temporaries are allocated.
        self._stash.drop()
        clip = None if self._clip_norm is None or self._clip_norm == float("inf") else float(self._clip_norm)
        run = reconstruct_rows_compiled if plan.implementation == "compiled" else reconstruct_rows
        if plan.mode != "reconstruct":  # the warm start: statistics only, .grad stays the adversarial gradient
            stats = reconstruct_rows(layout, a_rows, c_rows, segment_ids=plan.segment_ids,
                                     num_segments=plan.num_segments, clip_norm=clip, combine=False)
            return stats, plan.grads
        # The gathered gradients are not needed any more: let them go before the schedule's
        # temporaries are allocated (the plan is consumed here; .grad is set again below).
        same_dtype = all(b.row_dtype == b.dtype for b in layout.buckets)
        views_of = dict(zip(plan.params, a_views, strict=True))
        for p in plan.params:
            p.grad = views_of[p] if same_dtype else None
        plan.adversarial[:] = a_views
        plan.clean[:] = [None] * len(plan.clean)
        plan.grads[:] = [(p, g if g is None else views_of[p]) for p, g in plan.grads]
        stats = run(layout, a_rows, c_rows, segment_ids=plan.segment_ids, num_segments=plan.num_segments,
                    clip_norm=clip)
        results = result_rows(layout, a_rows)
        views = a_views if all(r is a for r, a in zip(results, a_rows, strict=True)) else layout.views(results)
        new = dict(zip(plan.params, views, strict=True))
        return stats, [(p, g if g is None else new[p]) for p, g in plan.grads]

    def _sources(self) -> tuple[Callable[[Tensor], Tensor | None], Callable[[Tensor], Tensor | None]]:
        """Where each parameter's adversarial and clean gradients are, for this step."""
        current = lambda p: p.grad  # noqa: E731
        nothing = lambda p: None  # noqa: E731
        kinds = [k for k in KINDS if k in self._stash]
        has_current = any(p.grad is not None for p in self._unique_params())
        if not kinds:
            if self.active:
                raise RuntimeError(
                    "AGROptimizer.step() found no stashed gradient: AGR is active (step "
                    f"{self._step_count} >= start_step {self._start_step}) and needs the clean gradient "
                    "stashed with stash_clean() (or the adversarial one with stash_adversarial()) "
                    "between the two backward passes, or both passed to opt.backward(clean=..., adversarial=...)."
                    + self._stash.dropped_note()
                )
            return current, nothing  # warm start, adversarial pass only
        if len(kinds) == 1:
            kind = kinds[0]
            if not has_current:
                # A zero_grad() that dropped the other kind's stash is the likelier cause than the order.
                cause = self._stash.dropped_note().strip() or (
                    f"stash_{kind}() goes between the two backward passes (after the first), not after both."
                )
                raise RuntimeError(
                    f"AGROptimizer.step() found the stashed {kind} gradient but no current gradient on any "
                    f"parameter: {cause} Nothing was changed; call zero_grad() and redo the step"
                )
            stashed = self._stash[kind].get
            return (current, stashed) if kind == "clean" else (stashed, current)
        counts = {k: self._stash.passes.get(k, 0) for k in KINDS}
        if counts["clean"] != counts["adversarial"] or has_current:
            lagging = min(KINDS, key=lambda k: counts[k])
            detail = (
                f"{counts['clean']} clean and {counts['adversarial']} adversarial stashes; the last "
                f"stash_{lagging}() is missing"
                if counts["clean"] != counts["adversarial"]
                else f"both gradients are stashed ({counts['clean']} of each) but .grad holds another gradient"
            )
            raise RuntimeError(
                f"AGROptimizer.step() found {detail}. With gradient accumulation, every micro-batch stashes both "
                f"gradients (stash_clean() after the clean backward, stash_adversarial() after the adversarial "
                f"one) and no backward pass follows the last stash ({ACCUMULATION_RECIPE}). Nothing was changed"
            )
        return self._stash["adversarial"].get, self._stash["clean"].get

    def _segment_ids(self, groups: list[int]) -> list[int]:
        """Segment of each pair, from the param group of each (in ``param_groups`` order)."""
        if self._granularity == "tensor":
            return list(range(len(groups)))
        if self._granularity == "global":
            return [0] * len(groups)
        order = {g: i for i, g in enumerate(dict.fromkeys(groups))}  # groups without a gradient skipped
        return [order[g] for g in groups]

    def _scaler_request(self, current: tuple[Tensor | None, ...]) -> ScalerRequest:
        return read_scaler_request(
            self, self._stash.scaler_view, bool(self._stash), self._stash.version, current  # type: ignore[arg-type]
        )

    def _is_state_init_step(self, current: tuple[Tensor | None, ...]) -> bool:
        """Whether this is torch.distributed.checkpoint's state-initialisation step.

        ``get/set_optimizer_state_dict`` step a fresh optimizer (empty state, no gradient)
        once with zero gradients and every lr set to 0. Only checked when no gradient is
        stashed, so the host sync below is off the training path.
        """
        if self._optimizer.state:
            return False
        if not all(float(g["lr"]) == 0.0 for g in self._optimizer.param_groups if "lr" in g):
            return False
        return not any(bool(local_tensor(g).count_nonzero()) for g in current if g is not None)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, with the wrapper's state in every param group.

        The wrapper's entry (``"agr"``: step count and settings) sits in each saved param
        group, so it survives tools that keep only ``"state"`` and ``"param_groups"``
        (``torch.distributed.checkpoint``). Everything is plain Python or tensors:
        ``torch.load(..., weights_only=True)`` reads it. To load it into a plain optimizer,
        pass it through :func:`~agr_optim.strip_agr_state` first.
        """
        agr = self._agr()
        if agr is not self:
            return agr.state_dict()
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self._optimizer.state_dict()
        mine = self._agr_state()
        state_dict["param_groups"] = [{**group, STATE_KEY: dict(mine)} for group in state_dict["param_groups"]]
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _agr_state(self) -> dict[str, Any]:
        return {
            "step": self._step_count,
            "clip_norm": self._clip_norm,
            "start_step": self._start_step,
            "granularity": self._granularity,
            "fused": self._fused,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict` (or a plain inner-optimizer one).

        The checkpoint's step count and settings replace the wrapper's (they stay assignable
        afterwards). A plain optimizer state dict (no ``"agr"`` entry, e.g. a checkpoint of the
        warm-start run) loads the inner state and leaves the wrapper's step count and settings
        as they are. A malformed ``"agr"`` entry raises ``ValueError`` naming it, before
        anything (inner optimizer or wrapper) changes. Any stash is dropped.
        """
        agr = self._agr()
        if agr is not self:
            return agr.load_state_dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        mine = read_agr_state(state_dict)
        self._optimizer.load_state_dict(strip_agr_state(state_dict))
        if mine is not None:
            for key, value in mine.items():
                setattr(self, "_step_count" if key == "step" else f"_{key}", value)
        self._drop_stash()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


#: The getters a wrapper around the wrapper forwards ``param_groups`` through (see _amp.py).
_FORWARDING_CODE = (AGROptimizer.param_groups.fget.__code__,)  # type: ignore[attr-defined]


def _graph(root: Tensor) -> tuple[set[object], set[int]]:
    """The nodes of ``root``'s autograd graph other than the leaves' accumulators, and the ``id``
    of each leaf it accumulates into. Two losses whose node sets meet share a forward pass: the
    first one's backward must keep its graph."""
    seen: set[object] = set()
    leaves: set[int] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if type(node).__name__ == "AccumulateGrad":
            leaves.add(id(node.variable))  # type: ignore[attr-defined]
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return seen, leaves


def _gradients_of(loss: Tensor, name: str, params: list[Tensor], *, retain_graph: bool = False) -> list[Tensor | None]:
    """``loss``'s gradient of each parameter (``None``: not reached), by autograd through ``.grad``,
    which is ``None`` before and after; a loss that reaches none of them is refused."""
    loss.backward(retain_graph=retain_graph)
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    if all(g is None for g in grads):
        raise ValueError(
            f"backward(): the {name} loss reaches none of the optimizer's parameters (no gradient on any of them); "
            "pass the loss of the model this optimizer trains. Nothing was changed"
        )
    return grads


def _refuse_one_pass_reduced(clean_changed: Tensor, adversarial_changed: Tensor) -> None:
    """Refuse two passes of which only one was averaged over the processes (``DistributedDataParallel``
    synchronises one backward pass per forward: after both forwards, only the first pass). One
    host sync, only with more than one process."""
    clean_was, adversarial_was = bool(clean_changed), bool(adversarial_changed)  # the first read waits for both
    if clean_was == adversarial_was:
        return
    reduced, local = ("clean", "adversarial") if clean_was else ("adversarial", "clean")
    raise RuntimeError(
        f"backward(): the {reduced} gradients were averaged over the processes after autograd computed them "
        f"(DistributedDataParallel's all-reduce) and the {local} gradients were not: DDP synchronises one backward "
        "pass per forward, and both forwards came before this call, so the replicas would drift apart. Under DDP "
        "use the two-pass protocol, each forward followed by its own backward pass: model(x), loss.backward(), "
        "opt.stash_clean(), model(x_adv), loss.backward(), opt.step() (the recipes' steps: authors=False). "
        "Nothing was changed"
    )


def _refuse_unlike(grads: list[Tensor | None], params: list[Tensor], earlier: dict[Tensor, Tensor]) -> None:
    """Refuse gradients that cannot be added to what earlier ``backward(clean=None)`` calls left."""
    for index, (p, g) in enumerate(zip(params, grads, strict=True)):
        before = earlier.get(p)
        if g is not None and before is not None and (g.shape, g.dtype, g.device) != (before.shape, before.dtype,
                                                                                      before.device):
            raise RuntimeError(
                f"backward(): the adversarial gradient of parameter {index} (shape {tuple(g.shape)}, {g.dtype}, on "
                f"{g.device}) does not match the one an earlier backward(clean=None) left (shape "
                f"{tuple(before.shape)}, {before.dtype}, on {before.device}): the model was moved or cast between "
                "micro-batches; call zero_grad() and redo them"
            )


def _requires_closure(optimizer: Optimizer) -> bool:
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):  # no signature to read: assume a plain step()
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def _overlaps(t: Tensor) -> bool:
    """Whether ``t`` has elements sharing memory (``expand``): torch refuses in-place writes."""
    return torch._debug_has_internal_overlap(local_tensor(t)) != 0


def _fused_setting(fused: object) -> bool | str:
    """A named setting (``"compile"``, ``"device"``) stays as it is; anything else is read as a
    bool, as before."""
    return str(fused) if isinstance(fused, str) and fused in FUSED_SETTINGS else bool(fused)


def _plain_clip_norm(clip_norm: float | None) -> float | None:
    """A validated ``clip_norm`` as a Python float (numpy's would not load with weights_only=True)."""
    return None if clip_norm is None else float(clip_norm)
