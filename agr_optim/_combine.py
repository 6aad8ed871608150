r"""The host schedule's combine: ``r_i = k_a a_i + k_c c_i`` for every tensor, in place or into new tensors.

Float32/float64 gradients are combined by two multi-tensor ops per cache-sized chunk
(:func:`combine`); bf16/fp16 ones in float32, rounded once. Segments whose sums had to be rescued
(:mod:`._gramian`) are combined by :func:`combine_exact`, in float64 with the clean gradient taken
as :math:`\hat c = c / s_c`: their :math:`k_c` may lie outside the gradients' range although
:math:`k_c c` does not. (The accelerator schedule combines its flat rows itself, :mod:`._device`.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._gramian import LOW_PRECISION


def combine(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    k_a: list[float],
    k_c: list[float],
    out: Sequence[Tensor] | None,
) -> list[Tensor]:
    """``out_i = k_a[i] a_i + k_c[i] c_i``; ``out`` may be ``adversarial`` itself (in place)."""
    n = len(adversarial)
    if out is None:
        # New outputs (the functional API); empty_like keeps each gradient's strides, so the
        # chunks below pair elements of a, c and r alike.
        targets = [torch.empty_like(a) for a in adversarial]
    else:
        targets = list(out)
    fast = [i for i in range(n) if adversarial[i].dtype not in LOW_PRECISION]
    if fast:
        # Coefficients in the gradients' dtype (per-tensor casts inside the foreach kernels
        # would cost more): one tensor for both lists, rounded once from the floats.
        ka_by_dtype, kc_by_dtype = {}, {}
        for d in {adversarial[i].dtype for i in fast}:
            both = torch.tensor(k_a + k_c, dtype=d).unbind()
            ka_by_dtype[d], kc_by_dtype[d] = both[:n], both[n:]
        _combine_chunked(
            [(targets[i], adversarial[i], clean[i], ka_by_dtype[adversarial[i].dtype][i],
              kc_by_dtype[adversarial[i].dtype][i]) for i in fast]
        )
    for i in range(n):
        if adversarial[i].dtype in LOW_PRECISION:
            # One rounding to bf16/fp16: combine in float32, round once at the end.
            ka, kc = (torch.tensor(k[i], dtype=torch.float32) for k in (k_a, k_c))
            r = adversarial[i].float() * ka
            c = clean[i]
            if c is not None:
                r = r + c.float() * kc
            targets[i].copy_(r)
    return targets


#: Elements per chunk of the combine (2 MiB of float32): ``mul_`` leaves the chunk in the
#: cache for ``addcmul_``. Measured on a 2-core EPYC: 0.5M-1M elements best, whole-model
#: passes about 1.5x slower.
_CHUNK = 1 << 19


def _combine_chunked(items: list[tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]]) -> None:
    """``r = k_a a + k_c c`` for ``(r, a, c, k_a, k_c)`` items, chunk by cache-sized chunk.

    Gradients are cut into pieces of at most ``_CHUNK`` elements (views, no copies) and
    every group of about ``_CHUNK`` elements gets ``copy_`` (only when ``r`` is not ``a``: in
    place, nothing is copied onto itself),
    ``mul_`` and ``addcmul_`` in a row, so the later passes read from the cache. The items
    are walked last first: the reduction pass just left the last gradients in the cache.
    """
    r_chunk: list[Tensor] = []
    a_chunk: list[Tensor] = []
    copy_chunk: list[bool] = []  # whether r is another tensor than a (decided before cutting:
    # the pieces of one tensor are distinct view objects even when r is a)
    ka_chunk: list[Tensor] = []
    rc_chunk: list[Tensor] = []
    c_chunk: list[Tensor] = []
    kc_chunk: list[Tensor] = []
    size = 0

    def flush() -> None:
        copies = [(r, a) for r, a, needed in zip(r_chunk, a_chunk, copy_chunk, strict=True) if needed]
        if copies:
            torch._foreach_copy_([r for r, _ in copies], [a for _, a in copies])
        torch._foreach_mul_(r_chunk, ka_chunk)
        if rc_chunk:
            torch._foreach_addcmul_(rc_chunk, c_chunk, kc_chunk)
        for chunk in (r_chunk, a_chunk, copy_chunk, ka_chunk, rc_chunk, c_chunk, kc_chunk):
            chunk.clear()

    for r, a, c, ka, kc in reversed(items):
        needs_copy = r is not a
        pieces: list[tuple[Tensor, Tensor, Tensor | None]]
        layout = _dense_layout(r, a, c) if r.numel() > _CHUNK else None
        if layout is not None:
            r_flat, a_flat, c_flat = _flat_views(layout, r, a, c)
            pieces = [
                (r_flat[s : s + _CHUNK], a_flat[s : s + _CHUNK], None if c_flat is None else c_flat[s : s + _CHUNK])
                for s in range(0, r_flat.numel(), _CHUNK)
            ]
        else:
            pieces = [(r, a, c)]
        for r_piece, a_piece, c_piece in pieces:
            r_chunk.append(r_piece)
            a_chunk.append(a_piece)
            copy_chunk.append(needs_copy)
            ka_chunk.append(ka)
            if c_piece is not None:
                rc_chunk.append(r_piece)
                c_chunk.append(c_piece)
                kc_chunk.append(kc)
            size += r_piece.numel()
            if size >= _CHUNK:
                flush()
                size = 0
    if r_chunk:
        flush()


def _dense_layout(r: Tensor, a: Tensor, c: Tensor | None) -> str | None:
    """The layout in which ``r``, ``a`` and ``c`` all cut into matching 1-D views, if any."""
    tensors = (r, a) if c is None else (r, a, c)
    if all(t.is_contiguous() for t in tensors):
        return "contiguous"
    if r.dim() == 4 and all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        return "channels_last"
    return None


def _flat_views(layout: str, r: Tensor, a: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    if layout == "channels_last":  # NHWC in memory: this permutation is a contiguous view
        r, a = r.permute(0, 2, 3, 1), a.permute(0, 2, 3, 1)
        c = None if c is None else c.permute(0, 2, 3, 1)
    return r.view(-1), a.view(-1), (None if c is None else c.view(-1))


def combine_exact(
    adversarial: Sequence[Tensor],
    clean: Sequence[Tensor | None],
    k_a: float,
    k_c_scaled: float,
    scale_c: float,
    out: Sequence[Tensor] | None,
) -> list[Tensor]:
    """``r = k_a a + k_c_scaled (c / scale_c)`` in float64, rounded once to each gradient's dtype.

    For rescued segments: ``scale_c`` is a power of two, so ``c / scale_c`` is exact, and
    ``k_c_scaled`` is finite wherever the result is (unlike ``k_c = k_c_scaled / scale_c``).
    """
    results = []
    for i, (a, c) in enumerate(zip(adversarial, clean, strict=True)):
        r = a.to(torch.float64) * k_a
        if c is not None:
            r += (c.to(torch.float64) / scale_c) * k_c_scaled
        if out is None:
            results.append(r.to(a.dtype))
        else:
            results.append(out[i].copy_(r))
    return results
