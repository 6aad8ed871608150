"""The networks of the paper's experiments, taking images in [0, 1] and normalizing inside.

Tong et al., *Balancing Generalization and Robustness in Adversarial Training via Steering
through Clean and Adversarial Gradient Directions*, ACM MM 2024, train PreActResNet-18 and
WideResNet-34-10 (their ``model.py`` in RUIYUN-ML/AGR). Their models normalize inside
``__call__``, so attacks work on images in [0, 1] and the L-inf radius (8/255) is a radius in pixel
space. The models here do the same with a :class:`Normalize` layer whose per-channel ``mean`` and
``std`` are registered buffers (saved in the state dict, moved by ``.to()``):

.. math::

    \\operatorname{model}(x) = f\\big((x - \\mu) / \\sigma\\big), \\qquad x \\in [0, 1]^{C \\times H \\times W}.

Default normalization: the authors' code normalizes every dataset (CIFAR-10, CIFAR-100,
Tiny-ImageNet) with the ImageNet statistics :data:`AUTHORS_MEAN` and :data:`AUTHORS_STD`
(``transforms.Normalize`` in their ``tools.py``), so the two residual networks default to these
for 3-channel inputs; any other channel count, and :class:`SmallCNN`, default to the identity
(mean 0, std 1). Pass ``mean``/``std`` (one value per channel) to use, for example, a dataset's
own statistics (:attr:`agr_optim.datasets.Dataset.mean`).

All models work in ``channels_last`` memory format (``model.to(memory_format=torch.channels_last)``)
and under ``torch.compile``: their forward passes have no data-dependent Python branches.

>>> import torch
>>> from agr_optim.models import build_model
>>> model = build_model("smallcnn", num_classes=10, in_channels=1, image_size=8)
>>> model(torch.rand(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AUTHORS_MEAN",
    "AUTHORS_STD",
    "MODELS",
    "Normalize",
    "PreActResNet18",
    "SmallCNN",
    "WideResNet",
    "build_model",
]

#: The per-channel mean the authors normalize every dataset with (ImageNet's; their ``tools.py``).
AUTHORS_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
#: The per-channel standard deviation the authors normalize every dataset with.
AUTHORS_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: The names :func:`build_model` accepts (the ``--model`` choices of ``agr-train``).
MODELS: tuple[str, ...] = ("preactresnet18", "wrn34-10", "smallcnn")


def _positive_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with ``mean`` and ``std`` as registered buffers.

    Args:
        mean: one finite value per channel.
        std: one finite value > 0 per channel (as many as ``mean``).

    The buffers have shape ``[1, C, 1, 1]`` and dtype float32; they are saved in the state dict,
    so a checkpoint carries the normalization its weights were trained with.

    >>> import torch
    >>> from agr_optim.models import Normalize
    >>> norm = Normalize((0.5,), (0.25,))
    >>> norm(torch.tensor([[[[0.0, 1.0]]]]))
    tensor([[[[-2.,  2.]]]])
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        means, stds = _channel_values(mean, "mean"), _channel_values(std, "std")
        if len(means) != len(stds):
            raise ValueError(f"mean has {len(means)} values but std has {len(stds)}: give one per channel")
        if not all(s > 0 for s in stds):
            raise ValueError(f"std must be > 0 for every channel, got {tuple(stds)}")
        self.register_buffer("mean", torch.tensor(means, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(stds, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def num_channels(self) -> int:
        return self.mean.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = ", ".join(f"{v:.4g}" for v in self.mean.flatten().tolist())
        std = ", ".join(f"{v:.4g}" for v in self.std.flatten().tolist())
        return f"mean=({mean}), std=({std})"


def _channel_values(values: Sequence[float], name: str) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of numbers (one per channel), got {values!r}")
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers (one per channel), got {values!r}") from None
    if not all(math.isfinite(v) for v in floats):
        raise ValueError(f"{name} must be finite, got {tuple(floats)}")
    return floats


def _normalize_layer(
    in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None, authors_default: bool
) -> Normalize:
    """The model's input normalization; defaults: the authors' for RGB residual networks, else identity."""
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (one value per channel), or neither for the default")
    if mean is None or std is None:
        if authors_default and in_channels == 3:
            mean, std = AUTHORS_MEAN, AUTHORS_STD
        else:
            mean, std = (0.0,) * in_channels, (1.0,) * in_channels
    layer = Normalize(mean, std)
    if layer.num_channels != in_channels:
        raise ValueError(f"mean and std have {layer.num_channels} values but in_channels is {in_channels}")
    return layer


# ---------------------------------------------------------------------- PreActResNet-18
class _PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, shortcut from the first activation."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        # A 1x1 projection only where the shape changes (the identity elsewhere, no parameters).
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(act)
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreActResNet-18 as in the authors' ``model.py``: with a final BatchNorm + ReLU before pooling.

    ``conv3x3(64)`` -> four stages of two pre-activation blocks (64, 128, 256, 512 channels,
    strides 1, 2, 2, 2) -> BN -> ReLU -> global average pooling -> linear. 11,172,170 parameters
    for 10 classes (the variant without the final BN, common elsewhere, has 1,024 fewer).

    The authors pool with ``avg_pool2d(out, 4)``, which on their 32x32 inputs is the global
    average pool used here; the global pool also accepts other image sizes (e.g. 64x64).
    Parameter names match the authors' state dict, plus ``normalize.mean`` and ``normalize.std``.

    Args:
        num_classes: outputs of the classifier (>= 2).
        in_channels: input channels (3 for RGB).
        mean, std: per-channel input normalization; default: :data:`AUTHORS_MEAN` /
            :data:`AUTHORS_STD` for 3 channels (the authors' choice for every dataset), the
            identity otherwise.

    Inputs: ``[N, in_channels, H, W]`` in [0, 1]. Outputs: logits ``[N, num_classes]``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = _positive_int(num_classes, "num_classes", 2)
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.normalize = _normalize_layer(in_channels, mean, std, authors_default=True)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        planes_in = 64
        stages = []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(_PreActBlock(planes_in, planes, stride), _PreActBlock(planes, planes, 1)))
            planes_in = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ---------------------------------------------------------------------- WideResNet
class _WideBasicBlock(nn.Module):
    """WRN block: BN-ReLU-conv3x3-BN-ReLU-conv3x3; where the shape changes, a 1x1 conv of the activation."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.convShortcut: nn.Module | None = None  # the authors' name, so their state dicts load
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + shortcut


