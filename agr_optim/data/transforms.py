"""The authors' training transform as pure tensor functions on a batch already on the device.

The authors' ``train.py`` applies ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``,
torchtoolbox's ``Cutout()`` and ``ToTensor()`` to PIL images in a ``DataLoader``. Here the same
steps work on a float batch in [0, 1] on any device, vectorised over the batch and drawing from an
explicit :class:`torch.Generator` on the batch's device (no host synchronisation, no Python loop
over images): :func:`random_crop`, :func:`random_flip`, :func:`cutout` (DeVries & Taylor's
square), :func:`authors_cutout` (torchtoolbox's rectangle, what the authors ran) and
:func:`augment`, which chains them in the authors' order.

>>> import torch
>>> from agr_optim.data import augment
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.rand(8, 3, 32, 32)
>>> augment(x, padding=4, flip=True, cutout="authors", generator=g).shape
torch.Size([8, 3, 32, 32])
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_generator, check_int, describe

__all__ = ["augment", "authors_cutout", "cutout", "random_crop", "random_flip"]


def _check_batch(x: object, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor [N, C, H, W], got {describe(x)}")
    return x


def _same_format(out: Tensor, like: Tensor) -> Tensor:
    """``out`` in ``like``'s memory format (channels_last stays channels_last)."""
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _span_mask(start: Tensor, length: Tensor | int, size: int) -> Tensor:
    """``[N, size]`` booleans: ``start[n] <= i < start[n] + length[n]`` (clipped to ``0 <= i < size``)."""
    i = torch.arange(size, device=start.device)
    return (i >= start[:, None]) & (i < (start + length)[:, None])


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Pad every image with ``padding`` zeros on each side, then crop it back at a random offset.

    ``torchvision.transforms.RandomCrop(H, padding=padding)`` (fill 0, ``padding_mode="constant"``,
    the authors' setting) on a batch: each image ``n`` becomes
    ``pad(x[n])[:, i_n : i_n + H, j_n : j_n + W]`` with ``i_n, j_n`` uniform in ``{0, ..., 2 padding}``,
    i.e. a translation by ``(i_n - padding, j_n - padding)`` that brings in zeros.

    Args:
        x: float ``[N, C, H, W]``.
        padding: pixels of zeros on each side (>= 0; 0 returns ``x`` itself).
        generator: a :class:`torch.Generator` on ``x``'s device (one draw of ``2 N`` integers).
    """
    _check_batch(x)
    check_int(padding, "padding", 0)
    check_generator(generator, x)
    if padding == 0:
        return x
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # [N, H]
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # [N, W]
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices on dims 0, 2, 3 around the slice of dim 1 give [N, H, W, C].
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return _same_format(out, x)


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability 1/2 (``RandomHorizontalFlip()``).

    Args:
        x: float ``[N, C, H, W]``.
        generator: a :class:`torch.Generator` on ``x``'s device (one draw of ``N`` uniforms).
    """
    _check_batch(x)
    check_generator(generator, x)
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return _same_format(torch.where(flip[:, None, None, None], x.flip(3), x), x)


def cutout(x: Tensor, length: int, generator: torch.Generator) -> Tensor:
    """Zero one ``length x length`` square per image, clipped at the borders (DeVries & Taylor, 2017).

    The square covers rows ``cy - length // 2 <= i < cy - length // 2 + length`` (columns alike)
    with its centre ``(cy, cx)`` uniform over the image's pixels, so near a border only the part
    inside the image is zeroed, as in the paper's reference code (which zeroes ``length - 1`` rows
    for an odd ``length``; here always ``length``). Every image gets one square.

    This is *not* what the authors ran: their ``Cutout()`` is torchtoolbox's random rectangle,
    :func:`authors_cutout`.

    Args:
        x: float ``[N, C, H, W]``.
        length: side of the square in pixels (>= 1).
        generator: a :class:`torch.Generator` on ``x``'s device (draws ``2 N`` integers).
    """
    _check_batch(x)
    check_int(length, "length", 1)
    check_generator(generator, x)
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=generator, device=x.device)
    cx = torch.randint(0, w, (n,), generator=generator, device=x.device)
    box = _span_mask(cy - length // 2, length, h)[:, :, None] & _span_mask(cx - length // 2, length, w)[:, None, :]
    return _same_format(torch.where(box[:, None], 0.0, x), x)


_square_cutout = cutout  # augment's argument ``cutout`` shadows the function there


def authors_cutout(
    x: Tensor,
    generator: torch.Generator,
    *,
    p: float = 0.5,
    scale: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.4, 1 / 0.4),
) -> Tensor:
    """The authors' ``Cutout()``: torchtoolbox's random rectangle, as applied to their PIL images.

    ``torchtoolbox.transform.Cutout()`` with its defaults, per image: with probability ``p``, an
    area fraction :math:`s \\sim U(\\text{scale})` and an aspect ratio :math:`r \\sim U(\\text{ratio})`
    give a rectangle of :math:`h = \\lfloor\\sqrt{s H W r}\\rfloor` rows and
    :math:`w = \\lfloor\\sqrt{s H W / r}\\rfloor` columns at a uniform integer position
    (top in ``0..H-h``, left in ``0..W-w``), filled with one integer :math:`c \\sim U\\{0..255\\}`.
    The authors apply it to a PIL image, and Pillow pastes an integer colour into an RGB image as
    ``(c, 0, 0)``: the rectangle is ``c / 255`` in the first channel and 0 in the others (a
    1-channel image gets ``c / 255``). That is what this function does, so that the paper preset
    trains on the authors' inputs; :func:`cutout` is the classic square.

    Args:
        x: float ``[N, C, H, W]`` in [0, 1].
        generator: a :class:`torch.Generator` on ``x``'s device (one draw of ``6 N`` uniforms).
        p: probability that an image gets a rectangle, in [0, 1].
        scale: range of the area fraction, ``0 <= low <= high <= 1``.
        ratio: range of the aspect ratio ``h / w``, ``0 < low <= high``.
    """
    _check_batch(x)
    check_generator(generator, x)
    if not (isinstance(p, (int, float)) and 0 <= p <= 1):
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    if not (len(scale) == 2 and 0 <= scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must be (low, high) with 0 <= low <= high <= 1, got {scale!r}")
    if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1] and math.isfinite(ratio[1])):
        raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {ratio!r}")
    n, c, h, w = x.shape
    u = torch.rand((6, n), generator=generator, device=x.device, dtype=torch.float32)
    area = (scale[0] + (scale[1] - scale[0]) * u[0]) * (h * w)
    aspect = ratio[0] + (ratio[1] - ratio[0]) * u[1]
    rows = torch.sqrt(area * aspect).floor().clamp(0, h)
    cols = torch.sqrt(area / aspect).floor().clamp(0, w)
    top = (u[2] * (h - rows + 1)).floor().clamp(max=h - rows)  # uniform in 0..H-h (randint is inclusive)
    left = (u[3] * (w - cols + 1)).floor().clamp(max=w - cols)
    value = (u[4] * 256).floor().clamp(max=255) / 255.0
    rows = torch.where(u[5] < p, rows, torch.zeros_like(rows))  # no rectangle with probability 1 - p
    box = _span_mask(top, rows, h)[:, :, None] & _span_mask(left, cols, w)[:, None, :]
    fill = torch.zeros((n, c, 1, 1), dtype=x.dtype, device=x.device)
    fill[:, 0, 0, 0] = value.to(x.dtype)
    return _same_format(torch.where(box[:, None], fill, x), x)


