"""``python -m benchmarks.gpu_check`` on the CPU: every section reports, the guards hold.

A CUDA machine is lent only now and then, so CI runs the command without CUDA (its CPU parts)
and checks the report: one JSON with every section's status and sane numbers, the same summary
on screen and in summary.txt, the CUDA test selection, and a section past its limit recorded as
a timeout while the others still run. No timing is asserted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

#: CUDA hidden: a run of the whole suite on a GPU machine must not start the full GPU check.
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import gpu_check

    return gpu_check


def _check(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out), *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def test_cpu_run_reports_every_section(tmp_path, gpu_check):
    done = _check(tmp_path, "--budget", "400", timeout=600)  # generous: a loaded shared machine
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["schema_version"] == gpu_check.SCHEMA_VERSION and report["cuda"] is False and report["quick"]
    assert report["environment"]["torch"] == torch.__version__
    assert report["environment"]["cuda_available"] is False
    assert list(report["sections"]) == list(gpu_check.SECTIONS)
    sections = report["sections"]
    for name, section in sections.items():
        assert section["status"] in ("ok", "skipped"), (name, section.get("error"), section.get("problems"))
        assert 0 <= section["seconds"] and section["limit_s"] > 0, name
    assert report["overall"] == "ok" and report["elapsed_s"] <= report["budget_s"]

    # The steps ran on every path and agree with the float64 per-layer reference.
    no_sync = sections["no_sync"]
    assert {(r["fused"], r["granularity"]) for r in no_sync["runs"]} == {
        (True, "tensor"), (True, "group"), (True, "global"), (False, "tensor")}
    assert all(r["step_count"] == 3 and r["synced"] is None for r in no_sync["runs"])  # no sync check on CPU
    assert {a["fused"] for a in no_sync["agreement"]} == {True, False}
    assert all(a["ok"] and a["max_relative_error"] <= 1e-5 for a in no_sync["agreement"])

    amp = sections["amp_fp16"]
    assert all(0 <= e <= gpu_check.STEP_TOL for e in amp["step_error"].values()), amp["step_error"]
    assert math.isfinite(amp["fp16_drift_from_fp32"]) and amp["fp16_drift_from_fp32"] <= gpu_check.FP16_DRIFT_TOL
    assert amp["inf_steps_skipped"] == [True, True] and amp["inf_run_steps_taken"] == 1
    assert amp["unscale_vs_step_relative_error"] <= 1e-5

    accelerate = sections["accelerate_fp16"]
    if accelerate["status"] == "ok":
        assert accelerate["step_error"] <= gpu_check.STEP_TOL and accelerate["inf_step_skipped"] is True
        assert accelerate["steps_taken"] == accelerate["steps"]
    else:
        assert "accelerate does not import" in accelerate["reason"]

    # The CUDA tests were selected (test_fused.py's no-sync test by its skipif, test_cuda.py by
    # its marker) and skipped; nothing else was collected.
    tests = sections["cuda_tests"]
    ids = {t["id"] for t in tests["tests"]}
    assert {f"tests.test_fused::test_cuda_step_never_synchronises[{g}]" for g in ("tensor", "group", "global")} <= ids
    assert any(i.startswith("tests.test_cuda::") for i in ids), ids
    assert all(i.startswith("tests.test_cuda::") or "cuda" in i for i in ids), ids
    assert tests["skipped"] == tests["collected"] and tests["failed"] == tests["errors"] == 0
    assert tests["collection_errors"] == []

    bench = sections["reconstruct_benchmark"]
    [model] = bench["results"]
    assert model["model"] == "preactresnet18_w16" and model["device"] == "cpu"
    rows = {row["name"]: row for row in model["rows"]}
    assert {"floor", "agr_overhead_fused", "reconstruct_fused", "reconstruct_loop", "per_layer_reference",
            "paper_script_reference"} <= set(rows)
    assert rows["floor"]["ratio_to_floor"] == 1.0
    assert all(math.isfinite(r["ms"]) and (r["kind"] != "time" or r["ms"] > 0) for r in rows.values())
    assert {"agr_overhead_over_floor", "reconstruct_loop_over_fused"} <= set(model["targets"])

    training = sections["training"]
    assert training["status"] == "skipped"
    assert training["reason"].startswith(("skipped: no training command", "no CUDA device"))

    # One summary, on screen and in the file, with a line per section and the missing GPU said plainly.
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.strip() in done.stdout
    assert "NO CUDA DEVICE" in summary
    for name, section in sections.items():
        assert f"[{section['status']:>7}] {name} (" in summary


def test_a_section_past_its_limit_is_recorded_and_the_others_run(tmp_path):
    done = _check(tmp_path, "--sections", "amp_fp16", "reconstruct_benchmark", "--section-limit", "amp_fp16=1")
    assert done.returncode == 1, done.stderr[-3000:]  # a section did not pass
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["sections"]) == ["amp_fp16", "reconstruct_benchmark"]
    amp, bench = report["sections"]["amp_fp16"], report["sections"]["reconstruct_benchmark"]
    assert amp["status"] == "timeout" and "limit of 1 s" in amp["reason"] and amp["seconds"] < 30
    assert bench["status"] == "ok" and bench["results"][0]["rows"]
    assert report["overall"] == "failed"
    assert "[timeout] amp_fp16" in (tmp_path / "summary.txt").read_text()


def test_a_section_whose_process_dies_is_an_error(tmp_path, gpu_check):
    result = gpu_check._run_section("no_such_section", tmp_path, 30.0, quick=True, cuda=False)
    assert result["status"] == "error" and "wrote nothing" in result["error"] and "no_such_section" in result["error"]


SELECTION_TESTS = '''
import pytest

@pytest.mark.cuda
def test_marked():
    pass

@pytest.mark.skipif(False, reason="needs a CUDA device")
def test_skipif_cuda():
    pass

@pytest.mark.skipif(False, reason="needs a GPU")
def test_skipif_gpu():
    pass

@pytest.mark.skipif(False, reason="needs lightning")
def test_other_skipif():
    pass

def test_plain():
    pass
'''


def test_cuda_test_selection(tmp_path, gpu_check):
    """The plugin keeps exactly the CUDA tests, and a module that does not import is reported
    without stopping the others."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: needs CUDA\n")
    (tmp_path / "test_selection.py").write_text(textwrap.dedent(SELECTION_TESTS))
    (tmp_path / "test_broken.py").write_text("raise ImportError('a package this machine lacks')\n")
    junit = tmp_path / "junit.xml"
    command = gpu_check.cuda_test_command(junit, (str(tmp_path),))
    done = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout[-3000:]  # the broken module
    result = gpu_check.parse_junit(junit)
    assert {t["id"].split("::")[-1]: t["outcome"] for t in result["tests"]} == {
        "test_marked": "passed", "test_skipif_cuda": "passed", "test_skipif_gpu": "passed"}
    assert result["collection_errors"] == ["test_broken"]
    # Without --cuda-only the plugin changes nothing.
    everything = [c for c in command if c != "--cuda-only"]
    done = subprocess.run(everything, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert len(gpu_check.parse_junit(junit)["tests"]) == 5
