"""DDP, FSDP2 and torch.distributed.checkpoint: 2 gloo processes on loopback against 1 process.

Each test spawns one process group and runs several checks in it (tests/_distributed_workers.py).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="needs torch.distributed with gloo",
    ),
]


def spawn(check_name: str, tmp_path) -> None:
    """Run a check on every rank. A failed assertion is re-raised with its traceback. A rank
    killed by a signal (gloo on a loaded machine has been seen to abort with "terminate called
    without an active exception") counts as passed only if a rank had written its marker
    after the checks and a barrier, i.e. the crash came in the teardown; otherwise the run is
    retried once in a fresh folder."""
    import _distributed_workers as workers
    import torch.multiprocessing as mp

    def once(directory) -> None:
        directory.mkdir()
        try:
            mp.spawn(workers.run, args=(getattr(workers, check_name), str(directory)),
                     nprocs=workers.WORLD)
        except mp.ProcessExitedException as error:
            # A rank writes its marker after a barrier that every rank reaches only once its
            # own check has passed: one marker means all passed.
            passed = any((directory / f"passed.{rank}").exists() for rank in range(workers.WORLD))
            if not (error.signal_name and passed):
                raise
            print(f"rank {error.error_index} died with {error.signal_name} in the teardown, after every check passed")

    try:
        once(tmp_path / "first")
    except mp.ProcessExitedException as error:
        if not error.signal_name:
            raise
        print(f"rank {error.error_index} died with {error.signal_name} before every check passed; retrying once")
        once(tmp_path / "retry")


def test_ddp_equals_one_process_and_dcp_resumes(tmp_path):
    """DDP, half the batch per rank = one process on the whole batch (1e-5), all granularities,
    bucket views on and off, and with ZeroRedundancyOptimizer inside; DCP save/load of the wrapper
    on DDP resumes bit for bit."""
    spawn("ddp_checks", tmp_path)


def test_fsdp2_equals_one_process_grad_scaler_bad_input_and_dcp(tmp_path):
    """FSDP2 (DTensor shards, one of them empty) = one process (1e-5) for every granularity, fused
    and loop; GradScaler on sharded gradients, an inf on one rank skips the step on both;
    a DTensor/plain mix is refused; DCP save/load resumes bit for bit."""
    spawn("fsdp_checks", tmp_path)


def test_backward_refused_under_ddp_and_equal_to_one_process_where_every_pass_is_averaged(tmp_path):
    """opt.backward after both forwards under DDP (only its first pass is all-reduced: the replicas
    would drift) is refused on every rank with nothing changed, and the two-pass protocol then
    trains to the one-process result; under FSDP2, or hooks that all-reduce every pass, it equals
    one process; the warm start's single pass under DDP equals loss.backward()."""
    spawn("backward_checks", tmp_path)


def test_fsdp1_flat_shards_are_refused(tmp_path):
    """FSDP1 keeps plain-tensor shards: AGR would take each process's shard's cosine. Refused at
    construction and add_param_group (flat parameters), and by stash_clean, backward and every step,
    a warm start's too (use_orig_params views), nothing moved."""
    spawn("fsdp1_checks", tmp_path)


FSDP1_ONE_PROCESS = r"""
import sys
import torch, torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
sys.path.insert(0, {tests!r})
import _distributed_workers as W
from agr_optim import AGROptimizer

dist.init_process_group("gloo", init_method="file://{rendezvous}", rank=0, world_size=1)
try:
    model = FSDP(W.make_model(), device_id=torch.device("cpu"))  # use_orig_params=False: one FlatParameter
    try:
        AGROptimizer(torch.optim.SGD(model.parameters(), lr=W.LR), clip_norm=W.CLIP, granularity="tensor")
    except ValueError as error:
        message = str(error)
        assert message.startswith("AGROptimizer: parameter 0") and "FlatParameter" in message, message
        assert "use_orig_params=True" in message and "granularity='group' or 'global'" in message, message
    else:
        raise AssertionError("granularity='tensor' on a FlatParameter was accepted")
    # The same elements in one segment: granularity 'global' is the unwrapped model's AGR.
    plain = W.make_model()
    batches = W.make_batches(3)
    for m in (model, plain):
        opt = AGROptimizer(torch.optim.SGD(m.parameters(), lr=W.LR, momentum=W.MOMENTUM), clip_norm=W.CLIP,
                           granularity="global")
        W.train(m, opt, batches, rank=0, sharded_batch=False)
    with FSDP.summon_full_params(model):
        got = [p.detach().clone() for p in model.module.parameters()]
    err = max((a - b).abs().max().item() for a, b in zip(got, plain.parameters()))
    assert err <= W.TOL, err
    print("ok")
finally:
    dist.destroy_process_group()
"""


def test_fsdp1_in_one_process_refuses_tensor_granularity_on_flat_parameters(tmp_path):
    """In one process FSDP1's gradients are whole, but a FlatParameter is a wrapped module flattened:
    granularity 'tensor' would take one cosine per module (0.04 from the unwrapped model after 3
    steps, measured), so it is refused naming both ways out; 'global' equals the unwrapped model."""
    import os
    import subprocess
    import sys

    script = FSDP1_ONE_PROCESS.format(tests=os.path.dirname(__file__), rendezvous=tmp_path / "rendezvous")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
