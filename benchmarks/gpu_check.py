"""Every figure that needs a GPU, in one command of under 5 minutes: ``python -m benchmarks.gpu_check --out DIR``.

A CUDA machine is lent to this project only now and then, for a few minutes that include its
start, so the check must run right the first time and fit: a global budget (``--budget``,
default 270 s) and a time cap per section (``SECTIONS``). Each section runs in its own process
(a CUDA error, a hung compile or a sync-debug mode left on cannot reach the next), saves what it
has measured as it goes, and is killed at its cap; an error, a failed check or a timeout costs
that section only. Sections, in the order they run:

- ``syncs``: host synchronisations per optimizer call at every granularity, for ``fused=True``
  (the accelerator schedule on a GPU), ``"device"`` and ``False``: counted by
  ``torch.cuda.set_sync_debug_mode("warn")`` around steady-state iterations, and by
  :class:`~benchmarks._ops.OpCounter` (the dispatched operations that read back to the host).
- ``memory``: the extra peak GPU memory of AGR's training steps over plain SGD's, in parameter
  bytes (``torch.cuda.max_memory_allocated``; the issue's target is at most 1.25).
- ``cuda_tests``: ``pytest -m cuda`` (``tests/test_cuda.py``: every implementation against
  float64 on the GPU, no host sync, GradScaler, ...); its exit code and ``-q`` summary line.
- ``step_cost``: the optimizer step on PreActResNet-18 and WideResNet-34-10 shapes, eager and
  ``fused="compile"``: AGR's iteration (``zero_grad()`` + ``stash_clean()`` + ``step()``) over the
  SGD foreach step's (``zero_grad()`` + ``step()``) and over the floor (``dot`` + ``add`` of the
  flat gradients), timed with CUDA events after a warm-up, medians of paired ratios; the H200
  prediction from the operations counted on the device beside it.
- ``epoch_cost``: an AGR-AT epoch over a PGD-AT epoch (``benchmarks.train_cost``) on
  PreActResNet-18, batch 128, PGD-10, fp32 and bf16, on a synthetic 32x32 ``.npz`` written here.
- ``agr_train``: one short ``python -m agr_optim.train`` run on that ``.npz``; its
  ``summary.json`` read by key names.

It writes ``DIR/gpu_check.json`` (one document: the environment, then every section's status,
seconds, limit, ``figures`` and ``problems`` or ``error``; ``figures`` at the top level gathers
every section's), ``DIR/summary.txt`` (also printed) and each section's files (``DIR/sections``,
the pytest log, the train_cost JSONs, the training run's folder). Without CUDA it says so and
runs its CPU parts at tiny sizes (``tests/test_gpu_check.py`` runs it so in CI); none of that is a
GPU result. See docs/benchmarks.rst.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata, util
from pathlib import Path
from typing import Any

import torch
from torch import nn

SCHEMA_VERSION = 2
ROOT = Path(__file__).resolve().parents[1]
STATUSES = ("ok", "failed", "error", "timeout", "skipped")
BUDGET_S = 270.0  # the whole run, imports and compiles included: under 5 minutes with a margin

#: Sections in running order, with their caps in seconds. The expected times on an H200 are
#: about half the caps (syncs 15 s, memory 15 s, the CUDA tests 45 s, the step costs 70 s with
#: two compilations, the epochs 40 s, the training run 20 s); the budget, not the caps' sum,
#: bounds the run: each section gets at most what the budget can spare after keeping
#: ``_RESERVE_S`` for every later one.
SECTIONS: dict[str, float] = {
    "syncs": 45.0,
    "memory": 40.0,
    "cuda_tests": 90.0,
    "step_cost": 110.0,
    "epoch_cost": 90.0,
    "agr_train": 45.0,
}
_RESERVE_S = 12.0
_MIN_S = 8.0  # a section given less is not started (a fresh interpreter needs a few seconds)
_FINAL_S = 5.0  # kept for writing the report
_MARGIN_S = 4.0  # a section's process plans with its limit less this (writing its result)

CLIP_NORM = 0.1
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
GRANULARITIES = ("tensor", "group", "global")
EXTRA_MEMORY_TARGET = 1.25  # extra peak memory over plain SGD, in parameter bytes (issue 17)
COMPILE_TOL = 1e-5  # the compiled reconstruction against the eager one (float32 sums, reordered)


# ---------------------------------------------------------------------------------- utilities
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_json(path: Path, data: Any) -> None:
    """Atomically: a killed process leaves the last complete document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _error_text(error: BaseException, limit: int = 2000) -> str:
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))[-limit:]


