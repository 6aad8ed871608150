"""benchmarks/distributed_cost.py: the counts of what agr-train under torchrun all-reduces, the
ring prediction's arithmetic, and the gloo measurement runs (its times are not asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from agr_optim.models import build_model
from benchmarks import distributed_cost


def test_counts_and_the_ring_prediction(tmp_path, capsys):
    """Bytes per step from the parameters counted here; the ring time 2 (N - 1) / N x bytes /
    bandwidth, two gradient all-reduces per AGR step; one GPU communicates nothing."""
    out = tmp_path / "cost.json"
    assert distributed_cost.main(["--models", "wrn34-10", "--no-measure", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    model = build_model("wrn34-10", num_classes=10, in_channels=3, image_size=32)
    parameters = sum(p.numel() for p in model.parameters())
    counted = result["counted"]["wrn34-10"]
    assert counted["bytes_per_gradient_all_reduce"] == 4 * parameters == 4 * 46_160_474
    assert round(counted["forward_flops_per_image"] / 1e9, 3) == 13.318  # docs/reproducing.rst's F
    one, eight, sixty_four = result["prediction"]
    assert one["NVLink 900 GB/s"]["all_reduce_seconds_per_step"] == 0.0
    nvlink = eight["NVLink 900 GB/s"]["all_reduce_seconds_per_step"]
    assert nvlink == pytest.approx(2 * 2 * 7 / 8 * 4 * parameters / 900e9)
    assert sixty_four["InfiniBand 400 Gb/s"]["all_reduce_seconds_per_step"] == pytest.approx(
        2 * 2 * 63 / 64 * 4 * parameters / 50e9
    )
    # One GPU at 50 TFLOP/s: the 4,581 PFLOP of docs/reproducing.rst in about 25 hours.
    assert round(one["total_pflop"]) == 4581 and one["NVLink 900 GB/s"]["hours_200_epochs"] == pytest.approx(
        4581e15 / 50e12 / 3600, rel=1e-3
    )
    assert "prediction" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_the_gloo_measurement_runs(tmp_path):
    out = tmp_path / "cost.json"
    assert distributed_cost.main(["--models", "smallcnn", "--repeats", "1", "--out", str(out)]) == 0
    measured = json.loads(out.read_text())["measured"]
    assert set(measured) == {"smallcnn gradient (92,136 bytes)", "smallcnn BatchNorm buffers (640 bytes)",
                             "read decision (1 int broadcast)"}
    assert all(entry["median_seconds"] > 0 for entry in measured.values())
