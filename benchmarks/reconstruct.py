"""Microbenchmarks of AGR's reconstruction against the memory floor, per layer code and peers.

Run from the repository root::

    python -m benchmarks.reconstruct            # PreActResNet-18 and WideResNet-34-10 shapes
    python -m benchmarks.reconstruct --quick    # small shapes, few repeats: a smoke test
    python -m benchmarks.reconstruct --out results.json

Every row is timed in the same process, the rows interleaved (each repeat runs all of them, in
an order rotated from repeat to repeat, so drift of a noisy machine hits all alike). Reported:
the median over repeats in ms, and the median over repeats of the ratio to the floor timed in
the same repeat, with its quartiles (on a shared machine a burst of load slows the floor and
the row of one repeat alike, so the paired ratio is steadier than a ratio of medians):

- ``floor``: one ``torch.dot`` of two flat N-element buffers plus one ``torch.add(x, y, out=z)``:
  the least memory traffic of any exact reconstruction (read both gradients once for the sums,
  read both and write the result once for the combine).
- ``sgd_step``: plain foreach SGD (momentum 0.9, weight decay 5e-4), ``zero_grad()`` + ``step()``.
- ``agr_overhead_fused`` / ``agr_overhead_loop``: ``AGROptimizer(SGD)``'s ``zero_grad()`` +
  ``stash_clean()`` + ``step()`` minus the plain SGD's ``zero_grad()`` + ``step()`` (median of the
  per-repeat differences). Gradients come from a real backward pass of the synthetic loss
  ``sum_i <p_i, w_i>``: autograd hands over a new tensor per parameter, exactly as a model's
  backward does when ``.grad`` is None; the backward passes are not timed.
- ``reconstruct_fused`` / ``reconstruct_loop``: ``functional.reconstruct`` (new tensors) on the
  same two gradient lists, ``fused=True`` and ``fused=False``.
- ``per_layer_reference``: the paper's public code's per-layer step (``_reference.py``), lean;
  ``paper_script_reference`` adds what the script also does every step (``torch.cat`` of both
  gradients, per-layer L2 distance and cosine logging).
- peers, when installed: pytorch-optimizer's ``PCGrad`` (overhead over plain SGD, defined like
  AGR's: its gradient retrieval, flattening, projection, unflattening, with the same backward
  passes untimed) and TorchJD's ``PCGrad`` aggregator (aggregation of a prebuilt 2 x N matrix
  only). Both project globally (one segment), AGR per tensor.
- compiled: ``reconstruct_(..., fused="compile")`` and ``AGROptimizer(SGD, fused="compile")``
  once compiled (the overhead row like the eager one); compile times reported separately.

Beside the times, ``ops_per_step`` (on CPU): the ATen operations one optimizer iteration
dispatches (``benchmarks/_step_ops.py``): the plain foreach SGD step's, and AGR's own beyond it
(``zero_grad()`` + ``stash_clean()`` + ``step()`` less SGD's ``zero_grad()`` + ``step()``) for the
accelerator schedule (``fused="device"``, counted on CPU: its dispatch is the same on a GPU) and
the host schedule (``fused=True`` on CPU): kernels, CUDA launches, views, allocations, host
syncs, bytes read and written; the accelerator schedule's kernels and syncs at every granularity;
and the H200 time those counts predict.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from agr_optim import AGROptimizer
from agr_optim import functional as F

from . import _memory, _step_ops
from ._reference import paper_script_reconstruct, per_layer_reconstruct
from ._shapes import MODELS, narrow_shapes, parameter_shapes

#: 2: ratios are medians of per-repeat paired ratios, with quartiles; 3: ``ops_per_step``
SCHEMA_VERSION = 3
GRANULARITIES = ("tensor", "group", "global")
CLIP_NORM = 0.1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Case:
    """One row: ``run()`` returns the seconds of the timed part (untimed work may surround it)."""

    def __init__(self, name: str, run: Callable[[], float], note: str = "") -> None:
        self.name, self.run, self.note = name, run, note
        self.times: list[float] = []


class Workload:
    """Two gradients for a model's parameter shapes, and the optimizers and buffers to time."""

    def __init__(self, shapes: list[tuple[int, ...]], device: torch.device) -> None:
        self.device = device
        gen = torch.Generator(device="cpu").manual_seed(0)
        n = sum(math.prod(s) for s in shapes)
        self.numel = n
        self.floor_x = torch.randn(n, generator=gen).to(device)
        self.floor_y = torch.randn(n, generator=gen).to(device)
        self.floor_z = torch.empty(n, device=device)
        self.params = [torch.zeros(s, device=device, requires_grad=True) for s in shapes]
        # The adversarial weights w_a are random; the clean ones are +-0.5 w_a plus noise, the
        # sign alternating over tensors: both branches (projection and interpolation) run.
        self.w_adv = [torch.randn(s, generator=gen).to(device) for s in shapes]
        self.w_clean = [
            (0.5 * (1 if i % 2 else -1) * w.cpu() + torch.randn(s, generator=gen)).to(device)
            for i, (s, w) in enumerate(zip(shapes, self.w_adv, strict=True))
        ]

    def backward(self, weights: list[torch.Tensor]) -> None:
        """A real backward pass whose gradient is ``weights``: autograd allocates each ``.grad``."""
        loss = sum((p * w).sum() for p, w in zip(self.params, weights, strict=True))
        loss.backward()  # type: ignore[union-attr]

    def sgd(self) -> torch.optim.SGD:
        return torch.optim.SGD(self.params, lr=1e-4, momentum=0.9, weight_decay=5e-4, foreach=True)


