"""agr_optim.training.cli: the ``agr-train`` command end to end (outputs, resume, Ctrl-C, refused
folders, the module entry point, --num-classes), and the old import path ``agr_optim.train``.

End to end on small folders in the real formats, written here (CIFAR-10/100 pickles, a
Tiny-ImageNet tree of JPEGs, an .npz), with ``smallcnn`` and 1 to 2 epochs of a cheap attack.
(The run folder's own promises are in tests/test_run_folder.py.)
"""

from __future__ import annotations

import ast
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _training import (
    CHEAP,
    assert_same,
    cli_args,
    comparable,
    one_line,
    read_metrics,
    run,
    tree,
    write_cifar,
    write_tiny_imagenet,
)

import agr_optim.training
from agr_optim.training import METRIC_COLUMNS, Trainer, cli, resolve

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("c10"), 10)


# ---------------------------------------------------------------------- end to end
def test_end_to_end_cifar10_outputs_and_columns(cifar10, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(
        cli_args(
            "flip",
            dataset="cifar10",
            data_dir=cifar10,
            epochs=2,
            agr_start_epoch=1,
            eval_every=1,
            cutout=8,
            crop_padding=2,
            out=out,
        ),
        capsys,
    )
    assert code == 0, stdout
    names = set(os.listdir(out))
    assert names == {
        "config.json",
        "metrics.csv",
        "summary.json",
        "curves.png",
        "checkpoint_last.pt",
        "checkpoint_prev.pt",  # the epoch before the last: a fallback (issue 14)
        "checkpoint_best.pt",
        "checksums.json",  # the checkpoints' SHA-256 (issue 14)
        "run.lock",  # who runs in the folder (issue 14)
    }
    umask = os.umask(0)
    os.umask(umask)
    for name in names:  # normal modes, not mkstemp's 0600
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o666 & ~umask
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 2 and config["agr_start_epoch"] == 1 and config["cutout"] == 8
    for key in config:  # every setting is printed with where it came from
        assert f"  {key} " in stdout
    rows = read_metrics(out)
    assert list(rows[0]) == list(METRIC_COLUMNS) and [r["epoch"] for r in rows] == ["0", "1"]
    assert [r["agr_active"] for r in rows] == ["0", "1"]
    assert rows[0]["agr_cosine"] == "" and rows[1]["agr_cosine"] != ""  # AGR statistics from epoch 1 on
    for r in rows:
        assert 0 <= float(r["test_clean_acc"]) <= 1 and 0 <= float(r["train_robust_acc"]) <= 1
        assert float(r["seconds"]) > 0 and math.isfinite(float(r["train_loss"]))
    assert -1 <= float(rows[1]["agr_cosine"]) <= 1 and 0 <= float(rows[1]["agr_projection_rate"]) <= 1
    assert math.isclose(
        float(rows[1]["agr_norm_difference"]),
        float(rows[1]["agr_norm_adversarial"]) - float(rows[1]["agr_norm_clean"]),
        rel_tol=1e-9,
        abs_tol=1e-12,
    )
    assert float(rows[0]["lr"]) == 0.1 and math.isclose(float(rows[1]["lr"]), 0.01)  # milestone 1 of 2 epochs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["epochs_done"] == 2 and summary["agr_start_epoch"] == 1
    best = max(rows, key=lambda r: float(r["test_robust_acc"]))
    assert summary["best"]["test_robust_acc"] == pytest.approx(float(best["test_robust_acc"]))
    assert summary["final"]["epoch"] == 1
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = torch.load(out / "checkpoint_best.pt", weights_only=True)
    assert saved["epoch"] == summary["best"]["epoch"]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["cifar100", "tiny-imagenet"])
def test_other_folders_end_to_end(dataset, tmp_path, capsys):
    folder = write_cifar(tmp_path, 100) if dataset == "cifar100" else write_tiny_imagenet(tmp_path)
    code, stdout, _ = run(
        cli_args(dataset=dataset, data_dir=folder.parent, epochs=1, image_size=16, out=tmp_path / "o"), capsys
    )
    assert code == 0, stdout
    assert len(read_metrics(tmp_path / "o")) == 1
    assert ("100 classes" if dataset == "cifar100" else "3 classes") in stdout


