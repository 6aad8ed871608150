"""Hugging Face Accelerate (the real ``accelerate`` package): gradient accumulation under
``accelerator.accumulate`` in Accelerate's own order (backward, step, zero_grad; step and
zero_grad are skipped on the micro-batches that do not synchronise), with and without its
GradScaler path.

The reference is written out here: per optimizer step, both gradients averaged over the
micro-batches with autograd, AGR in float64 numpy (``_asserts.reference_agr``), SGD with
momentum by hand. What the CPU cannot run: Accelerate creates a GradScaler only for fp16 on an
accelerator (``mixed_precision="fp16"`` on CPU gives none), so the CPU test hands Accelerate a
real CPU GradScaler where it keeps its own (``accelerator.scaler``) and runs Accelerate's scaled
backward and scaler step path without fp16 autocast; the fp16 run itself is CUDA-only below.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _asserts import reference_agr
from torch import nn

from agr_optim import AGROptimizer

accelerate = pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

LR, MOMENTUM, CLIP, STEPS = 0.1, 0.9, 0.3, 2


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each test starts from none."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def micro_batches(n: int, device: str = "cpu") -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(5)
    return [tuple(t.to(device) for t in (torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g),
                                         torch.randn(4, 2, generator=g))) for _ in range(n)]


def accelerate_run(accelerator, data) -> tuple[nn.Module, AGROptimizer]:
    """The recipe of docs/amp_distributed.rst: every micro-batch stashes both gradients."""
    model = make_model().to(accelerator.device)
    model, opt = accelerator.prepare(
        model, AGROptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), clip_norm=CLIP)
    )
    agr = opt.optimizer  # Accelerate's AcceleratedOptimizer wraps the AGROptimizer
    for x, x_adv, y in data:
        with accelerator.accumulate(model):
            accelerator.backward(F.mse_loss(model(x), y))
            agr.stash_clean()
            accelerator.backward(F.mse_loss(model(x_adv), y))
            agr.stash_adversarial()
            opt.step()
            opt.zero_grad()
    return model, agr


def reference(data, accumulation: int) -> list[torch.Tensor]:
    """Manual accumulation: both gradients averaged over each group of micro-batches, then AGR."""
    model = make_model().to(data[0][0].device)
    params = list(model.parameters())
    buffers: list[np.ndarray | None] = [None] * len(params)
    for start in range(0, len(data), accumulation):
        group = data[start:start + accumulation]
        clean = [sum(gs) / accumulation for gs in zip(*(torch.autograd.grad(F.mse_loss(model(x), y), params)
                                                        for x, _, y in group), strict=True)]
        adversarial = [sum(gs) / accumulation for gs in zip(*(torch.autograd.grad(F.mse_loss(model(xa), y), params)
                                                              for _, xa, y in group), strict=True)]
        r, _ = reference_agr(adversarial, clean, clip_norm=CLIP, segments=range(len(params)))
        with torch.no_grad():
            for i, p in enumerate(params):
                buffers[i] = r[i] if buffers[i] is None else MOMENTUM * buffers[i] + r[i]
                p -= torch.from_numpy(LR * buffers[i]).to(p)
    return [p.detach() for p in params]


def assert_params(model: nn.Module, expected: list[torch.Tensor], atol: float) -> None:
    for p, q in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=atol)


def test_accumulate_in_accelerates_order_equals_manual_accumulation():
    data = micro_batches(2 * STEPS)
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
    model, agr = accelerate_run(accelerator, data)
    assert agr.step_count == STEPS and not agr.has_stash
    assert_params(model, reference(data, 2), atol=1e-5)
    # Not the same as stepping on every micro-batch: accumulation really happened.
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), reference(data, 1), strict=True)) > 1e-4


def test_stashing_only_the_clean_gradient_under_accumulate_is_refused():
    """The plain protocol under accelerator.accumulate: the skipped step() leaves the adversarial
    gradient in .grad, the next clean pass adds to it; the second stash_clean() says why."""
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = make_model()
    model, opt = accelerator.prepare(model, AGROptimizer(torch.optim.SGD(model.parameters(), lr=LR)))
    data = micro_batches(2)
    with pytest.raises(RuntimeError, match="already stashed.*gradient accumulation.*stash_adversarial"):
        for x, x_adv, y in data:
            with accelerator.accumulate(model):
                accelerator.backward(F.mse_loss(model(x), y))
                opt.optimizer.stash_clean()
                accelerator.backward(F.mse_loss(model(x_adv), y))
                opt.step()
                opt.zero_grad()
    assert opt.optimizer.step_count == 0


def test_accelerates_grad_scaler_path_on_cpu():
    """Accelerate's scaled backward and its scaler step (patched step, scaler.step, update) with a
    real CPU GradScaler: a power-of-two scale unscales exactly, so the result is the reference's."""
    data = micro_batches(2 * STEPS)
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)  # what fp16 on CUDA sets up
    model, agr = accelerate_run(accelerator, data)
    assert agr.step_count == STEPS and not accelerator.optimizer_step_was_skipped
    assert accelerator.scaler.get_scale() == 2.0**12
    assert_params(model, reference(data, 2), atol=1e-5)


def test_bf16_autocast_on_cpu():
    """mixed_precision="bf16" (what the CPU offers: autocast, no scaler): close to float32."""
    data = micro_batches(2 * STEPS)
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True, mixed_precision="bf16")
    assert accelerator.scaler is None
    model, agr = accelerate_run(accelerator, data)
    assert agr.step_count == STEPS
    assert_params(model, reference(data, 2), atol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Accelerate creates its GradScaler for fp16 on CUDA only")
def test_fp16_with_accelerates_grad_scaler_on_cuda():
    data = micro_batches(2 * STEPS, device="cuda")
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=2, mixed_precision="fp16")
    assert accelerator.scaler is not None
    model, agr = accelerate_run(accelerator, data)
    assert agr.step_count == STEPS and not accelerator.optimizer_step_was_skipped
    assert_params(model, reference(data, 2), atol=2e-2)