def _timed(device: torch.device, fn: Callable[[], object]) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def build_cases(work: Workload, *, peers: bool, compiled: bool) -> tuple[list[Case], dict]:
    device = work.device
    info: dict = {"peers": {}, "compile_s": None, "compile_optimizer_s": None}
    x, y, z = work.floor_x, work.floor_y, work.floor_z
    a_list, c_list = work.w_adv, work.w_clean

    def floor() -> None:
        torch.dot(x, y)
        torch.add(x, y, out=z)

    def training_step(opt: torch.optim.Optimizer, agr: bool) -> float:
        t = _timed(device, opt.zero_grad)
        if agr:
            work.backward(work.w_clean)
            t += _timed(device, opt.stash_clean)  # type: ignore[attr-defined]
        work.backward(work.w_adv)
        return t + _timed(device, opt.step)

    plain = work.sgd()
    agr_fused = AGROptimizer(work.sgd(), clip_norm=CLIP_NORM, fused=True)
    agr_loop = AGROptimizer(work.sgd(), clip_norm=CLIP_NORM, fused=False)
    cases = [
        Case("floor", lambda: _timed(device, floor), "torch.dot(x, y) + torch.add(x, y, out=z), N elements"),
        Case("sgd_step", lambda: training_step(plain, False), "plain foreach SGD: zero_grad() + step()"),
        Case("agr_fused_step", lambda: training_step(agr_fused, True),
             "AGROptimizer(SGD, fused=True): zero_grad() + stash_clean() + step()"),
        Case("agr_loop_step", lambda: training_step(agr_loop, True),
             "AGROptimizer(SGD, fused=False): zero_grad() + stash_clean() + step()"),
        Case("reconstruct_fused",
             lambda: _timed(device, lambda: F.reconstruct(a_list, c_list, clip_norm=CLIP_NORM, fused=True)),
             "functional.reconstruct(fused=True), new tensors"),
        Case("reconstruct_loop",
             lambda: _timed(device, lambda: F.reconstruct(a_list, c_list, clip_norm=CLIP_NORM, fused=False)),
             "functional.reconstruct(fused=False), new tensors"),
        Case("per_layer_reference",
             lambda: _timed(device, lambda: per_layer_reconstruct(a_list, c_list, CLIP_NORM)),
             "per layer like the paper's code: .item() cosine, new tensors per layer"),
        Case("paper_script_reference",
             lambda: _timed(device, lambda: paper_script_reconstruct(a_list, c_list, CLIP_NORM)),
             "the same plus the script's torch.cat flattening and per-layer logging"),
    ]
    if compiled:
        cases += _compiled_cases(work, info, training_step)
    if peers:
        cases += _peer_cases(work, info, training_step)
    return cases, info