def test_num_classes_reaches_the_loader_and_the_model(tmp_path, capsys):
    """--num-classes: an .npz whose labels skip classes (here 0..4 of 7) is refused without it,
    naming the flag; with it the model has that many outputs and config.json records it."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = digits.target < 5
    x, y = (digits.images[keep] / 16.0).astype(np.float32)[:120], digits.target[keep][:120]
    y = np.where(y == 4, 6, y)  # labels 0, 1, 2, 3, 6: not dense
    path = tmp_path / "sparse.npz"
    np.savez(path, x_train=x[:80], y_train=y[:80], x_test=x[80:], y_test=y[80:])
    flags = ["--dataset", "npz", "--data-dir", path, "--epochs", "1", "--attack-steps", "1", "--eval-steps", "1"]
    code, stdout, stderr = run([*flags, "--out", tmp_path / "refused"], capsys)
    assert code == 2 and stdout == "" and stderr.count("\n") == 1 and "--num-classes" in stderr, stderr
    assert not (tmp_path / "refused").exists()
    code, stdout, _ = run([*flags, "--num-classes", "7", "--out", tmp_path / "o"], capsys)
    assert code == 0 and "7 classes" in stdout, stdout
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_classes"] == 7
    model = torch.load(tmp_path / "o" / "checkpoint_last.pt", weights_only=True)["model"]
    last_weight = [v for k, v in model.items() if k.endswith("weight")][-1]
    assert last_weight.shape[0] == 7
    code, _, _ = run(["--out", tmp_path / "o", "--resume"], capsys)  # a finished run: nothing more
    assert code == 0


# ---------------------------------------------------------------------- resume
@pytest.mark.parametrize("method", ["at", pytest.param("avmixup", marks=pytest.mark.slow)])
def test_resume_after_an_interruption_equals_the_uninterrupted_run(method, cifar10, tmp_path, capsys):
    """Stopped (Ctrl-C) after epoch 0 of 2, then ``--resume``: bit for bit the 2-epoch run
    (weights, momentum, AGR state, scheduler, every random stream, metrics)."""
    flags = {
        "dataset": "cifar10",
        "data_dir": str(cifar10),
        "epochs": 2,
        "agr_start_epoch": 1,
        "flip": True,
        "method": method,
        "eval_every": 1,
        "attack_steps": 2,
        "eval_steps": 3,
        "batch_size": 32,
        "threads": 1,
    }
    argv = [a for k, v in flags.items() for a in (["--flip"] if k == "flip" else [f"--{k.replace('_', '-')}", v])]
    code, _, _ = run([*argv, "--out", tmp_path / "whole"], capsys)
    assert code == 0
    cfg, sources = resolve({**flags, "out": str(tmp_path / "cut")})

    def interrupt(trainer, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli.train(cfg, sources=sources, on_epoch=interrupt, log=lambda s: None)
    assert len(read_metrics(tmp_path / "cut")) == 1
    code, stdout, _ = run(["--out", tmp_path / "cut", "--resume"], capsys)
    assert code == 0 and "resuming" in stdout
    whole = torch.load(tmp_path / "whole" / "checkpoint_last.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint_last.pt", weights_only=True)
    assert whole["epoch"] == cut["epoch"] == 2
    assert any("agr" in group for group in whole["optimizer"]["param_groups"])  # the AGR state is in it
    assert_same(comparable(whole), comparable(cut))
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
    assert strip(read_metrics(tmp_path / "whole")) == strip(read_metrics(tmp_path / "cut"))
    code, stdout, _ = run(["--out", tmp_path / "cut", "--resume"], capsys)  # finished: nothing more to train
    assert code == 0 and len(read_metrics(tmp_path / "cut")) == 2 and "epoch   2" not in stdout


def test_keyboard_interrupt_exits_130_with_a_resume_hint(cifar10, tmp_path, capsys, monkeypatch):
    """Ctrl-C in the first epoch (issue 14, problem 4: the folder then held config.json only, and
    both --resume and a fresh start were refused): the message claims no saved epoch, --resume
    starts the run from epoch 0, and a fresh start in that folder is allowed too; both equal the
    uninterrupted run."""
    flags = ["--dataset", "cifar10", "--data-dir", cifar10, *CHEAP, "--epochs", "1"]
    assert run([*flags, "--out", tmp_path / "whole"], capsys)[0] == 0
    train_epoch = Trainer.train_epoch

    def stop(self, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_epoch", stop)
    for out in ("resumed", "restarted"):
        code, _, stderr = run([*flags, "--out", tmp_path / out], capsys)
        assert code == 130 and "--resume" in stderr and "starts the run from epoch 0" in stderr, stderr
        assert "are saved" not in stderr and "last finished epoch" not in stderr
        assert sorted(os.listdir(tmp_path / out)) == ["config.json", "run.lock"]  # the run exists, no epoch
    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    code, stdout, _ = run(["--out", tmp_path / "resumed", "--resume"], capsys)
    assert code == 0 and "no checkpoint yet" in stdout
    code, stdout, _ = run([*flags, "--out", tmp_path / "restarted"], capsys)
    assert code == 0 and "starting over" in stdout
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]
    whole = strip(read_metrics(tmp_path / "whole"))
    assert strip(read_metrics(tmp_path / "resumed")) == whole == strip(read_metrics(tmp_path / "restarted"))


# ---------------------------------------------------------------------- refused folders
def test_bad_folders_are_refused_with_nothing_written(cifar10, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = write_cifar(tmp_path / "corrupt", 10, n_train=10, n_test=4)
    (corrupt / "data_batch_3").write_bytes(b"\x80\x04not a pickle")
    cifar100 = write_cifar(tmp_path / "c100", 100, n_train=10, n_test=4)
    for folder, needle in ((empty, "lacks"), (corrupt, "corrupt"), (cifar100, "cifar100")):
        before = tree(tmp_path)
        code, stdout, stderr = run(["--dataset", "cifar10", "--data-dir", folder, "--out", tmp_path / "o"], capsys)
        assert code == 2 and stdout == "" and needle in stderr and stderr.count("\n") == 1, stderr
        assert tree(tmp_path) == before and not (tmp_path / "o").exists()
    # --out: a file, a non-empty folder (without --resume), --resume with other flags or nothing
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    cases = [
        (["--out", blocker], "not a folder"),
        (["--out", blocker / "sub"], "not a folder"),
        (["--out", full], "not empty"),
        (["--out", full, "--resume", "--epochs", "3"], "drop --epochs"),
        (["--out", full, "--resume"], "config.json"),
        (["--resume"], "--out"),
    ]
    for argv, needle in cases:
        before = tree(tmp_path)
        code, stdout, stderr = run(argv, capsys)
        assert code == 2 and stdout == "" and needle in stderr and stderr.count("\n") == 1, (argv, stderr)
        assert tree(tmp_path) == before


# ---------------------------------------------------------------------- entry points
def test_module_entry_point():
    """``python -m agr_optim.train`` is the console script's twin."""
    proc = subprocess.run(
        [sys.executable, "-m", "agr_optim.train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "--agr-start-epoch" in proc.stdout and "--autoattack-samples" in proc.stdout


#: Every public name ``agr_optim.train`` had before it became the entry point of the package (its
#: own names and the run-folder names it re-exported for agr-demo).
OLD_NAMES = (
    "AMP_MODES EXIT_DIVERGED EXIT_INTERRUPTED EXIT_REFUSED EXIT_WRITE_FAILED MAX_IMAGE_SIDE MAX_SEED MAX_THREADS "
    "METHODS METHOD_NAMES METRIC_COLUMNS NATIVE_SIDES PAPER_AGR_START_FRACTION PRESETS PROGRESS_SECONDS ConfigError "
    "Diverged Interrupted Progress RunFolderError RunStopped TrainConfig Trainer WriteError atomic_write build_parser "
    "load_data main metrics_csv resolve train unwritable write_json write_text"
).split()


def test_the_old_module_path_keeps_every_name():
    import agr_optim.train as old
    from agr_optim.training import run_folder

    assert sorted(old.__all__) == sorted(OLD_NAMES)
    for name in OLD_NAMES:
        new = getattr(agr_optim.training, name, None) or getattr(run_folder, name)
        assert getattr(old, name) is new, name
    for name in agr_optim.training.__all__:
        assert hasattr(agr_optim.training, name), name


@pytest.mark.parametrize("path", ["agr_optim/demo.py", "benchmarks/train_cost.py"])
def test_demo_and_benchmark_use_only_public_names(path):
    """agr-demo and the cost benchmark import public names and touch no private attribute of
    another object (they used train.py's _Parser and Trainer._own_streams, _autocast, _step)."""
    module = ast.parse((REPOSITORY / path).read_text())
    for node in ast.walk(module):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("agr_optim")):
            assert not [a.name for a in node.names if a.name.startswith("_")], (path, node.lineno)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            assert isinstance(node.value, ast.Name) and node.value.id == "self", (path, node.lineno, node.attr)


# ---------------------------------------------------------------------- AutoAttack
@pytest.mark.slow
def test_autoattack_at_the_end(cifar10, tmp_path, capsys):
    pytest.importorskip("torchattacks")
    code, stdout, _ = run(
        cli_args(dataset="cifar10", data_dir=cifar10, epochs=1, autoattack_samples=8, out=tmp_path / "o"), capsys
    )
    assert code == 0, stdout
    aa = json.loads((tmp_path / "o" / "summary.json").read_text())["autoattack"]
    assert aa["samples"] == 8 and 0 <= aa["robust_acc"] <= 1 and aa["checkpoint"].startswith("best")


def test_resume_with_settings_this_machine_refuses_says_so(tmp_path, capsys, monkeypatch):
    """A run whose config.json asks for what this machine lacks (here W&B, on a machine without the
    package): --resume read the file fine, so the line says the settings are refused here and that
    a resumed run keeps them (flags cannot change them), not that config.json is unreadable."""
    out = tmp_path / "run"
    out.mkdir()
    settings = {**resolve({"out": str(out)})[0].to_json(), "log": ["wandb"], "world_size": 1}
    (out / "config.json").write_text(json.dumps(settings))
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    before = tree(tmp_path)
    code, stdout, stderr = run(["--out", out, "--resume"], capsys)
    assert code == 2 and stdout == "" and tree(tmp_path) == before
    line = one_line(stderr)
    assert "cannot read" not in line and f"the settings in '{out / 'config.json'}' are refused here" in line
    assert "--log wandb needs the wandb package" in line and "keeps the settings it started with" in line