def _child_env() -> dict[str, str]:
    """The working tree first on the path: the check runs from a checkout, installed or not."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def run_command(command: list[str], timeout: float, log: Path | None = None, own_group: bool = False
                ) -> dict[str, Any]:
    """Run ``command`` in the repository root, killed at ``timeout``; output to ``log`` as it
    comes (kept if killed), else captured. ``own_group`` (the driver's sections): in a process
    group of its own, killed whole; the commands a section runs stay in the section's group, so
    that killing the section kills them too."""
    start = time.monotonic()
    sink = open(log, "w") if log is not None else subprocess.PIPE  # noqa: SIM115 (closed below)
    try:
        process = subprocess.Popen(command, cwd=ROOT, env=_child_env(), stdout=sink, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=own_group)
        try:
            output, _ = process.communicate(timeout=max(timeout, 1.0))
            timed_out = False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                if own_group:
                    os.killpg(process.pid, signal.SIGKILL)
                else:
                    process.kill()
            output, _ = process.communicate()
            timed_out = True
    finally:
        if log is not None:
            sink.close()  # type: ignore[union-attr]
    if log is not None:
        output = log.read_text(errors="replace")
    return {"returncode": process.returncode, "timed_out": timed_out, "seconds": time.monotonic() - start,
            "output": output or ""}


def _median_ratio(top: list[float], bottom: list[float]) -> float:
    return statistics.median(t / b for t, b in zip(top, bottom, strict=True))


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return [q[0], q[2]]


# ------------------------------------------------------------------------------ the sections
@dataclass
class Section:
    """What a section's process knows: where to write, the device, its deadline, and the result
    it fills (``figures``, ``problems``, details), saved by :meth:`save` as it goes."""

    name: str
    out: Path
    device: torch.device
    deadline: float
    result: dict[str, Any] = field(default_factory=lambda: {"figures": {}, "problems": []})

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def path(self) -> Path:
        return self.out / "sections" / f"{self.name}.json"

    def save(self) -> None:
        """The result so far, marked partial: what the parent reads if this process is killed."""
        write_json(self.path, {**self.result, "status": "timeout", "partial": True})

    def finish(self) -> str:
        """The status: the one the section set (skipped, timeout), else failed with problems, else ok."""
        self.result.setdefault("status", "failed" if self.result["problems"] else "ok")
        return self.result["status"]


class _Stopwatch:
    """The seconds of the timed parts of one repeat. On CUDA: events on the device's clock,
    the queue drained before the repeat, so a span is what the host waits for, launches
    included; elsewhere ``perf_counter``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.spans: list[Any] = []

    def begin(self) -> None:
        self.spans = []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.spans.append((start, end))
        else:
            began = time.perf_counter()
            yield
            self.spans.append(time.perf_counter() - began)

    def end(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return sum(start.elapsed_time(end) for start, end in self.spans) / 1e3
        return float(sum(self.spans))


@contextlib.contextmanager
def _sync_warnings(device: torch.device, found: Counter[str], key: str) -> Iterator[None]:
    """Count the host synchronisations of the block (CUDA's sync debug mode, "warn")."""
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)
    found[key] += sum("synchroniz" in str(w.message).lower() for w in caught)


# ----------------------------------------------------------------------- section: syncs
class _SyncNet(nn.Module):
    """Channels-last convolutions with BatchNorm and a 1M-element linear layer: the layouts and
    sizes of a real model's gradients in ten tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


STEADY_STEPS = 3


def sync_counts(device: torch.device, fused: bool | str, granularity: str) -> dict[str, Any]:
    """Host syncs per optimizer call of AGR(SGD) steps after two warm-up steps: under CUDA's
    sync debug mode (CUDA only) and as dispatched operations (:data:`~benchmarks._ops.SYNCING`)."""
    from agr_optim import AGROptimizer

    from ._ops import SYNCING, OpCounter

    torch.manual_seed(0)
    model = _SyncNet().to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    groups = [{"params": list(model.features.parameters())}, {"params": list(model.head.parameters())}]
    sgd = torch.optim.SGD(groups, lr=0.05, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=True)
    opt = AGROptimizer(sgd, clip_norm=CLIP_NORM, granularity=granularity, fused=fused)
    x = torch.rand(8, 3, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    y = torch.randint(0, 10, (8,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def iteration(around: Callable[[str], contextlib.AbstractContextManager[Any]]) -> None:
        with around("zero_grad"):
            opt.zero_grad()
        loss_fn(model(x), y).backward()
        with around("stash_clean"):
            opt.stash_clean()
        loss_fn(model(x_adv), y).backward()
        with around("step"):
            opt.step()

    for _ in range(2):  # momentum buffers, the rows' layout and its index tensors
        iteration(lambda name: contextlib.nullcontext())
    result: dict[str, Any] = {"fused": fused, "granularity": granularity}
    if device.type == "cuda":
        found: Counter[str] = Counter()
        for _ in range(STEADY_STEPS):
            iteration(lambda name: _sync_warnings(device, found, name))
        result["sync_debug_per_call"] = {name: found[name] / STEADY_STEPS for name in ("zero_grad", "stash_clean",
                                                                                      "step")}
        result["sync_debug_per_step"] = sum(found.values()) / STEADY_STEPS
    counter = OpCounter()
    iteration(lambda name: counter)
    result["dispatched_syncs_per_step"] = counter.syncs
    result["dispatched_sync_ops"] = {name: n for name, n in counter.names.items() if name in SYNCING}
    result["kernels_per_step"] = counter.kernels
    result["step_count"] = opt.step_count
    return result


def section_syncs(s: Section) -> None:
    """Every granularity, ``fused`` True / "device" / False on CUDA, where the accelerator
    schedule (True and "device") must make none (the loop's are recorded); on a CPU "device"
    alone, which must dispatch none."""
    s.result["runs"] = []
    # On a CPU only the accelerator schedule forced: the others' host reads are free there.
    for fused in (True, "device", False) if s.cuda else ("device",):
        for granularity in GRANULARITIES:
            run = sync_counts(s.device, fused, granularity)
            s.result["runs"].append(run)
            key = {True: "fused_true", "device": "fused_device", False: "fused_false"}[fused]
            s.result["figures"].setdefault(key, {})[granularity] = {
                "sync_debug_per_step": run.get("sync_debug_per_step"),
                "dispatched_syncs_per_step": run["dispatched_syncs_per_step"]}
            if fused is not False and (run.get("sync_debug_per_step") or run["dispatched_syncs_per_step"]):
                s.result["problems"].append(f"fused={fused!r}, granularity={granularity}: host syncs per step "
                                            f"{run.get('sync_debug_per_step')} (sync debug), "
                                            f"{run['dispatched_sync_ops']} (dispatched)")
            s.save()
    if not s.cuda:
        s.result["note"] = "no CUDA: dispatched syncs only (CUDA's sync debug mode needs a GPU)"


# ----------------------------------------------------------------------- section: memory
def section_memory(s: Section) -> None:
    """Peak allocated GPU memory of three training steps (``benchmarks/_memory.py``'s loop at
    batch 2), plain SGD and AGR(SGD) (the accelerator schedule), each from an empty cache."""
    if not s.cuda:
        s.result.update(status="skipped", reason="no CUDA: the CPU's peak RSS is measured by python -m "
                        "benchmarks.reconstruct (its memory rows, agr_device among them)")
        return
    import gc

    from . import _memory

    for model in ("preactresnet18", "wideresnet34_10"):
        peaks = {}
        for variant in ("plain", "agr_fused"):
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.synchronize(s.device)
            base = torch.cuda.memory_allocated(s.device)
            torch.cuda.reset_peak_memory_stats(s.device)
            row = _memory._train(model, variant, steps=3, batch=2, device=str(s.device))
            torch.cuda.synchronize(s.device)
            peaks[variant] = torch.cuda.max_memory_allocated(s.device) - base
        extra = (peaks["agr_fused"] - peaks["plain"]) / row["param_bytes"]
        s.result["figures"][model] = {"param_bytes": row["param_bytes"], "plain_peak_bytes": peaks["plain"],
                                      "agr_peak_bytes": peaks["agr_fused"], "extra_peak_over_param_bytes": extra,
                                      "target": EXTRA_MEMORY_TARGET, "met": extra <= EXTRA_MEMORY_TARGET}
        if extra > EXTRA_MEMORY_TARGET:
            s.result["problems"].append(f"{model}: AGR's extra peak memory is {extra:.2f} x the parameters "
                                        f"(target <= {EXTRA_MEMORY_TARGET})")
        s.save()


# ---------------------------------------------------------------------- section: CUDA tests
_SUMMARY_LINE = re.compile(r"\b(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)\b")


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's final summary line (``5 passed, 2 skipped in 3.1s``)."""
    for line in reversed(output.splitlines()):
        if re.search(r"\bin [\d.]+s\b", line) and _SUMMARY_LINE.search(line):
            counts: dict[str, int] = {}
            for number, word in _SUMMARY_LINE.findall(line):
                word = {"error": "errors", "warning": "warnings"}.get(word, word)
                counts[word] = int(number)
            return counts
    return {}


def section_cuda_tests(s: Section) -> None:
    """``pytest -m cuda`` over the test suite (on a CPU over tests/test_cuda.py only: the same
    selection, every test skipped, without collecting the whole suite)."""
    log = s.out / "cuda_tests.txt"
    paths = ["tests"] if s.cuda else ["tests/test_cuda.py"]
    command = [sys.executable, "-m", "pytest", *paths, "-m", "cuda", "-v", "-p", "no:cacheprovider",
               "--continue-on-collection-errors"]
    s.result["command"] = "python " + " ".join(command[1:])
    done = run_command(command, timeout=s.left() - _MARGIN_S, log=log)
    output = done["output"]
    counts = pytest_counts(output)
    # Test modules that do not import here (a package the lent machine lacks): listed, and a
    # failure only if one of them is test_cuda.py; the CUDA tests of the others still ran.
    uncollected = sorted(set(re.findall(r"ERROR collecting (\S+)", output)))
    errors = counts.get("errors", 0) - len(uncollected)
    s.result.update(returncode=done["returncode"], log=log.name, counts=counts, uncollected_modules=uncollected,
                    not_passed=[line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))][:30])
    s.result["figures"] = {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
                           "errors": errors, "skipped": counts.get("skipped", 0)}
    if done["timed_out"]:
        s.result.update(status="timeout", reason="pytest ran past the section's limit (see the log)")
    elif done["returncode"] not in (0, 1) or not counts:
        s.result["problems"].append(f"pytest exited with {done['returncode']}: {output[-600:]}")
    elif counts.get("failed") or errors > 0 or any(m.endswith("test_cuda.py") for m in uncollected):
        s.result["problems"].append(f"{counts.get('failed', 0)} failed, {errors} errors"
                                    + (f"; not imported: {', '.join(uncollected)}" if uncollected else ""))
    elif not s.cuda:
        s.result.update(status="skipped", reason=f"no CUDA: {counts.get('skipped', 0)} CUDA tests skipped")
    elif not counts.get("passed"):
        s.result["problems"].append("no CUDA test passed on a CUDA machine")