def _compiled_cases(work: Workload, info: dict, training_step: Callable) -> list[Case]:
    device = work.device
    a_work = [a.clone() for a in work.w_adv]
    c_list = work.w_clean

    def run() -> float:
        for a, src in zip(a_work, work.w_adv, strict=True):  # fresh input, untimed
            a.copy_(src)
        return _timed(device, lambda: F.reconstruct_(a_work, c_list, clip_norm=CLIP_NORM, fused="compile"))

    agr_compiled = AGROptimizer(work.sgd(), clip_norm=CLIP_NORM, fused="compile")
    try:
        info["compile_s"] = run()  # the first call compiles
        run()
        info["compile_optimizer_s"] = training_step(agr_compiled, True)  # the wrapper's kernel compiles
    except Exception as error:  # a missing C++ compiler, an unsupported platform
        info["compile_error"] = f"{type(error).__name__}: {error}"[:300]
        return []
    fused_inplace = [a.clone() for a in work.w_adv]

    def run_eager() -> float:
        for a, src in zip(fused_inplace, work.w_adv, strict=True):
            a.copy_(src)
        return _timed(device, lambda: F.reconstruct_(fused_inplace, c_list, clip_norm=CLIP_NORM, fused=True))

    return [
        Case("reconstruct_inplace_fused", run_eager, "functional.reconstruct_(fused=True), in place (eager)"),
        Case("reconstruct_inplace_compiled", run, 'functional.reconstruct_(fused="compile"), in place'),
        Case("agr_compiled_step", lambda: training_step(agr_compiled, True),
             'AGROptimizer(SGD, fused="compile"): zero_grad() + stash_clean() + step()'),
    ]


def _peer_cases(work: Workload, info: dict, training_step: Callable) -> list[Case]:
    device = work.device
    cases: list[Case] = []
    try:
        from pytorch_optimizer import PCGrad as PCGradOptimizer
        from pytorch_optimizer.optimizer.pcgrad import flatten_grad, un_flatten_grad
    except ImportError as error:
        info["peers"]["pytorch_optimizer"] = f"skipped: {error}"
    else:
        info["peers"]["pytorch_optimizer"] = "installed"
        pcgrad = PCGradOptimizer(work.sgd(), reduction="mean")

        def pcgrad_step() -> float:
            # pc_backward() with its two backward passes replaced by ours (untimed).
            grads, shapes, has_grads = [], [], []
            t = 0.0
            for weights in (work.w_clean, work.w_adv):
                t += _timed(device, lambda: pcgrad.zero_grad(set_to_none=True))
                work.backward(weights)
                start = time.perf_counter()
                grad, shape, has_grad = pcgrad.retrieve_grad()
                grads.append(flatten_grad(grad))
                has_grads.append(flatten_grad(has_grad))
                shapes.append(shape)
                _sync(device)
                t += time.perf_counter() - start

            def project() -> None:
                merged = pcgrad.project_conflicting(grads, has_grads)
                pcgrad.set_grad(un_flatten_grad(merged, shapes[0]),
                                un_flatten_grad(torch.stack(has_grads).sum(dim=0), shapes[0]))
                pcgrad.step()

            return t + _timed(device, project)

        cases.append(Case("pytorch_optimizer_pcgrad_step", pcgrad_step,
                          "pytorch-optimizer PCGrad: pc_backward() minus its backward passes, + step()"))
    try:
        from torchjd.aggregation import PCGrad as PCGradAggregator
    except ImportError as error:
        info["peers"]["torchjd"] = f"skipped: {error}"
    else:
        info["peers"]["torchjd"] = "installed"
        aggregator = PCGradAggregator()
        matrix = torch.stack([torch.cat([g.reshape(-1) for g in work.w_adv]),
                              torch.cat([g.reshape(-1) for g in work.w_clean])])
        cases.append(Case("torchjd_pcgrad_aggregate", lambda: _timed(device, lambda: aggregator(matrix)),
                          "TorchJD PCGrad aggregator on a prebuilt 2 x N matrix (aggregation only)"))
    return cases


