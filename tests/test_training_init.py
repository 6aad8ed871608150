"""agr_optim.training.checkpoint_io: ``agr-train --init-from``, fine-tuning a trained model with AGR.

The recipe (AGR from the first epoch of a new run on a model trained without it) against a
reference built here from torch's own ``load_state_dict``; every key style a file comes in; the
refusals (one line naming the first wrong key and both shapes, before anything is written); and
``--resume``, which reads the run's own checkpoint. On scikit-learn's digits with the small CNN,
PGD-1 and batch 256 (6 steps per epoch).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _training import assert_same, one_line, read_metrics, run

from agr_optim.models import build_model
from agr_optim.training import Trainer, cli, load_data, resolve
from agr_optim.training.checkpoint_io import apply_init, read_init

TINY = ["--attack-steps", "1", "--eval-steps", "1", "--batch-size", "256", "--threads", "1"]
FINE_TUNE = ["--agr", "--agr-start-epoch", "0", "--lr", "0.001", "--lr-gamma", "1"]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    """A run without AGR, 1 epoch: the model a user already has (its folder has checksums.json)."""
    out = tmp_path_factory.mktemp("plain") / "run"
    assert cli.main([str(a) for a in ["--out", out, "--epochs", "1", "--no-agr", *TINY]]) == 0
    return out


def settings(tmp_path: Path, **flags) -> tuple:
    cfg, _ = resolve({"out": str(tmp_path / "unused"), "attack_steps": 1, "eval_steps": 1, "batch_size": 256, **flags})
    return cfg, load_data(cfg)


def model_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint_last.pt", weights_only=True)["model"]


# ---------------------------------------------------------------------- the recipe
def test_fine_tune_recipe_equals_loading_the_weights_by_hand(plain_run, tmp_path, capsys, one_thread):
    """--init-from CHECKPOINT --agr --agr-start-epoch 0: the run's first epoch starts from the
    file's weights (torch's load_state_dict into a fresh Trainer: a fresh optimizer, momentum from
    zero) and is an AGR epoch."""
    out = tmp_path / "tuned"
    source = plain_run / "checkpoint_last.pt"
    code, stdout, stderr = run(["--out", out, "--epochs", "1", "--init-from", source, *FINE_TUNE, *TINY], capsys)
    assert code == 0, stdout + stderr
    assert f"initial weights from {source} (an agr-train checkpoint after epoch 0 (0-based))" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["init_from"] == str(source) and config["agr_start_epoch"] == 0
    (row,) = read_metrics(out)
    assert row["agr_active"] == "1" and row["agr_cosine"] != "" and float(row["lr"]) == 0.001

    cfg, data = settings(tmp_path, epochs=1, agr=True, agr_start_epoch=0, lr=0.001, lr_gamma=1.0)
    reference = Trainer(cfg, data)
    reference.module.load_state_dict(torch.load(source, weights_only=True)["model"])
    reference.train_epoch()
    assert_same(model_weights(out), reference.module.state_dict(), "fine-tuned weights")
    untouched = Trainer(cfg, data)  # the same run from its own initialization: not the same weights
    untouched.train_epoch()
    assert not torch.equal(untouched.module.state_dict()["features.0.weight"], model_weights(out)["features.0.weight"])


# ---------------------------------------------------------------------- the files
def test_every_key_style_gives_the_same_weights(plain_run, tmp_path, one_thread):
    cfg, data = settings(tmp_path)
    weights = model_weights(plain_run)
    files = {
        "state dict": (weights, "a state dict"),
        "ddp": ({f"module.{k}": v for k, v in weights.items()}, "a state dict, DDP's module. prefix"),
        "zoo": ({"state_dict": weights, "epoch": 154, "arch": "smallcnn"}, "its 'state_dict'"),
        "zoo ddp": ({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, "its 'state_dict', DDP's"),
    }
    for name, (content, source) in files.items():
        path = tmp_path / f"{name}.pt"
        torch.save(content, path)
        init = read_init(replace(cfg, init_from=str(path)), data)
        assert init.source.startswith(source) and init.kept == (), name
        assert_same(init.state, weights, name)
    # An agr-train checkpoint: verified by its run folder's checksums, or read plainly elsewhere.
    best = read_init(replace(cfg, init_from=str(plain_run / "checkpoint_best.pt")), data)
    assert best.source == "an agr-train checkpoint after epoch 0 (0-based)"
    assert_same(best.state, weights, "checkpoint_best.pt")
    copied = tmp_path / "elsewhere" / "checkpoint_last.pt"
    copied.parent.mkdir()
    shutil.copy(plain_run / "checkpoint_last.pt", copied)
    init = read_init(replace(cfg, init_from=str(copied)), data)
    assert_same(init.state, weights, "copied checkpoint")


def test_a_file_without_the_normalization_buffers_keeps_the_models(tmp_path, capsys, one_thread):
    """The AGR authors' state dicts lack normalize.mean/std (their models normalize in code, with
    the statistics the models here default to): the model's own are kept, and the run says so."""
    torch.manual_seed(5)
    trained = build_model("preactresnet18", num_classes=10, in_channels=1, image_size=8)
    authors = {k: v for k, v in trained.state_dict().items() if not k.startswith("normalize.")}
    path = tmp_path / "authors.pt"
    torch.save(authors, path)
    cfg, data = settings(tmp_path, model="preactresnet18", init_from=str(path))
    init = read_init(cfg, data)
    assert init.kept == ("normalize.mean", "normalize.std")
    assert "not in the file, kept from --model: normalize.mean, normalize.std" in init.line()
    model = build_model("preactresnet18", num_classes=10, in_channels=1, image_size=8)
    own = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("normalize.")}
    apply_init(model, init)
    assert_same(model.state_dict(), {**authors, **own}, "loaded model")


