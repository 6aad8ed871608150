"""What ``agr-train`` under torchrun communicates: counted, measured on gloo, predicted on GPUs.

Run from the repository root::

    python -m benchmarks.distributed_cost                      # all three parts, 2 gloo processes
    python -m benchmarks.distributed_cost --no-measure         # the counts and the prediction only
    python -m benchmarks.distributed_cost --processes 2 --repeats 7 --out distributed_cost.json

1. **Counted.** For each model of ``agr-train`` (SmallCNN on 8x8 digits, PreActResNet-18 and
   WideResNet-34-10 on 32x32 images): the parameters ``P`` (one float32 gradient all-reduce is
   ``4 P`` bytes; DDP reduces both backward passes of an AGR step, so an AGR step all-reduces
   ``2 x 4 P`` bytes and a plain step ``4 P``), the BatchNorm running statistics (averaged once
   per step), and the forward FLOPs per image (:class:`torch.utils.flop_counter.FlopCounterMode`,
   as ``docs/reproducing.rst`` counts them).
2. **Measured** (gloo on loopback, ``--processes`` processes on this machine, one thread each):
   the median seconds of one ``all_reduce`` of each model's gradient and of its BatchNorm
   buffers, and of the per-step broadcast of rank 0's read decision (one int).
3. **Predicted**, on paper: WideResNet-34-10, PGD-10 with AGR in the paper's preset (the clean
   gradient on every step: two gradient all-reduces per step), CIFAR-10, global batch 128, 200
   epochs with PGD-20 evaluation every epoch, on 1, 8 and 64 GPUs: compute at an assumed
   sustained throughput, and the ring all-reduce time ``2 (N - 1) / N x bytes / bandwidth`` at
   NVLink's 900 GB/s and InfiniBand's 400 Gb/s (50 GB/s), without overlap (an upper bound: DDP
   overlaps the all-reduce with the backward pass). A prediction, not a measurement.

A benchmark, not a test: no figure is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from agr_optim.models import build_model

#: (model, input channels, image side) as agr-train builds them.
MODELS = (("smallcnn", 1, 8), ("preactresnet18", 3, 32), ("wrn34-10", 3, 32))
#: The paper's CIFAR-10 protocol.
TRAIN_IMAGES, TEST_IMAGES, EPOCHS, GLOBAL_BATCH = 50_000, 10_000, 200, 128
#: Forward passes per image (F units, docs/reproducing.rst): a PGD-10 training step with AGR
#: (10 x (F + backward to the input, F) + clean forward F + adversarial forward and backward 3F +
#: clean backward 2F), and PGD-20 evaluation (clean and robust forward, 20 x 2F).
TRAIN_F, EVAL_F = 26, 42
BANDWIDTHS = {"NVLink 900 GB/s": 900e9, "InfiniBand 400 Gb/s": 50e9}
GPUS = (1, 8, 64)


def count(name: str, channels: int, side: int) -> dict[str, Any]:
    """Parameters, BatchNorm buffer elements and forward FLOPs per image of one model."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(name, num_classes=10, in_channels=channels, image_size=side).eval()
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        model(torch.zeros(1, channels, side, side))
    parameters = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    return {
        "parameters": parameters,
        "bn_buffer_elements": buffers,
        "forward_flops_per_image": flops.get_total_flops(),
        "bytes_per_gradient_all_reduce": 4 * parameters,
        "bytes_all_reduced_per_agr_step": 2 * 4 * parameters + 4 * buffers,
        "bytes_all_reduced_per_plain_step": 4 * parameters + 4 * buffers,
    }


def ring_seconds(nbytes: float, processes: int, bandwidth: float) -> float:
    """A ring all-reduce's bandwidth term: each process sends and receives 2 (N - 1) / N of it."""
    return 0.0 if processes == 1 else 2 * (processes - 1) / processes * nbytes / bandwidth


