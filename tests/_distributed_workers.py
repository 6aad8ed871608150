"""Worker functions for tests/test_distributed.py (spawned processes import them by name).

Each worker runs several checks in one process group (starting a group costs seconds) and
asserts inside the worker: a failure surfaces in the parent as the worker's traceback.
The reference is one process on the whole batch: both gradients from autograd, AGR in float64
numpy (``_asserts.reference_agr``, independent of the library) and SGD with momentum by hand.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _asserts import reference_agr
from _reference_training import reference_sgd_training
from torch import nn

from agr_optim import AGROptimizer

WORLD = 2
BATCH = 8  # global batch; each rank takes BATCH // WORLD
LR, MOMENTUM, CLIP = 0.1, 0.9, 0.3
TOL = 1e-5


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # Linear(7, 1).weight has one row: with Shard(0) over 2 ranks one rank holds an empty shard.
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1))


def make_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 5, generator=g), torch.randn(BATCH, 5, generator=g), torch.randn(BATCH, 1, generator=g))
            for _ in range(steps)]


def groups_of(model: nn.Module) -> list[dict]:
    """Two param groups, so that granularity "group" differs from "global"."""
    params = list(model.parameters())
    return [{"params": params[:2]}, {"params": params[2:]}]


def segments_for(granularity: str, n_first_group: int, n: int) -> list[int]:
    if granularity == "tensor":
        return list(range(n))
    if granularity == "group":
        return [0] * n_first_group + [1] * (n - n_first_group)
    return [0] * n


def reference_params(batches, granularity: str) -> list[torch.Tensor]:
    """One process, whole batch, AGR by hand (float64 numpy), SGD with momentum by hand."""
    n = len(list(make_model().parameters()))
    return reference_sgd_training(make_model, batches, lr=LR, momentum=MOMENTUM, clip_norm=CLIP,
                                  segments=segments_for(granularity, 2, n))


def train(model: nn.Module, opt: AGROptimizer, batches, rank: int, scaler=None, sharded_batch: bool = True) -> None:
    lo, hi = (rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD) if sharded_batch else (0, BATCH)
    scale = (lambda loss: scaler.scale(loss)) if scaler is not None else (lambda loss: loss)
    for x, x_adv, y in batches:
        x, x_adv, y = x[lo:hi], x_adv[lo:hi], y[lo:hi]
        opt.zero_grad()
        if opt.active:
            scale(F.mse_loss(model(x), y)).backward()
            opt.stash_clean()
        scale(F.mse_loss(model(x_adv), y)).backward()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


def full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()


def assert_close(params, expected, what: str, tol: float = TOL) -> None:
    for i, (p, q) in enumerate(zip(params, expected, strict=True)):
        err = (full(p) - q).abs().max().item()
        assert err <= tol, f"{what}: parameter {i} differs from the reference by {err:.3g} (> {tol})"


def run(rank: int, check: Callable[[int, str], None], tmpdir: str) -> None:
    """One rank: the check, then a marker file saying that it passed (written before the
    teardown, so that the parent can tell a failed check from a crash in gloo's teardown).
    The ranks meet through a file in ``tmpdir`` (a port found free by the parent could be taken
    by another process before rank 0 binds it)."""
    rendezvous = os.path.join(tmpdir, "rendezvous")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        check(rank, tmpdir)
        dist.barrier()  # passed by every rank only once every rank's check has passed
        with open(os.path.join(tmpdir, f"passed.{rank}"), "w") as f:
            f.write("passed\n")
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- DDP
def ddp_checks(rank: int, tmpdir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    batches = make_batches(3)
    # Half the batch per rank equals the whole batch in one process, every granularity,
    # with DDP's bucket views on and off (the stash must not alias a bucket).
    for granularity, bucket_view in (("tensor", False), ("group", True), ("global", False)):
        model = DDP(make_model(), gradient_as_bucket_view=bucket_view)
        opt = AGROptimizer(torch.optim.SGD(groups_of(model), lr=LR, momentum=MOMENTUM), clip_norm=CLIP,
                           granularity=granularity)
        train(model, opt, batches, rank)
        assert_close(model.parameters(), reference_params(batches, granularity),
                     f"DDP {granularity} bucket_view={bucket_view}")
    # ZeroRedundancyOptimizer inside: it shards the inner optimizer's update, not the gradients
    # AGR reads (DDP's whole averages), so the result is still one process's.
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = DDP(make_model())
    first, second = groups_of(model)
    inner = ZeroRedundancyOptimizer(first["params"], optimizer_class=torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    inner.add_param_group(second)
    train(model, AGROptimizer(inner, clip_norm=CLIP, granularity="group"), batches, rank)
    assert_close(model.parameters(), reference_params(batches, "group"), "DDP + ZeroRedundancyOptimizer")
    dcp_resume(rank, tmpdir, lambda: DDP(make_model()), "ddp")


# --------------------------------------------------------------------------- opt.backward
class SideBranch(nn.Module):
    """``make_model()`` with a side branch whose four tensors are the model's largest, used only
    when ``used`` (per rank: data-dependent control flow)."""

    def __init__(self, used: bool) -> None:
        super().__init__()
        self.body, self.used = make_model(), used
        self.side = nn.Sequential(nn.Linear(5, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x + self.side(x) if self.used else x)


class Checkpointed(nn.Module):
    """``make_model()`` in one reentrant checkpoint, or (``shared``) a layer applied in two."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.body, self.shared = make_model(), shared
        self.layer = nn.Linear(5, 5) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        x = x.detach().requires_grad_()  # a reentrant checkpoint computes gradients only for such inputs
        if self.layer is None:
            return checkpoint(self.body, x, use_reentrant=True)
        for _ in range(2):
            x = checkpoint(lambda t: torch.tanh(self.layer(t)), x, use_reentrant=True)
        return self.body(x)


def train_with_backward(model: nn.Module, opt: AGROptimizer, batches, rank: int) -> None:
    """As ``train``, with both forwards first and both passes in ``opt.backward`` (TRADES-style code)."""
    lo, hi = rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD
    for x, x_adv, y in batches:
        x, x_adv, y = x[lo:hi], x_adv[lo:hi], y[lo:hi]
        opt.zero_grad()
        loss_c = F.mse_loss(model(x), y)
        loss_a = F.mse_loss(model(x_adv), y)
        opt.backward(clean=loss_c if opt.active else None, adversarial=loss_a)
        opt.step()


def backward_checks(rank: int, tmpdir: str) -> None:
    """``opt.backward`` across processes: refused under DDP, where only one of its two passes is
    all-reduced; equal to one process where each pass is averaged (FSDP2, or hooks that all-reduce
    every accumulated gradient); the warm start's single pass under DDP as the two-pass protocol's."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    batches = make_batches(3)
    expected = reference_params(batches, "tensor")

    def build(model: nn.Module, start_step: int = 0) -> AGROptimizer:
        return AGROptimizer(torch.optim.SGD(groups_of(model), lr=LR, momentum=MOMENTUM), clip_norm=CLIP,
                            granularity="tensor", start_step=start_step)

    # DDP: refused on every rank, naming the fix, with nothing changed.
    model = DDP(make_model())
    opt = build(model)
    x, x_adv, y = (t[rank * BATCH // WORLD:(rank + 1) * BATCH // WORLD] for t in batches[0])
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)  # what the training code left: must be left as it was
    params_before = [p.detach().clone() for p in model.parameters()]
    loss_c, loss_a = F.mse_loss(model(x), y), F.mse_loss(model(x_adv), y)
    try:
        opt.backward(clean=loss_c, adversarial=loss_a)
    except RuntimeError as error:
        message = str(error)
        assert "DistributedDataParallel" in message and "two-pass protocol" in message, message
        assert "clean gradients were averaged" in message and "Nothing was changed" in message, message
        assert "recipes' steps: authors=False" in message, message  # mart/awp/avmixup_step(authors=True) call it
    else:
        raise AssertionError(f"rank {rank}: opt.backward under DDP was accepted (its second pass is not all-reduced)")
    assert not opt.has_stash and opt.step_count == 0
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert_close(model.parameters(), params_before, "DDP after a refused backward()", tol=0.0)
    # The same model then trains with the two-pass protocol to the one-process result.
    train(model, opt, batches, rank)
    assert_close(model.parameters(), expected, "DDP two-pass protocol after a refused backward()")

    # Probes that saw nothing or the wrong thing: the largest parameters unused on rank 0
    # (find_unused_parameters; rank 0 accepted and stepped while rank 1 raised); the whole model in a
    # reentrant checkpoint (its parameters are missing from the loss's graph); a layer in two
    # reentrant checkpoints (its gradient arrives in two parts, no part's norm that of .grad: both
    # passes looked averaged, and were accepted).
    for what, module, options in (
        ("the largest parameters unused on rank 0", SideBranch(used=rank == 1), {"find_unused_parameters": True}),
        ("a reentrant checkpoint around the model", Checkpointed(shared=False), {}),
        ("a layer in two reentrant checkpoints", Checkpointed(shared=True), {"static_graph": True}),
    ):
        model = DDP(module, **options)
        opt = build(model)
        try:
            opt.backward(clean=F.mse_loss(model(x), y), adversarial=F.mse_loss(model(x_adv), y))
        except RuntimeError as error:
            assert "clean gradients were averaged" in str(error), f"{what}: {error}"
        else:
            raise AssertionError(f"rank {rank}: opt.backward under DDP with {what} was accepted")
        assert not opt.has_stash and opt.step_count == 0 and all(p.grad is None for p in module.parameters())

    # DDP warm start: one forward, one pass (backward(clean=None)) is all-reduced as loss.backward().
    plain, with_backward = DDP(make_model()), DDP(make_model())
    train(plain, build(plain, start_step=5), batches[:2], rank)
    train_with_backward(with_backward, build(with_backward, start_step=5), batches[:2], rank)
    assert_close(with_backward.parameters(), [full(p) for p in plain.parameters()], "DDP warm start via backward()")

    # Every pass averaged (FSDP2's reduce-scatter; hooks all-reducing each accumulated gradient).
    def average(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad)
        p.grad.div_(WORLD)

    def averaged_by_hooks() -> nn.Module:
        model = make_model()
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(average)
        return model

    for name, model in (("FSDP2", shard(make_model())), ("all-reduce hooks", averaged_by_hooks())):
        opt = build(model)
        train_with_backward(model, opt, batches, rank)
        assert opt.step_count == len(batches)
        assert_close(model.parameters(), expected, f"opt.backward under {name}")


# --------------------------------------------------------------------------- FSDP2
def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module)
    return fully_shard(model)


def fsdp_checks(rank: int, tmpdir: str) -> None:
    from torch.distributed.tensor import DTensor

    batches = make_batches(3)
    for granularity in ("tensor", "group", "global"):
        for fused in (True, False):
            model = shard(make_model())
            assert all(isinstance(p, DTensor) for p in model.parameters())
            opt = AGROptimizer(torch.optim.SGD(groups_of(model), lr=LR, momentum=MOMENTUM), clip_norm=CLIP,
                               granularity=granularity, fused=fused)
            train(model, opt, batches, rank)
            assert_close(model.parameters(), reference_params(batches, granularity),
                         f"FSDP2 {granularity} fused={fused}")
            # The statistics are global: identical on both ranks.
            cosines = [torch.zeros_like(opt.last_stats.cosine) for _ in range(WORLD)]
            dist.all_gather(cosines, opt.last_stats.cosine)
            assert torch.equal(cosines[0], cosines[1])
    fsdp_grad_scaler(rank, batches)
    fsdp_bad_input(rank)
    dcp_resume(rank, tmpdir, lambda: shard(make_model()), "fsdp2")


def fsdp_grad_scaler(rank: int, batches) -> None:
    """GradScaler with sharded gradients: equals the reference; an inf on one rank skips on both."""
    model = shard(make_model())
    opt = AGROptimizer(torch.optim.SGD(groups_of(model), lr=LR, momentum=MOMENTUM), clip_norm=CLIP,
                       granularity="tensor")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    train(model, opt, batches, rank, scaler=scaler)
    assert_close(model.parameters(), reference_params(batches, "tensor"), "FSDP2 + GradScaler")
    before = [full(p).clone() for p in model.parameters()]
    x, x_adv, y = batches[0]
    opt.zero_grad()
    scaler.scale(F.mse_loss(model(x), y)).backward()
    opt.stash_clean()
    if rank == 0:  # an inf in rank 0's shard of the stashed gradient only
        stashed = next(g for g in opt._stash["clean"].values() if g is not None)
        stashed.to_local().view(-1)[0] = float("inf")
    scaler.scale(F.mse_loss(model(x_adv), y)).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**11, f"rank {rank}: the scale did not back off ({scaler.get_scale()})"
    assert opt.step_count == len(batches) and not opt.has_stash
    assert_close(model.parameters(), before, "FSDP2 skipped step", tol=0.0)


def fsdp_bad_input(rank: int) -> None:
    from agr_optim.functional import reconstruct

    model = shard(make_model())
    sharded = [p.detach() for p in model.parameters()]
    plain = [full(p) for p in sharded]
    try:
        reconstruct(sharded, plain)
    except ValueError as error:
        assert "DTensor and plain tensor" in str(error), str(error)
    else:
        raise AssertionError("a DTensor/plain mix was accepted")
    # The functional API on DTensors equals the reference on the full tensors.
    from torch.distributed.tensor import distribute_tensor

    g = torch.Generator().manual_seed(2)  # the same full tensors on both ranks, then sharded
    a = [distribute_tensor(torch.randn(p.shape, generator=g), p.device_mesh, p.placements) for p in sharded]
    c = [distribute_tensor(torch.randn(p.shape, generator=g), p.device_mesh, p.placements) for p in sharded]
    expected, _ = reference_agr([full(t) for t in a], [full(t) for t in c], clip_norm=0.5,
                                segments=list(range(len(a))))
    for fused in (True, False):
        out = reconstruct(a, c, clip_norm=0.5, fused=fused)
        assert all(isinstance(o, type(t)) and o.placements == t.placements for o, t in zip(out, a, strict=True))
        assert_close(out, [torch.from_numpy(e).float() for e in expected], f"reconstruct on DTensors fused={fused}")


# --------------------------------------------------------------------------- FSDP1
def fsdp1_checks(rank: int, tmpdir: str) -> None:
    """FSDP1's flat shards are plain tensors: AGR on them took each process's shard's cosine (a
    parameter difference of 0.03 from one process after 3 steps, measured). Refused: at
    construction on its flat parameters, and on ``use_orig_params=True`` views of parameters the
    optimizer was built on before the wrapping by stash_clean(), backward() and every step (a warm
    start's plain ones too); nothing moves."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def refused(call: Callable[[], object], where: str) -> None:
        try:
            call()
        except ValueError as error:
            message = str(error)
            assert message.startswith(f"{where}: parameter 0"), message
            assert "FullyShardedDataParallel (FSDP1)" in message, message
            assert "fully_shard" in message and "DistributedDataParallel" in message, message
        else:
            raise AssertionError(f"rank {rank}: AGR on FSDP1's flat shards was accepted ({where})")

    model = FSDP(make_model(), device_id=torch.device("cpu"))
    refused(lambda: AGROptimizer(torch.optim.SGD(model.parameters(), lr=LR), clip_norm=CLIP), "AGROptimizer")
    opt = AGROptimizer(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=LR), clip_norm=CLIP)
    refused(lambda: opt.add_param_group({"params": model.parameters()}), "add_param_group()")
    assert len(opt.param_groups) == 1

    model = make_model()
    # A warm start: its plain steps are refused too (else the refusal came at step start_step).
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM), clip_norm=CLIP, start_step=5)
    wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
    x, x_adv, y = (t[rank * BATCH // WORLD:(rank + 1) * BATCH // WORLD] for t in make_batches(1)[0])
    F.mse_loss(wrapped(x), y).backward()
    refused(opt.stash_clean, "stash_clean()")
    assert not opt.has_stash
    F.mse_loss(wrapped(x_adv), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    refused(opt.step, "step()")
    assert opt.step_count == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    # opt.backward: AGR's refusal, not FSDP's storage error from autograd.grad on its parameters.
    opt.zero_grad()
    refused(lambda: opt.backward(clean=F.mse_loss(wrapped(x), y), adversarial=F.mse_loss(wrapped(x_adv), y)),
            "backward()")
    assert not opt.has_stash


# --------------------------------------------------------------------------- DCP
def dcp_resume(rank: int, tmpdir: str, build: Callable[[], nn.Module], name: str) -> None:
    """get/set_optimizer_state_dict on the wrapper, saved with DCP: a resumed run continues exactly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    batches = make_batches(5)

    def fresh():
        model = build()
        # Adam has state to restore; the warm start (start_step=3) ends after the resume
        # point, so the restored step count decides when AGR starts.
        return model, AGROptimizer(torch.optim.Adam(groups_of(model), lr=1e-2), clip_norm=CLIP, start_step=3)

    model, opt = fresh()
    train(model, opt, batches[:2], rank)
    path = os.path.join(tmpdir, name)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)
    train(model, opt, batches[2:], rank)

    resumed, ropt = fresh()
    assert ropt.step_count == 0
    state = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, ropt)}
    # The state-initialisation step DCP runs on a fresh optimizer is not counted.
    assert ropt.step_count == 0, f"DCP's initialisation step was counted ({ropt.step_count})"
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(resumed, state["model"])
    set_optimizer_state_dict(resumed, ropt, state["optim"])
    assert ropt.step_count == 2 and not ropt.active, f"{name}: restored step count {ropt.step_count}"
    train(resumed, ropt, batches[2:], rank)
    assert ropt.step_count == opt.step_count == 5
    assert_close(resumed.parameters(), [full(p) for p in model.parameters()], f"{name} DCP resume", tol=0.0)
