"""PyTorch Lightning (the real ``lightning`` package), manual optimization: what Lightning's
optimizer wrapper shows, gradient clipping, schedulers, LearningRateMonitor, resume.

The reference is written out here: both gradients from autograd, the adversarial one clipped by
hand as ``clip_grad_norm_`` documents (``max_norm / (total_norm + 1e-6)``), AGR in float64 numpy
(``_asserts.reference_agr``) and SGD with momentum by hand.
"""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _asserts import reference_agr
from torch import nn
from torch.utils.data import DataLoader

from agr_optim import AGROptimizer

L = pytest.importorskip("lightning")
from lightning.pytorch.core.optimizer import LightningOptimizer  # noqa: E402

pytestmark = [
    # lightning 2.6.6's own _pytree.py calls a torch API that torch 2.13 deprecates.
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"),
]

LR, MOMENTUM, CLIP = 0.1, 0.9, 0.3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    # Scaled up so that the adversarial gradient's norm is well above the clipping value.
    return [(torch.randn(8, 4, generator=g), 3 * torch.randn(8, 4, generator=g), 5 * torch.randn(8, 2, generator=g))
            for _ in range(n)]


class AGRModule(L.LightningModule):
    def __init__(self, clip_val: float | None = None, scheduler: bool = False) -> None:
        super().__init__()
        self.model = make_model()
        self.automatic_optimization = False
        self.clip_val, self.scheduler = clip_val, scheduler
        self.seen: list[dict] = []

    def configure_optimizers(self):
        opt = AGROptimizer(torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM), clip_norm=CLIP)
        if not self.scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}

    def training_step(self, batch, batch_idx):
        x, x_adv, y = batch
        opt = self.optimizers()  # Lightning's LightningOptimizer around the AGROptimizer
        self.seen.append({"step_count": opt.step_count, "groups": len(opt.param_groups),
                          "lr": opt.param_groups[0]["lr"], "state": len(opt.state)})
        opt.zero_grad()
        self.manual_backward(F.mse_loss(self.model(x), y))
        opt.stash_clean()
        self.manual_backward(F.mse_loss(self.model(x_adv), y))
        if self.clip_val is not None:
            self.clip_gradients(opt, gradient_clip_val=self.clip_val, gradient_clip_algorithm="norm")
        opt.step()
        if self.scheduler:
            self.lr_schedulers().step()


def fit(module: AGRModule, data, max_steps: int, ckpt_path=None, **kwargs) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                    enable_checkpointing=False, enable_model_summary=False)
    trainer = L.Trainer(max_steps=max_steps, **{**settings, **kwargs})
    trainer.fit(module, DataLoader(data, batch_size=None), ckpt_path=ckpt_path)
    return trainer


def reference(data, clip_val: float | None, lrs: list[float]) -> list[torch.Tensor]:
    """AGR + SGD(momentum) by hand, the adversarial gradient clipped first (float64)."""
    model = make_model()
    params = list(model.parameters())
    buffers: list[np.ndarray | None] = [None] * len(params)
    for (x, x_adv, y), lr in zip(data, lrs, strict=True):
        clean = torch.autograd.grad(F.mse_loss(model(x), y), params)
        adversarial = [g.double() for g in torch.autograd.grad(F.mse_loss(model(x_adv), y), params)]
        if clip_val is not None:
            total = float(torch.sqrt(sum((g * g).sum() for g in adversarial)))
            adversarial = [g * min(1.0, clip_val / (total + 1e-6)) for g in adversarial]
        r, _ = reference_agr(adversarial, clean, clip_norm=CLIP, segments=range(len(params)))
        with torch.no_grad():
            for i, p in enumerate(params):
                buffers[i] = r[i] if buffers[i] is None else MOMENTUM * buffers[i] + r[i]
                p -= torch.from_numpy(lr * buffers[i]).to(p.dtype)
    return [p.detach() for p in params]


def assert_params(module: AGRModule, expected: list[torch.Tensor]) -> None:
    for p, q in zip(module.model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-5)


