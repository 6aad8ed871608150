"""agr_optim.training.tracking: ``agr-train --log tensorboard,wandb``, read back with each tool's
own reader (TensorBoard's EventAccumulator; W&B's ``wandb leet inspect`` on the offline run's
``.wandb`` log) and compared with metrics.csv, through a resume that repeats an epoch.

The real packages, no network: W&B runs with ``WANDB_MODE=offline``. On scikit-learn's digits with
PGD-1 and batch 256 (6 steps per epoch); the running figures are read at every step
(``PROGRESS_SECONDS`` 0) so that each step is logged.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from _training import one_line, read_metrics, run

from agr_optim.training import METRIC_COLUMNS, ConfigError, TrainConfig, build_parser, cli, engine, resolve, run_folder
from agr_optim.training.tracking import _after_older_events

pytest.importorskip("tensorboard")
wandb = pytest.importorskip("wandb")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TINY = ["--attack-steps", "1", "--eval-steps", "1", "--batch-size", "256", "--eval-every", "1", "--threads", "1"]
STEPS = 6  # ceil(1347 digits / 256)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B offline, its own folders in tmp_path (nothing in the home folder), no account."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setattr(engine, "PROGRESS_SECONDS", 0.0)  # a running read (and log) at every step
    # wandb reads its environment once per process setup: a fresh one for each test.
    wandb.teardown()
    yield
    wandb.teardown()


# ---------------------------------------------------------------------- readers
def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in an event folder, as TensorBoard shows it (purged events dropped)."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of an offline W&B run, by W&B's own reader of its ``.wandb`` log."""
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def wandb_history(run_dir: Path) -> dict[int, dict]:
    """The history rows of an offline W&B run, by step."""
    rows = [r["history"] for r in wandb_records(run_dir) if r["type"] == "history"]
    return {int(r["step"]["num"]): r["item"] for r in rows}


def offline_runs(out: Path) -> list[Path]:
    """W&B's offline run folders under ``out``, oldest first: ``offline-run-<start second>-<run id>``,
    and W&B appends ``-1``, ``-2``... when a run starting in the same second finds the name taken, so
    the name order is the start order."""
    return sorted((out / "wandb").glob("offline-run-*"))


def is_folder_of(run_dir: Path, run_id: str) -> bool:
    """Whether ``run_dir`` is an offline folder of W&B run ``run_id`` (with or without the suffix W&B
    adds when two attempts of the run start in the same second)."""
    return re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?", run_dir.name) is not None


def csv_figures(out: Path) -> dict[int, dict[str, float]]:
    """metrics.csv's non-empty cells, by epoch, as floats."""
    rows = read_metrics(out)
    return {int(r["epoch"]): {k: float(v) for k, v in r.items() if k != "epoch" and v != ""} for r in rows}


def assert_tensorboard_holds(out: Path, epochs: int) -> None:
    """Every figure of metrics.csv once, at its epoch (float32, as TensorBoard stores scalars), and
    a running figure at every optimizer step once, the last of each epoch its mean."""
    figures = csv_figures(out)
    scalars = tensorboard_scalars(out / "tensorboard" / "epochs")
    expected_tags = {f"epoch/{k}" for row in figures.values() for k in row}
    assert set(scalars) == expected_tags
    for tag, points in scalars.items():
        column = tag.removeprefix("epoch/")
        want = [(e, np.float32(row[column])) for e, row in figures.items() if column in row]
        assert [(s, np.float32(v)) for s, v in points] == want, tag
    running = tensorboard_scalars(out / "tensorboard" / "steps")
    assert set(running) == {"running/train_loss", "running/train_robust_acc"}
    for tag, points in running.items():
        assert [s for s, _ in points] == list(range(epochs * STEPS)), tag  # each step once
        column = tag.removeprefix("running/")
        for e in range(epochs):  # the running mean after an epoch's last step is the epoch's figure
            assert np.float32(points[(e + 1) * STEPS - 1][1]) == np.float32(figures[e][column]), (tag, e)


