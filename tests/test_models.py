"""agr_optim.models: the authors' architectures (parameter counts), normalization inside, channels_last.

The parameter counts are checked twice: against the figures the paper's setting is known by and
against a layer-by-layer count written here. WRN-34-10 is built on the meta device (no memory,
no forward); only small WideResNets run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agr_optim.models import (
    AUTHORS_MEAN,
    AUTHORS_STD,
    MODELS,
    Normalize,
    PreActResNet18,
    SmallCNN,
    WideResNet,
    build_model,
)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(cin: int, cout: int, k: int = 3) -> int:
    return cin * cout * k * k


def bn(c: int) -> int:
    return 2 * c


def preact18_count(num_classes: int, in_channels: int = 3) -> int:
    """Layer by layer: conv1, 4 stages of 2 pre-activation blocks, the final BN, the classifier."""
    total = conv(in_channels, 64)
    cin = 64
    for planes in (64, 128, 256, 512):
        for _ in range(2):
            total += bn(cin) + conv(cin, planes) + bn(planes) + conv(planes, planes)
            if cin != planes:  # 1x1 projection shortcut in the first block of stages 2-4
                total += conv(cin, planes, 1)
            cin = planes
    return total + bn(512) + 512 * num_classes + num_classes


def wrn_count(depth: int, k: int, num_classes: int, in_channels: int = 3) -> int:
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    total = conv(in_channels, 16)
    for group in range(3):
        cin, cout = widths[group], widths[group + 1]
        for block in range(n):
            c = cin if block == 0 else cout
            total += bn(c) + conv(c, cout) + bn(cout) + conv(cout, cout) + (conv(c, cout, 1) if c != cout else 0)
    return total + bn(widths[3]) + widths[3] * num_classes + num_classes


def test_preactresnet18_has_the_authors_parameter_count() -> None:
    assert count(PreActResNet18()) == 11_172_170 == preact18_count(10)
    assert count(PreActResNet18(num_classes=100)) == preact18_count(100)
    assert count(PreActResNet18(num_classes=200, in_channels=1)) == preact18_count(200, 1)


def test_wrn34_10_has_the_authors_parameter_count_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = WideResNet(depth=34, widen_factor=10, num_classes=10)
        model100 = build_model("wrn34-10", num_classes=100, in_channels=3, image_size=32)
    assert count(model) == 46_160_474 == wrn_count(34, 10, 10)
    assert count(model100) == wrn_count(34, 10, 100)
    assert count(WideResNet(depth=16, widen_factor=2, num_classes=7)) == wrn_count(16, 2, 7)


def test_forward_shapes() -> None:
    assert PreActResNet18().eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert PreActResNet18(num_classes=200)(torch.rand(1, 3, 64, 64)).shape == (1, 200)  # global pooling
    assert WideResNet(depth=10, widen_factor=2, num_classes=5)(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    assert SmallCNN()(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert SmallCNN(num_classes=4, in_channels=1, image_size=28)(torch.rand(3, 1, 28, 28)).shape == (3, 4)


def _twin_without_normalization(model: nn.Module, factory) -> nn.Module:
    """The same weights with an identity Normalize: the unnormalized network."""
    twin = factory()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")}
    missing, unexpected = twin.load_state_dict(state, strict=False)
    assert set(missing) == {"normalize.mean", "normalize.std"} and not unexpected
    return twin.eval()


@pytest.mark.parametrize(
    "factory, channels, size",
    [
        (lambda **kw: PreActResNet18(num_classes=10, in_channels=3, **kw), 3, 32),
        (lambda **kw: WideResNet(depth=10, widen_factor=1, num_classes=10, in_channels=3, **kw), 3, 16),
        (lambda **kw: SmallCNN(num_classes=10, in_channels=1, image_size=8, **kw), 1, 8),
    ],
    ids=["preactresnet18", "wideresnet", "smallcnn"],
)
def test_model_normalizes_inside(factory, channels: int, size: int) -> None:
    rng = np.random.default_rng(0)
    mean = rng.uniform(0.2, 0.6, channels)
    std = rng.uniform(0.1, 0.4, channels)
    model = factory(mean=tuple(mean), std=tuple(std)).eval()
    twin = _twin_without_normalization(model, lambda: factory(mean=(0.0,) * channels, std=(1.0,) * channels))
    x = rng.uniform(0, 1, (2, channels, size, size))
    normalized = (x - mean[None, :, None, None]) / std[None, :, None, None]  # float64, by hand
    with torch.no_grad():
        got = model(torch.tensor(x, dtype=torch.float32))
        want = twin(torch.tensor(normalized, dtype=torch.float32))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # And the normalization matters: without it the outputs differ.
    with torch.no_grad():
        assert not torch.allclose(twin(torch.tensor(x, dtype=torch.float32)), want, atol=1e-3)


def _randomize_batchnorm(model: nn.Module, seed: int) -> None:
    """Non-trivial BN affine parameters and running statistics, so eval-mode BN is not ~identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, lo, hi in ((m.weight, 0.5, 1.5), (m.bias, -0.3, 0.3), (m.running_mean, -0.3, 0.3),
                                  (m.running_var, 0.5, 2.0)):
                    t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) * (hi - lo) + lo)