def test_lightning_optimizer_delegates_to_the_inner_optimizer():
    """Lightning's wrapper is an instance of a subclass of AGROptimizer holding ours as _optimizer."""
    model = make_model()
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=LR))
    wrapped = LightningOptimizer(opt)
    assert isinstance(wrapped, AGROptimizer)
    assert wrapped.param_groups is opt.optimizer.param_groups and wrapped.param_groups[0]["lr"] == LR
    assert wrapped.state is opt.optimizer.state and wrapped.defaults is opt.optimizer.defaults
    F.mse_loss(model(torch.randn(2, 4)), torch.zeros(2, 2)).backward()
    wrapped.stash_clean()  # reaches the AGROptimizer's own stash
    assert opt.has_stash and wrapped.has_stash and "_stash" not in vars(wrapped)
    wrapped.clip_norm = 0.2
    assert opt.clip_norm == 0.2 and "_clip_norm" not in vars(wrapped)
    wrapped.zero_grad()
    assert not opt.has_stash
    for copied in (copy.copy(wrapped), copy.copy(opt)):  # copies delegate the same way
        assert copied.param_groups is opt.optimizer.param_groups and copied.state is opt.optimizer.state


def test_clip_gradients_clips_the_adversarial_gradient():
    """self.clip_gradients(opt, 0.5) between the adversarial backward and step() clips .grad (the
    adversarial gradient, over the model's parameters, not the stash), then AGR reconstructs."""
    data = batches(3)
    module = AGRModule(clip_val=0.5)
    fit(module, data, max_steps=3)
    assert [s["groups"] for s in module.seen] == [1, 1, 1]
    unclipped = reference(data, None, [LR] * 3)
    expected = reference(data, 0.5, [LR] * 3)
    assert max((p - q).abs().max().item() for p, q in zip(unclipped, expected, strict=True)) > 1e-3
    assert_params(module, expected)


def test_scheduler_from_configure_optimizers_steps_the_inner_lr():
    data = batches(3)
    module = AGRModule(scheduler=True)
    fit(module, data, max_steps=3)
    assert [s["lr"] for s in module.seen] == pytest.approx([LR, LR / 2, LR / 4])
    assert module.trainer.optimizers[0].optimizer.param_groups[0]["lr"] == pytest.approx(LR / 8)
    assert_params(module, reference(data, None, [LR, LR / 2, LR / 4]))


def test_learning_rate_monitor_logs_the_inner_lr(tmp_path):
    """One optimizer, its scheduled lr. Lightning adds a second column, lr-SGD, with the same values:
    LearningRateMonitor unwraps any ``.optimizer`` attribute (for DeepSpeed) and compares the result
    with the scheduled optimizer by identity (see docs/amp_distributed.rst)."""
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    module = AGRModule(scheduler=True)
    fit(module, batches(3), max_steps=3, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1,
        callbacks=[LearningRateMonitor(logging_interval="step")])
    (path,) = tmp_path.glob("run/*/metrics.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    columns = {k for row in rows for k, v in row.items() if k.startswith("lr") and v != ""}
    assert columns == {"lr-AGROptimizer", "lr-SGD"}
    for column in columns:
        logged = [float(row[column]) for row in rows if row[column] != ""]
        assert logged == pytest.approx([LR, LR / 2, LR / 4])


def test_resume_from_a_lightning_checkpoint_restores_the_agr_step_count(tmp_path):
    data = batches(2)  # the checkpoint at the end of an epoch: Lightning resumes there exactly
    first = AGRModule()
    trainer = fit(first, data, max_steps=2)
    path = tmp_path / "agr.ckpt"
    trainer.save_checkpoint(path)
    assert [s["step_count"] for s in first.seen] == [0, 1] and first.seen[0]["state"] == 0
    resumed = AGRModule()
    trainer = fit(resumed, data, max_steps=4, ckpt_path=path)
    # The AGR step count and the inner momentum buffers come back from the checkpoint.
    assert [s["step_count"] for s in resumed.seen] == [2, 3]
    assert resumed.seen[0]["state"] == len(list(resumed.model.parameters()))
    assert trainer.optimizers[0].step_count == 4


def test_clip_gradients_under_mixed_precision_is_refused_by_lightning():
    """Lightning's MixedPrecision (16-mixed and bf16-mixed) refuses to clip an optimizer that
    unscales itself (``_step_supports_amp_scaling``): a clear error, not a silent no-op."""
    module = AGRModule(clip_val=0.5)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping because it performs unscaling"):
        fit(module, batches(1), max_steps=1, precision="bf16-mixed")
    assert module.trainer.optimizers[0].step_count == 0