def count_ops(name: str) -> dict:
    """``ops_per_step`` of one model (see the module docstring), counted on CPU."""
    shapes = parameter_shapes(name)
    device = _step_ops.count_step(shapes, fused="device")
    host = _step_ops.count_step(shapes, fused=True)
    # Kernels and syncs depend on the tensors, not their sizes: the other granularities are
    # counted on the narrow twin, in two param groups ("group" has two segments).
    by_granularity = {}
    for granularity in GRANULARITIES:
        own = _step_ops.count_step(narrow_shapes(name), fused="device", granularity=granularity, groups=2)["agr_own"]
        by_granularity[granularity] = {"kernels": own["kernels"], "syncs": own["syncs"]}
    return {
        "counted_on": "cpu",
        "note": "one iteration: zero_grad() + stash_clean() + step() for AGR, zero_grad() + step() for SGD; "
                "agr_own = AGR's iteration less SGD's; one param group, granularity 'tensor'",
        "param_bytes": 4 * sum(math.prod(s) for s in shapes),
        "sgd_foreach_step": device["sgd_step"],
        "agr_device_schedule": {"own": device["agr_own"], "iteration": device["agr_iteration"],
                                "own_by_name": device["agr_own_by_name"],
                                "by_granularity_narrow_twin_two_groups": by_granularity},
        "agr_host_schedule": {"own": host["agr_own"], "iteration": host["agr_iteration"],
                              "own_by_name": host["agr_own_by_name"]},
        "predicted_h200": _step_ops.prediction(device),
    }


def run_model(name: str, *, device: torch.device, repeats: int, warmup: int, peers: bool, compiled: bool,
              memory: bool, quick: bool = False, ops: bool = False, timing: bool = True) -> dict:
    """One model's rows (``timing=False``: none), memory rows and ``ops_per_step`` (CPU only)."""
    shapes = parameter_shapes(name)
    work = Workload(shapes, device)
    if timing:
        cases, info = build_cases(work, peers=peers, compiled=compiled)
    else:
        cases, info, repeats = [], {"peers": {}, "compile_s": None, "compile_optimizer_s": None}, 0
    for case in cases:
        for _ in range(warmup):
            case.run()
    for repeat in range(repeats):
        shift = repeat % len(cases)
        for case in cases[shift:] + cases[:shift]:
            case.times.append(case.run())
    by_name = {case.name: case for case in cases}
    rows = []

    floors = by_name["floor"].times if timing else []

    def add(name: str, times: list[float], note: str, kind: str = "time") -> None:
        # The ratio is the median of per-repeat ratios to the floor timed in the same repeat:
        # a burst of load on this shared machine slows the floor and the row alike.
        ratios = sorted(t / f for t, f in zip(times, floors, strict=True))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        rows.append({"name": name, "kind": kind, "ms": statistics.median(times) * 1e3,
                     "ratio_to_floor": statistics.median(ratios), "ratio_quartiles": [quartiles[0], quartiles[2]],
                     "samples": len(times), "note": note})

    for case in cases:
        add(case.name, case.times, case.note)
    plain = by_name["sgd_step"].times if timing else []
    overhead_rows = [("agr_fused_step", "agr_overhead_fused"), ("agr_loop_step", "agr_overhead_loop"),
                     ("agr_compiled_step", "agr_overhead_compiled"),
                     ("pytorch_optimizer_pcgrad_step", "pytorch_optimizer_pcgrad_overhead")]
    for source, target in overhead_rows:
        if source in by_name:
            differences = [t - p for t, p in zip(by_name[source].times, plain, strict=True)]
            add(target, differences, f"{source} minus sgd_step (paired per repeat)", kind="overhead")
    checks = _targets({row["name"]: row for row in rows})
    result = {
        "model": name,
        "description": MODELS[name][0],
        "device": str(device),
        "num_tensors": len(shapes),
        "num_elements": work.numel,
        "dtype": "float32",
        "repeats": repeats,
        "rows": rows,
        "targets": checks,
        "peers": info["peers"],
        "compile_s": info["compile_s"],
        "compile_optimizer_s": info["compile_optimizer_s"],
    }
    if "compile_error" in info:
        result["compile_error"] = info["compile_error"]
    del work, cases
    if memory and device.type == "cpu":
        variants = ("plain", "agr_fused", "agr_device") if quick else _memory.VARIANTS
        result["memory"] = _memory.measure(name, variants, steps=2)
    if ops and device.type == "cpu":
        result["ops_per_step"] = count_ops(name)
    return result