def augment(
    x: Tensor,
    *,
    padding: int = 4,
    flip: bool = True,
    cutout: int | Literal["authors"] | None = None,
    generator: torch.Generator,
) -> Tensor:
    """The authors' training transform on a batch: random crop, horizontal flip, then cutout.

    Args:
        x: float ``[N, C, H, W]`` in [0, 1], on any device.
        padding: :func:`random_crop` padding (4 in the paper; 0: no crop).
        flip: apply :func:`random_flip`.
        cutout: ``None`` (none), an int (:func:`cutout` with that square side), or ``"authors"``
            (:func:`authors_cutout`, what the authors' ``Cutout()`` does).
        generator: a :class:`torch.Generator` on ``x``'s device; the draws are taken in the order
            crop, flip, cutout, so a seeded generator gives the same batch every time.

    Returns:
        A new tensor (or ``x`` itself if every step is off), in ``x``'s memory format.
    """
    _check_batch(x)
    check_int(padding, "padding", 0)
    if not isinstance(flip, bool):
        raise ValueError(f"flip must be True or False, got {flip!r}")
    if cutout is not None and cutout != "authors" and (
        isinstance(cutout, bool) or not isinstance(cutout, int) or cutout < 1
    ):
        raise ValueError(f"cutout must be None, 'authors' or a square side >= 1 (an integer), got {cutout!r}")
    check_generator(generator, x)
    out = random_crop(x, padding, generator)
    if flip:
        out = random_flip(out, generator)
    if cutout == "authors":
        out = authors_cutout(out, generator)
    elif cutout is not None:
        out = _square_cutout(out, cutout, generator)
    return out
