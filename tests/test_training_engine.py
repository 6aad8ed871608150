"""agr_optim.training.engine: the Trainer (the step of every method, the shared warm start, the
AGR statistics of an epoch, the public pieces of an epoch) and the cost benchmark built on it.

End to end on a small CIFAR-10 pickle folder written here, with ``smallcnn`` and 1 to 2 epochs of
a cheap attack.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _training import assert_same, cli_args, comparable, read_metrics, run, write_cifar

from agr_optim import AGROptimizer
from agr_optim.training import EpochSums, TrainConfig, Trainer, load_data, resolve


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("c10"), 10)


@pytest.fixture
def one_thread():
    """Tiny models: one thread is faster and spares the shared cores (as tests/test_authors_step.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method", ["trades", "mart", "awp", "avmixup"])
def test_each_method_trains_an_epoch(method, cifar10, tmp_path, capsys):
    code, stdout, _ = run(
        cli_args(dataset="cifar10", data_dir=cifar10, epochs=1, agr_start_epoch=0, method=method, out=tmp_path / "o"),
        capsys,
    )
    assert code == 0, stdout
    (row,) = read_metrics(tmp_path / "o")
    assert row["agr_active"] == "1" and math.isfinite(float(row["train_loss"])) and row["agr_cosine"] != ""


# ---------------------------------------------------------------------- the shared warm start
def test_forked_agr_arm_equals_a_from_scratch_agr_run(cifar10, tmp_path, one_thread):
    """What agr-demo relies on: the plain arm forked at the AGR start epoch = an --agr run."""
    cfg, _ = resolve(
        {
            "dataset": "cifar10",
            "data_dir": str(cifar10),
            "epochs": 2,
            "agr_start_epoch": 1,
            "attack_steps": 2,
            "eval_steps": 2,
            "batch_size": 32,
            "out": str(tmp_path),
            "agr": False,
            "eval_every": 2,
            "method": "at",
        }
    )
    data = load_data(cfg)
    plain = Trainer(cfg, data)
    plain.train_epoch()
    forked = plain.fork(agr=True)
    forked.train_epoch()
    scratch = Trainer(TrainConfig(**{**cfg.to_json(), "lr_milestones": cfg.lr_milestones, "agr": True}), data)
    scratch.train_epoch()
    scratch.train_epoch()
    assert isinstance(forked.optimizer_for(1), AGROptimizer)
    assert_same(comparable(forked.state_dict()), comparable(scratch.state_dict()))
    plain.train_epoch()  # the plain arm goes on without AGR: not the same weights
    assert not all(
        torch.equal(a, b) for a, b in zip(plain.module.parameters(), forked.module.parameters(), strict=True)
    )


def test_an_epoch_of_public_steps_is_train_epoch(cifar10, tmp_path, one_thread):
    """own_streams + training_batches + train_step (what benchmarks/train_cost.py times) take
    bit for bit the steps of train_epoch: same weights, momentum, AGR step count and streams
    (no lr milestone, so that train_epoch's scheduler step leaves the lr as it was)."""
    cfg, _ = resolve(
        {"dataset": "cifar10", "data_dir": str(cifar10), "epochs": 2, "agr_start_epoch": 0, "attack_steps": 1,
         "batch_size": 32, "eval_every": 2, "method": "avmixup", "lr_milestones": "", "out": str(tmp_path)}
    )
    data = load_data(cfg)
    whole, pieces = Trainer(cfg, data), Trainer(cfg, data)
    whole.train_epoch()
    with pieces.own_streams():
        pieces.model.train()
        outputs = [pieces.train_step(x, y) for x, y in pieces.training_batches()]
    assert len(outputs) == math.ceil(80 / 32) and all(torch.isfinite(o.loss) for o in outputs)
    a, b = whole.state_dict(), pieces.state_dict()
    for key in ("model", "optimizer", "rng"):
        assert_same(a[key], b[key], key)
    assert pieces.agr is not None and pieces.agr.step_count == 3


# ---------------------------------------------------------------------- the AGR statistics
def test_warm_start_stats_log_without_changing_the_run(cifar10, tmp_path, capsys):
    """--warm-start-stats: AGR statistics in the warm-start epochs too (the authors log them), the
    run itself (weights, momentum, streams) bit for bit the one without."""
    flags = {"dataset": "cifar10", "data_dir": cifar10, "epochs": 2, "agr_start_epoch": 1, "eval_every": 2}
    assert run(cli_args(**flags, out=tmp_path / "plain"), capsys)[0] == 0
    assert run(cli_args("warm-start-stats", **flags, out=tmp_path / "logged"), capsys)[0] == 0
    plain, logged = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "logged")
    assert plain[0]["agr_cosine"] == "" and logged[0]["agr_cosine"] != "" and logged[0]["agr_active"] == "0"
    assert plain[1]["agr_cosine"] == logged[1]["agr_cosine"]
    a, b = (torch.load(tmp_path / d / "checkpoint_last.pt", weights_only=True) for d in ("plain", "logged"))
    for key in ("model", "optimizer", "scheduler", "rng"):
        assert_same(a[key], b[key], key)