class _NetworkBlock(nn.Module):
    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(_WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
              for i in range(blocks))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WideResNet-``depth``-``widen_factor`` as in the authors' ``model.py`` (no dropout).

    ``conv3x3(16)`` -> three groups of ``(depth - 4) / 6`` blocks with ``16k, 32k, 64k`` channels
    (``k = widen_factor``; strides 1, 2, 2) -> BN -> ReLU -> global average pooling -> linear.
    WRN-34-10 has 46,160,474 parameters for 10 classes. Initialization as the authors': conv
    weights from :math:`\\mathcal N(0, 2 / (k_h k_w c_{out}))`, BN weight 1 and bias 0, linear
    bias 0 (linear weight: PyTorch's default). The authors pool with ``avg_pool2d(out, 8)``,
    the global pool on 32x32 inputs. Parameter names match the authors' state dict, plus
    ``normalize.mean`` and ``normalize.std``.

    Args:
        depth: total depth, ``6 n + 4`` for ``n >= 1`` blocks per group (34: 5 blocks).
        widen_factor: channel multiplier ``k >= 1``.
        num_classes, in_channels, mean, std: as for :class:`PreActResNet18` (the same defaults).
    """

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        _positive_int(depth, "depth", 10)
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6 n + 4 (10, 16, 22, 28, 34, 40, ...), got {depth}")
        self.depth = depth
        self.widen_factor = _positive_int(widen_factor, "widen_factor")
        self.num_classes = _positive_int(num_classes, "num_classes", 2)
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.normalize = _normalize_layer(in_channels, mean, std, authors_default=True)
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        blocks = (depth - 4) // 6
        # The authors create the classifier first; keeping their order keeps their random init.
        self.linear = nn.Linear(widths[3], num_classes)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _NetworkBlock(blocks, widths[0], widths[1], 1)
        self.block2 = _NetworkBlock(blocks, widths[1], widths[2], 2)
        self.block3 = _NetworkBlock(blocks, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                    module.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
                elif isinstance(module, nn.BatchNorm2d):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
                elif isinstance(module, nn.Linear):
                    module.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn1(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ---------------------------------------------------------------------- SmallCNN
class SmallCNN(nn.Module):
    """conv16-conv32-pool-conv32-pool-fc64-fc with batch norm: 23,034 parameters (1 channel, 10 classes).

    The demo's network, for digits, mnist5k and tests: fast on a laptop CPU. Batch norm matters
    here: without it, adversarial training from scratch at lr 0.1 often stays at chance level for
    the first epochs. The second pooling is adaptive (to 2x2), so any ``image_size >= 2`` works.

    Args:
        num_classes: outputs (>= 2).
        in_channels: input channels (1 for grayscale digits).
        image_size: the side of the square images the model is built for (>= 2), kept as
            ``model.image_size``; the layers do not depend on it.
        mean, std: per-channel input normalization; default: the identity (the demo feeds
            [0, 1] images unnormalized).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 8,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = _positive_int(num_classes, "num_classes", 2)
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.image_size = _positive_int(image_size, "image_size", 2)
        self.normalize = _normalize_layer(in_channels, mean, std, authors_default=False)
        # Layers in the demo's order: the same seed gives the demo's initial weights.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 2 * 2, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.features(self.normalize(x))


# ---------------------------------------------------------------------- factory
def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """The model called ``name`` (one of :data:`MODELS`), for a dataset's classes, channels and size.

    ``"preactresnet18"``: :class:`PreActResNet18`; ``"wrn34-10"``: :class:`WideResNet` (depth 34,
    widen factor 10); ``"smallcnn"``: :class:`SmallCNN`. ``mean``/``std`` as in each class
    (``None``: its default). ``image_size`` (the side of the square inputs) is checked here and
    passed to :class:`SmallCNN`; the residual networks pool globally and take any size >= 1.

    Raises:
        ValueError: an unknown ``name`` (naming ``--model`` and the choices), or a bad argument.
    """
    if name not in MODELS:
        raise ValueError(f"unknown --model {name!r}; choose one of {', '.join(MODELS)}")
    _positive_int(image_size, "image_size", 2 if name == "smallcnn" else 1)
    if name == "preactresnet18":
        return PreActResNet18(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
    if name == "wrn34-10":
        return WideResNet(34, 10, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size, mean=mean, std=std)
