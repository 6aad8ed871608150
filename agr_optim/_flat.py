r"""Flat gradient rows: the accelerator schedule's buffers, one padded row per device and dtype.

The accelerator ("device") schedule must not launch kernels per parameter tensor: on a GPU each
launch costs microseconds, and models have 50 to 100 tensors. It therefore works on *rows*: all
gradients of one kind (adversarial or clean) of one device and dtype copied, by one
``torch._foreach_copy_``, into one flat tensor. Each tensor starts at a multiple of the *chunk*
``B`` and is padded with zeros to the next one, so a row is a ``[K, B]`` matrix whose every row
(a chunk) belongs to exactly one tensor, hence to one segment whatever the granularity. Per-segment
sums are then per-chunk reductions (one kernel for all tensors) gathered by a cached index, and the
combine multiplies each chunk by its segment's coefficients (two kernels for all tensors).

A :class:`Layout` says where each tensor sits: it depends on the tensors' shapes, strides,
dtypes and devices only, and is built once and cached (its index tensors are copied to the device
once, not per step: no host synchronisation). Rows are allocated per use from the caching
allocator and freed with the last reference (a padded row costs about 1 % more than the
gradients; a persistent one would hold that memory through the forward and backward passes).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._gramian import LOW_PRECISION

__all__ = ["Bucket", "Layout", "layout_of", "layout_for", "SegmentMaps", "index_tensor"]

#: Smallest and largest chunk (elements). The chunk is about 2 % of the mean tensor size, so
#: padding costs about 1 % of the gradients' memory.
_MIN_CHUNK, _MAX_CHUNK = 64, 1 << 16


def row_dtype(dtype: torch.dtype) -> torch.dtype:
    """The rows' dtype: bf16/fp16 gradients are combined in float32 and rounded once at the end."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def dense_strides(shape: Sequence[int], strides: Sequence[int]) -> tuple[int, ...]:
    """The strides autograd gives the gradient of a parameter of ``shape`` and ``strides`` (its
    "layout contract"): the parameter's own when they lay it out densely without overlap
    (contiguous, channels last, any permutation; a dimension of size 1 never with stride 0),
    else the contiguous strides. An empty parameter keeps its strides."""
    if math.prod(shape) == 0:
        return tuple(strides)
    order = sorted(range(len(shape)), key=lambda d: (strides[d], shape[d]))
    expected = 1
    dense = True
    for d in order:
        if shape[d] == 1:
            continue
        if strides[d] != expected:
            dense = False
            break
        expected *= shape[d]
    if dense:
        return tuple(st if st or size != 1 else 1 for size, st in zip(shape, strides, strict=True))
    contiguous, running = [], 1
    for size in reversed(shape):
        contiguous.append(running)
        running *= max(size, 1)
    return tuple(reversed(contiguous))


def chunk_size(numels: Sequence[int]) -> int:
    """A power of two near 2 % of the mean tensor size, within ``[_MIN_CHUNK, _MAX_CHUNK]``."""
    mean = sum(numels) / max(len(numels), 1)
    target = max(0.02 * mean, 1.0)
    return int(min(max(2 ** round(math.log2(target)), _MIN_CHUNK), _MAX_CHUNK))


@dataclass(frozen=True)
class SegmentMaps:
    """A bucket's chunks mapped to segments: ``chunk_segment[k]`` is chunk ``k``'s segment (for
    the combine); ``gather`` is ``[S * width, 1]``: the chunks of each segment, ``width`` per
    segment, padded with ``K``, the row's last chunk (all padding, so its sums are zero)."""

    chunk_segment: Tensor
    gather: Tensor
    width: int