# ---------------------------------------------------------------------- both trackers, one run
def test_tensorboard_and_wandb_hold_every_figure_of_metrics_csv(tmp_path, capsys, offline):
    out = tmp_path / "run"
    code, stdout, stderr = run(
        ["--out", out, "--epochs", "2", "--agr-start-epoch", "1", "--log", "tensorboard", "--log", "wandb", *TINY],
        capsys,
    )
    assert code == 0, stdout + stderr
    assert json.loads((out / "config.json").read_text())["log"] == ["tensorboard", "wandb"]
    figures = csv_figures(out)
    assert "agr_cosine" not in figures[0] and "agr_cosine" in figures[1]  # AGR from epoch 1
    assert_tensorboard_holds(out, epochs=2)

    (run_dir,) = offline_runs(out)
    run_id = json.loads((out / "tracking.json").read_text())["wandb"]["id"]
    assert is_folder_of(run_dir, run_id)
    history = wandb_history(run_dir)
    for e, row in figures.items():
        logged = history[(e + 1) * STEPS - 1]  # an epoch's row at its last optimizer step
        assert logged["epoch"] == e
        assert {k.removeprefix("epoch/"): v for k, v in logged.items() if k.startswith("epoch/")} == row
        assert logged["running/train_loss"] == row["train_loss"]  # the last running read, same step
    running = sorted(s for s, item in history.items() if "running/train_robust_acc" in item)
    assert running == list(range(2 * STEPS))
    records = wandb_records(run_dir)
    (header,) = [r["run"] for r in records if r["type"] == "run"]
    config = json.loads((out / "config.json").read_text())
    assert header["run_id"] == run_id and header["project"] == "agr-train"
    settings = {k: v for k, v in header["config"]["update"].items() if k != "_wandb"}
    assert set(settings) == {f.name for f in fields(TrainConfig)}  # every setting, as config.json has it
    assert settings == {k: config[k] for k in settings}
    summary = [r["summary"]["update"] for r in records if r["type"] == "summary"]
    last = {k: v for update in summary for k, v in update.items()}  # the run's summary: the last values
    assert last["epoch/agr_cosine"] == figures[1]["agr_cosine"] and last["epoch/test_robust_acc"] == figures[1][
        "test_robust_acc"
    ]


# ---------------------------------------------------------------------- a resume that repeats an epoch
def test_resume_neither_repeats_nor_loses_an_epoch(tmp_path, capsys, offline, monkeypatch):
    """Stopped after epoch 1 was logged but before its checkpoint (a kill between the two): the
    resumed run trains epoch 1 again; TensorBoard shows each epoch and each step once (the older
    events are purged), W&B continues the same run id with the same steps."""
    out = tmp_path / "run"
    save = cli._save_epoch

    def killed_before_the_checkpoint_of_epoch_1(trainer, checkpoints, saved):
        if trainer.epoch == 2:
            raise KeyboardInterrupt
        save(trainer, checkpoints, saved)

    monkeypatch.setattr(cli, "_save_epoch", killed_before_the_checkpoint_of_epoch_1)
    argv = ["--out", out, "--epochs", "3", "--agr-start-epoch", "1", "--log", "tensorboard,wandb", *TINY]
    code, _, stderr = run(argv, capsys)
    assert code == cli.EXIT_INTERRUPTED and "epoch 0 is saved" in stderr
    first = tensorboard_scalars(out / "tensorboard" / "epochs")
    assert [s for s, _ in first["epoch/train_loss"]] == [0, 1]  # epoch 1 was logged, not saved
    run_id = json.loads((out / "tracking.json").read_text())["wandb"]["id"]

    monkeypatch.setattr(cli, "_save_epoch", save)
    code, stdout, stderr = run(["--out", out, "--resume"], capsys)
    assert code == 0, stdout + stderr
    assert len(os.listdir(out / "tensorboard" / "epochs")) == 2  # one event file per attempt
    assert_tensorboard_holds(out, epochs=3)

    assert json.loads((out / "tracking.json").read_text())["wandb"]["id"] == run_id
    before, after = offline_runs(out)
    assert is_folder_of(before, run_id) and is_folder_of(after, run_id)
    assert [r["run"]["run_id"] for r in wandb_records(after) if r["type"] == "run"] == [run_id]
    old, new = wandb_history(before), wandb_history(after)
    figures = csv_figures(out)
    epochs_of = lambda history: [item["epoch"] for item in history.values() if "epoch" in item]
    assert epochs_of(old) == [0, 1] and epochs_of(new) == [1, 2]
    assert min(new) == STEPS  # the resumed run logs from the first step of epoch 1 on
    # The repeated epoch is bit for bit the stopped one: the same step holds the same figures.
    wall_clock = ("epoch/seconds", "epoch/eval_seconds", "_runtime", "_timestamp")
    for step in set(old) & set(new):
        assert {k: v for k, v in old[step].items() if k not in wall_clock} == {
            k: v for k, v in new[step].items() if k not in wall_clock
        }
    merged = {**old, **new}  # one row per step
    for e, row in figures.items():
        logged = merged[(e + 1) * STEPS - 1]
        assert {k.removeprefix("epoch/"): v for k, v in logged.items() if k.startswith("epoch/")} == row