def _targets(rows: dict[str, dict]) -> dict[str, dict]:
    """The issue's targets, as measured ratios (reported, never asserted)."""
    targets: dict[str, dict] = {}

    def target(name: str, value: float | None, limit: float, better: str) -> None:
        if value is not None:
            met = value <= limit if better == "lower" else value >= limit
            targets[name] = {"value": value, "limit": limit, "better": better, "met": met}

    def ratio(name: str) -> float | None:
        return rows[name]["ratio_to_floor"] if name in rows else None

    overhead = ratio("agr_overhead_fused")
    if overhead is not None:
        target("agr_overhead_over_floor", overhead, 1.5, "lower")
        target("per_layer_reference_over_agr_overhead", ratio("per_layer_reference") / max(overhead, 1e-9), 3.0,
               "higher")
        target("paper_script_reference_over_agr_overhead", ratio("paper_script_reference") / max(overhead, 1e-9),
               3.0, "higher")
    if "reconstruct_loop" in rows:
        target("reconstruct_loop_over_fused", rows["reconstruct_loop"]["ms"] / rows["reconstruct_fused"]["ms"], 2.0,
               "higher")
    target("compiled_over_floor", ratio("reconstruct_inplace_compiled"), 1.25, "lower")
    target("agr_overhead_compiled_over_floor", ratio("agr_overhead_compiled"), 1.25, "lower")
    return targets


def format_table(result: dict) -> str:
    lines = [f"{result['description']}: {result['num_tensors']} tensors, {result['num_elements'] / 1e6:.2f}M "
             f"float32 elements, {result['device']}, " + (f"median of {result['repeats']} repeats" if result["repeats"]
                                                            else "no timed rows")]
    if result["rows"]:
        lines.append(f"  {'row':34s} {'ms':>9s} {'x floor':>8s}  {'(quartiles)':>13s}")
    for row in result["rows"]:
        low, high = row["ratio_quartiles"]
        lines.append(f"  {row['name']:34s} {row['ms']:9.2f} {row['ratio_to_floor']:8.2f}  ({low:5.2f}-{high:5.2f})")
    if result.get("compile_s") is not None:
        lines.append(f"  compile time (first call): functional {result['compile_s']:.1f} s, "
                     f"AGROptimizer step {result['compile_optimizer_s'] or float('nan'):.1f} s")
    for name, note in result["peers"].items():
        if note != "installed":
            lines.append(f"  peer {name}: {note}")
    for name, t in result["targets"].items():
        lines.append(f"  target {name}: {t['value']:.2f} ({'<=' if t['better'] == 'lower' else '>='} "
                     f"{t['limit']}) {'met' if t['met'] else 'MISSED'}")
    lines += format_ops(result.get("ops_per_step"))
    memory = result.get("memory")
    if memory:
        lines.append(f"  peak RSS, fresh processes, {memory['steps']} training steps at batch {memory['batch']} "
                     f"(parameters: {memory['param_bytes'] / 2**20:.1f} MiB):")
        for variant, row in memory["variants"].items():
            lines.append(f"    {variant:24s} peak {row['peak_rss_bytes'] / 2**20:8.1f} MiB, extra over plain "
                         f"{row['extra_over_plain_bytes'] / 2**20:7.1f} MiB = "
                         f"{row['extra_over_plain_ratio_to_params']:.2f} x parameters")
    return "\n".join(lines)


