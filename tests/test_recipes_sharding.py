"""agr_optim.recipes._sharding: a shard of a batch draws its rows of the whole batch's random
draws (PGD's start, AVmixup's lambda), and leaves the streams where the whole batch's draw does:
what makes agr-train's random draws the same for every number of processes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from agr_optim.recipes import PGD, avmixup_step
from agr_optim.recipes._sharding import drawn_for, per_example

SPLITS = [(0, 3), (3, 5), (5, 8)]  # unequal shards, as a last batch gives


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(8, 2, 3, 3, generator=g), torch.randint(0, 4, (8,), generator=g)


@pytest.mark.parametrize(
    "attack",
    [PGD(0.1, 0.02, steps=0), PGD(0.1, 0.02, steps=0, random_start="normal", loss="kl"),
     PGD(0.1, 0.02, steps=0, authors=True)],
    ids=["uniform", "normal", "authors"],
)
def test_pgd_start_of_a_shard_is_its_rows_of_the_whole_batch(attack):
    """Zero steps: the attack returns its (projected) random start, elementwise in x and the draw."""
    x, y = _batch()
    model = nn.Sequential(nn.Flatten(), nn.Linear(18, 4))
    torch.manual_seed(5)
    whole = attack(model, x, y)
    after_whole = torch.random.get_rng_state()
    pieces = []
    for lo, hi in SPLITS:
        torch.manual_seed(5)  # every process holds the same stream
        with drawn_for(x, lo, hi):
            pieces.append(attack(model, x[lo:hi], y[lo:hi]))
        assert torch.equal(torch.random.get_rng_state(), after_whole)
    assert torch.equal(torch.cat(pieces), whole)
    assert not torch.equal(whole, x)  # a random start was drawn


def test_avmixup_lambda_of_a_shard_is_its_rows_of_the_whole_batch():
    """The mixed inputs come out as the logits of an identity layer (lr 0: nothing moves)."""
    x, y = _batch()
    x = x.reshape(8, 18)
    model = nn.Linear(18, 18, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(18))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    push = lambda m, xb, yb: (xb + 0.05).clamp(0, 1)  # noqa: E731  a deterministic attack
    g = torch.Generator().manual_seed(3)
    whole = avmixup_step(model, opt, x, y, attack=push, generator=g).logits
    after_whole = g.get_state()
    pieces = []
    for lo, hi in SPLITS:
        g = torch.Generator().manual_seed(3)
        with drawn_for(x, lo, hi):
            pieces.append(avmixup_step(model, opt, x[lo:hi], y[lo:hi], attack=push, generator=g).logits)
        assert torch.equal(g.get_state(), after_whole)
    assert torch.equal(torch.cat(pieces), whole)


def test_a_draw_for_another_batch_is_refused():
    x, _ = _batch()
    with drawn_for(x, 2, 4), pytest.raises(RuntimeError, match=r"shape \(3, 2, 3, 3\) inside drawn_for\(rows 2:4"):
        per_example(x[:3], torch.rand_like)
    with pytest.raises(ValueError, match="rows 5:9 are not a slice of a batch of 8"), drawn_for(x, 5, 9):
        pass
    assert torch.equal(per_example(x, torch.zeros_like), torch.zeros_like(x))  # outside: the plain draw
