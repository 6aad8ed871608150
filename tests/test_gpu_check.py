"""``python -m benchmarks.gpu_check`` on the CPU: every section reports, the report is read by name, the caps hold.

A CUDA machine is lent only now and then and the check must run right the first time there, so
CI runs its CPU mode (the same code at tiny sizes, CUDA hidden) and checks the report: one JSON
whose sections and figures are found by name, the summary on screen and in summary.txt, a
section past its limit recorded as a timeout while the others still run. No timing is asserted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

#: CUDA hidden: a run of the whole suite on a GPU machine must not start the full GPU check.
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import gpu_check

    return gpu_check


def _check(out: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out), *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cpu_mode_reports_every_section_by_name(tmp_path, gpu_check, monkeypatch):
    done = _check(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["schema_version"] == gpu_check.SCHEMA_VERSION and report["cuda"] is False
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["cuda_available"] is False
    assert list(report["sections"]) == list(gpu_check.SECTIONS)
    sections, figures = report["sections"], report["figures"]
    for name, section in sections.items():
        assert section["status"] in ("ok", "skipped"), (name, section.get("error"), section.get("problems"))
        assert 0 <= section["seconds"] <= section["limit_s"] + 5, name
        assert figures[name] == section.get("figures", {}), name
        assert f"] {name}: " in done.stderr, name  # the elapsed time of each section, as it ends
    assert report["overall"] == "ok" and report["elapsed_s"] <= report["budget_s"]

    # The accelerator schedule forced on the CPU dispatches no host sync at any granularity,
    # and as many kernels at each (the number does not depend on the segments).
    assert set(figures["syncs"]) == {"fused_device"}
    assert {g: v["dispatched_syncs_per_step"] for g, v in figures["syncs"]["fused_device"].items()} == {
        "tensor": 0, "group": 0, "global": 0}
    runs = sections["syncs"]["runs"]
    assert len({r["kernels_per_step"] for r in runs}) == 1 and all(r["step_count"] == 3 for r in runs)

    assert sections["memory"]["status"] == "skipped" and "no CUDA" in sections["memory"]["reason"]
    tests = figures["cuda_tests"]
    assert tests["skipped"] > 0 and tests["passed"] == tests["failed"] == tests["errors"] == 0
    assert "-m cuda" in sections["cuda_tests"]["command"] and (tmp_path / "cuda_tests.txt").exists()

    # The step costs, and the operations counted in the section's process: the same as here.
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks._shapes import parameter_shapes
    from benchmarks._step_ops import count_step

    step = figures["step_cost"]["preactresnet18_w16"]
    assert step["eager"]["agr_iteration_over_sgd_step"] > 0 and step["eager"]["agr_iteration_over_floor"] > 0
    assert math.isfinite(step["eager"]["agr_own_over_sgd_step"])  # (a difference: any sign on a busy CPU)
    here = count_step(parameter_shapes("preactresnet18_w16"), fused="device")
    assert step["counted"]["agr_own"] == here["agr_own"] and step["counted"]["agr_own"]["syncs"] == 0
    assert step["predicted_h200"]["agr_own_over_sgd_step"] > 0

    epoch = figures["epoch_cost"]
    assert set(epoch) == {"fp32"} and epoch["fp32"]["steps_per_epoch"] == 1  # (bf16 autocast is CUDA's)
    assert epoch["fp32"]["agr_at_epoch_over_at_epoch"] > 0 and (tmp_path / "epoch_cost_fp32.json").exists()
    assert set(epoch["fp32"]["seconds_per_epoch_median"]) == {"plain", "floor", "agr"}

    train = figures["agr_train"]
    assert train["agr_active"] == 1 and math.isfinite(train["train_loss"])
    assert (tmp_path / "agr_train" / "summary.json").exists()

    # One summary, on screen and in the file; the missing GPU said plainly.
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.strip() in done.stdout and "NO CUDA DEVICE" in summary
    for name, section in sections.items():
        assert f"[{section['status']:>7}] {name} (" in summary


@pytest.mark.slow
def test_a_section_past_its_limit_is_recorded_and_the_others_run(tmp_path):
    done = _check(tmp_path, "--sections", "memory", "cuda_tests", "--section-limit", "cuda_tests=2", timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]  # a section did not pass
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["sections"]) == ["memory", "cuda_tests"]
    memory, tests = report["sections"]["memory"], report["sections"]["cuda_tests"]
    assert tests["status"] == "timeout" and tests["seconds"] < 30, tests
    assert memory["status"] == "skipped" and report["overall"] == "failed"
    assert "[timeout] cuda_tests" in (tmp_path / "summary.txt").read_text()


def test_a_section_whose_process_dies_is_an_error(tmp_path, gpu_check):
    result = gpu_check.run_section("no_such_section", tmp_path, 60.0, "cpu")
    assert result["status"] == "error" and "wrote nothing" in result["error"] and "no_such_section" in result["error"]


def test_the_budget_keeps_time_for_later_sections(gpu_check):
    cap = gpu_check.SECTIONS["step_cost"]
    assert gpu_check.plan_limit("step_cost", 1000.0, 2, {}) == cap
    spare = 100.0 - gpu_check._FINAL_S - 2 * gpu_check._RESERVE_S
    assert gpu_check.plan_limit("step_cost", 100.0, 2, {}) == min(cap, spare)
    assert gpu_check.plan_limit("step_cost", 1000.0, 0, {"step_cost": 7.0}) == 7.0
    assert sum(gpu_check.SECTIONS.values()) > gpu_check.BUDGET_S  # the budget, not the caps, bounds a run


@pytest.mark.parametrize(
    ("line", "counts"),
    [
        ("======= 12 passed, 3 skipped, 990 deselected in 21.04s =======",
         {"passed": 12, "skipped": 3, "deselected": 990}),
        ("1 failed, 2 passed, 1 error, 4 warnings in 65.00s (0:01:05)",
         {"failed": 1, "passed": 2, "errors": 1, "warnings": 4}),
        ("10 skipped in 3.21s", {"skipped": 10}),
    ],
)
def test_pytest_summary_line_is_read(gpu_check, line, counts):
    output = f"tests/test_cuda.py::test_x PASSED\nFAILED tests/test_cuda.py::test_y - AssertionError\n{line}\n"
    assert gpu_check.pytest_counts(output) == counts
    assert gpu_check.pytest_counts("collected 0 items / 1 error\nInterrupted\n") == {}


def test_synthetic_npz_is_a_valid_dataset(tmp_path, gpu_check):
    from agr_optim.datasets import load_dataset

    path = gpu_check.write_synthetic_npz(tmp_path / "synthetic.npz", n_train=40, n_test=20)
    data = load_dataset("npz", str(path), seed=0)
    assert tuple(data.x_train.shape) == (40, 3, 32, 32) and tuple(data.x_test.shape) == (20, 3, 32, 32)
    assert data.num_classes == 10 and set(data.y_train.tolist()) == set(range(10))


PASSED_WITH_AN_UNCOLLECTED_MODULE = """\
tests/test_cuda.py::test_a PASSED
tests/test_cuda.py::test_b PASSED
==================================== ERRORS ====================================
_______________ ERROR collecting tests/test_state_machine.py ________________
ModuleNotFoundError: No module named 'hypothesis'
ERROR tests/test_state_machine.py
============ 2 passed, 900 deselected, 1 error in 12.30s ============
"""


@pytest.mark.parametrize(
    ("output", "returncode", "status"),
    [
        (PASSED_WITH_AN_UNCOLLECTED_MODULE, 1, "ok"),
        (PASSED_WITH_AN_UNCOLLECTED_MODULE.replace("test_state_machine.py", "test_cuda.py"), 1, "failed"),
        ("tests/test_cuda.py::test_a FAILED\nFAILED tests/test_cuda.py::test_a - assert 1 == 2\n"
         "==== 1 failed, 3 passed in 2.00s ====\n", 1, "failed"),
        ("==== 5 skipped, 900 deselected in 2.00s ====\n", 0, "failed"),  # on a CUDA machine: none passed
        ("ImportError while loading conftest\n", 4, "failed"),
    ],
    ids=["an-uncollected-module", "test-cuda-uncollected", "a-failure", "all-skipped", "no-summary"],
)
def test_cuda_tests_section_reads_pytests_exit_code_and_summary(tmp_path, gpu_check, monkeypatch, output, returncode,
                                                               status):
    """On a CUDA machine: a module that does not import there costs its own tests, not the
    section, unless it is test_cuda.py; a failure, no passed test or no summary line fail it."""
    def fake_run(command, timeout, log=None, own_group=False):
        assert command[1:4] == ["-m", "pytest", "tests"] and "-m" in command[4:] and "cuda" in command
        log.write_text(output)
        return {"returncode": returncode, "timed_out": False, "seconds": 1.0, "output": output}

    monkeypatch.setattr(gpu_check, "run_command", fake_run)
    section = gpu_check.Section("cuda_tests", tmp_path, torch.device("cuda"), deadline=float("inf"))
    gpu_check.section_cuda_tests(section)
    result = section.result
    assert section.finish() == status, result
    if status == "ok":
        assert result["figures"] == {"passed": 2, "failed": 0, "errors": 0, "skipped": 0}
        assert result["uncollected_modules"] == ["tests/test_state_machine.py"]