def _ops_line(label: str, figures: dict, cuda: bool = True) -> str:
    moved = (figures["bytes_read"] + figures["bytes_written"]) / 2**20
    launches = f" ({figures['launches']} CUDA launches)" if cuda else ""
    return (f"    {label:32s} {figures['kernels']:4d} kernels{launches}, {figures['views']:4d} views, "
            f"{figures['allocations']} allocations, {figures['syncs']:3d} host syncs, {moved:8.1f} MiB moved")


def format_ops(ops: dict | None) -> list[str]:
    """``ops_per_step`` in a few lines."""
    if not ops:
        return []
    predicted = ops["predicted_h200"]
    granularities = ", ".join(f"{g} {v['kernels']} kernels / {v['syncs']} syncs"
                              for g, v in ops["agr_device_schedule"]["by_granularity_narrow_twin_two_groups"].items())
    return [
        f"  dispatched per step (counted on {ops['counted_on']}; parameters {ops['param_bytes'] / 2**20:.1f} MiB):",
        _ops_line("SGD foreach step", ops["sgd_foreach_step"]),
        _ops_line("AGR own, accelerator schedule", ops["agr_device_schedule"]["own"]),
        _ops_line("AGR own, host schedule (CPU)", ops["agr_host_schedule"]["own"], cuda=False),
        f"    accelerator schedule by granularity: {granularities}",
        f"  predicted H200 (launches x {predicted['launch_s'] * 1e6:.0f} us + bytes / "
        f"{predicted['bandwidth_bytes_per_s'] / 1e12:.1f} TB/s): SGD step {predicted['sgd_step_s'] * 1e6:.0f} us, "
        f"AGR own {predicted['agr_own_s'] * 1e6:.0f} us = {predicted['agr_own_over_sgd_step']:.2f} x SGD "
        f"(target <= {predicted['target_agr_own_over_sgd_step']:g}); a prediction, not a measurement",
    ]


#: Rows of the docs' tables (docs/benchmarks.rst), in order, with their labels there.
RST_ROWS = [
    ("floor", "floor: ``dot`` + ``add(out=)``"),
    ("sgd_step", "plain SGD ``zero_grad()`` + ``step()``"),
    ("agr_overhead_fused", "**AGR fused overhead** (step minus SGD)"),
    ("agr_overhead_compiled", "**AGR compiled overhead**"),
    ("agr_overhead_loop", "AGR loop overhead"),
    ("reconstruct_fused", "``reconstruct(fused=True)``"),
    ("reconstruct_loop", "``reconstruct(fused=False)``"),
    ("reconstruct_inplace_fused", "``reconstruct_(fused=True)``"),
    ("reconstruct_inplace_compiled", '``reconstruct_(fused="compile")``'),
    ("per_layer_reference", "per-layer reference (lean)"),
    ("paper_script_reference", "per-layer reference (as the script)"),
    ("pytorch_optimizer_pcgrad_overhead", "pytorch-optimizer ``PCGrad`` overhead"),
    ("torchjd_pcgrad_aggregate", "TorchJD ``PCGrad`` aggregation only"),
    ("agr_fused_step", "AGR(SGD) fused, whole step"),
    ("agr_compiled_step", 'AGR(SGD) ``fused="compile"``, whole step'),
    ("agr_loop_step", "AGR(SGD) loop, whole step"),
    ("pytorch_optimizer_pcgrad_step", "pytorch-optimizer ``PCGrad``, whole step"),
]


