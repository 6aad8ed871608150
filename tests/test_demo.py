"""Tests for the agr-demo command: bad input, outputs, the shared warm start, lazy imports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from agr_optim import AGROptimizer, demo
from agr_optim.recipes import pgd_at_step


def run_main(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr)."""
    try:
        code = demo.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny_npz(tmp_path):
    """A small slice of the digits as a local .npz (also exercises --data)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x[:96], y_train=digits.target[:96], x_test=x[96:160], y_test=digits.target[96:160])
    return str(path)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--method", "pgd"], "--method"),
        (["--eps", "0"], "--eps"),
        (["--eps", "-0.1"], "--eps"),
        (["--eps", "1.5"], "--eps"),
        (["--eps", "nan"], "--eps"),
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "-3"], "--epochs"),
        (["--epochs", "two"], "--epochs"),
        (["--seeds", "0"], "--seeds"),
        (["--agr-start", "1"], "--agr-start"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
        (["--data", "/nonexistent/file.npz"], "--data"),
    ],
)
def test_bad_arguments_one_line_exit_2_nothing_written(args, needle, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_main([*args, "--out", str(out)], capsys)
    assert code == 2
    assert stdout == ""
    assert stderr.count("\n") == 1 and needle in stderr and "error" in stderr
    assert not out.exists()


def test_unwritable_out_is_refused_before_training(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    trained = []
    monkeypatch.setattr(demo, "train_pair", lambda *a, **k: trained.append(1))
    for out in (blocker, blocker / "sub" / "dir"):
        code, stdout, stderr = run_main(["--epochs", "1", "--seeds", "1", "--out", str(out)], capsys)
        assert code == 2 and stdout == "" and stderr.count("\n") == 1 and "--out" in stderr
    assert blocker.read_text() == "not a folder" and trained == []


def test_read_only_folder_is_refused(tmp_path, capsys, monkeypatch):
    """A folder where no file can be created (simulated: root ignores chmod)."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(demo.tempfile, "TemporaryFile", refuse)
    code, _, stderr = run_main(["--out", str(tmp_path / "new")], capsys)
    assert code == 2 and "Permission denied" in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "new").exists()


