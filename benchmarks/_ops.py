"""Counting what a piece of code dispatches to ATen: kernels, views, host synchronisations.

On a GPU every ATen operation that computes something launches at least one kernel (about 5 us
each in eager mode), while views only build metadata; operations that read a value back to the
host (``.item()``, ``bool(tensor)``, ``nonzero``, a tensor made from Python data) stall the host
until the device catches up. :class:`OpCounter` sorts every dispatched operation into these
classes, on any device: the CPU counts are those a GPU would see, since the dispatch is the same.
It also estimates the memory traffic of the computing operations (:attr:`OpCounter.bytes_read`,
:attr:`OpCounter.bytes_written`): what the tensors an operation reads and writes hold, each
distinct element once (see :func:`traffic`). With a launch cost per kernel and a memory bandwidth
this predicts an accelerator's time for code that no accelerator has run yet.

Used by ``benchmarks.reconstruct`` (ops per step beside the times), ``benchmarks.gpu_check`` (host
syncs per step on CUDA) and ``tests/test_device.py`` (the budgets as tests).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Operations that read device memory back to the host (or copy Python data to the device):
#: each synchronises the host with a GPU.
SYNCING = frozenset({
    "aten._local_scalar_dense",  # .item(), float(t), bool(t)
    "aten.is_nonzero",
    "aten.nonzero",
    "aten.nonzero_static",
    "aten.equal",
    "aten.lift_fresh",  # torch.tensor(python data): a host-to-device copy off CPU
    "aten._assert_async",
    "aten.masked_select",
    "aten.unique",
    "aten._unique2",
    "aten.repeat_interleave",  # without output_size it reads the total back
})
#: Allocations without a kernel (``torch.empty``): metadata and the caching allocator only.
ALLOCATING = frozenset({"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty"})
#: Operations that overwrite their destination without reading it.
OVERWRITING = frozenset({"aten.copy_", "aten._foreach_copy_", "aten.zero_", "aten._foreach_zero_", "aten.fill_",
                         "aten._foreach_fill_"})
#: Operations that read only the elements they select from their source: as many as they write.
SELECTING = frozenset({"aten.index_select", "aten.gather"})
#: CUDA's multi-tensor kernels (``multi_tensor_apply`` in PyTorch's ``MultiTensorApply.cuh``) cut
#: tensors into blocks of ``_FOREACH_CHUNK`` elements and launch when ``_FOREACH_BLOCKS`` blocks or
#: ``_FOREACH_TENSORS[depth - 1]`` tensors (``depth``: the number of tensor lists) are filled. These
#: are the limits with 32 KB kernel arguments (CUDA >= 12.1 and a driver >= 530, as on an H200);
#: with 4 KB arguments they are 320 blocks and (110, 64, 48, 36, 30) tensors.
_FOREACH_CHUNK, _FOREACH_BLOCKS, _FOREACH_TENSORS = 65536, 2240, (770, 448, 336, 252, 210)
#: Reductions that accumulate in a wider dtype than their input's (``dtype=``) by first copying the
#: whole input to that dtype: ATen's ``make_reduction`` casts the input unless it is float16 or
#: bfloat16 accumulated in float32 (which CUDA's kernels do in registers). The copy is a kernel of
#: its own inside the operation: never dispatched, so counted here from the dtypes.
CASTING_REDUCTIONS = frozenset({"aten.sum", "aten.mean", "aten.nansum", "aten.prod", "aten.linalg_vector_norm",
                                "aten.norm"})


def _name(func: Any) -> str:
    return str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)


def tensor_bytes(t: torch.Tensor) -> int:
    """The bytes of the distinct elements of ``t``: a broadcast (stride-0) dimension counts once."""
    distinct = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            distinct *= size
    return distinct * t.element_size() if t.numel() else 0


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _key(t: torch.Tensor) -> tuple[Any, ...]:
    """The same memory seen twice (``x * x``) is read once."""
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


def launches(name: str, args: Any) -> int:
    """The kernels a computing operation launches on CUDA: one, except a multi-tensor
    (``_foreach_``) operation, whose launches ``multi_tensor_apply``'s loop decides (simulated
    here; its slow per-tensor path, taken for mixed dtypes or devices, is not modelled)."""
    if not name.startswith("aten._foreach_"):
        return 1
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    if not lists:
        return 1
    max_tensors = _FOREACH_TENSORS[min(len(lists), len(_FOREACH_TENSORS)) - 1]
    count = blocks = tensors = 0
    for t in lists[0]:
        if t.numel() == 0:
            continue
        tensors += 1
        chunks = math.ceil(t.numel() / _FOREACH_CHUNK)
        for chunk in range(chunks):
            blocks += 1
            if blocks == _FOREACH_BLOCKS or (tensors == max_tensors and chunk == chunks - 1):
                count += 1
                tensors = 1 if chunk < chunks - 1 else 0  # a tensor cut by a launch goes on in the next
                blocks = 0
    return max(count + (blocks > 0), 1)


def hidden_cast(name: str, args: Any, written: list[torch.Tensor]) -> tuple[int, int]:
    """``(bytes read, bytes written)`` of the copy a reduction makes of its input to a wider
    accumulation dtype (:data:`CASTING_REDUCTIONS`); ``(0, 0)`` where it makes none. The
    reduction then reads that copy instead of its input: :func:`traffic` counts the input."""
    if name not in CASTING_REDUCTIONS or not args or not isinstance(args[0], torch.Tensor) or not written:
        return 0, 0
    source, target = args[0].dtype, written[0].dtype
    if source == target or not source.is_floating_point or (source in (torch.float16, torch.bfloat16)
                                                             and target == torch.float32):
        return 0, 0
    copy = tensor_bytes(args[0]) // args[0].element_size() * target.itemsize
    return tensor_bytes(args[0]), copy


def _bind(func: Any, args: Any, kwargs: Any) -> list[tuple[Any, Any]]:
    """``(schema argument, value)`` of every argument given (``None`` for the argument without a schema)."""
    schema = getattr(func, "_schema", None)
    kwargs = kwargs or {}
    if schema is None:
        return [(None, v) for v in (*args, *kwargs.values())]
    bound = []
    for index, arg in enumerate(schema.arguments):
        if arg.kwarg_only or index >= len(args):
            if arg.name in kwargs:
                bound.append((arg, kwargs[arg.name]))
        else:
            bound.append((arg, args[index]))
    return bound


def _is_written(arg: Any) -> bool:
    return arg is not None and arg.alias_info is not None and arg.alias_info.is_write


def traffic(func: Any, args: Any, kwargs: Any, out: Any) -> tuple[int, int, bool]:
    """``(bytes read, bytes written, hidden cast)`` of one computing operation, an estimate from its schema.

    Written: the arguments the schema marks as written (in-place and ``out=`` forms, ``self`` of
    the in-place multi-tensor ops), else the returned tensors. Read: every other tensor argument,
    and a written one too unless the operation only overwrites it (``copy_``, ``zero_``,
    ``fill_``, an ``out=`` argument). A selection (``index_select``) reads what it writes plus
    its index. A reduction into a wider dtype adds its hidden copy (:func:`hidden_cast`: read the
    input, write the copy, then the reduction reads the copy); the third value says whether it
    made one. Caches are ignored: every operation reads its inputs from memory, which is what
    separate eager kernels do on an accelerator once the data exceed its cache.
    """
    name = _name(func)
    bound = _bind(func, args, kwargs)
    read: dict[tuple[Any, ...], int] = {}
    written: dict[tuple[Any, ...], int] = {}
    for arg, value in bound:
        for t in _tensors(value):
            if _is_written(arg):
                written[_key(t)] = tensor_bytes(t)
                if arg.kwarg_only or name in OVERWRITING:
                    continue
            read[_key(t)] = tensor_bytes(t)
    outputs = [t for arg, value in bound if _is_written(arg) for t in _tensors(value)]
    if not written:
        outputs = _tensors(out if isinstance(out, (list, tuple)) else [out])
        for t in outputs:
            written[_key(t)] = tensor_bytes(t)
    if name in SELECTING and bound:
        for t in _tensors(bound[0][1]):  # the source: only the selected elements are read
            read.pop(_key(t), None)
        read[("selected",)] = sum(written.values())
    cast_read, cast_written = hidden_cast(name, args, outputs)
    if cast_read:
        read[_key(args[0])] = cast_read + cast_written  # the copy reads the input; the reduction the copy
        written[("cast",)] = cast_written
    return sum(read.values()), sum(written.values()), bool(cast_read)


class OpCounter(TorchDispatchMode):
    """Counts every ATen operation dispatched inside the ``with`` block, by class.

    ``kernels``: operations that compute (each at least one kernel launch on a GPU); ``views``:
    aliasing operations (no kernel); ``allocations``: ``empty`` and friends (no kernel);
    ``syncs``: the host-synchronising operations of :data:`SYNCING` (also counted as kernels or
    views as they are); ``other``: the profiler's markers. ``names`` holds every operation's
    count by name; ``bytes_read`` and ``bytes_written`` the estimated memory traffic of the
    kernels (:func:`traffic`), ``bytes_by_name`` the same summed per operation; ``launches``
    the kernels CUDA would launch for them (:func:`launches`: more than ``kernels`` where a
    multi-tensor operation spans many tensors or elements, or a reduction copies its input to a
    wider dtype first, ``hidden_casts`` of them: :func:`hidden_cast`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.names: Counter[str] = Counter()
        self.bytes_by_name: Counter[str] = Counter()
        self.kernels = self.views = self.allocations = self.syncs = self.other = 0
        self.bytes_read = self.bytes_written = self.launches = self.hidden_casts = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = _name(func)
        self.names[name] += 1
        if name in SYNCING:
            self.syncs += 1
        if getattr(func, "is_view", False) or torch.Tag.inplace_view in getattr(func, "tags", ()):
            self.views += 1
        elif name in ALLOCATING:
            self.allocations += 1
        elif name.startswith("profiler."):  # Optimizer.step's record_function: no kernel
            self.other += 1
        else:
            self.kernels += 1
            out = func(*args, **(kwargs or {}))
            read, written, cast = traffic(func, args, kwargs, out)
            self.launches += launches(name, args) + cast  # the hidden copy is a kernel of its own
            self.hidden_casts += cast
            self.bytes_read += read
            self.bytes_written += written
            self.bytes_by_name[name] += read + written
            return out
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.names.values())

    @property
    def bytes_moved(self) -> int:
        return self.bytes_read + self.bytes_written

    def summary(self) -> dict[str, Any]:
        return {"kernels": self.kernels, "views": self.views, "allocations": self.allocations, "syncs": self.syncs,
                "total": self.total, "launches": self.launches, "hidden_casts": self.hidden_casts,
                "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written,
                "by_name": dict(sorted(self.names.items()))}
