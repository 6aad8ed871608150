"""Per-segment diagnostics of one reconstruction (what the paper's code logs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ReconstructionStats"]


@dataclass(frozen=True)
class ReconstructionStats:
    r"""Diagnostics of one reconstruction, one entry per segment.

    Every field is a 1-D tensor of length ``num_segments`` on the gradients' device, so
    building it costs no host synchronisation; reading a value (``.item()``, printing) does.
    Norms are those of the unscaled gradients, in the accumulation dtype (float64 where the
    device supports it).

    Attributes:
        cosine: :math:`\cos(a, c)`, 0 where either gradient is zero.
        projected: ``True`` where :math:`\cos \le 0` (Gradient Orthogonal Projection), ``False``
            where the segment was interpolated.
        norm_adversarial: :math:`\lVert a \rVert`.
        norm_clean: :math:`\lVert c \rVert`.
        norm_reconstructed: :math:`\lVert r \rVert` before clipping.
        clip_scale: :math:`\min(1, \text{clip\_norm} / \lVert r \rVert)`; 1 without clipping.
    """

    cosine: Tensor
    projected: Tensor
    norm_adversarial: Tensor
    norm_clean: Tensor
    norm_reconstructed: Tensor
    clip_scale: Tensor

    @property
    def num_segments(self) -> int:
        return self.cosine.numel()

    def projection_rate(self) -> Tensor:
        """Fraction of segments that were projected (a 0-dim tensor, no host sync)."""
        return self.projected.to(self.cosine.dtype).mean()

    def to_dict(self) -> dict[str, list[float] | list[bool]]:
        """Plain Python lists, for logging (this reads the tensors: a host sync on GPUs)."""
        return {
            "cosine": self.cosine.tolist(),
            "projected": self.projected.tolist(),
            "norm_adversarial": self.norm_adversarial.tolist(),
            "norm_clean": self.norm_clean.tolist(),
            "norm_reconstructed": self.norm_reconstructed.tolist(),
            "clip_scale": self.clip_scale.tolist(),
        }

    @staticmethod
    def concat(parts: list[ReconstructionStats]) -> ReconstructionStats:
        """Join the statistics of several reconstructions, segments in order."""
        if len(parts) == 1:
            return parts[0]
        fields = ReconstructionStats.__dataclass_fields__
        return ReconstructionStats(
            **{name: torch.cat([getattr(p, name).to(parts[0].cosine.device) for p in parts]) for name in fields}
        )