def test_epoch_statistics_are_the_authors_means(tmp_path):
    """The AGR columns: the AGR code's per-step means over parameter tensors, averaged over steps
    (its ``get_cos_similarity`` with 1e-20, GOP when cos <= 0, ``torch.norm(g1 - g2)``)."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.0), clip_norm=0.1)
    sums = EpochSums(torch.device("cpu"))
    expected = np.zeros(6)
    steps = 3
    for _ in range(steps):
        clean = [torch.randn_like(p) for p in model.parameters()]
        adversarial = [torch.randn_like(p) for p in model.parameters()]
        opt.zero_grad()
        for p, c in zip(model.parameters(), clean, strict=True):
            p.grad = c.clone()
        opt.stash_clean()
        for p, a in zip(model.parameters(), adversarial, strict=True):
            p.grad = a.clone()
        opt.step()
        sums.add_agr(opt)
        per_tensor = []
        for a, c in zip(adversarial, clean, strict=True):
            a, c = a.double().flatten().numpy(), c.double().flatten().numpy()
            cos = a @ c / (np.linalg.norm(a) * np.linalg.norm(c) + 1e-20)
            per_tensor.append([cos, cos <= 0, np.linalg.norm(a), np.linalg.norm(c), np.linalg.norm(a - c)])
        m = np.mean(per_tensor, axis=0)
        expected += np.array([m[0], m[1], m[2], m[3], m[2] - m[3], m[4]]) / steps
    row = sums.finish()
    columns = ("cosine", "projection_rate", "norm_adversarial", "norm_clean", "norm_difference", "l2_distance")
    got = [row[f"agr_{name}"] for name in columns]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- the cost benchmark
def test_train_cost_benchmark_runs(tmp_path, capsys):
    """``python -m benchmarks.train_cost`` (a benchmark: its figures are not asserted) runs its
    three arms and writes its JSON."""
    from benchmarks import train_cost

    out = tmp_path / "cost.json"
    assert train_cost.main(["--repeats", "1", "--max-batches", "1", "--attack-steps", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["seconds_per_epoch_median"]) == {"plain", "floor", "agr"}
    assert set(result["paired_ratio_quartiles"]) == {"agr/plain", "floor/plain", "agr/floor"}
    assert result["setup"]["steps_per_epoch"] == 1 and "agr/plain" in capsys.readouterr().out


# ---------------------------------------------------------------------- CUDA (skipped without a GPU)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_cuda_epoch_with_amp(amp, cifar10, tmp_path, capsys):
    """On CUDA: autocast (fp16 with a GradScaler through AGR), channels_last, data on the device."""
    code, stdout, _ = run(
        cli_args(
            dataset="cifar10", data_dir=cifar10, epochs=2, agr_start_epoch=1, device="cuda", amp=amp, out=tmp_path
        ),
        capsys,
    )
    assert code == 0, stdout
    rows = read_metrics(tmp_path)
    assert rows[1]["agr_active"] == "1" and math.isfinite(float(rows[1]["agr_cosine"]))
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    code, _, _ = run(["--out", tmp_path, "--resume"], capsys)  # a finished run resumes to nothing new
    assert code == 0 and len(read_metrics(tmp_path)) == 2
