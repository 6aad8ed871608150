"""agr_optim.data.loader: batches of tensors on the device.

Not testable on CPU: that ``batches`` never synchronises with the host on an accelerator (checked
by reading)."""

from __future__ import annotations

import pytest
import torch
from _data_files import gen

from agr_optim.data import batches


def test_batches_cover_the_data_once_in_the_generators_order() -> None:
    x, y = torch.arange(10.0)[:, None].repeat(1, 3), torch.arange(10)
    got = list(batches(x, y, 4, shuffle=True, generator=gen(11)))
    assert [len(b) for b, _ in got] == [4, 4, 2]
    order = torch.cat([yb for _, yb in got])
    assert torch.equal(order, torch.randperm(10, generator=gen(11)))
    assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in got)  # rows stay paired
    assert [len(b) for b, _ in batches(x, y, 4, shuffle=True, generator=gen(11), drop_last=True)] == [4, 4]
    plain = list(batches(x, y, 3, shuffle=False, generator=None))
    assert torch.equal(torch.cat([yb for _, yb in plain]), y) and plain[0][0]._base is x  # views
    g = gen(12)
    batches(x, y, 4, shuffle=True, generator=g)  # the order is drawn at the call
    assert not torch.equal(g.get_state(), gen(12).get_state())


def test_batches_arguments_are_checked_at_the_call() -> None:
    x, y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"generator must be a torch.Generator"):
        batches(x, y, 2, shuffle=True, generator=None)
    with pytest.raises(ValueError, match=r"x has 4 rows but y has 3"):
        batches(x, y[:3], 2, shuffle=False, generator=None)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1"):
        batches(x, y, 0, shuffle=False, generator=None)

