"""agr_optim.training.config: the one source of settings (defaults = the quick preset, the paper
preset as overrides, the generated parser) and every refusal of a flag (one line, exit 2,
nothing written)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import torch
from _training import run

from agr_optim.data import MAX_CLASSES, MIN_IMAGE_SIDE
from agr_optim.training import PRESETS, ConfigError, TrainConfig, build_parser, config, resolve


# ---------------------------------------------------------------------- one source of settings
def test_defaults_are_the_quick_preset(tmp_path):
    """The parser's defaults are TrainConfig's, which are --preset quick's (the drift of issue 15:
    TrainConfig said flip=True, the quick preset flip=False)."""
    parser = build_parser()
    parsed = vars(parser.parse_args([]))
    assert parsed.pop("resume") is False
    declared = {f.name: None if f.default is MISSING else f.default for f in fields(TrainConfig)}
    assert parsed == declared
    out = str(tmp_path / "o")
    quick, sources = resolve({"out": out})
    assert quick == TrainConfig(out=out) == resolve({"preset": "quick", "out": out})[0]
    assert PRESETS["quick"] == {}
    # The quick preset's values, as documented (docs/reproducing.rst, docs/agr_train.rst).
    assert (quick.dataset, quick.model, quick.epochs, quick.batch_size) == ("digits", "smallcnn", 20, 64)
    assert (quick.eps, quick.attack_step, quick.autoattack_samples, quick.warm_start_stats) == (0.1, 0.025, 0, False)
    assert not quick.flip and quick.cutout is None and quick.crop_padding == 1 and quick.eval_every == 5
    assert quick.lr_milestones == (10, 15) and quick.agr_start_epoch == 15
    assert sources["flip"] == "preset quick" and "derived" in sources["lr_milestones"]
    # None follows --epochs in TrainConfig itself, as in both presets.
    longer = resolve({"out": out, "epochs": 40})[0]
    assert TrainConfig(out=out, epochs=40) == longer and longer.lr_milestones == (20, 30)


def test_every_field_has_exactly_one_flag():
    """One flag per TrainConfig field (--x-y for x_y; --x/--no-x for the switches; and the
    field's aliases: --trackers for --log), each with its help and default, and no other flag but
    --resume."""
    parser = build_parser()
    actions = [a for a in parser._actions if a.dest != "help"]
    by_dest: dict[str, list] = {}
    for action in actions:
        by_dest.setdefault(action.dest, []).append(action)
    assert set(by_dest) == {f.name for f in fields(TrainConfig)} | {"resume"}
    for f in fields(TrainConfig):
        (action,) = by_dest[f.name]
        flag = "--" + f.name.replace("_", "-")
        switch = isinstance(f.default, bool)
        aliases = list(f.metadata["aliases"])
        assert action.option_strings == ([flag, "--no-" + flag[2:]] if switch else [flag]) + aliases, f.name
        assert action.help and (f.default is MISSING or "default: " in action.help), f.name
    help_text = " ".join(parser.format_help().split())
    assert "--epochs EPOCHS training epochs (default: 20; --preset paper, authors: 200)" in help_text
    assert "--lr-gamma LR_GAMMA" in help_text and "--num-classes NUM_CLASSES" in help_text


def test_only_given_flags_override_the_preset():
    """parse_flags returns the flags given, so that --preset paper keeps its values for the rest."""
    parser = build_parser()
    assert parser.parse_flags([]) == {}
    flags = parser.parse_flags(["--preset", "paper", "--no-agr", "--epochs", "3", "--out", "o", "--data-dir", "d"])
    assert flags == {"preset": "paper", "agr": False, "epochs": 3, "out": "o", "data_dir": "d"}
    cfg, sources = resolve(flags)
    assert (cfg.epochs, cfg.agr, cfg.batch_size, cfg.flip) == (3, False, 128, True)
    assert sources["preset"] == sources["agr"] == "flag" and sources["batch_size"] == "preset paper"
    assert parser.parse_flags(["--out", "o", "--resume"]) == {"out": "o", "resume": True}


def test_presets_are_overrides_of_protocol_settings():
    """Every preset sets only settings that exist and are a protocol's (not --out, --device,
    --seed, ...), and differs from the defaults where it sets them."""
    protocol = {f.name for f in fields(TrainConfig) if f.metadata["protocol"]}
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    assert {"seed", "device", "out", "data_dir", "threads", "num_classes"}.isdisjoint(protocol)
    for name, overrides in PRESETS.items():
        assert set(overrides) <= protocol, name
        assert all(overrides[k] != defaults[k] for k in overrides), name
    with pytest.raises(ConfigError, match="--out"):
        resolve({"preset": "quick"})


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


def test_one_thread_by_default_and_saved(tmp_path):
    """Issue 14: the default thread count oversubscribed a busy machine (docs/agr_train.rst has the
    measurements); on CPU the results depend on it, so config.json records it."""
    cfg, sources = resolve({"out": str(tmp_path)})
    assert cfg.threads == 1 and sources["threads"] == "default" and cfg.to_json()["threads"] == 1


def test_image_size_and_num_classes_bounds_are_the_loaders(tmp_path):
    """--image-size below agr_optim.data's minimum is refused by the config (it used to pass the
    config and fail in the loader); --num-classes within [2, MAX_CLASSES]."""
    out = str(tmp_path / "o")
    with pytest.raises(ConfigError, match=rf"^--image-size must be an integer in \[{MIN_IMAGE_SIDE}, 256\]"):
        resolve({"out": out, "image_size": MIN_IMAGE_SIDE - 1})
    assert resolve({"out": out, "image_size": MIN_IMAGE_SIDE, "crop_padding": 0})[0].image_size == MIN_IMAGE_SIDE
    for bad in (1, MAX_CLASSES + 1, True, 2.5):
        with pytest.raises(ConfigError, match=rf"^--num-classes must be an integer in \[2, {MAX_CLASSES}\], got"):
            resolve({"out": out, "num_classes": bad})
    cfg, sources = resolve({"out": out, "num_classes": 10})
    assert cfg.num_classes == 10 and sources["num_classes"] == "flag" and cfg.to_json()["num_classes"] == 10
    assert resolve({"out": out})[0].num_classes is None


def test_old_configs_without_the_new_settings_still_read():
    """A config.json written before --num-classes (or --lr-gamma's flag) reads with the defaults."""
    saved = TrainConfig(out="o").to_json()
    del saved["num_classes"]
    assert TrainConfig.from_json(saved) == TrainConfig(out="o")
    with pytest.raises(ConfigError, match="unknown settings"):
        TrainConfig.from_json({**saved, "new_knob": 1})


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
        (["--lr-gamma", "0"], "--lr-gamma"),
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
        (["--image-size", "3", "--crop-padding", "0"], "--image-size must be an integer in [4, 256]"),
        (["--num-classes", "1"], "--num-classes must be an integer in [2, "),
        (["--num-classes", "12"], "--num-classes 12: digits: num_classes=12 disagrees with the dataset's 10"),
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
    monkeypatch.setattr(config, "NATIVE_SIDES", {})  # as for a dataset of unknown side
    code, stdout, stderr = run(["--crop-padding", "8", "--out", tmp_path / "o"], capsys)
    assert code == 2 and stdout == "" and stderr.count("\n") == 1 and "below the image side 8" in stderr
    assert not (tmp_path / "o").exists()


def test_every_setting_passes_through_torchruns_parser():
    """torchrun parses the script's arguments too, with abbreviations allowed: a flag that prefixes
    one of its options is refused there ('ambiguous option: --log could match --log-dir, ...') or
    taken as its own. Every setting has a spelling torchrun hands to agr-train untouched, and it
    reaches the same setting (--trackers for --log)."""
    from torch.distributed.run import get_args_parser

    launcher = get_args_parser()
    parser = build_parser()
    blocked = []
    for action in parser._actions:
        if action.dest == "help":
            continue
        passed = []
        for option in action.option_strings:
            argv = ["--standalone", "--nproc_per_node=2", "-m", "agr_optim.train", "--out", "o", option, "x"]
            with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit):
                if launcher.parse_args(argv).training_script_args == argv[4:]:
                    passed.append(option)
        assert passed, f"no spelling of --{action.dest.replace('_', '-')} passes through torchrun"
        blocked += [option for option in action.option_strings if option not in passed]
    assert blocked == ["--log"]  # docs/distributed.rst says so
    argv = ["--standalone", "-m", "agr_optim.train", "--out", "o", "--trackers", "tensorboard", "--trackers", "wandb"]
    script = launcher.parse_args(argv).training_script_args
    assert resolve(parser.parse_flags(script))[0].log == ("tensorboard", "wandb")


