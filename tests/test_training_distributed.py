"""agr-train under torchrun (agr_optim.training.distributed): two gloo processes on loopback against
the single-process reference of tests/_sharded_reference.py (accumulation over the rank shards,
per-shard BatchNorm); a 2-process run stopped after its first epoch resumes in 1 process; Ctrl-C
(SIGTERM) to torchrun leaves a resumable run; a divergence stops every process; refusals.

Each torchrun test starts three Python processes (the agent and two workers): about 10 s here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _sharded_reference import Protocol, reference_run
from _training import read_metrics, run

from agr_optim.models import build_model
from agr_optim.training import cli, resolve, run_folder, train

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)
slow_distributed = [pytest.mark.slow, pytest.mark.distributed]

PROTOCOL = Protocol()
# float32 training, reduced by gloo in another order than the reference's sums would be at more
# processes; with 2 processes every sum has two terms and the runs agree to the last bit here.
WEIGHT_TOL = 1e-6
METRIC_TOL = 1e-9  # sums of float32 losses in float64, in another order
COSINE_TOL = 1e-6  # the library's cosine is summed in float32, the reference's in float64


def torchrun(out: Path, *flags: str, processes: int = 2, env: dict | None = None, timeout: float = 180):
    """``torchrun --standalone --nproc_per_node=N -m agr_optim.train --out OUT FLAGS`` -> completed process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "agr_optim.train", "--out", str(out), *flags]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


def agr_train_lines(text: str) -> list[str]:
    """The lines the run printed (torchrun's own log lines and tracebacks aside)."""
    return [line for line in text.splitlines() if line.startswith(("agr-train", "epoch "))]


def assert_matches_reference(out: Path, world_sizes: list[int]) -> dict:
    """``out``'s metrics.csv rows and last checkpoint against the reference; returns the largest
    differences seen."""
    expected = reference_run(PROTOCOL, world_sizes)
    rows = read_metrics(out)
    assert len(rows) == len(world_sizes)
    worst = {"weights": 0.0, "metrics": 0.0}
    for epoch, (row, want) in enumerate(zip(rows, expected["rows"], strict=True)):
        for column, value in want.items():
            if value is None:
                assert row[column] == "", (epoch, column)
                continue
            err = abs(float(row[column]) - value)
            worst["metrics"] = max(worst["metrics"], err)
            tol = COSINE_TOL if column == "agr_cosine" else METRIC_TOL * max(1.0, abs(value))
            assert err <= tol, f"epoch {epoch} {column}: {row[column]} != {value}"
    state = torch.load(out / run_folder.CHECKPOINT_LAST, weights_only=True)
    for name, value in expected["model"].items():
        got = state["model"][name]
        if value.is_floating_point():
            err = float((got - value).abs().max())
            worst["weights"] = max(worst["weights"], err)
            assert err <= WEIGHT_TOL, f"{name} differs by {err:.3g}"
        else:
            assert torch.equal(got, value), name
    momentum = [s["momentum_buffer"] for _, s in sorted(state["optimizer"]["state"].items())]
    for i, (got, value) in enumerate(zip(momentum, expected["momentum"], strict=True)):
        err = float((got - value).abs().max())
        worst["weights"] = max(worst["weights"], err)
        assert err <= WEIGHT_TOL, f"momentum of parameter {i} differs by {err:.3g}"
    return worst


# ---------------------------------------------------------------------- the reference itself
def test_the_reference_with_one_shard_is_the_single_process_run(tmp_path, capsys):
    """The reference is right where it can be checked without processes: with one shard per batch
    it is a plain agr-train run (so its sharded form is the definition, not a copy of the code)."""
    code, _, _ = run([*PROTOCOL.flags(), "--out", tmp_path / "one"], capsys)
    assert code == 0
    assert json.loads((tmp_path / "one" / "config.json").read_text())["world_size"] == 1
    worst = assert_matches_reference(tmp_path / "one", [1, 1])
    print(f"one process vs the one-shard reference: {worst}")