# ---------------------------------------------------------------------- refusals
def test_log_refusals_are_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code, _, stderr = run(["--out", out, "--log", "tensorboard,mlflow", *TINY], capsys)
    assert code == 2 and "--log must be names among tensorboard, wandb" in one_line(stderr)
    assert "tensorboard,mlflow" in stderr
    # A package that is not installed (None in sys.modules is how Python marks a blocked import).
    monkeypatch.setitem(sys.modules, "wandb", None)
    code, _, stderr = run(["--out", out, "--log", "tensorboard,wandb", *TINY], capsys)
    assert code == 2 and "--log wandb needs the wandb package" in one_line(stderr)
    assert 'pip install "agr_optim[tracking]"' in stderr
    assert not out.exists()


def test_wandb_without_an_account_refuses_and_the_same_command_then_runs(tmp_path, capsys, monkeypatch, offline):
    """Online without an API key: one line naming --log wandb and offline mode; the folder (with
    TensorBoard's first files) starts over with the same command once W&B is offline."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    argv = ["--out", out, "--epochs", "1", "--log", "tensorboard,wandb", *TINY]
    code, _, stderr = run(argv, capsys)
    line = one_line(stderr)
    assert code == 2 and "--log wandb: cannot start the W&B run" in line and "WANDB_MODE=offline" in line
    assert not (out / run_folder.CHECKPOINT_LAST).exists() and not (out / "metrics.csv").exists()
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()  # (wandb reads WANDB_MODE once per process setup)
    code, stdout, stderr = run(argv, capsys)
    assert code == 0, stdout + stderr
    assert "starting over" in stdout and len(read_metrics(out)) == 1


def test_log_flag_repeated_or_comma_separated_is_one_setting_saved_in_config_json():
    parser = build_parser()
    for argv in (["--log", "tensorboard", "--log", "wandb,tensorboard"], ["--log", "tensorboard,wandb"]):
        cfg, sources = resolve(parser.parse_flags(["--out", "o", *argv]))
        assert cfg.log == ("tensorboard", "wandb") and sources["log"] == "flag"
        assert TrainConfig.from_json(cfg.to_json()) == cfg and cfg.to_json()["log"] == ["tensorboard", "wandb"]
    assert resolve({"out": "o", "log": "wandb"})[0].log == ("wandb",)  # as the flag's text
    assert resolve({"out": "o"})[0].log == ()  # metrics.csv only
    old = TrainConfig(out="o").to_json()
    del old["log"], old["init_from"]  # a config.json of an earlier version
    assert TrainConfig.from_json(old) == TrainConfig(out="o")
    with pytest.raises(ConfigError, match="--log must be names among tensorboard, wandb, each once"):
        resolve({"out": "o", "log": ("wandb", "wandb")})


def test_a_resumed_event_file_sorts_after_the_older_ones(tmp_path):
    """TensorBoard reads event files in name order and a resume's purge must come after what it
    purges: with an event file of this second in the folder, the next one waits for the next."""
    now = int(time.time())
    (tmp_path / f"events.out.tfevents.{now:010d}.host.99999.7").write_bytes(b"")
    _after_older_events(str(tmp_path))
    assert int(time.time()) > now


def test_trackers_are_imported_only_when_a_run_opens_them():
    """Importing agr-train (and parsing --log) loads neither package: TensorBoard costs ~1 s."""
    code = (
        "import sys\n"
        "from agr_optim.training import resolve\n"
        "resolve({'out': 'x', 'log': 'tensorboard,wandb'})\n"
        "print(sorted(m for m in ('tensorboard', 'wandb', 'torch.utils.tensorboard') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_columns_reach_the_trackers_by_their_csv_names():
    """The trackers' keys are metrics.csv's columns (``epoch/<column>``): a renamed column would
    rename the tag, and the tests above compare every tag with the CSV."""
    from agr_optim.training.tracking import _numbers

    row = {k: i + 0.5 for i, k in enumerate(METRIC_COLUMNS)} | {"epoch": 3, "agr_active": 1, "test_clean_acc": None}
    assert set(_numbers(row, skip=("epoch",))) == set(METRIC_COLUMNS) - {"epoch", "test_clean_acc"}


# ---------------------------------------------------------------------- only rank 0
@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_only_rank_0_writes_tracker_files(tmp_path):
    """Two gloo processes open the trackers on one folder: rank 0's event files only."""
    script = textwrap.dedent(
        f"""
        import os, sys
        import torch.distributed as dist
        from agr_optim.training import resolve, tracking
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'rendezvous'}", rank=rank, world_size=2)
        cfg, _ = resolve({{"out": "{tmp_path / 'run'}", "log": "tensorboard"}})
        with tracking.open_trackers(cfg, epochs_done=0, steps_per_epoch=4, resume=False) as tracker:
            print(rank, tracking.is_main_process(), len(tracker.trackers))
            tracker.log_epoch({{"epoch": 0, "lr": 0.1, "train_loss": 1.5 + rank}})
        dist.barrier()
        dist.destroy_process_group()
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [o.split() for o, _ in outputs] == [["0", "True", "1"], ["1", "False", "0"]]
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard" / "epochs")
    assert scalars["epoch/train_loss"] == [(0, 1.5)]  # rank 0's figure, once
    assert len(os.listdir(tmp_path / "run" / "tensorboard" / "epochs")) == 1


def test_a_tracker_package_that_is_installed_but_broken_refuses_in_one_line(tmp_path, capsys, monkeypatch):
    """An installed package that fails to import (W&B with a protobuf it does not fit, say) passes
    the check before the run (the package is found, not imported: that costs a second) and is then
    refused in one line when the tracker opens: exit 2, no epoch trained (the folder starts over)."""
    fake = tmp_path / "site" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"cannot import name 'builder' from 'google.protobuf'\")\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "wandb")  # this test's wandb, not the one imported above
    out = tmp_path / "run"
    code, _, stderr = run(["--out", out, "--epochs", "1", "--log", "wandb", *TINY], capsys)
    line = one_line(stderr)
    assert code == 2 and "--log wandb: the wandb package is installed but does not import" in line
    assert "google.protobuf" in line and not (out / "metrics.csv").exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # TensorBoard's writer thread
def test_a_full_disk_under_tensorboard_stops_as_a_full_disk_and_resumes(tmp_path, capsys, monkeypatch, offline):
    """The event files' writes fail (ENOSPC in TensorBoard's writer thread, raised at its next call)
    in epoch 1: the run stops as on any full disk (exit status 4, one line naming the event folder
    and what is saved), not with a traceback; resumed with space again, it ends with every epoch
    in metrics.csv and in TensorBoard once."""
    import errno

    from tensorboard.summary.writer import record_writer

    full = {"now": False}
    write = record_writer.RecordWriter.write

    def no_space(self, data):
        if full["now"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", no_space)
    out = tmp_path / "run"
    argv = ["--out", out, "--epochs", "2", "--agr-start-epoch", "1", "--log", "tensorboard", *TINY]
    cfg, _ = resolve(build_parser().parse_flags([str(a) for a in argv]))
    with pytest.raises(cli.RunStopped) as stop:
        cli.train(cfg, log=lambda line: None, on_epoch=lambda trainer, row: full.update(now=True))
    assert stop.value.code == cli.EXIT_WRITE_FAILED
    assert str(stop.value).startswith(f"no space left on device while writing {out / 'tensorboard'}")
    assert "epoch 0 is saved" in str(stop.value) and len(read_metrics(out)) == 1
    full["now"] = False
    code, stdout, stderr = run(["--out", out, "--resume"], capsys)
    assert code == 0, stdout + stderr
    assert_tensorboard_holds(out, epochs=2)