def predict(counted: dict[str, Any], throughput: float) -> list[dict[str, Any]]:
    """WideResNet-34-10, paper protocol with AGR, 1/8/64 GPUs (see the module docstring)."""
    flops = counted["forward_flops_per_image"]
    steps = -(-TRAIN_IMAGES // GLOBAL_BATCH)
    per_step_bytes = 2 * counted["bytes_per_gradient_all_reduce"]
    rows = []
    for gpus in GPUS:
        compute = TRAIN_F * flops * GLOBAL_BATCH / gpus / throughput
        evaluation = EVAL_F * flops * TEST_IMAGES / gpus / throughput
        row: dict[str, Any] = {
            "gpus": gpus,
            "images_per_gpu_per_step": GLOBAL_BATCH / gpus,
            "compute_seconds_per_step": compute,
            "bytes_all_reduced_per_step": per_step_bytes,
            "total_pflop": EPOCHS * (TRAIN_F * flops * TRAIN_IMAGES + EVAL_F * flops * TEST_IMAGES) / 1e15,
        }
        for label, bandwidth in BANDWIDTHS.items():
            comm = 2 * ring_seconds(counted["bytes_per_gradient_all_reduce"], gpus, bandwidth)
            hours = EPOCHS * (steps * (compute + comm) + evaluation) / 3600
            row[label] = {"all_reduce_seconds_per_step": comm, "hours_200_epochs": hours,
                          "communication_share": comm / (compute + comm) if compute + comm else 0.0}
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- gloo measurement
def _worker(rank: int, processes: int, store: str, sizes: dict[str, int], repeats: int, path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A file rendezvous, not a free port: a port found free by the parent and bound seconds
    # later by the spawned rank 0 can be taken in between.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=processes)
    try:
        results: dict[str, Any] = {}

        def timed(what: str, run: Any) -> None:
            run()  # warm-up (connections, allocations)
            seconds = []
            for _ in range(repeats):
                dist.barrier()
                start = time.perf_counter()
                run()
                seconds.append(time.perf_counter() - start)
            results[what] = statistics.median(seconds)

        for what, numel in sizes.items():
            tensor = torch.ones(numel)
            timed(what, lambda t=tensor: dist.all_reduce(t))
        decision = torch.tensor([1])
        timed("read decision (1 int broadcast)", lambda: dist.broadcast(decision, src=0))
        if rank == 0:
            with open(path, "w") as f:
                json.dump(results, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure(counted: dict[str, dict[str, Any]], processes: int, repeats: int) -> dict[str, Any]:
    """Median seconds of the all-reduces of a step, on ``processes`` gloo processes (loopback)."""
    import torch.multiprocessing as mp

    sizes = {}
    for name, c in counted.items():
        sizes[f"{name} gradient ({c['bytes_per_gradient_all_reduce']:,} bytes)"] = c["parameters"]
        sizes[f"{name} BatchNorm buffers ({4 * c['bn_buffer_elements']:,} bytes)"] = c["bn_buffer_elements"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "measured.json")
        store = os.path.join(tmp, "rendezvous")
        mp.spawn(_worker, args=(processes, store, sizes, repeats, path), nprocs=processes)
        with open(path) as f:
            seconds = json.load(f)
    measured: dict[str, Any] = {}
    for what, median in seconds.items():
        entry: dict[str, Any] = {"median_seconds": median}
        for name, c in counted.items():
            if what.startswith(f"{name} gradient"):
                # The bandwidth this ring achieved: bytes each process moved over the time.
                entry["effective_gb_per_s"] = ring_seconds(c["bytes_per_gradient_all_reduce"], processes, 1e9) / median
        measured[what] = entry
    return measured


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="gloo processes for the measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--throughput", type=float, default=50e12, help="assumed sustained FLOP/s per GPU")
    parser.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--models", default=",".join(m for m, _, _ in MODELS), help="comma-separated")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    wanted = args.models.split(",")
    counted = {name: count(name, ch, side) for name, ch, side in MODELS if name in wanted}
    for name, c in counted.items():
        print(f"{name}: {c['parameters']:,} parameters, {c['forward_flops_per_image'] / 1e9:.3f} GFLOP forward per "
              f"image; all-reduced per AGR step {c['bytes_all_reduced_per_agr_step']:,} bytes (2 gradients + "
              f"BatchNorm buffers), per plain step {c['bytes_all_reduced_per_plain_step']:,}")
    result: dict[str, Any] = {"counted": counted, "setup": {"python": platform.python_version(),
                                                              "torch": torch.__version__, "machine": platform.machine(),
                                                              "cpus": os.cpu_count()}}
    if "wrn34-10" in counted:
        result["prediction"] = predict(counted["wrn34-10"], args.throughput)
        print(f"prediction, WRN-34-10 PGD-10 + AGR, CIFAR-10, 200 epochs, global batch {GLOBAL_BATCH}, "
              f"{args.throughput / 1e12:g} TFLOP/s per GPU (assumed), no overlap:")
        for row in result["prediction"]:
            cells = "; ".join(f"{label}: all-reduce {1e3 * v['all_reduce_seconds_per_step']:.2f} ms/step, "
                              f"{v['hours_200_epochs']:.1f} h" for label, v in row.items() if isinstance(v, dict))
            print(f"  {row['gpus']:>2} GPUs ({row['images_per_gpu_per_step']:g} images each): compute "
                  f"{1e3 * row['compute_seconds_per_step']:.1f} ms/step; {cells}")
    if args.measure:
        result["setup"].update(processes=args.processes, repeats=args.repeats, backend="gloo (loopback)")
        result["measured"] = measure(counted, args.processes, args.repeats)
        print(f"measured, gloo on loopback, {args.processes} processes, median of {args.repeats}:")
        for what, entry in result["measured"].items():
            rate = f", {entry['effective_gb_per_s']:.2f} GB/s per process" if "effective_gb_per_s" in entry else ""
            print(f"  {what}: {1e3 * entry['median_seconds']:.3f} ms{rate}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
