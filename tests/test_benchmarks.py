"""``python -m benchmarks.reconstruct --quick``: every row runs, the JSON has its schema; the operation counter.

No timing is asserted (these machines are noisy): the numbers are the benchmark's business. The
memory-traffic and launch estimates of ``benchmarks/_ops.py`` are checked against byte counts
worked out by hand for single operations.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

#: Inductor (reached through the peers' imports on some versions) imports a deprecated torch.jit API.
_JIT_WARNING = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"

EXPECTED_ROWS = {
    "floor", "sgd_step", "agr_fused_step", "agr_loop_step", "reconstruct_fused", "reconstruct_loop",
    "per_layer_reference", "paper_script_reference", "agr_overhead_fused", "agr_overhead_loop",
}


@pytest.mark.slow
@pytest.mark.filterwarnings(_JIT_WARNING)
def test_quick_benchmark_runs_every_row(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.reconstruct", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "floor" in done.stdout and "x floor" in done.stdout
    report = json.loads(out.read_text())
    assert report["schema_version"] == 3 and report["quick"] is True
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
        assert memory["param_bytes"] > 0 and set(memory["variants"]) == {"plain", "agr_fused", "agr_device"}
        for variant, row in memory["variants"].items():
            assert row["peak_rss_bytes"] > 0, variant
            assert math.isfinite(row["extra_over_plain_ratio_to_params"])
        ops = result["ops_per_step"]
        device, host = ops["agr_device_schedule"], ops["agr_host_schedule"]
        assert device["own"]["syncs"] == 0 and host["own"]["syncs"] > 0  # the host schedule reads on the host
        assert {g: v["syncs"] for g, v in device["by_granularity_narrow_twin_two_groups"].items()} == {
            "tensor": 0, "group": 0, "global": 0}
        for name in ("kernels", "launches", "views", "bytes_read", "bytes_written"):
            assert device["own"][name] == device["iteration"][name] - ops["sgd_foreach_step"][name], name
        predicted = ops["predicted_h200"]
        assert predicted["agr_own_over_sgd_step"] == pytest.approx(predicted["agr_own_s"] / predicted["sgd_step_s"])
    # The docs' tables come from a saved run: every row of the run that the docs show, in RST.
    rst = subprocess.run([sys.executable, "-m", "benchmarks.reconstruct", "--rst", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert rst.returncode == 0, rst.stderr[-3000:]
    overhead = next(r for r in report["results"][0]["rows"] if r["name"] == "agr_overhead_fused")
    assert ".. list-table::" in rst.stdout and "**AGR fused overhead**" in rst.stdout
    assert f"     - {overhead['ratio_to_floor']:.2f}" in rst.stdout
    assert "   * - AGR, accelerator schedule" in rst.stdout and "agr_device" in rst.stdout


def test_shapes_match_the_architectures(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks._shapes import parameter_shapes

    counts = {name: (len(s), sum(math.prod(x) for x in s)) for name, s in
              ((n, parameter_shapes(n)) for n in ("preactresnet18", "wideresnet34_10"))}
    assert counts["preactresnet18"] == (56, 11_172_170)
    assert counts["wideresnet34_10"][0] == 98
    assert round(counts["wideresnet34_10"][1] / 1e6, 1) == 46.2


# --------------------------------------------------------------------- the operation counter
@pytest.fixture
def ops(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import _ops

    return _ops


def _counted(ops, fn):
    with ops.OpCounter() as counter:
        fn()
    return counter


def test_traffic_counts_what_each_operation_reads_and_writes(ops):
    n = 1000
    x, y, z = torch.randn(n), torch.randn(n), torch.empty(n)
    m, index = x.view(10, 100), torch.tensor([1, 3])
    cases = {  # (kernels, bytes read, bytes written), by hand for float32 (4 bytes) and float64 (8)
        "dot": (lambda: torch.dot(x, y), (1, 8 * n, 4)),
        "add into out=": (lambda: torch.add(x, y, out=z), (1, 8 * n, 4 * n)),
        "in place": (lambda: z.mul_(x), (1, 8 * n, 4 * n)),
        "copy": (lambda: z.copy_(x), (1, 4 * n, 4 * n)),
        "one input twice": (lambda: x * x, (1, 4 * n, 4 * n)),
        "broadcast read once": (lambda: x + torch.ones(1).expand(n), (2, 4 * n + 4, 4 * n + 4)),
        "selected rows and the index": (lambda: m.index_select(0, index), (1, 2 * 400 + 2 * 8, 2 * 400)),
        "two lists": (lambda: torch._foreach_add_([z, y], [x, x]), (1, 12 * n, 8 * n)),
        "float32 norm": (lambda: torch.linalg.vector_norm(m, dim=1), (1, 4 * n, 40)),
        # Accumulating in float64 copies the input first (ATen's make_reduction): one more kernel,
        # which writes 8n and which the reduction reads instead of the input.
        "float64 norm": (lambda: torch.linalg.vector_norm(m, dim=1, dtype=torch.float64), (1, 12 * n, 8 * n + 80)),
    }
    for label, (fn, (kernels, read, written)) in cases.items():
        counter = _counted(ops, fn)
        assert (counter.kernels, counter.bytes_read, counter.bytes_written) == (kernels, read, written), label
        assert counter.launches == kernels + counter.hidden_casts, label
    assert _counted(ops, cases["float64 norm"][0]).hidden_casts == 1
    assert _counted(ops, cases["float32 norm"][0]).hidden_casts == 0


def test_launches_follow_multi_tensor_apply(ops):
    """CUDA's multi-tensor kernels launch per 2240 blocks of 65536 elements, or per 448 tensors
    of two lists (770 of one); meta tensors: no memory."""
    small = [torch.empty(10, device="meta")] * 1000
    assert ops.launches("aten._foreach_add_", (small, small)) == 3  # ceil(1000 / 448)
    assert ops.launches("aten._foreach_mul_", (small, 2.0)) == 2  # ceil(1000 / 770)
    big = [torch.empty(2240 * 65536 + 1, device="meta")]
    assert ops.launches("aten._foreach_mul_", (big, 2.0)) == 2
    assert ops.launches("aten._foreach_mul_", ([torch.empty(0, device="meta")] * 3, 2.0)) == 1
    assert ops.launches("aten.add", (small[0], small[0])) == 1


def test_an_iteration_is_counted_without_the_gradients_setup(ops, monkeypatch):
    from benchmarks._step_ops import count_step, predict

    shapes = [(3, 4), (5,)]
    step = count_step(shapes, fused="device")
    n = 17  # elements: the SGD step reads and writes whole tensors, 4 bytes each
    assert step["sgd_step"]["syncs"] == step["agr_own"]["syncs"] == 0
    assert step["sgd_step"]["bytes_read"] % (4 * n) == 0 and step["sgd_step"]["bytes_written"] % (4 * n) == 0
    for name, value in step["agr_own"].items():
        assert value == step["agr_iteration"][name] - step["sgd_step"][name], name
    figures = {"launches": 10, "bytes_read": 3 * 10**6, "bytes_written": 10**6}
    assert predict(figures) == pytest.approx(10 * 5e-6 + 4e6 / 4.8e12)


def test_before_after_pairs_each_repeat_with_its_floor(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.before_after import summarize

    def run(checkout, slow):
        # Each repeat's floor and rows slowed alike by the load: the paired ratios do not move.
        floor = [0.010 * slow[i] for i in range(3)]
        times = {"floor": floor, "sgd_step": [2 * f for f in floor], "agr_fused_step": [3.5 * f for f in floor],
                 "reconstruct_fused": [1.5 * f for f in floor], "reconstruct_inplace_fused": [1.2 * f for f in floor]}
        return {"checkout": checkout, "model": "m", "times": times}

    summary = summarize([run("old", [1, 5, 1]), run("old", [2, 2, 2]), run("new", [1, 1, 9])])
    for checkout in ("old", "new"):
        entry = summary[checkout]["m"]
        assert entry["agr_overhead_fused_over_floor"]["median"] == pytest.approx(1.5)  # (3.5 - 2) floors
        assert entry["reconstruct_inplace_fused_over_floor"]["range"] == pytest.approx([1.2, 1.2])
    assert len(summary["old"]["m"]["runs"]) == 2
    assert summary["old"]["m"]["floor_ms"]["range"] == pytest.approx([10.0, 20.0])  # medians 10 and 20 ms
