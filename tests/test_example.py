"""The README's main job, ``examples/train_small.py``, runs as a user runs it and learns."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_small.py"


@pytest.mark.slow
def test_train_small_runs_and_learns() -> None:
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "2", "--warm-start", "1"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "epoch 1/2 (warm start)" in run.stdout and "epoch 2/2 (AGR)" in run.stdout, run.stdout
    match = re.search(r"test: clean accuracy ([0-9.]+), PGD-10 accuracy ([0-9.]+)", run.stdout)
    assert match, run.stdout
    clean, robust = map(float, match.groups())
    # Ten classes: chance is 0.1. Two epochs reach about 0.9 clean; well above chance is enough.
    assert clean > 0.5 and 0.0 <= robust <= 1.0, run.stdout
    assert "projection rate" in run.stdout
