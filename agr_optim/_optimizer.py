"""``AGROptimizer``: AGR as a drop-in wrapper around any ``torch.optim.Optimizer``."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._amp import forget_scaler_request, read_scaler_request, stash_group, unscale_
from ._distributed import local_tensor
from ._stats import ReconstructionStats
from .functional import _run, validate_clip_norm, validate_fused, validate_gradients, validate_granularity

__all__ = ["AGROptimizer"]

GRANULARITIES = ("tensor", "group", "global")
_STATE_KEY = "agr"
_TRANSIENT = ("_stash", "_stash_kind", "_stash_group")
#: What a pickle or deepcopy keeps, as torch's Optimizer keeps only its defaults, state and
#: groups: hooks, a scheduler's patched ``step`` (it holds a weakref to the original) and the
#: stash are left behind.
_PICKLED = (
    "_optimizer", "_initializing", "clip_norm", "start_step", "granularity", "fused", "_step_count", "last_stats"
)


class AGROptimizer(Optimizer):
    r"""Adaptive Gradient Reconstruction around an inner optimizer.

    Tong et al., *Adversarial Training with Adaptive Gradient Reconstruction*, ACM MM 2024.
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
    rate act on :math:`r`. During the warm start (the first ``start_step`` steps) the update
    is :math:`a`, unchanged and unclipped, as in the paper, which starts AGR at epoch 155 of 200.

    The wrapper shares the inner optimizer's ``param_groups``, ``state`` and ``defaults``
    (the objects, not copies), so LR schedulers, ``add_param_group`` and checkpoints act on
    the inner optimizer.

    Args:
        optimizer: the inner optimizer (SGD with momentum in the paper; any torch optimizer).
        clip_norm: clip each segment's reconstructed gradient to this norm; ``None`` for no
            clipping. The paper's code uses 0.1 per tensor.
        start_step: number of initial steps that use the adversarial gradient alone.
        granularity: the segments: ``"tensor"`` (each parameter tensor, the paper),
            ``"group"`` (each param group) or ``"global"`` (all parameters at once).
        fused: use the fused implementation (default) or the readable per-segment loop;
            ``"compile"`` (opt-in) runs the fused path through ``torch.compile`` (see
            :func:`agr_optim.functional.reconstruct`).

    Attributes:
        last_stats: :class:`~agr_optim.ReconstructionStats` of the last reconstructing step
            (``None`` before one); segments are, in ``param_groups`` order, the parameters
            that had an adversarial gradient (``"tensor"``), the groups that had one
            (``"group"``), or one segment (``"global"``).

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
        validate_clip_norm(clip_norm)
        _validate_start_step(start_step)
        validate_granularity(granularity, GRANULARITIES)
        self._optimizer = optimizer
        self._initializing = True
        # Optimizer.__init__ sets up the hook dictionaries and wraps step() so that step
        # pre/post hooks fire; the throwaway group it builds is replaced by the inner's below.
        super().__init__([torch.empty(0)], {})
        self._initializing = False
        self.clip_norm: float | None = clip_norm
        self.start_step: int = int(start_step)
        self.granularity: str = granularity
        validate_fused(fused)
        self.fused: bool | str = _fused_setting(fused)
        self._step_count = 0
        self._stash: dict[Tensor, Tensor | None] | None = None
        self._stash_kind: str | None = None
        self._stash_group: dict[str, Any] | None = None
        self.last_stats: ReconstructionStats | None = None

    # ------------------------------------------------------------------ delegation
    @property
    def optimizer(self) -> Optimizer:
        """The inner optimizer."""
        return self._optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        if self.__dict__.get("_initializing", True):
            return self._init_groups
        groups = self._optimizer.param_groups
        if self.__dict__.get("_stash") is None:
            return groups
        # While a gradient is stashed, GradScaler must unscale and inf-check it like
        # ``.grad``; it only looks at ``param_groups``, so the stash is listed as one more
        # group (a new list: the inner optimizer never sees it). See ``_amp.py``.
        return [*groups, self._amp_stash_group()]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if self.__dict__.get("_initializing", True):
            self._init_groups = value
        else:
            self._optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self._optimizer.state if not self.__dict__.get("_initializing", True) else self._init_state

    @state.setter
    def state(self, value: Any) -> None:
        if self.__dict__.get("_initializing", True):
            self._init_state = value
        else:
            self._optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self._optimizer.defaults if not self.__dict__.get("_initializing", True) else self._init_defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        if self.__dict__.get("_initializing", True):
            self._init_defaults = value
        else:
            self._optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer (and so to this wrapper)."""
        if self.__dict__.get("_initializing", True):
            super().add_param_group(param_group)
        else:
            self._optimizer.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in _PICKLED if k in self.__dict__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        for key in (*_TRANSIENT, "last_stats"):
            state.setdefault(key, None)
        # Optimizer.__setstate__ recreates the hook dictionaries and the step wrapper.
        super().__setstate__(state)

    def __repr__(self) -> str:
        return (
            f"AGROptimizer(clip_norm={self.clip_norm}, start_step={self.start_step}, "
            f"granularity={self.granularity!r}, fused={self.fused}, step_count={self._step_count})\n"
            f"  wrapping {self._optimizer!r}"
        )

    # ------------------------------------------------------------------ the AGR protocol
    @property
    def active(self) -> bool:
        """Whether the next :meth:`step` reconstructs (``False`` during the warm start)."""
        return self._step_count >= self.start_step

    @property
    def step_count(self) -> int:
        """Steps applied so far (saved and restored by the state dict)."""
        return self._step_count

    @property
    def has_stash(self) -> bool:
        """Whether a gradient is stashed for the next :meth:`step`."""
        return self._stash is not None

    def stash_clean(self) -> None:
        """Take the clean gradient out of ``.grad`` and keep it for :meth:`step`.

        Call after the clean backward pass and before the adversarial one; ``.grad`` is
        ``None`` afterwards, so the adversarial backward starts from zero. No copy is made:
        the gradient tensors themselves are kept (except gradients that are views into a
        shared buffer, like DDP's ``gradient_as_bucket_view``, which the next backward pass
        would overwrite).
        """
        self._take_stash("clean")

    def stash_adversarial(self) -> None:
        """Like :meth:`stash_clean` for the other order: adversarial backward first."""
        self._take_stash("adversarial")

    def _take_stash(self, kind: str) -> None:
        if self._stash is not None:
            raise RuntimeError(
                f"a {self._stash_kind} gradient is already stashed for this step; call step() or "
                f"zero_grad() before stash_{kind}() again"
            )
        params = [p for group in self._optimizer.param_groups for p in group["params"]]
        for index, p in enumerate(params):
            g = p.grad
            if g is not None and (g.is_sparse or g.layout != torch.strided):
                raise ValueError(
                    f"parameter {index} (shape {tuple(p.shape)}) has a sparse gradient; "
                    "AGR supports dense gradients only"
                )
        stash: dict[Tensor, Tensor | None] = {}
        for p in params:
            if p in stash:
                continue  # listed twice (torch warns): its gradient is already stashed
            g = p.grad
            # A gradient that is a view into a shared buffer (DDP's gradient_as_bucket_view)
            # would be overwritten by the next backward pass, which writes into the same
            # buffer: only such views are copied.
            stash[p] = g.clone() if g is not None and g._is_view() else g
            p.grad = None
        self._stash, self._stash_kind = stash, kind

    def _drop_stash(self) -> None:
        self._stash, self._stash_kind, self._stash_group = None, None, None

    def _amp_stash_group(self) -> dict[str, Any]:
        if self._stash_group is None:
            assert self._stash is not None
            self._stash_group = stash_group(self._stash, self._optimizer.param_groups)
        return self._stash_group

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) the gradients through the inner optimizer, and drop any stash."""
        self._drop_stash()
        self._optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Reconstruct ``.grad`` from the stashed and the current gradient, then step.

        ``closure``, if given, is called first (with gradients enabled) and must run both
        backward passes and the stash itself; its return value is returned.

        Under ``GradScaler.step(opt)`` (the wrapper sets ``_step_supports_amp_scaling``), both
        gradients are unscaled here, and an inf or NaN in either skips the whole step: the
        parameters, the inner state and the step count stay as they are, the stash is dropped.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            # Everything is checked before anything changes.
            self._check_stash()
            init_step = self._is_state_init_step()
            prepared = self._prepare() if self.active and not init_step else None
            amp = read_scaler_request(self, self._stash_group, self._stash is not None)
        except Exception:
            forget_scaler_request(self)  # GradScaler does not clean up when step() raises
            raise
        if amp.found_inf:
            self._drop_stash()
            return loss
        if amp.inv_scale is not None:
            unscale_(self._all_gradients(), amp.inv_scale)
        # Attribute writes come after the inner step: under torch.compile the inner step's
        # graph break drops the writes made before it (seen with torch 2.13); .grad writes stay.
        if prepared is not None:
            stats = self._reconstruct(*prepared)
            self._optimizer.step()
            self.last_stats = stats
            self._step_count += 1
        elif init_step:
            # torch.distributed.checkpoint initialises a fresh optimizer's state with a step
            # on zero gradients at lr 0; it moves nothing, so it is passed to the inner
            # optimizer and not counted.
            self._optimizer.step()
        else:
            self._finish_warm_start()
            self._optimizer.step()
            self._step_count += 1
        self._drop_stash()
        return loss

    def _all_gradients(self) -> list[Tensor]:
        grads = [p.grad for group in self._optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self._stash is not None:
            grads += [g for g in self._stash.values() if g is not None]
        unique = {id(g): g for g in grads}  # a parameter listed twice is unscaled once
        return list(unique.values())

    def _check_stash(self) -> None:
        """A stash whose parameter moved (device, dtype or shape) since it was taken."""
        if self._stash is None:
            return
        for index, (p, g) in enumerate(self._stash.items()):
            if g is None:
                continue
            if g.device != p.device or g.dtype != p.dtype or g.shape != p.shape:
                raise RuntimeError(
                    f"the stashed {self._stash_kind} gradient of parameter {index} (shape {tuple(g.shape)}, "
                    f"{g.dtype}, on {g.device}) no longer matches the parameter (shape {tuple(p.shape)}, "
                    f"{p.dtype}, on {p.device}): the model was moved or cast after stash_{self._stash_kind}(); "
                    "call zero_grad() and redo both backward passes"
                )

    def _is_state_init_step(self) -> bool:
        """Whether this is torch.distributed.checkpoint's state-initialisation step.

        ``get/set_optimizer_state_dict`` step a fresh optimizer (empty state, no gradient)
        once with zero gradients and every lr set to 0. Only checked when no gradient is
        stashed (otherwise an error), so the host sync below is off the training path.
        """
        if self._stash is not None or self._optimizer.state:
            return False
        groups = self._optimizer.param_groups
        if not all(float(g["lr"]) == 0.0 for g in groups if "lr" in g):
            return False
        grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
        return not any(bool(local_tensor(g).count_nonzero()) for g in grads)

    def _finish_warm_start(self) -> None:
        """Warm start: the update is the adversarial gradient alone."""
        if self._stash is not None and self._stash_kind == "adversarial":
            for p, g in self._stash.items():
                p.grad = g

    def _pairs(self) -> tuple[list[Tensor], list[Tensor], list[Tensor | None], list[int], int]:
        """Parameters with an adversarial gradient, their (a, c) pairs and segment ids."""
        if self._stash is None:
            raise RuntimeError(
                "AGROptimizer.step() found no stashed gradient: AGR is active (step "
                f"{self._step_count} >= start_step {self.start_step}) and needs the clean gradient "
                "stashed with stash_clean() (or the adversarial one with stash_adversarial()) "
                "between the two backward passes"
            )
        stash, clean_first = self._stash, self._stash_kind == "clean"
        params: list[Tensor] = []
        adversarial: list[Tensor] = []
        clean: list[Tensor | None] = []
        segment_ids: list[int] = []
        segment = -1
        seen: set[int] = set()
        for group in self._optimizer.param_groups:
            group_has_grad = False
            for p in group["params"]:
                if id(p) in seen:
                    continue  # listed twice: reconstructed once (its .grad is shared)
                seen.add(id(p))
                current, stashed = p.grad, stash.get(p)
                a, c = (current, stashed) if clean_first else (stashed, current)
                if a is None:
                    continue  # no adversarial gradient: the parameter stays frozen
                if not group_has_grad and self.granularity == "group" or segment < 0:
                    segment += 1
                group_has_grad = True
                params.append(p)
                adversarial.append(a)
                clean.append(c)
                if self.granularity == "tensor":
                    segment_ids.append(len(params) - 1)
                else:
                    segment_ids.append(segment)
        if self.granularity == "global":
            segment_ids = [0] * len(params)
        num_segments = (max(segment_ids) + 1) if segment_ids else 0
        return params, adversarial, clean, segment_ids, num_segments

    def _prepare(self) -> tuple[list[Tensor], list[Tensor], list[Tensor | None], list[int], int]:
        params, adversarial, clean, segment_ids, num_segments = self._pairs()
        try:
            validate_gradients(adversarial, clean)
        except ValueError as error:
            raise ValueError(f"cannot reconstruct: {error} (indices count parameters with a gradient)") from None
        return params, adversarial, clean, segment_ids, num_segments

    def _reconstruct(
        self,
        params: list[Tensor],
        adversarial: list[Tensor],
        clean: list[Tensor | None],
        segment_ids: list[int],
        num_segments: int,
    ) -> ReconstructionStats:
        # Non-stashed parameters keep no gradient unless they have an adversarial one.
        assert self._stash is not None
        all_params = list(self._stash)
        _, stats = _run(
            adversarial, clean, segment_ids, num_segments, self.clip_norm, self.fused, out=adversarial
        )
        with_grad = set(map(id, params))
        for p in all_params:
            if id(p) not in with_grad:
                p.grad = None
        for p, r in zip(params, adversarial, strict=True):
            p.grad = r
        return stats

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, with the wrapper's state in every param group.

        The wrapper's entry (``"agr"``: step count and settings) sits in each saved param
        group, so it survives tools that keep only ``"state"`` and ``"param_groups"``
        (``torch.distributed.checkpoint``). Everything is plain Python or tensors:
        ``torch.load(..., weights_only=True)`` reads it.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self._optimizer.state_dict()
        mine = self._agr_state()
        state_dict["param_groups"] = [{**group, _STATE_KEY: dict(mine)} for group in state_dict["param_groups"]]
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _agr_state(self) -> dict[str, Any]:
        return {
            "step": self._step_count,
            "clip_norm": self.clip_norm,
            "start_step": self.start_step,
            "granularity": self.granularity,
            "fused": self.fused,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict` (or a plain inner-optimizer one).

        A plain optimizer state dict (no ``"agr"`` entry, e.g. a checkpoint of the warm-start
        run) loads the inner state and leaves the wrapper's step count and settings as they are.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list):
            raise ValueError("state_dict has no 'param_groups' list")
        mine = _read_agr_state(groups)
        inner = dict(state_dict)
        inner["param_groups"] = [{k: v for k, v in g.items() if k != _STATE_KEY} for g in groups]
        self._optimizer.load_state_dict(inner)
        if mine is not None:
            self._step_count = mine["step"]
            self.clip_norm = mine["clip_norm"]
            self.start_step = mine["start_step"]
            self.granularity = mine["granularity"]
            self.fused = mine["fused"]
        self._drop_stash()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _fused_setting(fused: object) -> bool | str:
    """``"compile"`` stays as it is; anything else is read as a bool, as before."""
    return "compile" if fused == "compile" else bool(fused)


def _validate_start_step(start_step: object) -> None:
    if isinstance(start_step, bool) or not isinstance(start_step, numbers.Integral) or int(start_step) < 0:
        raise ValueError(f"Invalid start_step: {start_step!r}; expected an integer >= 0")


def _read_agr_state(groups: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The wrapper entry of a saved state dict, validated; ``None`` if there is none."""
    entries = [g.get(_STATE_KEY) for g in groups if isinstance(g, dict)]
    present = [e for e in entries if e is not None]
    if not present:
        return None
    mine = present[0]
    if not isinstance(mine, dict):
        raise ValueError(f"state_dict's {_STATE_KEY!r} entry must be a dict, got {type(mine).__name__}")
    expected = {"step", "clip_norm", "start_step", "granularity", "fused"}
    if set(mine) != expected:
        raise ValueError(f"state_dict's {_STATE_KEY!r} entry has keys {sorted(mine)}; expected {sorted(expected)}")
    step = mine["step"]
    if isinstance(step, Tensor):
        step = int(step.item())
    _validate_start_step(step)
    validate_clip_norm(mine["clip_norm"])
    _validate_start_step(mine["start_step"])
    validate_granularity(mine["granularity"], GRANULARITIES)
    return {**mine, "step": int(step), "start_step": int(mine["start_step"]), "fused": _fused_setting(mine["fused"])}