# ---------------------------------------------------------------------- refusals
def refusal(tmp_path: Path, capsys, content, *flags) -> str:
    """The one-line refusal of a run from ``content`` (saved with torch.save, or a path); nothing
    may be written."""
    path = content if isinstance(content, Path) else tmp_path / "weights.pt"
    if not isinstance(content, Path):
        torch.save(content, path)
    out = tmp_path / "run"
    code, _, stderr = run(["--out", out, "--epochs", "1", "--init-from", path, *flags, *TINY], capsys)
    assert code == 2 and not out.exists(), stderr
    return one_line(stderr)


def test_mismatches_are_refused_naming_the_first_wrong_key_and_both_shapes(plain_run, tmp_path, capsys):
    weights = model_weights(plain_run)
    five_classes = {**weights, "features.14.weight": torch.zeros(5, 64), "features.14.bias": torch.zeros(5)}
    line = refusal(tmp_path, capsys, five_classes)
    assert "(a state dict) does not fit --model smallcnn with 10 classes and 1 input channels: " in line
    assert "features.14.weight has shape (5, 64) in the file and (10, 64) in the model" in line
    assert line.endswith("(keys: 2 of another shape) (see --help)\n")
    # Another architecture: the first of the model's keys that the file lacks.
    line = refusal(tmp_path, capsys, weights, "--model", "preactresnet18")
    assert "the model's conv1.weight (64, 1, 3, 3) is not in the file (keys: " in line
    assert "missing" in line and "unexpected" in line
    line = refusal(tmp_path, capsys, {**weights, "head.weight": torch.zeros(3, 2)})
    assert "the file's head.weight (3, 2) is not in the model (keys: 1 unexpected)" in line
    del weights["features.4.running_var"]
    line = refusal(tmp_path, capsys, weights)
    assert "the model's features.4.running_var (32) is not in the file (keys: 1 missing)" in line


def test_files_that_are_not_weights_are_refused_in_one_line(plain_run, tmp_path, capsys):
    weights = model_weights(plain_run)
    assert "no such file" in refusal(tmp_path, capsys, tmp_path / "missing.pt")
    model = build_model("smallcnn", num_classes=10, in_channels=1, image_size=8)
    assert "holds objects other than tensors and plain data" in refusal(tmp_path, capsys, model)
    assert "is not a state dict (its keys: 'epoch', 'net'" in refusal(tmp_path, capsys, {"epoch": 3, "net": [1]})
    nan = {**weights, "features.0.weight": torch.full_like(weights["features.0.weight"], float("nan"))}
    assert "features.0.weight holds a NaN or an infinity" in refusal(tmp_path, capsys, nan)
    # A checkpoint in a run folder whose bytes changed: refused by the folder's checksums.
    tampered = tmp_path / "tampered"
    shutil.copytree(plain_run, tampered, ignore=shutil.ignore_patterns("run.lock"))
    with open(tampered / "checkpoint_last.pt", "ab") as f:
        f.write(b"\0")
    line = refusal(tmp_path, capsys, tampered / "checkpoint_last.pt")
    assert "--init-from: " in line and "checkpoint_last.pt is corrupt or foreign" in line