# ----------------------------------------------------------------------- section: step cost
class _StepBench:
    """One model's gradients, a plain foreach SGD and AGR(SGD) optimizers on their own
    parameters, and the floor's flat buffers; each ``time_*`` runs one timed repeat."""

    def __init__(self, shapes: list[tuple[int, ...]], device: torch.device) -> None:
        from ._step_ops import _gradients

        self.device, self.shapes = device, shapes
        self.adversarial, self.clean = _gradients(shapes, device, seed=0)
        n = sum(math.prod(s) for s in shapes)
        self.flat = [torch.randn(n, device=device) for _ in range(3)]
        self.watch = _Stopwatch(device)
        self.plain_params, self.plain = self._sgd()
        self.agr: dict[str, tuple[list[torch.Tensor], Any]] = {}

    def _sgd(self) -> tuple[list[torch.Tensor], torch.optim.SGD]:
        params = [(0.1 * torch.randn(s)).to(self.device).requires_grad_() for s in self.shapes]
        return params, torch.optim.SGD(params, lr=1e-3, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=True)

    def add_agr(self, name: str, fused: bool | str) -> None:
        from agr_optim import AGROptimizer

        params, sgd = self._sgd()
        self.agr[name] = (params, AGROptimizer(sgd, clip_norm=CLIP_NORM, fused=fused))

    def time_floor(self) -> float:
        x, y, z = self.flat
        self.watch.begin()
        with self.watch.timed():
            torch.dot(x, y)
            torch.add(x, y, out=z)
        return self.watch.end()

    def time_sgd(self) -> float:
        grads = [g.clone() for g in self.adversarial]
        self.watch.begin()
        with self.watch.timed():
            self.plain.zero_grad()
        for p, g in zip(self.plain_params, grads, strict=True):
            p.grad = g
        with self.watch.timed():
            self.plain.step()
        return self.watch.end()

    def time_agr(self, name: str) -> float:
        self.watch.begin()
        self.agr_iteration(name, self.watch.timed)
        return self.watch.end()

    def agr_iteration(self, name: str, around: Callable[[], contextlib.AbstractContextManager[Any]]) -> None:
        """``zero_grad()``, the clean gradients set, ``stash_clean()``, the adversarial ones set,
        ``step()``: the optimizer's calls each inside ``around()``; fresh gradients (clones)
        made before the first."""
        params, opt = self.agr[name]
        clean, adversarial = [g.clone() for g in self.clean], [g.clone() for g in self.adversarial]
        with around():
            opt.zero_grad()
        for p, g in zip(params, clean, strict=True):
            p.grad = g
        with around():
            opt.stash_clean()
        for p, g in zip(params, adversarial, strict=True):
            p.grad = g
        with around():
            opt.step()

    def measure(self, paths: list[str], repeats: int, warmup: int) -> dict[str, Any]:
        """Interleaved repeats (the order rotated) of the floor, SGD and each AGR path; medians
        and the medians of per-repeat ratios."""
        rows: dict[str, Callable[[], float]] = {"floor": self.time_floor, "sgd": self.time_sgd}
        for path in paths:
            rows[path] = functools.partial(self.time_agr, path)
        names = list(rows)
        for name in names:
            for _ in range(warmup):
                rows[name]()
        times: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(rows[name]())
        floor, sgd = times["floor"], times["sgd"]
        figures: dict[str, Any] = {"floor_ms": statistics.median(floor) * 1e3,
                                   "sgd_step_ms": statistics.median(sgd) * 1e3, "repeats": repeats}
        for path in paths:
            agr = times[path]
            own = [a - b for a, b in zip(agr, sgd, strict=True)]
            figures[path] = {
                "agr_iteration_ms": statistics.median(agr) * 1e3,
                "agr_iteration_over_sgd_step": _median_ratio(agr, sgd),
                "agr_own_over_sgd_step": _median_ratio(own, sgd),
                "agr_own_over_sgd_step_quartiles": _quartiles([o / b for o, b in zip(own, sgd, strict=True)]),
                "agr_iteration_over_floor": _median_ratio(agr, floor),
                "agr_own_over_floor": _median_ratio(own, floor),
            }
        return figures

    def syncs(self, name: str) -> float | None:
        """Host syncs of one steady-state AGR iteration (CUDA's sync debug mode)."""
        if self.device.type != "cuda":
            return None
        found: Counter[str] = Counter()
        self.agr_iteration(name, lambda: _sync_warnings(self.device, found, "all"))
        return float(found["all"])

    def compiled_agrees(self) -> float:
        """The compiled reconstruction against the eager one on the same gradients: the largest
        relative difference over tensors (normwise)."""
        from agr_optim import functional

        results = {}
        for fused in (True, "compile"):
            a = [g.clone() for g in self.adversarial]
            functional.reconstruct_(a, self.clean, clip_norm=CLIP_NORM, fused=fused)
            results[fused] = a
        return max(float((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-300))
                   for x, y in zip(results["compile"], results[True], strict=True))