def _autoattack_run(tmp_path: Path, capsys, classes: int) -> tuple:
    """agr-train with AutoAttack on an .npz of ``classes`` classes -> (exit code, stdout, stderr, out)."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / f"c{classes}.npz"
    np.savez(path, x_train=rng.random((16, 8, 8, 1)), y_train=np.arange(16) % classes,
             x_test=rng.random((8, 8, 8, 1)), y_test=np.arange(8) % classes)
    out = tmp_path / f"run{classes}"
    argv = ["--out", out, "--dataset", "npz", "--data-dir", path, "--epochs", "1", "--batch-size", "8",
            "--attack-steps", "1", "--eval-steps", "1", "--crop-padding", "0", "--autoattack-samples", "8"]
    return (*run(argv, capsys), out)


def test_autoattack_on_fewer_than_four_classes_is_refused_before_training(tmp_path, capsys):
    """AutoAttack's targeted APGD-T reads the fourth-largest logit: on 2 or 3 classes torchattacks
    raised an IndexError after the whole training (and again on every --resume). Refused with the
    data loaded, before anything is written."""
    pytest.importorskip("torchattacks")
    code, stdout, stderr, out = _autoattack_run(tmp_path, capsys, 3)
    assert code == 2 and stdout == "" and not out.exists()
    assert "--autoattack-samples 8: AutoAttack (its targeted APGD-T) needs at least 4 classes" in stderr
    assert stderr.count("\n") == 1 and "has 3; pass --autoattack-samples 0" in stderr


@pytest.mark.slow
def test_autoattack_on_four_classes_runs(tmp_path, capsys):
    """The bound is AutoAttack's: 4 classes run to the end."""
    pytest.importorskip("torchattacks")
    code, _, stderr, out = _autoattack_run(tmp_path, capsys, 4)
    assert code == 0, stderr
    assert json.loads((out / "summary.json").read_text())["autoattack"]["samples"] == 8


