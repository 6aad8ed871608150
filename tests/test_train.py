"""Tests for ``agr-train`` (agr_optim.train): presets, flags, outputs, resume, refusals.

End to end on small folders in the real formats, written here (CIFAR-10/100 pickles, a
Tiny-ImageNet tree of JPEGs), with ``smallcnn`` and 1 to 2 epochs of a cheap attack.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_cli import run

from agr_optim import AGROptimizer
from agr_optim import train as train_mod
from agr_optim.train import METRIC_COLUMNS, PRESETS, ConfigError, TrainConfig, Trainer, load_data, resolve

# A cheap run: PGD-2 for training, PGD-3 for evaluation, batch 32.
CHEAP = ["--attack-steps", "2", "--eval-steps", "3", "--batch-size", "32", "--threads", "1"]


# ---------------------------------------------------------------------- data in the real formats
def write_cifar(root: Path, classes: int, n_train: int = 80, n_test: int = 32, seed: int = 0) -> Path:
    """A CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``) pickle folder."""
    rng = np.random.default_rng(seed)
    folder = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    key = b"labels" if classes == 10 else b"fine_labels"

    def dump(name: str, n: int) -> None:
        labels = rng.integers(0, classes, n)
        # Learnable: the class sets the mean brightness of the red channel.
        data = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.float64)
        data[:, 0] = data[:, 0] * 0.3 + (labels[:, None, None] * 170 / max(classes - 1, 1))
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data.clip(0, 255).astype(np.uint8).reshape(n, -1), key: labels.tolist()}, f)

    if classes == 10:
        for i in range(1, 6):
            dump(f"data_batch_{i}", n_train // 5)
        dump("test_batch", n_test)
    else:
        dump("train", n_train)
        dump("test", n_test)
    return folder


def write_tiny_imagenet(root: Path, wnids=("n01", "n02", "n03"), per_class: int = 6, seed: int = 0) -> Path:
    """A ``tiny-imagenet-200`` tree: wnids.txt, train/<wnid>/images/*.JPEG, val/images + annotations."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    lines = []
    for k, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(images / f"{wnid}_{i}.JPEG", quality=90)
        for i in range(2):
            name = f"val_{k}_{i}.JPEG"
            Image.fromarray(rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(folder / "val" / "images" / name)
            lines.append(f"{name}\t{wnid}\t0\t0\t63\t63\n")
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    return folder


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("c10"), 10)


def cli(*switches: str, **flags: object) -> list:
    """``--switch`` for each switch, ``--key value`` for each keyword (``_`` as ``-``), then CHEAP."""
    argv = [f"--{name}" for name in switches]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv + CHEAP


def read_metrics(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------- the paper preset
def test_paper_preset_is_the_authors_protocol(tmp_path):
    """The values of the AGR code's train.py (defaults and the README's command line)."""
    # (AutoAttack off here: the check that torchattacks is installed is not this test's business.)
    assert PRESETS["paper"]["autoattack_samples"] == 1000
    cfg, sources = resolve(
        {"preset": "paper", "out": str(tmp_path / "o"), "data_dir": str(tmp_path), "autoattack_samples": 0}
    )
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == (200, 128, 0.1, 0.9, 5e-4)
    assert cfg.lr_milestones == (100, 150) and cfg.lr_gamma == 0.1
    assert cfg.agr and cfg.agr_start_epoch == 155 and cfg.clip_norm == 0.1
    assert (cfg.eps, cfg.attack_step, cfg.attack_steps, cfg.eval_steps) == (8 / 255, 2 / 255, 10, 20)
    assert (cfg.crop_padding, cfg.flip, cfg.cutout, cfg.image_size) == (4, True, "authors", 32)
    assert (cfg.clean_pass, cfg.trades_attack, cfg.beta, cfg.awp_gamma) == ("always", "ce", 6.0, 0.01)
    assert cfg.warm_start_stats  # the authors' AGR arm logs its statistics from epoch 0
    assert (cfg.dataset, cfg.model, cfg.eval_every) == ("cifar10", "preactresnet18", 1)
    assert sources["epochs"] == "preset paper" and "derived" in sources["agr_start_epoch"]
    # The authors multiply lr by 0.1 at the start of epochs 100 and 150 (0-based, i in lr_stage).
    lr = 0.1
    for epoch in range(200):
        if epoch in (100, 150):
            lr *= 0.1
        assert math.isclose(cfg.lr_at(epoch), lr, rel_tol=1e-12)
        assert cfg.agr_on(epoch) == (epoch >= 155)  # the authors' `if i >= args.AGR_epoch`


def test_flags_override_the_preset(tmp_path):
    cfg, sources = resolve(
        {
            "preset": "paper",
            "out": "o",
            "data_dir": "d",
            "epochs": 40,
            "agr_start_epoch": 3,
            "clip_norm": 0.0,
            "lr_milestones": "5,30",
            "cutout": 0,
        }
    )
    assert cfg.epochs == 40 and cfg.agr_start_epoch == 3 and cfg.clip_norm is None and cfg.cutout is None
    assert cfg.lr_milestones == (5, 30) and sources["epochs"] == "flag" and sources["batch_size"] == "preset paper"
    derived, _ = resolve({"preset": "paper", "out": "o", "data_dir": "d", "epochs": 20})
    assert derived.lr_milestones == (10, 15) and derived.agr_start_epoch == 15  # the same shape
    assert not os.path.exists("o")


# ---------------------------------------------------------------------- end to end
def test_end_to_end_cifar10_outputs_and_columns(cifar10, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(
        cli(
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


@pytest.mark.parametrize("method", ["trades", "mart", "awp", "avmixup"])
def test_each_method_trains_an_epoch(method, cifar10, tmp_path, capsys):
    code, stdout, _ = run(
        cli(dataset="cifar10", data_dir=cifar10, epochs=1, agr_start_epoch=0, method=method, out=tmp_path / "o"), capsys
    )
    assert code == 0, stdout
    (row,) = read_metrics(tmp_path / "o")
    assert row["agr_active"] == "1" and math.isfinite(float(row["train_loss"])) and row["agr_cosine"] != ""


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["cifar100", "tiny-imagenet"])
def test_other_folders_end_to_end(dataset, tmp_path, capsys):
    folder = write_cifar(tmp_path, 100) if dataset == "cifar100" else write_tiny_imagenet(tmp_path)
    code, stdout, _ = run(
        cli(dataset=dataset, data_dir=folder.parent, epochs=1, image_size=16, out=tmp_path / "o"), capsys
    )
    assert code == 0, stdout
    assert len(read_metrics(tmp_path / "o")) == 1
    assert ("100 classes" if dataset == "cifar100" else "3 classes") in stdout


# ---------------------------------------------------------------------- resume
def _comparable(state: dict) -> dict:
    """A checkpoint without the wall-clock figures."""
    state = dict(state)
    strip = lambda row: {k: v for k, v in row.items() if k not in ("seconds", "eval_seconds")}
    state["metrics"] = [strip(r) for r in state["metrics"]]
    state["best"] = None if state["best"] is None else strip(state["best"])
    return state


def _assert_same(a, b, where="checkpoint"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), where


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
        train_mod.train(cfg, sources=sources, on_epoch=interrupt, log=lambda s: None)
    assert len(read_metrics(tmp_path / "cut")) == 1
    code, stdout, _ = run(["--out", tmp_path / "cut", "--resume"], capsys)
    assert code == 0 and "resuming" in stdout
    whole = torch.load(tmp_path / "whole" / "checkpoint_last.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint_last.pt", weights_only=True)
    assert whole["epoch"] == cut["epoch"] == 2
    assert any("agr" in group for group in whole["optimizer"]["param_groups"])  # the AGR state is in it
    _assert_same(_comparable(whole), _comparable(cut))
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


# ---------------------------------------------------------------------- the shared warm start
def test_forked_agr_arm_equals_a_from_scratch_agr_run(cifar10, tmp_path):
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
    _assert_same(_comparable(forked.state_dict()), _comparable(scratch.state_dict()))
    plain.train_epoch()  # the plain arm goes on without AGR: not the same weights
    assert not all(
        torch.equal(a, b) for a, b in zip(plain.module.parameters(), forked.module.parameters(), strict=True)
    )


# ---------------------------------------------------------------------- the AGR statistics
def test_warm_start_stats_log_without_changing_the_run(cifar10, tmp_path, capsys):
    """--warm-start-stats: AGR statistics in the warm-start epochs too (the authors log them), the
    run itself (weights, momentum, streams) bit for bit the one without."""
    flags = {"dataset": "cifar10", "data_dir": cifar10, "epochs": 2, "agr_start_epoch": 1, "eval_every": 2}
    assert run(cli(**flags, out=tmp_path / "plain"), capsys)[0] == 0
    assert run(cli("warm-start-stats", **flags, out=tmp_path / "logged"), capsys)[0] == 0
    plain, logged = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "logged")
    assert plain[0]["agr_cosine"] == "" and logged[0]["agr_cosine"] != "" and logged[0]["agr_active"] == "0"
    assert plain[1]["agr_cosine"] == logged[1]["agr_cosine"]
    a, b = (torch.load(tmp_path / d / "checkpoint_last.pt", weights_only=True) for d in ("plain", "logged"))
    for key in ("model", "optimizer", "scheduler", "rng"):
        _assert_same(a[key], b[key], key)


def test_epoch_statistics_are_the_authors_means(tmp_path):
    """The AGR columns: the AGR code's per-step means over parameter tensors, averaged over steps
    (its ``get_cos_similarity`` with 1e-20, GOP when cos <= 0, ``torch.norm(g1 - g2)``)."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.0), clip_norm=0.1)
    sums = train_mod._EpochSums(torch.device("cpu"))
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


# ---------------------------------------------------------------------- refusals, nothing written
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--method", "fgsm"], "--method"),
        (["--dataset", "imagenet"], "--dataset"),
        (["--model", "resnet50"], "--model"),
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "4", "--agr-start-epoch", "4"], "--agr-start-epoch"),
        (["--agr-start-epoch", "-1"], "--agr-start-epoch"),
        (["--eps", "0"], "--eps"),
        (["--eps", "nan"], "--eps"),
        (["--clip-norm", "-1"], "--clip-norm"),
        (["--lr", "0"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr-milestones", "a,b"], "--lr-milestones"),
        (["--cutout", "square"], "--cutout"),
        (["--amp", "bf16"], "--amp"),
        (["--amp", "int8"], "--amp"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
        (["--dataset", "cifar10"], "--data-dir"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "does not exist"),
        (["--dataset", "digits", "--data-dir", "/tmp"], "data_dir must be None"),
        (["--preset", "slow"], "--preset"),
        # issue 14, problem 11: these passed the checks, then crashed after the run started
        (["--seed", "18446744073709551615"], "--seed"),
        (["--threads", "1000000000000"], "--threads"),
        (["--crop-padding", "1000000"], "--crop-padding"),
        (["--crop-padding", "8"], "--crop-padding"),  # digits are 8x8: every crop would be padding
        (["--dataset", "cifar10", "--data-dir", "/tmp", "--image-size", "16", "--crop-padding", "16"], "padding"),
        (["--image-size", "1000000"], "--image-size"),
        (["--device", "meta"], "--device"),
        (["--device", "xpu"], "--device"),
        (["--device", "cuda:99"], "--device"),
    ],
)
def test_bad_flags_one_line_exit_2_nothing_written(args, needle, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run([*args, "--out", out], capsys)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and needle in stderr and "error" in stderr
    assert not out.exists()


def test_empty_out_and_a_padding_the_data_cannot_take_are_refused(tmp_path, capsys, monkeypatch):
    """Issue 14, problem 11: ``--out ''`` crashed after loading the data; a crop padding is
    checked against the loaded images too (an .npz has no fixed side), before anything is written."""
    code, stdout, stderr = run(["--out", ""], capsys)
    assert code == 2 and stdout == "" and stderr.count("\n") == 1 and "--out must be a folder path" in stderr
    monkeypatch.setattr(train_mod, "NATIVE_SIDES", {})  # as for a dataset of unknown side
    code, stdout, stderr = run(["--crop-padding", "8", "--out", tmp_path / "o"], capsys)
    assert code == 2 and stdout == "" and stderr.count("\n") == 1 and "below the image side 8" in stderr
    assert not (tmp_path / "o").exists()


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


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    """Issue 14: an epoch of silence read as a hang. Off a terminal a plain line is printed at
    every read of the running figures (every PROGRESS_SECONDS; here 0: after every step)."""
    import re

    monkeypatch.setattr(train_mod, "PROGRESS_SECONDS", 0.0)
    code, _, stderr = run(["--epochs", "1", "--batch-size", "256", "--attack-steps", "1", "--out", tmp_path], capsys)
    assert code == 0
    lines = stderr.splitlines()
    pattern = r"agr-train: epoch 0: batch (\d+)/6, loss \d+\.\d{4}, train-rob \d+\.\d\d %, \d+ s"
    assert [int(re.fullmatch(pattern, line)[1]) for line in lines] == [1, 2, 3, 4, 5, 6]  # 1347 images


def test_one_thread_by_default_and_saved(tmp_path):
    """Issue 14: the default thread count oversubscribed a busy machine (docs/agr_train.rst has the
    measurements); on CPU the results depend on it, so config.json records it."""
    cfg, sources = resolve({"out": str(tmp_path)})
    assert cfg.threads == 1 and sources["threads"] == "default" and cfg.to_json()["threads"] == 1


def test_module_entry_point():
    """``python -m agr_optim.train`` is the console script's twin."""
    proc = subprocess.run(
        [sys.executable, "-m", "agr_optim.train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "--agr-start-epoch" in proc.stdout and "--autoattack-samples" in proc.stdout


def test_presets_share_their_keys():
    assert PRESETS["paper"].keys() == PRESETS["quick"].keys()
    with pytest.raises(ConfigError, match="--out"):
        resolve({"preset": "quick"})


# ---------------------------------------------------------------------- AutoAttack
@pytest.mark.slow
def test_autoattack_at_the_end(cifar10, tmp_path, capsys):
    pytest.importorskip("torchattacks")
    code, stdout, _ = run(
        cli(dataset="cifar10", data_dir=cifar10, epochs=1, autoattack_samples=8, out=tmp_path / "o"), capsys
    )
    assert code == 0, stdout
    aa = json.loads((tmp_path / "o" / "summary.json").read_text())["autoattack"]
    assert aa["samples"] == 8 and 0 <= aa["robust_acc"] <= 1 and aa["checkpoint"].startswith("best")


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
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_cuda_epoch_with_amp(amp, cifar10, tmp_path, capsys):
    """On CUDA: autocast (fp16 with a GradScaler through AGR), channels_last, data on the device."""
    code, stdout, _ = run(
        cli(dataset="cifar10", data_dir=cifar10, epochs=2, agr_start_epoch=1, device="cuda", amp=amp, out=tmp_path),
        capsys,
    )
    assert code == 0, stdout
    rows = read_metrics(tmp_path)
    assert rows[1]["agr_active"] == "1" and math.isfinite(float(rows[1]["agr_cosine"]))
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    code, _, _ = run(["--out", tmp_path, "--resume"], capsys)  # a finished run resumes to nothing new
    assert code == 0 and len(read_metrics(tmp_path)) == 2