def section_step_cost(s: Section) -> None:
    """Eager on every model first (the figures that matter most), then the compiled path
    where time is left; the operations counted on the device and the H200 prediction beside."""
    from . import _step_ops
    from ._shapes import parameter_shapes

    models = ["preactresnet18", "wideresnet34_10"] if s.cuda else ["preactresnet18_w16"]
    repeats, warmup = (30, 5) if s.cuda else (5, 1)
    s.result.update(clock="CUDA events, the queue drained before each repeat" if s.cuda else "perf_counter",
                    definitions={"agr_iteration": "AGROptimizer(SGD): zero_grad() + stash_clean() + step()",
                                 "sgd_step": "foreach SGD (momentum 0.9, weight decay 5e-4): zero_grad() + step()",
                                 "agr_own": "agr_iteration - sgd_step, per repeat",
                                 "floor": "torch.dot(x, y) + torch.add(x, y, out=z) on the flat N elements"})
    benches = {}
    for model in models:
        shapes = parameter_shapes(model)
        bench = benches[model] = _StepBench(shapes, s.device)
        bench.add_agr("eager", True)
        figures = s.result["figures"][model] = bench.measure(["eager"], repeats, warmup)
        figures["eager"]["syncs_per_iteration"] = bench.syncs("eager")
        # Counted where it ran: on a CPU the accelerator schedule forced (fused=True is the host one there).
        counted = _step_ops.count_step(shapes, fused=True if s.cuda else "device", device=s.device)
        figures["counted"] = {"sgd_step": counted["sgd_step"], "agr_own": counted["agr_own"]}
        figures["predicted_h200"] = _step_ops.prediction(counted)
        s.save()
    if not s.cuda:
        s.result["compile"] = "not run: no CUDA (compiling on a CPU takes longer than this check's CPU mode)"
        return
    if util.find_spec("triton") is None:
        s.result["problems"].append("fused='compile' not run: triton is not installed")
        return
    needs = 60.0  # the first compilation, with a margin
    for model in models:
        if s.left() < needs:
            s.result["figures"][model]["compile"] = f"not run: {s.left():.0f} s left, compiling needs ~{needs:.0f} s"
            continue
        bench = benches[model]
        try:
            bench.add_agr("compile", "compile")
            started = time.monotonic()
            bench.time_agr("compile")  # compiles
            compile_s = time.monotonic() - started
            figures = bench.measure(["compile"], repeats, warmup)
            figures["compile"].update(compile_s=compile_s, syncs_per_iteration=bench.syncs("compile"))
            s.result["figures"][model]["compile"] = figures["compile"]
            s.result["figures"][model]["compile_paired"] = {k: figures[k] for k in ("floor_ms", "sgd_step_ms")}
            s.save()
            difference = figures["compile"]["max_relative_difference_to_eager"] = bench.compiled_agrees()
        except Exception as error:  # no C compiler, an inductor failure: this path only
            s.result["figures"][model]["compile_error"] = _error_text(error, 800)
            s.result["problems"].append(f"{model}: fused='compile' failed: {str(error).splitlines()[0][:200]}")
            break
        if not difference <= COMPILE_TOL:
            s.result["problems"].append(f"{model}: the compiled reconstruction differs from the eager one by "
                                        f"{difference:.2e} (tolerance {COMPILE_TOL:g})")
        needs = 1.5 * compile_s + 15.0
        s.save()