# ---------------------------------------------------------------------- resume
def test_resume_reads_its_own_checkpoint_not_the_init_file(plain_run, tmp_path, capsys, one_thread):
    """--init-from is for a new run: a resumed one continues from its checkpoint (the file may be
    gone) to the uninterrupted run's weights; --resume with --init-from is refused."""
    source = tmp_path / "start.pt"
    shutil.copy(plain_run / "checkpoint_last.pt", source)  # outside a run folder: read plainly
    argv = ["--epochs", "2", "--init-from", source, "--eval-every", "2", *FINE_TUNE, *TINY]
    assert run(["--out", tmp_path / "whole", *argv], capsys)[0] == 0

    cfg, _ = resolve(
        {**cli.build_parser().parse_flags([str(a) for a in ["--out", tmp_path / "stopped", *argv]])}
    )

    def stop(trainer, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli.train(cfg, on_epoch=stop, log=lambda s: None)
    source.unlink()
    code, _, stderr = run(["--out", tmp_path / "stopped", "--resume", "--init-from", source], capsys)
    assert code == 2 and "drop --init-from" in one_line(stderr)
    code, stdout, stderr = run(["--out", tmp_path / "stopped", "--resume"], capsys)
    assert code == 0 and "initial weights" not in stdout, stdout + stderr
    assert_same(model_weights(tmp_path / "stopped"), model_weights(tmp_path / "whole"), "resumed weights")


def test_a_run_started_before_log_and_init_from_existed_still_resumes(tmp_path, capsys, one_thread):
    """A run started by an earlier version has neither setting in its config.json nor in its
    checkpoint's copy of the settings: they count as their defaults, and --resume goes on."""
    from agr_optim.training import run_folder

    out = tmp_path / "run"
    cfg, _ = resolve({**cli.build_parser().parse_flags([str(a) for a in ["--out", out, "--epochs", "2", *TINY]])})

    def stop(trainer, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli.train(cfg, on_epoch=stop, log=lambda s: None)
    config = json.loads((out / "config.json").read_text())
    for settings in (config, None):  # config.json, then the checkpoint's copy (re-saved, checksummed)
        if settings is None:
            checkpoints = run_folder.Checkpoints(str(out))
            state = checkpoints.load(run_folder.CHECKPOINT_LAST, "cpu")
            settings = state["config"]
        del settings["log"], settings["init_from"]
    (out / "config.json").write_text(json.dumps(config))
    checkpoints.save(state, 0)
    code, stdout, stderr = run(["--out", out, "--resume"], capsys)
    assert code == 0, stdout + stderr
    assert len(read_metrics(out)) == 2


# ---------------------------------------------------------------------- review: files users have
def test_torch_compile_prefixes_are_read_like_ddps(plain_run, tmp_path, one_thread):
    """A state dict of a torch.compile'd model (keys ``_orig_mod.``), also inside DDP or around it
    (``module._orig_mod.``, ``_orig_mod.module.``): the same weights as the plain file."""
    cfg, data = settings(tmp_path)
    weights = model_weights(plain_run)
    for prefix in ("_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        path = tmp_path / "compiled.pt"
        torch.save({"state_dict": {prefix + k: v for k, v in weights.items()}}, path)
        init = read_init(replace(cfg, init_from=str(path)), data)
        assert "torch.compile's _orig_mod. prefix" in init.source, prefix
        assert ("DDP's module. prefix" in init.source) == ("module." in prefix), prefix
        assert_same(init.state, weights, prefix)


def test_an_empty_file_a_missing_checkpoint_and_other_kinds_of_tensor_are_refused(plain_run, tmp_path, capsys):
    """One line each, nothing written: an empty file (torch's EOFError has no message), a
    checkpoint name in a run folder that has none of it, integer, bool or complex tensors for
    floating weights (load_state_dict would cast them silently: 0/1 weights from a bool mask),
    a sparse or a meta tensor (torch's own errors, deep in the check)."""
    weights = model_weights(plain_run)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "empty.pt is empty (0 bytes)" in refusal(tmp_path, capsys, empty)
    line = refusal(tmp_path, capsys, plain_run / "checkpoint_prev.pt")  # a 1-epoch run has none
    assert "checkpoint_prev.pt': no such file" in line
    w = weights["features.0.weight"]
    for kind, tensor in (("torch.bool", w > 0), ("torch.int64", w.long()), ("torch.complex64", w.cfloat())):
        line = refusal(tmp_path, capsys, {**weights, "features.0.weight": tensor})
        assert f"features.0.weight is {kind} in the file and torch.float32 in the model" in line, kind
    line = refusal(tmp_path, capsys, {**weights, "features.0.weight": w.to_sparse()})
    assert "features.0.weight is a sparse tensor (torch.sparse_coo)" in line
    line = refusal(tmp_path, capsys, {**weights, "features.0.weight": torch.empty(w.shape, device="meta")})
    assert "features.0.weight is a meta tensor (shapes without values)" in line
    assert not (tmp_path / "run").exists()
