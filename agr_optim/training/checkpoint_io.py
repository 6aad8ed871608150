r"""``--init-from``: a model's weights from a file, checked against the run's model before anything
is written.

AGR is a late-training method (the paper switches it on at epoch 155 of 200), so most users try it
on a model they already trained: ``agr-train --init-from FILE --agr --agr-start-epoch 0 ...``
starts a new run from the file's weights with a fresh optimizer (momentum from zero), a fresh
schedule and AGR from the first step (docs/reproducing.rst, "Fine-tuning a trained model with AGR").

What the file may hold (read with ``torch.load(weights_only=True)``, which builds tensors and plain
data and runs no code):

- a state dict (``model.state_dict()``), also DDP's, whose every key starts with ``module.``, or a
  ``torch.compile``'d model's (``_orig_mod.``; both prefixes in either order);
- ``{'state_dict': ...}`` or ``{'model': ...}``, as model zoos ship them;
- an ``agr-train`` checkpoint (``checkpoint_last.pt``, ``checkpoint_prev.pt``,
  ``checkpoint_best.pt``): its ``model``; in a run folder with ``checksums.json`` it is read only
  when its SHA-256 is recorded there (:class:`~agr_optim.training.run_folder.Checkpoints`).

The weights must fit the model exactly: the same keys and shapes (a refusal names the first wrong
key and both shapes, and counts the others), floating tensors where the model's are floating
(``load_state_dict`` would cast a bool mask or int8 values silently), dense, finite values. One
exception: a file without both ``normalize.mean`` and ``normalize.std`` (the AGR authors' models
normalize in code, with the statistics this package's models default to, so their state dicts
lack the two buffers) keeps the model's own, and the run says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..models import build_model
from . import run_folder
from .config import ConfigError, TrainConfig

__all__ = ["InitWeights", "apply_init", "fit", "read_init"]

#: The model's buffers a file may lack together (kept from the model; see the module's docstring).
_NORMALIZATION = ("normalize.mean", "normalize.std")
_CHECKPOINT_NAMES = (run_folder.CHECKPOINT_LAST, run_folder.CHECKPOINT_PREV, run_folder.CHECKPOINT_BEST)


@dataclass(frozen=True)
class InitWeights:
    """Weights checked against the run's model: ``state`` (CPU tensors, by the model's keys),
    ``source`` (what the file was, for the run's line) and ``kept`` (the model's buffers kept)."""

    path: str
    state: dict[str, Tensor]
    source: str
    kept: tuple[str, ...]

    def line(self) -> str:
        """The run's line about its initial weights."""
        text = f"agr-train: initial weights from {self.path} ({self.source})"
        if self.kept:
            text += f"; not in the file, kept from --model: {', '.join(self.kept)}"
        return text


def _shape(t: Tensor) -> str:
    return f"({', '.join(map(str, t.shape))})"


def _kind(t: Tensor) -> str:
    """What a dtype holds, for :func:`fit`: real floating, complex, or integers (bool, quantized)."""
    return "complex" if t.is_complex() else "floating" if t.is_floating_point() else "integer"


def _load_file(path: str) -> Any:
    """The file's object: through the run folder's checksums when it is an ``agr-train``
    checkpoint beside a ``checksums.json``, else plainly; a one-line :class:`ConfigError`."""
    folder, name = os.path.split(os.path.abspath(path))
    if name in _CHECKPOINT_NAMES and os.path.exists(os.path.join(folder, run_folder.CHECKSUMS)):
        try:
            state = run_folder.Checkpoints(folder).load(name, "cpu")
        except run_folder.RunFolderError as error:
            raise ConfigError(f"--init-from: {error}") from None
        if state is None:  # the run has none of that name (a run of one epoch has no checkpoint_prev.pt)
            raise ConfigError(f"--init-from {path!r}: no such file")
        return state
    try:
        data = run_folder.read_regular_file(path, accept=lambda size: True)
    except FileNotFoundError:
        raise ConfigError(f"--init-from {path!r}: no such file") from None
    except OSError as error:
        raise ConfigError(f"--init-from {path!r}: cannot read it ({error.strerror or error})") from None
    try:
        return run_folder.load_tensors(data, path, "cpu", "a pickled model? save its state_dict() instead")
    except run_folder.RunFolderError as error:
        raise ConfigError(f"--init-from: {error}") from None