def _bn(state: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, state[prefix + "running_mean"], state[prefix + "running_var"], state[prefix + "weight"],
                        state[prefix + "bias"], training=False, eps=1e-5)


def _preact_reference(state: dict, x: torch.Tensor) -> torch.Tensor:
    """PreActResNet-18 of the authors' model.py, written with functional ops on the state dict (float64)."""
    out = F.conv2d((x - state["normalize.mean"]) / state["normalize.std"], state["conv1.weight"], padding=1)
    for stage, stride in zip((1, 2, 3, 4), (1, 2, 2, 2), strict=True):
        for block in range(2):
            p = f"layer{stage}.{block}."
            s = stride if block == 0 else 1
            act = F.relu(_bn(state, p + "bn1.", out))
            projection = state.get(p + "shortcut.0.weight")
            shortcut = out if projection is None else F.conv2d(act, projection, stride=s)
            mid = F.relu(_bn(state, p + "bn2.", F.conv2d(act, state[p + "conv1.weight"], stride=s, padding=1)))
            out = F.conv2d(mid, state[p + "conv2.weight"], padding=1) + shortcut
    out = F.avg_pool2d(F.relu(_bn(state, "bn.", out)), 4).flatten(1)  # the authors' avg_pool2d(out, 4)
    return F.linear(out, state["linear.weight"], state["linear.bias"])


def _wrn_reference(state: dict, x: torch.Tensor, blocks: int) -> torch.Tensor:
    """WideResNet of the authors' model.py (BasicBlock with equalInOut), functional, float64."""
    out = F.conv2d((x - state["normalize.mean"]) / state["normalize.std"], state["conv1.weight"], padding=1)
    for group, stride in zip((1, 2, 3), (1, 2, 2), strict=True):
        for block in range(blocks):
            p = f"block{group}.layer.{block}."
            s = stride if block == 0 else 1
            act = F.relu(_bn(state, p + "bn1.", out))
            projected = p + "convShortcut.weight" in state
            mid = F.relu(_bn(state, p + "bn2.", F.conv2d(act, state[p + "conv1.weight"], stride=s, padding=1)))
            mid = F.conv2d(mid, state[p + "conv2.weight"], padding=1)
            out = mid + (F.conv2d(act, state[p + "convShortcut.weight"], stride=s) if projected else out)
    out = F.avg_pool2d(F.relu(_bn(state, "bn1.", out)), 8).flatten(1)  # the authors' avg_pool2d(out, 8)
    return F.linear(out, state["linear.weight"], state["linear.bias"])


def test_preactresnet18_forward_matches_a_functional_reference() -> None:
    model = PreActResNet18(num_classes=10)
    _randomize_batchnorm(model, 1)
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    state = {k: v.double() for k, v in model.state_dict().items()}
    want = _preact_reference(state, x.double())
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_wideresnet_forward_matches_a_functional_reference() -> None:
    model = WideResNet(depth=16, widen_factor=2, num_classes=10)
    _randomize_batchnorm(model, 2)
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    state = {k: v.double() for k, v in model.state_dict().items()}
    want = _wrn_reference(state, x.double(), blocks=2)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_default_normalization_is_the_authors_for_rgb_and_identity_otherwise() -> None:
    # The authors' tools.py: transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]).
    for model in (PreActResNet18(), WideResNet(depth=10, widen_factor=1)):
        torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
        torch.testing.assert_close(model.normalize.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    assert AUTHORS_MEAN == (0.485, 0.456, 0.406) and AUTHORS_STD == (0.229, 0.224, 0.225)
    for model in (PreActResNet18(in_channels=1), SmallCNN(), SmallCNN(in_channels=3)):
        channels = model.normalize.mean.shape[1]
        assert torch.equal(model.normalize.mean, torch.zeros(1, channels, 1, 1))
        assert torch.equal(model.normalize.std, torch.ones(1, channels, 1, 1))


def test_normalization_is_saved_in_the_state_dict() -> None:
    model = SmallCNN(mean=(0.25,), std=(0.5,))
    restored = SmallCNN()
    restored.load_state_dict(model.state_dict())
    assert restored.normalize.mean.item() == 0.25 and restored.normalize.std.item() == 0.5


def test_smallcnn_is_the_demo_network() -> None:
    """The demo's conv16-conv32-pool-conv32-pool-fc64-fc, written out here: same seed, same weights."""
    torch.manual_seed(3)
    reference = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10),
    )
    torch.manual_seed(3)
    model = SmallCNN(num_classes=10, in_channels=1, image_size=8)
    assert count(model) == count(reference) == 23_034
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=0, atol=0)


