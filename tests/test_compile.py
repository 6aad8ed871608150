"""torch.compile: the reconstruction traces without graph breaks; a compiled training step equals eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agr_optim import AGROptimizer
from agr_optim.functional import reconstruct

pytestmark = [
    pytest.mark.slow,
    # Inductor imports torch.utils.mkldnn, which uses the deprecated torch.jit.script_method.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_reconstruct_compiles_as_one_graph(granularity):
    """fullgraph=True fails on any graph break: no .item(), no Python branch on tensor values."""
    a = [torch.randn(3, 4), torch.randn(5), torch.zeros(2)]
    c = [torch.randn(3, 4), -a[1], None]

    def fn(a, c):
        return reconstruct(a, c, clip_norm=0.5, granularity=granularity)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(a, c), fn(a, c), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    return model, AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), clip_norm=0.3)


def test_compiled_training_step_equals_eager():
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g))
            for _ in range(3)]

    def train_step(model, opt, x, x_adv, y):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.stash_clean()
        F.mse_loss(model(x_adv), y).backward()
        opt.step()

    eager_model, eager_opt = make()
    compiled_model, compiled_opt = make()
    compiled_step = torch.compile(train_step)  # inductor; graph breaks at backward() are allowed
    for batch in data:
        train_step(eager_model, eager_opt, *batch)
        compiled_step(compiled_model, compiled_opt, *batch)
    assert compiled_opt.step_count == 3
    for p, q in zip(compiled_model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def test_last_stats_under_compile():
    model, opt = make()
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.stash_clean()
    F.mse_loss(model(x + 0.5), y).backward()
    torch.compile(opt.step, backend="eager")()
    # The bookkeeping survives the inner step's graph break: stats set, stash dropped.
    assert opt.step_count == 1 and opt.last_stats is not None and not opt.has_stash
    opt.stash_clean()  # would raise "already stashed" if the compiled step had kept the stash


def test_fused_compile_inside_a_compiled_function_traces_the_per_tensor_form():
    """A caller's torch.compile around fused="compile" crashed (a compiled kernel mutating views
    inside another trace); there every setting traces the per-tensor form."""
    a, c = [torch.randn(50), torch.randn(3, 4)], [torch.randn(50), torch.randn(3, 4)]
    fn = lambda a, c: reconstruct(a, c, clip_norm=0.1, fused="compile")  # noqa: E731
    for got, want in zip(torch.compile(fn, backend="aot_eager")(a, c), reconstruct(a, c, clip_norm=0.1, fused=False),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