def test_a_batch_of_one_image_the_model_cannot_train_on_is_refused(tmp_path, capsys):
    """PreActResNet-18 reaches its last BatchNorm with 1x1 maps on images up to 8x8, and BatchNorm
    cannot train on one value per channel: a batch (or under torchrun a process's part of one) of
    one image crashed the run at its epoch's last step with a traceback. Refused before anything
    is written; the small CNN (BatchNorm on larger maps) trains on it."""
    import numpy as np

    from agr_optim.training import load_data
    from agr_optim.training.config import validate_data

    path = tmp_path / "three.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.random((3, 8, 8, 1)), y_train=np.array([0, 1, 0]), x_test=rng.random((4, 8, 8, 1)),
             y_test=np.array([0, 1, 0, 1]))
    argv = ["--dataset", "npz", "--data-dir", path, "--batch-size", "2", "--epochs", "1", "--crop-padding", "0",
            "--attack-steps", "1", "--eval-steps", "1"]
    code, stdout, stderr = run([*argv, "--model", "preactresnet18", "--out", tmp_path / "o"], capsys)
    assert code == 2 and stdout == "" and stderr.count("\n") == 1 and not (tmp_path / "o").exists(), stderr
    assert "--batch-size 2: the last batch (3 images mod 2) leaves one image, and --model preactresnet18" in stderr
    assert "on 8x8 images cannot train on one" in stderr
    assert run([*argv, "--model", "smallcnn", "--out", tmp_path / "small"], capsys)[0] == 0
    # Under torchrun: digits' last batch of 1347 mod 64 = 3 images gives one process 1 of them.
    cfg, _ = resolve({"out": str(tmp_path / "x"), "model": "preactresnet18"})
    data = load_data(cfg)
    validate_data(cfg, data)  # one process: 3 images
    with pytest.raises(ConfigError, match="leaves one image in one of the 2 processes"):
        validate_data(cfg, data, 2)