# ---------------------------------------------------------------------- two processes
@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_equal_the_sharded_reference(tmp_path):
    """torchrun with 2 gloo processes = the reference with 2 shards (per-shard BatchNorm, weighted
    sums; the last batch of 1347 mod 64 = 3 images splits 2 + 1), epoch 0 plain, epoch 1 AGR: the
    metrics (training sums, the AGR cosine of the all-reduced gradients, the sharded evaluation)
    and the weights, buffers and momentum. Rank 0 alone prints; config.json records 2 processes;
    each AGR step all-reduces the gradients twice, each plain step once."""
    out = tmp_path / "two"
    done = torchrun(out, *PROTOCOL.flags())
    assert done.returncode == 0, done.stdout + done.stderr
    worst = assert_matches_reference(out, [2, 2])
    print(f"2 processes vs the 2-shard reference: {worst}")
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    lines = agr_train_lines(done.stdout)
    assert sum(line.startswith("epoch ") for line in lines) == 2  # one line per epoch: rank 0's
    assert not agr_train_lines(done.stderr) and "Traceback" not in done.stderr, done.stderr
    assert any("2 processes on 1 host(s), DDP over gloo; --batch-size 64 is the global batch (32 per" in line
               for line in lines)
    (traffic,) = [line for line in lines if "all-reduced" in line]
    found = re.findall(r"in ([\d,]+) backward passes, ([\d,]+) bytes each", traffic)[0]
    passes, per_pass = (int(v.replace(",", "")) for v in found)
    steps = -(-1347 // 64)
    model = build_model("smallcnn", num_classes=10, in_channels=1, image_size=8)
    parameters = sum(p.numel() for p in model.parameters())
    assert (passes, per_pass) == (steps * 1 + steps * 2, 4 * parameters)


@pytest.mark.slow
@pytest.mark.distributed
def test_stopped_after_its_first_epoch_resumes_in_one_process_or_two(tmp_path, capsys):
    """Rank 0 killed at the first file operation of epoch 1's save (AGR_TRAIN_FAULT=kill:N; the
    other process then stops on its own): the folder holds epoch 0 of 2 processes. --resume in one
    process finishes the run as the reference with 2 shards in epoch 0 and 1 in epoch 1; --resume
    with 2 processes (in a copy) as the uninterrupted run, the reference with 2 and 2: the other
    process takes the checkpoint's momentum, schedule, streams and history from rank 0."""
    # N: the file operations of a run's first epoch (counted on a one-process run of the same flags).
    counted: list[int] = []
    flags = cli.build_parser().parse_flags(PROTOCOL.flags())
    cfg, _ = resolve({**flags, "epochs": 1, "agr_start_epoch": 0, "out": str(tmp_path / "count")})
    os.environ[run_folder.FAULT_ENV] = "enospc:100000"
    try:
        train(cfg, log=lambda line: None, on_epoch=lambda trainer, row: counted.append(run_folder._fault.count))
    finally:
        del os.environ[run_folder.FAULT_ENV]
    out = tmp_path / "stopped"
    done = torchrun(out, *PROTOCOL.flags(), env={run_folder.FAULT_ENV: f"kill:{counted[0] + 1}"})
    assert done.returncode != 0
    # The other process, waiting for epoch 1's files, says in one line that rank 0 is gone.
    assert "agr-train: process 1: the run's other processes are gone" in done.stderr and "[rank1]" not in done.stderr
    assert len(read_metrics(out)) == 1 and json.loads((out / "config.json").read_text())["world_size"] == 2
    again = tmp_path / "again"
    shutil.copytree(out, again)
    done = torchrun(again, "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    worst = assert_matches_reference(again, [2, 2])
    print(f"2 processes resumed with 2 vs the reference: {worst}")
    code, stdout, _ = run(["--out", out, "--resume"], capsys)
    assert code == 0, stdout
    assert "resuming" in stdout and "DDP over" not in stdout  # one process: no DDP line
    worst = assert_matches_reference(out, [2, 1])
    print(f"2 processes then 1 vs the reference: {worst}")


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_to_torchrun_leaves_a_resumable_run(tmp_path, capsys):
    """SIGTERM to torchrun once epoch 0 is saved (torchrun forwards it to both processes): rank 0
    says what is saved, the folder holds whole epochs and no temporary file, and --resume in one
    process finishes it with the epochs saved before unchanged."""
    out = tmp_path / "run"
    flags = [*PROTOCOL.flags(), "--epochs", "6", "--agr-start-epoch", "3"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "agr_optim.train", "--out", str(out), *flags]
    agent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.csv").exists() and time.monotonic() < deadline and agent.poll() is None:
            time.sleep(0.02)
        agent.send_signal(signal.SIGTERM)
        stdout, stderr = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
    saved = read_metrics(out)
    if len(saved) == 6:
        pytest.skip("the run finished before the signal reached it")
    assert agent.returncode != 0
    assert re.search(r"agr-train: interrupted; epochs? 0(\.\.\d+)? (is|are) saved", stderr), stderr
    assert not [name for name in os.listdir(out) if run_folder.is_temporary(name)]
    code, resumed, _ = run(["--out", out, "--resume"], capsys)
    assert code == 0, resumed
    rows = read_metrics(out)
    assert len(rows) == 6
    same = lambda row: {k: v for k, v in row.items() if k not in ("seconds", "eval_seconds")}  # noqa: E731
    assert [same(r) for r in rows[: len(saved)]] == [same(r) for r in saved]


@pytest.mark.slow
@pytest.mark.distributed
def test_divergence_stops_every_process_with_one_line(tmp_path):
    """--lr 1e4: both processes find the non-finite loss at the same step (the read is collective)
    and stop; rank 0 alone says where; exit status 3 (torchrun reports the failed workers)."""
    done = torchrun(tmp_path / "run", *PROTOCOL.flags(), "--lr", "1e4", "--agr-start-epoch", "0")
    stops = [line for line in done.stderr.splitlines() if line.startswith("agr-train: error: diverged")]
    assert len(stops) == 1, done.stderr
    assert done.stderr.count("exitcode  : 3 ") == 2, done.stderr  # both processes: the run's status
    assert "[rank0]" not in done.stderr and "[rank1]" not in done.stderr  # no worker traceback


@pytest.mark.slow
@pytest.mark.distributed
def test_a_batch_too_small_for_the_processes_is_refused_by_rank_0(tmp_path):
    """A global batch that cannot give each process an image: one line from rank 0, every process
    exits 2, nothing written."""
    done = torchrun(tmp_path / "run", *PROTOCOL.flags(), "--batch-size", "1")
    errors = [line for line in done.stderr.splitlines() if line.startswith("agr-train: error:")]
    assert errors == [
        "agr-train: error: --batch-size 1 (the global batch) with 2 processes: a batch has 1 images, fewer than "
        "the processes; every process needs an image of every batch: choose a larger --batch-size or fewer "
        "processes (see --help)"
    ], done.stderr
    assert done.stderr.count("exitcode  : 2 ") == 2, done.stderr
    assert not (tmp_path / "run").exists()


def test_sync_bn_is_refused_off_cuda(tmp_path, capsys):
    code, _, err = run([*PROTOCOL.flags(), "--sync-bn", "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert err == (
        "agr-train: error: --sync-bn needs --device cuda (got 'cpu'): torch's SyncBatchNorm runs on GPUs only; "
        "drop --sync-bn for BatchNorm per process (see --help)\n"
    )
    assert not (tmp_path / "o").exists()


# A script run from tmp_path imports agr_optim from sys.path, not from the current folder: this tree's.
REPOSITORY = str(Path(__file__).resolve().parents[1])

LOCKSTEP = """
import torch
from agr_optim.training import Trainer, load_data, resolve
from agr_optim.training.distributed import join

world = join()
torch.set_num_threads(1)
for method in ("trades", "mart", "awp", "avmixup"):
    cfg, _ = resolve({"out": "unused", "method": method, "epochs": 1, "agr_start_epoch": 0, "attack_steps": 1,
                      "eval_steps": 1, "threads": 1})
    trainer = Trainer(cfg, load_data(cfg), world)
    world.start(trainer)
    row = trainer.train_epoch()  # ends with the replica check: weights, buffers, momentum, streams
    if world.main:
        print("lockstep", method, row["train_loss"], flush=True)
world.exit(0)
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_every_method_keeps_the_processes_in_lockstep(tmp_path):
    """TRADES, MART, AWP (its weight perturbation from each process's shard) and AVmixup (lambda:
    each process's rows of the whole batch's draw) with AGR, one epoch on 2 processes: after it
    the processes hold the same weights, buffers, momentum and random streams (the trainer's own
    check after every epoch; the last batch of 3 images splits 2 + 1, so a draw per shard would
    leave the streams apart)."""
    script = tmp_path / "lockstep.py"
    script.write_text(LOCKSTEP)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPOSITORY}, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line.split()[1] for line in done.stdout.splitlines() if line.startswith("lockstep")] == [
        "trades", "mart", "awp", "avmixup"
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_init_from_reaches_every_process(tmp_path, capsys):
    """--init-from under torchrun: rank 0 reads the file, the other process takes the weights from
    rank 0 (it never opens the file), and the replica check after the epoch finds one model."""
    short = [*PROTOCOL.flags(), "--epochs", "1", "--agr-start-epoch", "0"]
    assert run([*short, "--out", tmp_path / "first"], capsys)[0] == 0
    start = tmp_path / "first" / run_folder.CHECKPOINT_LAST
    done = torchrun(tmp_path / "tuned", *short, "--init-from", str(start))
    assert done.returncode == 0, done.stdout + done.stderr
    assert sum(line.startswith("epoch ") for line in done.stdout.splitlines()) == 1


def torchrun_script(script: Path, text: str, out: Path, *flags: str) -> subprocess.CompletedProcess:
    """``text`` saved as ``script`` and run by torchrun on two processes with ``--out OUT FLAGS``
    (importing this tree's agr_optim) -> completed process."""
    script.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         "--out", str(out), *flags],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPOSITORY},
    )


RANK_1_LACKS_THE_DATA = """
import os, sys
from agr_optim.data import DatasetError
from agr_optim.training import cli

if os.environ["RANK"] == "1":  # this process's host lacks the data
    def missing(cfg):
        raise DatasetError("digits: scikit-learn is not installed on this host")
    cli.load_data = missing
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_data_another_process_lacks_is_refused_before_anything_is_written(tmp_path):
    """A process other than rank 0 cannot load the data: rank 0 says so in one line naming the
    process and host, every process exits 2, and rank 0 has written nothing (no config.json, no
    tracker files: it waits for every process's data before its first write)."""
    out = tmp_path / "run"
    done = torchrun_script(tmp_path / "lacks.py", RANK_1_LACKS_THE_DATA, out, *PROTOCOL.flags(),
                           "--trackers", "tensorboard")
    errors = [line for line in done.stderr.splitlines() if line.startswith("agr-train: error:")]
    assert len(errors) == 1 and errors[0].startswith("agr-train: error: process 1 of 2 (host "), done.stderr
    assert "scikit-learn is not installed on this host" in errors[0]
    assert done.stderr.count("exitcode  : 2 ") == 2, done.stderr
    assert not out.exists()


RANK_1_STOPS_LATE = """
import os, sys, time
from agr_optim.training import cli
from agr_optim.training.distributed import Stopped

if os.environ["RANK"] == "1":  # a loaded machine: this process stops two seconds after rank 0
    follow = cli._follow_run
    def late(world):
        try:
            follow(world)
        except Stopped:
            time.sleep(2)
            raise
    cli._follow_run = late
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_a_process_that_stops_after_rank_0_keeps_the_runs_status(tmp_path):
    """A refused run on a loaded machine: rank 0 has exited with status 2 while the other process,
    stopping too, is a moment behind. torchrun sends SIGTERM to a process still running once one
    has failed; that process took it for Ctrl-C (a traceback, an interrupt's exit status); it now ends with
    the run's status, 2, and only rank 0's line is printed."""
    out = tmp_path / "run"
    done = torchrun_script(tmp_path / "late.py", RANK_1_STOPS_LATE, out, *PROTOCOL.flags(), "--batch-size", "1")
    errors = [line for line in done.stderr.splitlines() if line.startswith("agr-train: error:")]
    assert len(errors) == 1 and errors[0].startswith("agr-train: error: --batch-size 1"), done.stderr
    assert done.stderr.count("exitcode  : 2 ") == 2 and "[rank1]" not in done.stderr, done.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_the_authors_step_that_ddp_cannot_reduce_is_refused(tmp_path):
    """The authors' MART, AWP and AVmixup steps with AGR take both backward passes after all their
    forward passes; DDP all-reduces only the first backward after a forward, so the processes
    trained apart (the replica check stopped the run after epoch 0, 'a bug'). Refused by rank 0 in
    one line before anything is written; their PGD-AT step (the recipes' order) runs."""
    authors = ["--authors-step", "--warm-start-stats", "--agr-start-epoch", "0", "--epochs", "1"]
    for method in ("mart", "awp", "avmixup"):
        out = tmp_path / method
        done = torchrun(out, *PROTOCOL.flags(), *authors, "--method", method)
        errors = [line for line in done.stderr.splitlines() if line.startswith("agr-train: error:")]
        assert errors == [
            f"agr-train: error: --authors-step with --method {method} and --agr under torchrun: the authors' step "
            "takes the clean and the adversarial backward pass after all its forward passes, and "
            "DistributedDataParallel all-reduces only the first; run it in one process, or drop --authors-step "
            "(see --help)"
        ], done.stderr
        assert done.stderr.count("exitcode  : 2 ") == 2 and not out.exists(), done.stderr
    done = torchrun(tmp_path / "at", *PROTOCOL.flags(), *authors, "--method", "at")
    assert done.returncode == 0, done.stdout + done.stderr