# ----------------------------------------------------------------------- section: epoch cost
def write_synthetic_npz(path: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Random uint8 32x32 RGB images with balanced labels of 10 classes (every class present)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays: dict[str, Any] = {"num_classes": np.int64(10)}
    for split, n in (("train", n_train), ("test", n_test)):
        arrays[f"x_{split}"] = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        arrays[f"y_{split}"] = rng.permutation(np.arange(n) % 10).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def _synthetic(s: Section) -> Path:
    path = s.out / "synthetic32.npz"
    if not path.exists():
        n_train, n_test = (1024, 256) if s.cuda else (32, 16)
        write_synthetic_npz(path, n_train, n_test)
    return path


def section_epoch_cost(s: Section) -> None:
    """``benchmarks.train_cost`` on PreActResNet-18, batch 128, PGD-10, fp32 then bf16: 8
    batches per epoch, 3 repeats of every arm after a warm-up epoch. On a CPU: SmallCNN,
    batch 8, PGD-1, one batch, fp32 only (bf16 autocast is CUDA's in agr-train)."""
    data = _synthetic(s)
    if s.cuda:
        settings = ["--model", "preactresnet18", "--batch-size", "128", "--attack-steps", "10", "--max-batches", "8",
                    "--repeats", "3", "--device", str(s.device)]
        amps = ["none", "bf16"]
    else:
        settings = ["--model", "smallcnn", "--batch-size", "8", "--attack-steps", "1", "--max-batches", "1",
                    "--repeats", "1", "--device", "cpu"]
        amps = ["none"]
        s.result["note"] = "no CUDA: SmallCNN at tiny sizes on the CPU (the plumbing, not a GPU figure)"
    s.result["arms"] = {"agr": "AGR-AT", "plain": "PGD-AT (the 'AT epoch')",
                        "floor": "PGD-AT plus the clean backward pass, its gradient discarded"}
    for index, amp in enumerate(amps):
        label = "fp32" if amp == "none" else amp
        out = s.out / f"epoch_cost_{label}.json"
        command = [sys.executable, "-m", "benchmarks.train_cost", "--dataset", "npz", "--data-dir", str(data),
                   "--eps", "0.0314", *settings, "--amp", amp, "--out", str(out)]
        # An equal share of what is left for each run still to come.
        done = run_command(command, timeout=(s.left() - _MARGIN_S) / (len(amps) - index))
        if done["timed_out"] or done["returncode"] != 0 or not out.exists():
            what = "ran past its share of the limit" if done["timed_out"] else f"exited with {done['returncode']}"
            s.result["figures"][label] = {"error": f"train_cost {what}: {done['output'][-800:]}"}
            s.result["problems"].append(f"{label}: train_cost {what}")
            s.save()
            continue
        report = json.loads(out.read_text())
        ratios = report["paired_ratio_quartiles"]
        s.result["figures"][label] = {
            "agr_at_epoch_over_at_epoch": ratios["agr/plain"][1],
            "agr_at_epoch_over_at_epoch_quartiles": [ratios["agr/plain"][0], ratios["agr/plain"][2]],
            "agr_at_epoch_over_floor_epoch": ratios["agr/floor"][1],
            "floor_epoch_over_at_epoch": ratios["floor/plain"][1],
            "seconds_per_epoch_median": report["seconds_per_epoch_median"],
            "steps_per_epoch": report["setup"]["steps_per_epoch"],
            "command": "python " + " ".join(command[1:]),
        }
        s.save()


# ----------------------------------------------------------------------- section: agr-train
#: What the section reads from the run's summary.json, by name.
SUMMARY_KEYS = ("complete", "epochs_done", "seconds_per_epoch", "final")
FINAL_KEYS = ("train_loss", "train_robust_acc", "test_robust_acc", "agr_active", "agr_cosine")


def section_agr_train(s: Section) -> None:
    """One epoch of ``python -m agr_optim.train`` with AGR from the first step (flags that exist
    since issue 14), then its summary.json by key names."""
    data = _synthetic(s)
    folder = s.out / "agr_train"
    if folder.exists():
        shutil.rmtree(folder)  # (ours: a rerun into the same --out)
    sizes = ["--batch-size", "128", "--attack-steps", "10", "--eval-steps", "2"] if s.cuda else \
        ["--batch-size", "16", "--attack-steps", "1", "--eval-steps", "1"]
    command = [sys.executable, "-m", "agr_optim.train", "--preset", "quick", "--dataset", "npz", "--data-dir",
               str(data), "--model", "smallcnn", "--epochs", "1", "--agr", "--agr-start-epoch", "0",
               "--eval-every", "1", *sizes, "--device", str(s.device), "--out", str(folder)]
    s.result["command"] = "python " + " ".join(command[1:])
    done = run_command(command, timeout=s.left() - _MARGIN_S)
    s.result.update(returncode=done["returncode"], wall_s=done["seconds"], output_tail=done["output"][-1500:])
    summary_path = folder / "summary.json"
    if done["timed_out"]:
        s.result.update(status="timeout", reason="the training run ran past the section's limit")
        return
    if done["returncode"] != 0 or not summary_path.exists():
        s.result["problems"].append(f"agr_optim.train exited with {done['returncode']}"
                                    + ("" if summary_path.exists() else " and wrote no summary.json"))
        return
    summary = json.loads(summary_path.read_text())
    final = summary.get("final") or {}
    missing = [k for k in SUMMARY_KEYS if k not in summary] + [f"final.{k}" for k in FINAL_KEYS if k not in final]
    s.result["figures"] = {"seconds_per_epoch": summary.get("seconds_per_epoch"),
                           **{key: final.get(key) for key in FINAL_KEYS}}
    if missing:
        s.result["problems"].append(f"summary.json lacks {', '.join(missing)}")
    if summary.get("complete") is not True or final.get("agr_active") != 1:
        s.result["problems"].append(f"the run did not complete with AGR on: complete={summary.get('complete')}, "
                                    f"agr_active={final.get('agr_active')}")
    loss = final.get("train_loss")
    if not (isinstance(loss, (int, float)) and math.isfinite(loss)):
        s.result["problems"].append(f"train_loss is {loss!r}")


SECTION_FUNCTIONS: dict[str, Callable[[Section], None]] = {
    "syncs": section_syncs,
    "memory": section_memory,
    "cuda_tests": section_cuda_tests,
    "step_cost": section_step_cost,
    "epoch_cost": section_epoch_cost,
    "agr_train": section_agr_train,
}


def _section_main(name: str, out: Path, limit: float, device_name: str) -> None:
    """A section in this (fresh) process; its result goes to ``out/sections/name.json``."""
    s = Section(name, out, torch.device(device_name), time.monotonic() + limit)
    try:
        SECTION_FUNCTIONS[name](s)
        s.finish()
    except Exception as error:
        s.result.update(status="error", error=_error_text(error))
    write_json(s.path, s.result)


# -------------------------------------------------------------------------------- the driver
def environment() -> dict[str, Any]:
    """What a reader needs to compare two runs, and what the lent machine lacks."""

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "packages": {p: version(p) for p in ("numpy", "triton", "pillow", "pytest", "hypothesis", "accelerate")},
        "c_compiler": shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"),
        "source_sha256": _source_hash(),
    }
    if shutil.which("git"):
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
        info["git_commit"] = done.stdout.strip() if done.returncode == 0 else None
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                          "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _source_hash() -> str:
    """The package's, the benchmarks' and the tests' Python files: the lent machine may get the
    working tree without .git."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("agr_optim/**/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/*.py")]):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def plan_limit(name: str, remaining: float, later: int, overrides: dict[str, float]) -> float:
    """A section's limit: its cap, and never more than the budget spares after keeping
    ``_RESERVE_S`` for each of the ``later`` sections."""
    return min(overrides.get(name, SECTIONS[name]), remaining - _FINAL_S - _RESERVE_S * later)


def run_section(name: str, out: Path, limit: float, device: str) -> dict[str, Any]:
    """One section in its own process, killed at ``limit``; what it saved, with its status."""
    path = out / "sections" / f"{name}.json"
    path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--section", name, "--out", str(out),
               "--limit", f"{max(limit - _MARGIN_S, 1.0):.1f}", "--device", device]
    done = run_command(command, timeout=limit, own_group=True)
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if done["timed_out"]:
        result.update(status="timeout", reason=f"ran past its limit of {limit:.0f} s", partial=bool(result))
    elif not result or result.get("partial"):
        result.update(status="error", error=f"the section's process exited with {done['returncode']}"
                      f"{' after a partial save' if result else ' and wrote nothing'}: {done['output'][-1500:]}")
    if result.get("status") not in STATUSES:
        result.update(status="error", error=f"no valid status: {result.get('status')!r}")
    return result


def run(out: Path, *, budget: float, sections: list[str], overrides: dict[str, float], command: str) -> dict[str, Any]:
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "command": command, "started_at": _now(),
                              "budget_s": budget, "cuda": cuda, "environment": {}, "sections": {}, "figures": {}}
    try:
        report["environment"] = environment()
    except Exception as error:  # nothing here may stop the checks
        report["environment"] = {"error": _error_text(error, 600)}
    print(f"agr_optim GPU check: {'CUDA: ' + torch.cuda.get_device_name(0) if cuda else 'NO CUDA DEVICE'}, "
          f"budget {budget:.0f} s", file=sys.stderr, flush=True)
    order = [name for name in SECTIONS if name in sections]
    for index, name in enumerate(order):
        remaining = budget - (time.monotonic() - start)
        limit = plan_limit(name, remaining, len(order) - index - 1, overrides)
        began = time.monotonic()
        if limit < _MIN_S and name not in overrides:
            result: dict[str, Any] = {"status": "timeout",
                                      "reason": f"not started: {remaining:.0f} s of the budget left"}
        else:
            try:
                result = run_section(name, out, limit, "cuda" if cuda else "cpu")
            except Exception as error:
                result = {"status": "error", "error": _error_text(error)}
        result.update(seconds=time.monotonic() - began, limit_s=max(limit, 0.0))
        report["sections"][name] = result
        report["figures"][name] = result.get("figures", {})
        print(f"[{result['status']:>7}] {name}: {result['seconds']:.1f} s (limit {result['limit_s']:.0f} s), "
              f"{time.monotonic() - start:.0f} s elapsed", file=sys.stderr, flush=True)
    report["finished_at"] = _now()
    report["elapsed_s"] = time.monotonic() - start
    report["overall"] = "ok" if all(s["status"] in ("ok", "skipped") for s in report["sections"].values()) else \
        "failed"
    write_json(out / "gpu_check.json", report)
    summary = format_summary(report)
    (out / "summary.txt").write_text(summary + "\n")
    print(summary, flush=True)
    return report


# ------------------------------------------------------------------------------- the summary
def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def _describe(name: str, s: dict[str, Any]) -> list[str]:
    """A few lines of a section's figures."""
    f = s.get("figures") or {}
    lines: list[str] = []
    if name == "syncs":
        for key, by_granularity in f.items():
            lines.append(f"{key}: " + ", ".join(
                f"{g} {_fmt(v['sync_debug_per_step'])} (sync debug) / {v['dispatched_syncs_per_step']} (dispatched)"
                for g, v in by_granularity.items()))
    elif name == "memory":
        lines += [f"{model}: extra peak {_fmt(v['extra_peak_over_param_bytes'])} x parameters (target <= "
                  f"{v['target']})" for model, v in f.items()]
    elif name == "cuda_tests":
        lines.append(", ".join(f"{v} {k}" for k, v in f.items()))
        lines += s.get("not_passed", [])[:10]
    elif name == "step_cost":
        for model, v in f.items():
            for path in ("eager", "compile"):
                p = v.get(path)
                if isinstance(p, dict) and "agr_iteration_ms" in p:
                    lines.append(f"{model} {path}: AGR iteration {_fmt(p['agr_iteration_ms'])} ms, SGD step "
                                 f"{_fmt(v['sgd_step_ms'] if path == 'eager' else v['compile_paired']['sgd_step_ms'])}"
                                 f" ms; AGR own / SGD {_fmt(p['agr_own_over_sgd_step'])}, AGR / floor "
                                 f"{_fmt(p['agr_iteration_over_floor'])}, syncs {_fmt(p['syncs_per_iteration'])}")
                elif p is not None:
                    lines.append(f"{model} {path}: {str(p)[:200]}")
            predicted = v.get("predicted_h200")
            if predicted:
                lines.append(f"{model}: predicted AGR own / SGD {_fmt(predicted['agr_own_over_sgd_step'])}")
    elif name == "epoch_cost":
        for label, v in f.items():
            if "agr_at_epoch_over_at_epoch" in v:
                lines.append(f"{label}: AGR-AT epoch / AT epoch {_fmt(v['agr_at_epoch_over_at_epoch'])} "
                             f"(quartiles {', '.join(_fmt(q) for q in v['agr_at_epoch_over_at_epoch_quartiles'])})")
    elif name == "agr_train":
        lines.append(", ".join(f"{k} {_fmt(v)}" for k, v in f.items()))
    lines += [f"PROBLEM: {p}" for p in s.get("problems", [])]
    if s.get("error"):
        lines.append("error: " + s["error"].strip().splitlines()[-1][:300])
    return lines