def test_bad_npz_contents(tmp_path, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((4, 8, 8)))
    code, _, stderr = run_main(["--data", str(path), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "y_train" in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_missing_extras_message(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError("No module named 'tqdm'", name="tqdm")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    code, _, stderr = run_main(["--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "agr_optim[demo]" in stderr and "tqdm" in stderr


def test_module_entry_point_bad_method(tmp_path):
    """``python -m agr_optim.demo`` is the console script's twin: exit status 2, one line."""
    proc = subprocess.run(
        [sys.executable, "-m", "agr_optim.demo", "--method", "fgsm", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "fgsm" in proc.stderr


def test_core_and_recipes_import_only_torch():
    code = (  # torch itself may import tqdm: count what our imports add on top of torch's
        "import sys, torch; before = set(sys.modules); import agr_optim, agr_optim.recipes, agr_optim.demo; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} & {'sklearn', 'matplotlib', 'tqdm'}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ---------------------------------------------------------------------- a tiny full run
def test_tiny_run_writes_table_json_and_png(tiny_npz, tmp_path, capsys):
    out = tmp_path / "nested" / "out"
    code, stdout, stderr = run_main(
        ["--data", tiny_npz, "--epochs", "2", "--seeds", "2", "--method", "trades", "--out", str(out)], capsys
    )
    assert code == 0
    assert "expected time" in stderr
    records = json.loads((out / "results.json").read_text())
    assert sorted((r["seed"], r["agr"]) for r in records) == [(0, False), (0, True), (1, False), (1, True)]
    for r in records:
        assert {"method", "agr", "seed", "epochs", "clean_acc", "robust_acc", "seconds"} <= set(r)
        assert r["method"] == "trades" and r["epochs"] == 2
        assert 0 <= r["robust_acc"] <= 1 and 0 <= r["clean_acc"] <= 1 and r["seconds"] > 0
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out)) == ["results.json", "tradeoff.png"]  # no temporary files left
    # The table: mean and sample std over seeds, per arm, as percentages.
    for agr, label in ((False, f"{'TRADES':<14}"), (True, f"{'TRADES+AGR':<14}")):
        clean = [100 * r["clean_acc"] for r in records if r["agr"] == agr]
        robust = [100 * r["robust_acc"] for r in records if r["agr"] == agr]
        row = next(line for line in stdout.splitlines() if line.startswith(label))
        expected = [np.mean(clean), np.std(clean, ddof=1), np.mean(robust), np.std(robust, ddof=1)]
        numbers = [float(v) for v in row.split()[1:] if v != "+-"][:4]
        assert numbers == pytest.approx(expected, abs=0.006)


@pytest.mark.parametrize("method", ["at", "mart", "awp"])
def test_each_method_runs(method, tiny_npz, tmp_path, capsys):
    code, stdout, _ = run_main(
        ["--data", tiny_npz, "--epochs", "1", "--seeds", "1", "--method", method, "--out", str(tmp_path)], capsys
    )
    assert code == 0 and "+AGR" in stdout
    records = json.loads((tmp_path / "results.json").read_text())
    assert all(math.isfinite(r["robust_acc"]) for r in records)


# ---------------------------------------------------------------------- the shared warm start
def test_forked_agr_arm_equals_a_from_scratch_agr_run(tiny_npz):
    """Training the warm start once and forking gives the AGR arm of a from-scratch run, bit for bit."""
    data = demo._load_npz(tiny_npz)
    cfg = demo.Config("at", 3, 1, 0.1, "unused", torch.device("cpu"), 0.4, 0.1, 0.1, 32, None)
    assert cfg.agr_start_epoch == 1
    trainer = demo._Trainer(cfg, data, seed=7)
    trainer.train_epoch(0)
    twin = trainer.fork_with_agr()
    for epoch in (1, 2):
        twin.train_epoch(epoch)

    # From scratch, written out: same seed, init, order, attack and lr schedule.
    torch.manual_seed(7)
    model = demo.SmallCNN(1, data.num_classes)
    order = torch.Generator().manual_seed(7)
    batches = math.ceil(len(data.y_train) / 32)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = AGROptimizer(sgd, clip_norm=0.1, start_step=1 * batches)
    attack = demo.PGD(0.1, 0.025, 10)
    for epoch, lr in enumerate([0.1, 0.01, 0.001]):  # x0.1 at int(0.5 * 3) = 1 and int(0.75 * 3) = 2
        for group in sgd.param_groups:
            group["lr"] = lr
        assert opt.active == (epoch >= 1)
        model.train()
        perm = torch.randperm(len(data.y_train), generator=order)
        for i in range(0, len(perm), 32):
            idx = perm[i : i + 32]
            pgd_at_step(model, opt, data.x_train[idx], data.y_train[idx], attack=attack)
    for a, b in zip(model.state_dict().values(), twin.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # and the plain arm is untouched by the fork
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), trainer.model.parameters(), strict=True))


def test_agr_start_epoch_and_schedule():
    def cfg(epochs, start):
        return demo.Config("at", epochs, 1, 0.1, "x", torch.device("cpu"), start, 0.1, 0.1, 64, None)

    assert cfg(200, 0.775).agr_start_epoch == 155  # the paper's schedule
    assert cfg(20, 0.775).agr_start_epoch == 15
    assert cfg(1, 0.775).agr_start_epoch == 0  # AGR acts in at least the last epoch
    assert cfg(2, 0.0).agr_start_epoch == 0
    c = cfg(200, 0.775)
    assert [demo._lr_at(c, e) for e in (0, 99, 100, 149, 150)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