@dataclass(eq=False)
class Bucket:
    """The tensors of one device and dtype, and where each sits in their row."""

    device: torch.device
    dtype: torch.dtype  # the gradients'
    members: tuple[int, ...]  # positions in the layout's tensor list
    shapes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    chunk: int
    num_chunks: int
    _pads: Tensor | None = field(default=None, repr=False)
    _spans: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (piece, size) of each pad
    _split: list[int] = field(default_factory=list, repr=False)
    _pad_sources: list[Tensor] = field(default_factory=list, repr=False)
    _maps: dict[tuple[int, ...], SegmentMaps] = field(default_factory=dict, repr=False)

    @property
    def row_dtype(self) -> torch.dtype:
        return row_dtype(self.dtype)

    @property
    def length(self) -> int:
        """The row's length: the members' chunks and one more, all padding (its sums are the
        zeros that pad the segment gather)."""
        return (self.num_chunks + 1) * self.chunk

    def chunks_of(self, position: int) -> range:
        start = self.offsets[position] // self.chunk
        return range(start, start + math.ceil(self.numels[position] / self.chunk))

    def new_row(self) -> Tensor:
        """An uninitialised row (no kernel): :meth:`Layout.gather` fills it, padding included. A
        normal tensor even under ``inference_mode``: its views become ``.grad``, which the next
        backward pass or ``zero_grad(set_to_none=False)`` writes in place."""
        with torch.inference_mode(False):
            return torch.empty(self.length, dtype=self.row_dtype, device=self.device)

    def views(self, row: Tensor) -> list[Tensor]:
        """Each member's region of ``row``, shaped and strided like its gradient."""
        return self.pieces(row)[0]

    def pieces(self, row: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """``row`` cut by one ``split``: each member's region (shaped and strided like its
        gradient), the non-empty padding regions, and as many zero tensors to copy into them
        (views of one cached zero chunk: the gather zeroes the padding in its own kernels)."""
        if self._pads is None:
            sizes = []
            for position, numel in enumerate(self.numels):
                sizes += [numel, len(self.chunks_of(position)) * self.chunk - numel]
            sizes.append(self.chunk)  # the final chunk, all padding
            zeros = torch.zeros(self.chunk, dtype=self.row_dtype, device=self.device)
            pads = [*range(1, len(sizes) - 1, 2), len(sizes) - 1]  # after each member, and the last chunk
            self._spans = [(i, sizes[i]) for i in pads if sizes[i]]
            self._split = sizes
            self._pad_sources = [zeros[:size] for _, size in self._spans]
            self._pads = zeros
        parts = row.split_with_sizes(self._split)
        members = [parts[2 * i].as_strided(shape, stride) for i, (shape, stride) in enumerate(zip(
            self.shapes, self.strides, strict=True))]
        return members, [parts[i] for i, _ in self._spans], self._pad_sources

    def matrix(self, row: Tensor) -> Tensor:
        """``row`` as ``[K + 1, B]``: one chunk per row, the last all padding."""
        return row.view(self.num_chunks + 1, self.chunk)

    def segment_maps(self, segment_ids: tuple[int, ...], num_segments: int) -> SegmentMaps:
        """The chunk-to-segment maps for ``segment_ids`` (of the layout's tensors), cached."""
        key = (*segment_ids, num_segments)
        found = self._maps.get(key)
        if found is None:
            chunk_segment = [0] * (self.num_chunks + 1)  # the padding chunk: any segment
            per_segment: list[list[int]] = [[] for _ in range(num_segments)]
            for position, member in enumerate(self.members):
                for k in self.chunks_of(position):
                    chunk_segment[k] = segment_ids[member]
                    per_segment[segment_ids[member]].append(k)
            width = max((len(chunks) for chunks in per_segment), default=0)
            gather = [chunks + [self.num_chunks] * (width - len(chunks)) for chunks in per_segment]
            found = SegmentMaps(
                chunk_segment=torch.tensor(chunk_segment, dtype=torch.long, device=self.device),
                gather=torch.tensor([[k] for chunks in gather for k in chunks], dtype=torch.long,
                                    device=self.device).view(-1, 1),
                width=width,
            )
            if len(self._maps) > 16:  # granularities and parameter subsets: a few at most
                self._maps.clear()
            self._maps[key] = found
        return found


class Layout:
    """Where every tensor of a list sits: one :class:`Bucket` per (device, dtype), in order of
    first appearance; members keep their order in the list."""

    def __init__(self, specs: Sequence[tuple[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device]]) -> None:
        self.key = tuple(specs)  # shapes, strides, dtypes, devices: rows of equal keys pair element for element
        self.size = len(specs)
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, (_, _, dtype, device) in enumerate(specs):
            groups.setdefault((device, dtype), []).append(index)
        self.buckets: list[Bucket] = []
        for (device, dtype), members in groups.items():
            shapes = tuple(specs[i][0] for i in members)
            numels = tuple(math.prod(s) for s in shapes)
            chunk = chunk_size(numels)
            offsets, start = [], 0
            for numel in numels:
                offsets.append(start * chunk)
                start += math.ceil(numel / chunk)
            self.buckets.append(Bucket(
                device=device, dtype=dtype, members=tuple(members), shapes=shapes,
                strides=tuple(dense_strides(specs[i][0], specs[i][1]) for i in members), offsets=tuple(offsets),
                numels=numels, chunk=chunk, num_chunks=start,
            ))

    def gather(self, tensors: Sequence[Tensor | None], *, add_to: list[Tensor] | None = None) -> list[Tensor]:
        """One row per bucket holding ``tensors`` (``None``: zeros), by one multi-tensor copy per
        bucket; with ``add_to`` (rows of this layout), added into those instead."""
        return self.gather_views(tensors, add_to=add_to)[0]

    @torch.no_grad()  # rows are buffers: a gradient that carries a graph (create_graph=True) is copied, not traced
    def gather_views(
        self, tensors: Sequence[Tensor | None], *, add_to: list[Tensor] | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """:meth:`gather`, and every tensor's region of the rows (as :meth:`views`)."""
        rows = []
        out: list[Tensor | None] = [None] * self.size
        for index, bucket in enumerate(self.buckets):
            row = bucket.new_row() if add_to is None else add_to[index]
            views, pads, zeros = bucket.pieces(row)
            targets = [v for v, m in zip(views, bucket.members, strict=True) if tensors[m] is not None]
            sources = [tensors[m] for m in bucket.members if tensors[m] is not None]
            missing = [v for v, m in zip(views, bucket.members, strict=True) if tensors[m] is None]
            if add_to is None:
                torch._foreach_copy_([*targets, *pads], [*sources, *zeros])  # type: ignore[list-item]
                if missing:
                    torch._foreach_zero_(missing)
            elif targets:
                torch._foreach_add_(targets, sources)  # type: ignore[arg-type]
            rows.append(row)
            for member, view in zip(bucket.members, views, strict=True):
                out[member] = view
        return rows, out  # type: ignore[return-value]

    def views(self, rows: Sequence[Tensor]) -> list[Tensor]:
        """Every tensor's region of ``rows``, in list order."""
        out: list[Tensor | None] = [None] * self.size
        for bucket, row in zip(self.buckets, rows, strict=True):
            for member, view in zip(bucket.members, bucket.views(row), strict=True):
                out[member] = view
        return out  # type: ignore[return-value]


def layout_for(params: Sequence[Tensor]) -> Layout:
    """The :class:`Layout` of the gradients of ``params`` (autograd gives a dense parameter's
    gradient the parameter's strides), cached."""
    return _cached(tuple(spec_of(p) for p in params))


def spec_of(t: Tensor) -> tuple[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device]:
    return tuple(t.shape), tuple(t.stride()), t.dtype, t.device


_LAYOUTS: OrderedDict[tuple[object, ...], Layout] = OrderedDict()
_CACHED_LAYOUTS = 8


def layout_of(tensors: Sequence[Tensor]) -> Layout:
    """The :class:`Layout` of ``tensors`` (by shapes, strides, dtypes and devices), cached."""
    return _cached(tuple(spec_of(t) for t in tensors))


def _cached(key: tuple[tuple[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device], ...]) -> Layout:
    found = _LAYOUTS.get(key)
    if found is None:
        found = Layout(key)
        _LAYOUTS[key] = found
        if len(_LAYOUTS) > _CACHED_LAYOUTS:
            _LAYOUTS.popitem(last=False)
    else:
        _LAYOUTS.move_to_end(key)
    return found


_INDICES: OrderedDict[tuple[object, ...], Tensor] = OrderedDict()


def index_tensor(values: Sequence[int], device: torch.device) -> Tensor:
    """``torch.tensor(values)`` on ``device``, cached: a host-to-device copy once per distinct
    list, not once per step (it would synchronise with the device)."""
    key = (device, *values)
    found = _INDICES.get(key)
    if found is None:
        found = _INDICES[key] = torch.tensor(list(values), dtype=torch.long, device=device)
        if len(_INDICES) > 64:
            _INDICES.popitem(last=False)
    return found
