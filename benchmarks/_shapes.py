"""The parameter shapes of the paper's models, taken from the architectures built in ``torch.nn``.

PreActResNet-18 (He et al. 2016, the CIFAR variant used by Rice et al. 2020 and by the AGR
paper) and WideResNet-34-10 (Zagoruyko & Komodakis 2016, the adversarial-training variant of
Madry/TRADES). The networks are built on the ``meta`` device: no memory, only shapes.
``build_model`` gives the real module (for the memory measurement, which trains it).
"""

from __future__ import annotations

import torch
from torch import nn


class PreActBlock(nn.Module):
    """The pre-activation basic block; WideResNet's block is the same (without dropout)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride, bias=False) if stride != 1 or in_planes != planes else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


def _pool(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


class PreActResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        layers, in_planes = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2**stage
            for block_stride in (stride, 1):
                layers.append(PreActBlock(in_planes, planes, block_stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(_pool(torch.relu(self.bn(self.layers(self.conv1(x))))))


class WideResNet(nn.Module):
    def __init__(self, depth: int = 34, widen: int = 10, num_classes: int = 10) -> None:
        super().__init__()
        blocks_per_stage = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        layers, in_planes = [], widths[0]
        for stage, stride in enumerate((1, 2, 2)):
            for block in range(blocks_per_stage):
                layers.append(PreActBlock(in_planes, widths[stage + 1], stride if block == 0 else 1))
                in_planes = widths[stage + 1]
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_pool(torch.relu(self.bn(self.layers(self.conv1(x))))))


#: name -> (description, constructor). The "-w16" model is PreActResNet-18 at a quarter of the
#: width: the same 56 tensors (so the same per-tensor Python work) at 1/16 of the elements,
#: for ``--quick``.
MODELS = {
    "preactresnet18": ("PreActResNet-18 (CIFAR-10)", lambda: PreActResNet18()),
    "wideresnet34_10": ("WideResNet-34-10 (CIFAR-10)", lambda: WideResNet(34, 10)),
    "preactresnet18_w16": ("PreActResNet-18 at width 16 (quick)", lambda: PreActResNet18(width=16)),
}


def build_model(name: str, device: str | torch.device = "cpu") -> nn.Module:
    with torch.device(device):
        return MODELS[name][1]()


def parameter_shapes(name: str) -> list[tuple[int, ...]]:
    """The shapes of the model's parameters, in ``model.parameters()`` order."""
    return [tuple(p.shape) for p in build_model(name, "meta").parameters()]


def narrow_shapes(name: str) -> list[tuple[int, ...]]:
    """The model's parameter tensors at a small width (the same architecture, far fewer
    elements): for counts that depend on the tensors, not their sizes. WideResNet-34 at width 1
    has one tensor fewer than at width 10 (its first block needs no shortcut convolution)."""
    if name.startswith("wideresnet34"):
        return [tuple(p.shape) for p in WideResNet(34, 1).to("meta").parameters()]
    return parameter_shapes("preactresnet18_w16")
