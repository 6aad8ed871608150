"""Per-segment diagnostics of one reconstruction (what the paper's code logs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ReconstructionStats"]

#: ``out=NO_OUTPUT`` for an implementation: the statistics only; no combine, nothing
#: gradient-sized written (``functional.statistics``).
NO_OUTPUT: object = type("NoOutput", (), {"__repr__": lambda self: "NO_OUTPUT"})()


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
        out_of_range: ``True`` where the segment's squares left the accurate range of the
            accumulation dtype (float32 norms above about 1e19 or below about 1e-12, or a
            gradient whose squares underflow to zero). On CPU such segments are summed again,
            scaled, in float64, and reconstructed exactly. Without host reads (accelerators,
            ``torch.compile``) they cannot be redone: the clean gradient of such a segment is
            treated as zero, so the update is the clipped adversarial gradient there.
    """

    cosine: Tensor
    projected: Tensor
    norm_adversarial: Tensor
    norm_clean: Tensor
    norm_reconstructed: Tensor
    clip_scale: Tensor
    out_of_range: Tensor

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
            "out_of_range": self.out_of_range.tolist(),
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
