"""A per-layer AGR step written the way the paper's public training script writes it.

One layer at a time: both norms, the cosine read back to Python with ``.item()``, a Python
branch on it, new tensors for the projection or interpolation and for the clipped result, and
a fresh ``.grad`` per parameter. (The public script also flattens both whole gradients with
``torch.cat`` first and logs an L2 distance per layer; this reference leaves those out, so it
is, if anything, faster than the original.) Used only as the baseline of the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def per_layer_reconstruct(adversarial: Sequence[Tensor], clean: Sequence[Tensor], clip_norm: float) -> list[Tensor]:
    results = []
    for a, c in zip(adversarial, clean, strict=True):
        g_adv, g_clean = a.view(-1), c.view(-1)
        norm_adv, norm_clean = torch.norm(g_adv), torch.norm(g_clean)
        dot = torch.dot(g_adv, g_clean)
        cosine = (dot / (norm_adv * norm_clean + 1e-20)).item()
        results.append(_layer_update(g_adv, g_clean, dot, norm_clean, cosine, clip_norm).view_as(a).clone())
    return results


def _layer_update(g_adv: Tensor, g_clean: Tensor, dot: Tensor, norm_clean: Tensor, cosine: float,
                  clip_norm: float) -> Tensor:
    """The script's branch on the Python-float cosine, with new tensors at every operation."""
    if cosine <= 0:
        grad = g_adv - (dot / norm_clean**2) * g_clean
    else:
        grad = cosine * g_clean + (1 - cosine) * g_adv
    clip = clip_norm / torch.norm(grad)
    return grad * torch.minimum(torch.ones_like(clip), clip)


@torch.no_grad()
def paper_script_reconstruct(adversarial: Sequence[Tensor], clean: Sequence[Tensor], clip_norm: float) -> list[Tensor]:
    """Closer to the public script: both gradients flattened with ``torch.cat`` first, and the
    per-layer logging it does every step (norms summed, cosine and L2 distance read back)."""
    flat_adv = torch.cat([a.reshape(-1) for a in adversarial])
    flat_clean = torch.cat([c.reshape(-1) for c in clean])
    results, logged, start = [], 0.0, 0
    for a in adversarial:
        g_adv, g_clean = flat_adv[start : start + a.numel()], flat_clean[start : start + a.numel()]
        start += a.numel()
        norm_adv, norm_clean = torch.norm(g_adv), torch.norm(g_clean)
        cosine = (torch.dot(g_adv, g_clean) / (norm_adv * norm_clean + 1e-20)).item()
        logged += torch.norm(g_adv - g_clean).item() + cosine
        dot = torch.dot(g_adv, g_clean)  # the script takes the dot again in the projection branch
        results.append(_layer_update(g_adv, g_clean, dot, norm_clean, cosine, clip_norm).view_as(a).clone())
    return results
