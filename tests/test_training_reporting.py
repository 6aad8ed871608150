"""agr_optim.training.reporting: what a run shows and writes, from its rows (the lines on screen,
the progress off a terminal, metrics.csv, summary.json, curves.png)."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
from _training import run

from agr_optim.training import METRIC_COLUMNS, TrainConfig, engine, reporting


def _row(epoch: int, *, evaluated: bool, agr: bool) -> dict:
    row = dict.fromkeys(METRIC_COLUMNS)
    row.update(epoch=epoch, lr=0.01, agr_active=int(agr), train_loss=1.25, train_robust_acc=0.4567, seconds=12.34)
    if evaluated:
        row.update(test_clean_acc=0.8, test_robust_acc=0.4, eval_seconds=2.0)
    if agr:
        row.update(agr_cosine=0.125, agr_projection_rate=0.25, agr_norm_adversarial=1.0, agr_norm_clean=0.5,
                   agr_norm_difference=0.5, agr_l2_distance=0.9, agr_clip_rate=0.0, agr_projection_rate_nonzero=0.2)
    return row


def test_screen_line():
    cfg = TrainConfig(out="o")  # 20 epochs: epochs 0..19
    assert reporting.screen_line(cfg, _row(3, evaluated=False, agr=False)) == (
        "epoch   3/19 lr 0.01 loss 1.2500 train-rob  45.67 test clean    -   rob    -   | 12.3 s"
    )
    assert reporting.screen_line(cfg, _row(17, evaluated=True, agr=True)) == (
        "epoch  17/19 lr 0.01 loss 1.2500 train-rob  45.67 test clean  80.00 rob  40.00 | AGR cos +0.1250 "
        "proj 0.250 |a| 1.0000 |c| 0.5000 diff +0.5000 l2 0.9000 | 12.3 s"
    )


def test_metrics_csv_and_summary_from_rows():
    cfg = TrainConfig(out="o", epochs=3)
    rows = [_row(0, evaluated=False, agr=False), _row(1, evaluated=True, agr=True)]
    read = list(csv.DictReader(io.StringIO(reporting.metrics_csv(rows))))
    assert [list(r) for r in read] == [list(METRIC_COLUMNS)] * 2
    assert read[0]["test_clean_acc"] == read[0]["agr_cosine"] == "" and read[0]["train_loss"] == "1.25"
    assert read[1]["agr_cosine"] == "0.125" and read[1]["agr_active"] == "1" and read[1]["epoch"] == "1"
    assert reporting.metrics_csv([]) == ",".join(METRIC_COLUMNS) + "\n"
    summary = reporting.summary(cfg, rows, rows[1], None)
    assert summary == {
        "method": "at",
        "agr": True,
        "agr_start_epoch": cfg.agr_start_epoch,
        "epochs_done": 2,
        "epochs": 3,
        "complete": False,
        "final": rows[1],
        "best": rows[1],
        "best_agr": rows[1],  # the best among the AGR epochs
        "best_predates_agr": False,
        "autoattack": None,
        "seconds_per_epoch": pytest.approx(12.34),
    }
    json.dumps(summary, allow_nan=False)  # what write_json writes
    no_agr = reporting.summary(TrainConfig(out="o", agr=False), [], None, None)
    assert no_agr["agr_start_epoch"] is None and no_agr["final"] is None and no_agr["seconds_per_epoch"] is None
    assert no_agr["best_agr"] is None and no_agr["best_predates_agr"] is None


def test_write_outputs(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), epochs=2)
    rows = [_row(0, evaluated=False, agr=False), _row(1, evaluated=True, agr=True)]
    assert reporting.write_outputs(cfg, rows, rows[1], curves=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "summary.json"]
    assert reporting.write_outputs(cfg, rows, rows[1], {"checkpoint": "last", "samples": 8})
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "summary.json").read_text())["autoattack"] == {"checkpoint": "last", "samples": 8}
    assert (tmp_path / "metrics.csv").read_text() == reporting.metrics_csv(rows)


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    """Issue 14: an epoch of silence read as a hang. Off a terminal a plain line is printed at
    every read of the running figures (every PROGRESS_SECONDS; here 0: after every step)."""
    monkeypatch.setattr(engine, "PROGRESS_SECONDS", 0.0)
    code, _, stderr = run(["--epochs", "1", "--batch-size", "256", "--attack-steps", "1", "--out", tmp_path], capsys)
    assert code == 0
    lines = stderr.splitlines()
    pattern = r"agr-train: epoch 0: batch (\d+)/6, loss \d+\.\d{4}, train-rob \d+\.\d\d %, \d+ s"
    assert [int(re.fullmatch(pattern, line)[1]) for line in lines] == [1, 2, 3, 4, 5, 6]  # 1347 images