def format_summary(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"agr_optim GPU check ({report['started_at']}): {report['elapsed_s']:.1f} s of a "
             f"{report['budget_s']:.0f} s budget, overall {report['overall'].upper()}",
             f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), Python {env.get('python')}, commit "
             f"{str(env.get('git_commit'))[:10]}, sources {str(env.get('source_sha256'))[:12]}"]
    if report["cuda"]:
        device = env.get("device", {})
        lines.append(f"device: {device.get('name')} (sm {device.get('capability')}, {device.get('memory_gib')} GiB), "
                     f"cuDNN {env.get('cudnn')}, triton {env.get('packages', {}).get('triton')}")
    else:
        lines.append("NO CUDA DEVICE: only the CPU parts ran, at tiny sizes; nothing below is a GPU result")
    for name, s in report["sections"].items():
        head = f"[{s['status']:>7}] {name} ({s['seconds']:.1f} s of {s['limit_s']:.0f} s)"
        lines.append(head + (f": {s['reason']}" if s.get("reason") else ""))
        lines += [f"    {line}" for line in _describe(name, s)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, summary.txt and the sections' files")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for everything (default {BUDGET_S:g})")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="run only these sections")
    parser.add_argument("--section-limit", action="append", default=[], metavar="NAME=SECONDS",
                        help="a section's cap instead of its default")
    parser.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)  # a section's process
    parser.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()  # absolute: the sections run in the repository root
    if args.section:
        _section_main(args.section, out, args.limit or SECTIONS[args.section], args.device)
        return 0
    if not args.budget > 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    overrides = {}
    for item in args.section_limit:
        name, _, seconds = item.partition("=")
        if name not in SECTIONS or not re.fullmatch(r"\d+(\.\d+)?", seconds):
            parser.error(f"--section-limit takes NAME=SECONDS with NAME one of {', '.join(SECTIONS)}, got {item!r}")
        overrides[name] = float(seconds)
    command = "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(out, budget=args.budget, sections=args.sections, overrides=overrides, command=command)
    return 0 if report["overall"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
