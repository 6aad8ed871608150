"""Tests for the agr-demo command: bad input, outputs, the paired study on agr-train's engine."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from agr_optim import demo
from agr_optim.train import Trainer, load_data


def run_main(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr)."""
    try:
        code = demo.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny_npz(tmp_path):
    """A small slice of the digits as a local .npz (also exercises --dataset npz)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x[:96], y_train=digits.target[:96], x_test=x[96:160], y_test=digits.target[96:160])
    return str(path)


def npz_args(path):
    return ["--dataset", "npz", "--data-dir", path]


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--method", "pgd"], "--method"),
        (["--dataset", "svhn"], "--dataset"),
        (["--eps", "0"], "--eps"),
        (["--eps", "-0.1"], "--eps"),
        (["--eps", "1.5"], "--eps"),
        (["--eps", "nan"], "--eps"),
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "two"], "--epochs"),
        (["--seeds", "0"], "--seeds"),
        (["--epochs", "5", "--agr-start-epoch", "5"], "--agr-start-epoch"),
        (["--clip-norm", "-1"], "--clip-norm"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
        (["--dataset", "npz", "--data-dir", "/nonexistent/file.npz"], "npz"),
        (["--dataset", "npz"], "--data-dir"),
    ],
)
def test_bad_arguments_one_line_exit_2_nothing_written(args, needle, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_main([*args, "--out", out], capsys)
    assert code == 2
    assert stdout == ""
    assert stderr.count("\n") == 1 and needle in stderr and "error" in stderr, stderr
    assert not out.exists()


def test_unwritable_out_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "sub" / "dir"):
        code, stdout, stderr = run_main(["--epochs", "1", "--seeds", "1", "--out", out], capsys)
        assert code == 2 and stdout == "" and stderr.count("\n") == 1 and "--out" in stderr
    assert blocker.read_text() == "not a folder"


def test_bad_npz_contents(tmp_path, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((4, 8, 8)))
    code, _, stderr = run_main([*npz_args(path), "--out", tmp_path / "o"], capsys)
    assert code == 2 and "y" in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_missing_extras_message(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError("No module named 'tqdm'", name="tqdm")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    code, _, stderr = run_main(["--out", tmp_path / "o"], capsys)
    assert code == 2 and "agr_optim[demo]" in stderr and "tqdm" in stderr
    assert not (tmp_path / "o").exists()


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
        "import sys, torch; before = set(sys.modules); "
        "import agr_optim, agr_optim.recipes, agr_optim.demo, agr_optim.train; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} & {'sklearn', 'matplotlib', 'tqdm'}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ---------------------------------------------------------------------- a tiny full run
def test_tiny_run_writes_table_json_and_png(tiny_npz, tmp_path, capsys):
    out = tmp_path / "nested" / "out"
    code, stdout, stderr = run_main(
        [*npz_args(tiny_npz), "--epochs", "2", "--seeds", "2", "--method", "trades", "--out", out], capsys
    )
    assert code == 0
    assert "expected time" in stderr and "AGR from epoch 1 (0-based)" in stderr
    records = json.loads((out / "results.json").read_text())
    assert sorted((r["seed"], r["agr"]) for r in records) == [(0, False), (0, True), (1, False), (1, True)]
    for r in records:
        assert r["method"] == "trades" and r["epochs"] == 2
        assert 0 <= r["robust_acc"] <= 1 and 0 <= r["clean_acc"] <= 1 and r["seconds"] > 0
        # the screen's "AGR in epochs 1..1" and results.json agree: 0-based, named so
        assert r["agr_start_epoch_0based"] == (1 if r["agr"] else None) and r["agr_epochs"] == (1 if r["agr"] else 0)
        assert [m["epoch"] for m in r["metrics"]] == [0, 1]
        assert r["clean_acc"] == r["metrics"][-1]["test_clean_acc"]
    assert "AGR in epochs 1..1 (1 epoch," in stdout
    assert "smoke run" in stdout and "says nothing about AGR" in stdout  # one AGR epoch means nothing
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out)) == ["config.json", "results.json", "tradeoff.png"]  # no temporary files left
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(out):  # issue 11: they were 0600
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o666 & ~umask
    # The table: mean and sample std over seeds, per arm, as percentages.
    for agr, label in ((False, f"{'TRADES':<14}"), (True, f"{'TRADES+AGR':<14}")):
        clean = [100 * r["clean_acc"] for r in records if r["agr"] == agr]
        robust = [100 * r["robust_acc"] for r in records if r["agr"] == agr]
        row = next(line for line in stdout.splitlines() if line.startswith(label))
        expected = [np.mean(clean), np.std(clean, ddof=1), np.mean(robust), np.std(robust, ddof=1)]
        numbers = [float(v) for v in row.split()[1:] if v != "+-"][:4]
        assert numbers == pytest.approx(expected, abs=0.006)


def test_default_run_has_no_smoke_note():
    cfg = demo.study_config(demo._build_parser().parse_args(["--out", "x"]))
    assert (cfg.epochs, cfg.agr_start_epoch, cfg.lr_milestones) == (20, 15, (10, 15))
    assert "smoke run" not in demo.format_table(cfg, "digits", (1, 1), [])


@pytest.mark.parametrize("method", ["at", "mart", "awp", "avmixup"])
def test_each_method_runs(method, tiny_npz, tmp_path, capsys):
    code, stdout, _ = run_main(
        [*npz_args(tiny_npz), "--epochs", "1", "--seeds", "1", "--method", method, "--out", tmp_path / "o"], capsys
    )
    assert code == 0 and "+AGR" in stdout
    records = json.loads((tmp_path / "o" / "results.json").read_text())
    assert all(math.isfinite(r["robust_acc"]) for r in records)


# ---------------------------------------------------------------------- the engine underneath
def test_pair_is_two_agr_train_runs(tiny_npz, tmp_path):
    """The demo is agr-train's engine: each arm equals a from-scratch Trainer run (--no-agr and
    --agr) with the demo's settings; the shared warm start changes nothing."""
    args = demo._build_parser().parse_args([*npz_args(tiny_npz), "--epochs", "2", "--out", str(tmp_path / "o")])
    cfg = demo.study_config(args)
    assert cfg.agr_start_epoch == 1 and cfg.clean_pass == "always" and cfg.eval_every == 2
    data = load_data(cfg)
    plain, with_agr = demo.train_pair(cfg, data, seed=4)
    for agr, result in ((False, plain), (True, with_agr)):
        scratch = Trainer(replace(cfg, seed=4, agr=agr), data)
        for _ in range(2):
            scratch.train_epoch()
        last = scratch.metrics[-1]
        assert (result.clean_acc, result.robust_acc) == (last["test_clean_acc"], last["test_robust_acc"])
        drop = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
        assert drop(result.metrics) == drop(scratch.metrics)
    assert plain.metrics[:1] == with_agr.metrics[:1]  # the shared warm start
    assert plain.metrics[1]["agr_active"] == 0 and with_agr.metrics[1]["agr_active"] == 1
    # Issue 16: the warm start's accuracy, what both arms start from (epoch 0 is not evaluated at
    # --eval-every 2: one more evaluation, which leaves the runs above as they were).
    warm = Trainer(replace(cfg, seed=4, agr=False), data)
    warm.train_epoch()
    assert warm.metrics[0]["test_clean_acc"] is None
    expected = warm.evaluate()
    for result in (plain, with_agr):
        assert (result.warm_start_clean_acc, result.warm_start_robust_acc) == expected
    table = demo.format_table(cfg, "npz", (1, 1), [plain, with_agr])
    row = next(line for line in table.splitlines() if line.startswith("warm start"))
    numbers = row[14:].split()
    assert [float(numbers[0]), float(numbers[3])] == pytest.approx([100 * expected[0], 100 * expected[1]], abs=0.006)
    assert "shared, epochs 0..0" in row


def test_agr_start_epoch_follows_the_paper():
    def start(epochs):
        return demo.study_config(demo._build_parser().parse_args(["--epochs", str(epochs), "--out", "x"]))

    assert start(200).agr_start_epoch == 155 and start(200).lr_milestones == (100, 150)  # the paper's schedule
    assert start(20).agr_start_epoch == 15
    assert start(1).agr_start_epoch == 0  # AGR acts in at least the last epoch
    c = start(200)
    assert [c.lr_at(e) for e in (0, 99, 100, 149, 150)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