def test_wideresnet_initialization_is_the_authors() -> None:
    model = WideResNet(depth=16, widen_factor=4, num_classes=10)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            w = module.weight.detach().double()
            if w.numel() >= 4096:  # enough samples for the std to be within a few percent
                assert abs(w.std().item() / np.sqrt(2.0 / fan_out) - 1) < 0.06, name
                assert abs(w.mean().item()) < 0.1 * np.sqrt(2.0 / fan_out), name
        elif isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
    assert torch.equal(model.linear.bias, torch.zeros(10))


def test_parameter_names_follow_the_authors_model_py() -> None:
    pre = PreActResNet18().state_dict()
    for key in ("conv1.weight", "layer1.0.bn1.weight", "layer2.0.shortcut.0.weight", "layer4.1.conv2.weight",
                "bn.running_var", "linear.weight"):
        assert key in pre, key
    assert "layer1.0.shortcut.0.weight" not in pre  # identity shortcut: no parameters
    with torch.device("meta"):
        wrn = WideResNet().state_dict()
    for key in ("conv1.weight", "block1.layer.0.convShortcut.weight", "block1.layer.4.conv2.weight",
                "block3.layer.0.bn1.weight", "bn1.weight", "linear.bias"):
        assert key in wrn, key


@pytest.mark.parametrize("name", ["preactresnet18", "smallcnn"])
def test_channels_last_gives_the_same_outputs(name: str) -> None:
    channels, size = (3, 32) if name == "preactresnet18" else (1, 8)
    model = build_model(name, num_classes=10, in_channels=channels, image_size=size).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        want = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_inputs_get_gradients_for_attacks() -> None:
    model = SmallCNN().eval()
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_build_model_names_and_arguments() -> None:
    assert MODELS == ("preactresnet18", "wrn34-10", "smallcnn")
    model = build_model("preactresnet18", num_classes=100, in_channels=3, image_size=32, mean=(0.5,) * 3,
                        std=(0.25,) * 3)
    assert isinstance(model, PreActResNet18) and model.linear.out_features == 100
    assert torch.equal(model.normalize.std.flatten(), torch.full((3,), 0.25))
    with torch.device("meta"):
        wrn = build_model("wrn34-10", num_classes=10, in_channels=3, image_size=32)
    assert isinstance(wrn, WideResNet) and (wrn.depth, wrn.widen_factor) == (34, 10)
    small = build_model("smallcnn", num_classes=3, in_channels=1, image_size=28)
    assert isinstance(small, SmallCNN) and small.image_size == 28 and small(torch.rand(1, 1, 28, 28)).shape == (1, 3)


def test_unknown_model_names_the_flag() -> None:
    expected = r"unknown --model 'resnet50'; choose one of preactresnet18, wrn34-10, smallcnn"
    with pytest.raises(ValueError, match=expected):
        build_model("resnet50", num_classes=10, in_channels=3, image_size=32)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PreActResNet18(mean=(0.5, 0.5), std=(0.2, 0.2)), "2 values but in_channels is 3"),
        (lambda: PreActResNet18(mean=(0.5,) * 3), "give both mean and std"),
        (lambda: SmallCNN(mean=(0.5,), std=(0.0,)), "std must be > 0"),
        (lambda: SmallCNN(mean=(float("nan"),), std=(1.0,)), "mean must be finite"),
        (lambda: SmallCNN(mean="0.5", std=(1.0,)), "mean must be a non-empty sequence"),
        (lambda: Normalize((0.5, 0.5), (1.0,)), "mean has 2 values but std has 1"),
        (lambda: PreActResNet18(num_classes=1), "num_classes must be an integer >= 2"),
        (lambda: SmallCNN(image_size=1), "image_size must be an integer >= 2"),
        (lambda: WideResNet(depth=35), "depth must be 6 n \\+ 4"),
        (lambda: WideResNet(widen_factor=0), "widen_factor must be an integer >= 1"),
        (lambda: build_model("smallcnn", num_classes=10, in_channels=1, image_size=0), "image_size"),
    ],
)
def test_bad_arguments_are_refused_with_their_name(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
