"""Smoke test of ``python -m benchmarks.authors_departures --quick``: it runs, writes its JSON, and
the figures that follow from the departures' nature hold (no measured size is asserted).

- MART's and AVmixup's extra forward passes change no gradient of the first step (train-mode
  BatchNorm normalises with the batch's statistics), so their first updates agree exactly, while
  their running statistics after one step differ;
- AWP's first update without AGR differs only by weight decay at w + v (tiny), with AGR by the
  clean gradient (larger);
- the authors' PGD attacks some points outside [0, 1], and its adversarial inputs differ.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_departures_run(tmp_path):
    out = tmp_path / "departures.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.authors_departures", "--quick", "--threads", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PGD (iterates not clamped" in done.stdout and "reporting only" in done.stdout
    report = json.loads(out.read_text())
    assert report["quick"] is True and {"setup", "pgd", "awp", "mart", "avmixup", "reporting_only"} <= set(report)
    first = report["pgd"]["first_batch"]
    assert first["fraction_attacked_points_outside_0_1"] > 0 and first["fraction_elements_differ"] > 0
    assert first["max_abs_difference_over_eps"] <= 2.0 + 1e-6  # both points lie in the eps-ball
    for method in ("mart", "avmixup"):
        for arm in ("plain", "agr"):
            assert report[method][arm]["first_update"]["global"] == 0.0
        assert report[method]["batch_norm_after_one_step"]["running_mean"]["of_the_change"]["min"] > 0.1
    awp = report["awp"]
    assert 0 < awp["plain"]["first_update"]["global"] < 1e-3 < awp["agr"]["first_update"]["global"]
    assert awp["clean_gradient_first_step"]["tensors_that_differ"] > 0