def format_rst(result: dict) -> str:
    """The docs' list-tables for one model's result (``--rst``)."""
    rows = {row["name"]: row for row in result["rows"]}
    lines = [f"{result['description']}: {result['num_tensors']} tensors, {result['num_elements'] / 1e6:.2f}M "
             f"float32 elements, median of {result['repeats']} repeats.", "",
             ".. list-table::", "   :header-rows: 1", "   :widths: 50 12 12 16", "",
             "   * - row", "     - ms", "     - x floor", "     - quartiles"]
    for name, label in RST_ROWS:
        if name in rows:
            row = rows[name]
            low, high = row["ratio_quartiles"]
            lines += [f"   * - {label}", f"     - {row['ms']:.1f}", f"     - {row['ratio_to_floor']:.2f}",
                      f"     - {low:.2f}-{high:.2f}"]
    memory = result.get("memory")
    if memory:
        lines += ["", f"Peak RSS (fresh processes, {memory['steps']} training steps at batch {memory['batch']}; "
                  f"parameters {memory['param_bytes'] / 2**20:.1f} MiB):", "",
                  ".. list-table::", "   :header-rows: 1", "   :widths: 40 15 15 15", "",
                  "   * - variant", "     - peak MiB", "     - extra MiB", "     - extra / parameters"]
        for variant, row in memory["variants"].items():
            lines += [f"   * - {variant}", f"     - {row['peak_rss_bytes'] / 2**20:.0f}",
                      f"     - {row['extra_over_plain_bytes'] / 2**20:.1f}",
                      f"     - {row['extra_over_plain_ratio_to_params']:.2f}"]
    if result.get("compile_s") is not None:
        lines += ["", f"First compile of the ``\"compile\"`` path: {result['compile_s']:.1f} s."]
    ops = result.get("ops_per_step")
    if ops:
        lines += ["", f"Dispatched per optimizer iteration (counted on {ops['counted_on']}; parameters "
                  f"{ops['param_bytes'] / 2**20:.1f} MiB; AGR's own beyond the SGD step):", "",
                  ".. list-table::", "   :header-rows: 1", "   :widths: 40 12 12 12 12 12", "",
                  "   * - ", "     - kernels", "     - CUDA launches", "     - views", "     - host syncs",
                  "     - MiB moved"]
        for label, figures in (("SGD foreach step", ops["sgd_foreach_step"]),
                               ("AGR, accelerator schedule", ops["agr_device_schedule"]["own"]),
                               ("AGR, host schedule (CPU only)", ops["agr_host_schedule"]["own"])):
            moved = (figures["bytes_read"] + figures["bytes_written"]) / 2**20
            launches = "n/a" if "host" in label else figures["launches"]
            lines += [f"   * - {label}", f"     - {figures['kernels']}", f"     - {launches}",
                      f"     - {figures['views']}", f"     - {figures['syncs']}", f"     - {moved:.0f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="AGR reconstruction benchmarks (see docs/benchmarks.rst)")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke test)")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--repeats", type=int, help="timed repeats per row (default 25, quick 3)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="model shape sets to run")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS measurement")
    parser.add_argument("--no-peers", action="store_true", help="skip pytorch-optimizer and TorchJD")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled path")
    parser.add_argument("--no-ops", action="store_true", help="skip counting the dispatched operations per step")
    parser.add_argument("--no-timing", action="store_true", help="no timed rows: the memory rows and the counts only")
    parser.add_argument("--rst", metavar="JSON", help="print the docs' tables of a saved run, and run nothing")
    args = parser.parse_args(argv)
    if args.rst:
        with open(args.rst) as f:
            report = json.load(f)
        print("\n\n".join(format_rst(result) for result in report["results"]))
        return report
    if not args.no_compile and not args.quick and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # A fresh inductor cache: the compile time reported is a first compile, not a cache hit.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="agr_bench_inductor_")
    models = args.models or (["preactresnet18_w16"] if args.quick else ["preactresnet18", "wideresnet34_10"])
    repeats = args.repeats or (3 if args.quick else 25)
    cuda = torch.cuda.is_available() and not args.no_timing  # (the counts and the memory rows are CPU's)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    results = []
    for device in devices:
        for name in models:
            result = run_model(name, device=device, repeats=repeats, warmup=1 if args.quick else 3,
                               peers=not args.no_peers, compiled=not args.no_compile and not args.quick,
                               memory=not args.no_memory, quick=args.quick,
                               ops=not args.no_ops and device.type == "cpu", timing=not args.no_timing)
            print(format_table(result), flush=True)
            results.append(result)
    report = {
        "schema_version": SCHEMA_VERSION,
        "quick": args.quick,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