def _weights(obj: Any, path: str) -> tuple[dict[str, Tensor], str]:
    """The state dict inside the file's object, and what the file was."""
    if not isinstance(obj, dict):
        raise ConfigError(f"--init-from {path!r} holds a {type(obj).__name__}, not a state dict")
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        state, source = obj, "a state dict"
    elif isinstance(obj.get("model"), dict) and isinstance(obj.get("epoch"), int) and "metrics" in obj:
        # checkpoint_last/prev.pt count the epochs done; checkpoint_best.pt names its 0-based epoch.
        epoch = obj["epoch"] - 1 if "optimizer" in obj else obj["epoch"]
        state, source = obj["model"], f"an agr-train checkpoint after epoch {epoch} (0-based)"
    elif isinstance(obj.get("state_dict"), dict):
        state, source = obj["state_dict"], "its 'state_dict'"
    elif isinstance(obj.get("model"), dict):
        state, source = obj["model"], "its 'model'"
    else:
        keys = ", ".join(map(repr, list(obj)[:4])) + (", ..." if len(obj) > 4 else "")
        raise ConfigError(
            f"--init-from {path!r} is not a state dict (its keys: {keys}): give tensors by parameter name, "
            f"{{'state_dict': ...}} or an agr-train checkpoint"
        )
    if not state:
        raise ConfigError(f"--init-from {path!r}: {source} is empty")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ConfigError(f"--init-from {path!r}: {source} holds {key!r}, which is not a named tensor")
    for key, value in state.items():
        # torch's own errors deep in the check otherwise (isfinite of a sparse or a meta tensor)
        if value.layout != torch.strided:
            raise ConfigError(f"--init-from {path!r}: {key} is a sparse tensor ({value.layout}); save dense weights")
        if value.is_meta:
            raise ConfigError(f"--init-from {path!r}: {key} is a meta tensor (shapes without values)")
    # DistributedDataParallel's module. and torch.compile's _orig_mod., in either order.
    prefixes = {"module.": "DDP's module. prefix", "_orig_mod.": "torch.compile's _orig_mod. prefix"}
    stripped = True
    while stripped:
        stripped = False
        for prefix, what in prefixes.items():
            if all(key.startswith(prefix) for key in state):
                state, source = {key[len(prefix) :]: v for key, v in state.items()}, f"{source}, {what}"
                stripped = True
    return state, source


def fit(state: dict[str, Tensor], model: dict[str, Tensor]) -> tuple[str, ...]:
    """Check ``state`` against the ``model``'s state dict (shapes only: ``model`` may be on the
    meta device); returns the model's keys to keep (the normalization buffers, when the file
    lacks both). Raises ``ValueError`` naming the first wrong key, in the model's order."""
    missing = [k for k in model if k not in state]
    kept = tuple(missing) if sorted(missing) == sorted(_NORMALIZATION) else ()
    missing = [k for k in missing if k not in kept]
    unexpected = [k for k in state if k not in model]
    reshaped = [k for k in model if k in state and state[k].shape != model[k].shape]
    # load_state_dict casts silently: float64 or float16 weights are fine, integer, bool or complex
    # ones for floating weights (a mask, quantized values) are not weights.
    retyped = [k for k in model if k in state and k not in reshaped and _kind(state[k]) != _kind(model[k])]
    if not (missing or unexpected or reshaped or retyped):
        return kept
    counts = ", ".join(
        f"{len(keys)} {what}"
        for keys, what in (
            (missing, "missing"),
            (unexpected, "unexpected"),
            (reshaped, "of another shape"),
            (retyped, "of another kind"),
        )
        if keys
    )
    wrong = [k for k in model if k in missing or k in reshaped or k in retyped]  # the model's order
    if wrong and wrong[0] in reshaped:
        key = wrong[0]
        what = f"{key} has shape {_shape(state[key])} in the file and {_shape(model[key])} in the model"
    elif wrong and wrong[0] in retyped:
        key = wrong[0]
        what = f"{key} is {state[key].dtype} in the file and {model[key].dtype} in the model"
    elif wrong:
        what = f"the model's {wrong[0]} {_shape(model[wrong[0]])} is not in the file"
    else:
        what = f"the file's {unexpected[0]} {_shape(state[unexpected[0]])} is not in the model"
    raise ValueError(f"{what} (keys: {counts})")


def read_init(cfg: TrainConfig, data: Any) -> InitWeights:
    """Read ``cfg.init_from`` and check it against ``cfg.model`` built for ``data`` (on the meta
    device: no memory, no random draw); one-line :class:`ConfigError` naming ``--init-from``.
    Writes nothing."""
    path = str(cfg.init_from)
    state, source = _weights(_load_file(path), path)
    with torch.device("meta"):
        model = build_model(
            cfg.model, num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size
        ).state_dict()
    try:
        kept = fit(state, model)
    except ValueError as error:
        raise ConfigError(
            f"--init-from {path!r} ({source}) does not fit --model {cfg.model} with {data.num_classes} classes "
            f"and {data.in_channels} input channels: {error}"
        ) from None
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ConfigError(f"--init-from {path!r}: {key} holds a NaN or an infinity")
    return InitWeights(path, state, source, kept)


def apply_init(module: nn.Module, init: InitWeights) -> None:
    """Copy the checked weights into ``module`` (cast to its dtypes, on its device)."""
    result = module.load_state_dict(init.state, strict=not init.kept)
    assert not result.unexpected_keys and sorted(result.missing_keys) == sorted(init.kept), result
