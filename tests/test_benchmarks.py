"""Smoke test of ``python -m benchmarks.reconstruct --quick``: every row runs, the JSON has its schema.

No timing is asserted (these machines are noisy): the numbers are the benchmark's business.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    # Inductor (reached through the peers' imports on some versions) imports a deprecated torch.jit API.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

EXPECTED_ROWS = {
    "floor", "sgd_step", "agr_fused_step", "agr_loop_step", "reconstruct_fused", "reconstruct_loop",
    "per_layer_reference", "paper_script_reference", "agr_overhead_fused", "agr_overhead_loop",
}


def test_quick_benchmark_runs_every_row(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.reconstruct", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "floor" in done.stdout and "x floor" in done.stdout
    report = json.loads(out.read_text())
    assert report["schema_version"] == 2 and report["quick"] is True
    assert {"torch", "python", "machine", "threads", "results"} <= set(report)
    assert report["results"], "no model was run"
    for result in report["results"]:
        assert {"model", "device", "num_tensors", "num_elements", "repeats", "rows", "targets", "peers"} <= set(result)
        assert result["num_tensors"] == 56  # PreActResNet-18's parameter tensors, at any width
        names = {row["name"] for row in result["rows"]}
        assert EXPECTED_ROWS <= names, EXPECTED_ROWS - names
        for peer, status in result["peers"].items():
            prefix = "pytorch_optimizer_pcgrad" if peer == "pytorch_optimizer" else "torchjd_pcgrad"
            assert status.startswith("skipped") or any(n.startswith(prefix) for n in names), (peer, status)
        for row in result["rows"]:
            assert {"name", "kind", "ms", "ratio_to_floor", "ratio_quartiles", "samples", "note"} <= set(row)
            assert row["samples"] == result["repeats"], row
            assert math.isfinite(row["ms"]) and math.isfinite(row["ratio_to_floor"]), row
            low, high = row["ratio_quartiles"]
            assert low <= high, row
            if row["name"] == "floor":
                assert row["ratio_to_floor"] == 1.0, row
            if row["kind"] == "time":
                assert row["ms"] > 0, row
        for target in result["targets"].values():
            assert {"value", "limit", "better", "met"} <= set(target)
        memory = result["memory"]
        assert memory["param_bytes"] > 0
        for variant, row in memory["variants"].items():
            assert row["peak_rss_bytes"] > 0, variant
            assert math.isfinite(row["extra_over_plain_ratio_to_params"])
    # The docs' tables come from a saved run: every row of the run that the docs show, in RST.
    rst = subprocess.run([sys.executable, "-m", "benchmarks.reconstruct", "--rst", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert rst.returncode == 0, rst.stderr[-3000:]
    overhead = next(r for r in report["results"][0]["rows"] if r["name"] == "agr_overhead_fused")
    assert ".. list-table::" in rst.stdout and "**AGR fused overhead**" in rst.stdout
    assert f"     - {overhead['ratio_to_floor']:.2f}" in rst.stdout


def test_shapes_match_the_architectures(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks._shapes import parameter_shapes

    counts = {name: (len(s), sum(math.prod(x) for x in s)) for name, s in
              ((n, parameter_shapes(n)) for n in ("preactresnet18", "wideresnet34_10"))}
    assert counts["preactresnet18"] == (56, 11_172_170)
    assert counts["wideresnet34_10"][0] == 98
    assert round(counts["wideresnet34_10"][1] / 1e6, 1) == 46.2
