"""One command for a lent CUDA machine: ``python -m benchmarks.gpu_check --out DIR``.

Runs, within a global time budget (``--budget``, default 480 s, so the whole stays under
8 minutes), each section in its own process with its own time limit, and writes
``DIR/gpu_check.json`` (one document: environment, every section's status, numbers and errors)
and ``DIR/summary.txt`` (also printed). A section that fails, raises or runs out of time is
recorded as such and the others still run. Sections:

- ``no_sync``: whole ``AGROptimizer(SGD)`` steps (``zero_grad``, ``stash_clean``, ``step``) of a
  small conv net under ``torch.cuda.set_sync_debug_mode("error")`` for ``fused=True`` at every
  granularity (a host synchronisation raises), and the number of synchronisations of each path
  (``fused=True``, ``False``, ``"compile"``) counted under ``"warn"``; plus the agreement of
  ``functional.reconstruct`` on the device with the per-layer reference run in float64 on the CPU.
- ``amp_fp16``: fp16 autocast with ``torch.amp.GradScaler`` through ``AGROptimizer`` against the
  same training in float32; ``scaler.unscale_(opt)`` after both backward passes against the plain
  ``scaler.step(opt)``; an inf in the adversarial gradient, then in the stashed clean gradient,
  must skip the step and back the scale off.
- ``accelerate_fp16``: the same training through ``accelerate.Accelerator(mixed_precision="fp16")``
  (its own GradScaler, ``AcceleratedOptimizer``) against float32; skipped if accelerate is missing.
- ``cuda_tests``: pytest on the repository's CUDA tests (``@pytest.mark.cuda``, or a ``skipif``
  whose reason names CUDA or a GPU), ``-W error`` as always; pass/fail counts from JUnit XML.
- ``reconstruct_benchmark``: ``benchmarks.reconstruct.run_model`` on the device (floor, fused,
  loop, compiled, the paper-style per-layer code) for PreActResNet-18 and WideResNet-34-10, the
  ratios of docs/benchmarks.rst; on CUDA also the extra peak GPU memory of a few training steps.
- ``training``: ``python -m agr_optim.train --preset quick ...`` for one epoch, when that module
  exists (else "skipped: no training command"), bounded to 90 s.

Without CUDA it says so, and runs the CPU parts quickly (the ``--quick`` shapes of the benchmark,
the amp and Accelerate plumbing on the CPU, the test selection with every CUDA test skipped):
``tests/test_gpu_check.py`` runs it so that CI keeps it working. See docs/benchmarks.rst.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

SCHEMA_VERSION = 1
ROOT = Path(__file__).resolve().parents[1]
CLIP_NORM = 0.1
STATUSES = ("ok", "failed", "error", "timeout", "skipped")

#: Sections in the order they run, with their time caps in seconds (each also gets at most what
#: the budget has left, less ``_KEEP_S`` for every later section). The cheap checks that decide
#: the most come first; the benchmark's compilations and the training run are the long parts.
SECTIONS: dict[str, float] = {
    "no_sync": 100.0,
    "amp_fp16": 60.0,
    "accelerate_fp16": 60.0,
    "cuda_tests": 120.0,
    "reconstruct_benchmark": 200.0,
    "training": 120.0,
}
_KEEP_S = 15.0  # kept back for each later section
_MIN_S = 8.0  # a section given less than this is skipped (a fresh interpreter needs a few seconds)
_FINAL_S = 10.0  # kept back for writing the report (and the few seconds before the clock starts)
_CHILD_MARGIN_S = 4.0  # a section's process plans with its limit less this (starting, writing its result)
#: The benchmark compiles (two torch.compile kernels per model, tens of seconds each on a GPU)
#: only for a model started with at least this much of its limit left.
_COMPILE_NEEDS_S = 110.0

#: Relative tolerances, normwise over all parameters.
#: One AGR step against its float64 reference from the same (scaled) gradients: float32
#: parameters of norm ~1 moved by ~lr * clip_norm = 5e-3 per tensor keep the update to ~1e-5.
#: A gradient left scaled (or unscaled twice) is off by the scale, 2**10: an O(1) error.
STEP_TOL = 1e-4
#: fp16 training against the same training in float32, after a few steps: fp16 rounds the
#: convolutions' inputs and output gradients to 11 bits, and their weight gradients are sums with
#: much cancellation, so the updates differ by ~2e-2 on the CPU here. A loose sanity bound only;
#: the step check above is the exact one.
FP16_DRIFT_TOL = 0.1
#: ``functional.reconstruct`` in float32 against the float64 reference: sums of ~1e6 products in
#: float32 have a relative error of ~1e-6 (pairwise/blocked summation); 1e-5 as the tests use.
FLOAT32_TOL = 1e-5


# ---------------------------------------------------------------------------------- utilities
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_json(path: Path, data: Any) -> None:
    """Write atomically (a killed child leaves the last complete document)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str, allow_nan=True))
    os.replace(tmp, path)


def _error_text(error: BaseException, limit: int = 2000) -> str:
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return text[-limit:]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _child_env() -> dict[str, str]:
    """The working tree first on the path (the command runs from it, installed or not)."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def _run_command(command: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run in its own session; on timeout kill that process group (pytest's workers too)."""
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env or _child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=max(timeout, 1.0))
        timed_out = False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended just now
            pass
        stdout, stderr = process.communicate()
        timed_out = True
    return {"returncode": process.returncode, "timed_out": timed_out, "seconds": time.monotonic() - start,
            "stdout": stdout or "", "stderr": stderr or ""}


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ------------------------------------------------------------------------------- environment
def environment() -> dict[str, Any]:
    """Versions and the device: what a reader needs to compare two runs."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "packages": {name: _version(name) for name in
                     ("numpy", "triton", "accelerate", "lightning", "pytest", "hypothesis", "agr_optim")},
        "git_commit": None,
        # The lent machine gets a copy of the working tree, perhaps without .git: this names the code.
        "source_sha256": _source_hash(),
    }
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False) \
        if _which("git") else None
    if done is not None and done.returncode == 0:
        info["git_commit"] = done.stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                                check=False)
        info["git_dirty"] = bool(status.stdout.strip())
    if info["cuda_available"]:
        info["cudnn"] = torch.backends.cudnn.version()
        info["devices"] = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["devices"].append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                                    "total_memory_gib": round(props.total_memory / 2**30, 1),
                                    "multi_processor_count": props.multi_processor_count})
        if _which("nvidia-smi"):
            try:
                smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, check=False, timeout=20)
                info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() \
                    else None
            except (OSError, subprocess.SubprocessError) as error:
                info["driver"] = f"nvidia-smi failed: {error}"
    return info


def _source_hash() -> str:
    """SHA-256 over the package's and the benchmarks' Python files (paths and contents)."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("agr_optim/**/*.py"), *ROOT.glob("benchmarks/*.py")]):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _which(program: str) -> bool:
    return any(os.access(os.path.join(d, program), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep))


# ---------------------------------------------------------------------- section: no host sync
class _NoSyncNet(nn.Module):
    """Convolutions with BatchNorm (channels-last), and a 1M-element linear layer: the layouts
    and sizes of a real model's gradients, in ten tensors (a quick compile)."""

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


def _sync_calls(device: torch.device, fused: bool | str, granularity: str, mode: str) -> dict[str, Any]:
    """Run AGR steps; under sync debug ``mode`` ("error": stop at the first host sync and name the
    call; "warn": count the syncs of each call). On the CPU the steps run without the check."""
    from agr_optim import AGROptimizer

    torch.manual_seed(0)
    model = _NoSyncNet().to(device, memory_format=torch.channels_last)
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                                       foreach=True), clip_norm=CLIP_NORM, granularity=granularity, fused=fused)
    checked = device.type == "cuda"
    steps, batch = (3, 16) if checked else (1, 4)  # on the CPU nothing is checked: keep it short
    x = torch.rand(batch, 3, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    counts = {"zero_grad": 0, "stash_clean": 0, "step": 0}
    result: dict[str, Any] = {"fused": fused, "granularity": granularity, "mode": mode}

    def call(name: str, fn: Callable[[], object], check: bool) -> None:
        if not (check and checked):
            fn()
            return
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode(mode)
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        counts[name] += sum("synchroniz" in str(w.message) for w in caught)

    start = time.perf_counter()
    current = ""
    try:
        for i in range(steps + 2):  # two unchecked steps: momentum buffers, compilation
            check = i >= 2
            current = "zero_grad"
            call(current, opt.zero_grad, check)
            loss_fn(model(x), y).backward()
            current = "stash_clean"
            call(current, opt.stash_clean, check)
            loss_fn(model((x + 0.03 * torch.randn_like(x)).clamp(0, 1)), y).backward()
            current = "step"
            call(current, opt.step, check)
            if i == 1:
                result["warmup_s"] = time.perf_counter() - start
    except RuntimeError as error:
        if "synchroniz" not in str(error):
            raise
        result.update(synced=True, synced_in=current, error=str(error).splitlines()[0][:300])
        return result
    result["step_count"] = opt.step_count
    if checked:
        result["syncs_per_call"] = {name: n / steps for name, n in counts.items()}
        result["synced"] = any(counts.values())
    else:
        result["synced"] = None  # not checked: no CUDA
    return result


def _reference_agreement(device: torch.device, fused: bool | str, shapes: list[tuple[int, ...]]) -> dict[str, Any]:
    """``functional.reconstruct`` on the device against the paper-style per-layer code run in
    float64 on the CPU (``benchmarks/_reference.py``, independent of the library)."""
    from agr_optim import functional as F

    from ._reference import per_layer_reconstruct
    from .reconstruct import Workload

    work = Workload(shapes, device)
    want = per_layer_reconstruct([a.double().cpu() for a in work.w_adv], [c.double().cpu() for c in work.w_clean],
                                 CLIP_NORM)
    got = F.reconstruct(work.w_adv, work.w_clean, clip_norm=CLIP_NORM, fused=fused)
    errors = [_relative_error(g, w) for g, w in zip(got, want, strict=True)]
    dtypes_kept = all(g.dtype == a.dtype and g.device == a.device for g, a in zip(got, work.w_adv, strict=True))
    worst = max(errors)
    return {"fused": fused, "tensors": len(shapes), "max_relative_error": worst, "tolerance": FLOAT32_TOL,
            "dtype_and_device_kept": dtypes_kept, "ok": worst <= FLOAT32_TOL and dtypes_kept}


def section_no_sync(device: torch.device, quick: bool, limit: float, save: Callable[[dict], None]) -> dict:
    from ._shapes import parameter_shapes

    cuda = device.type == "cuda"
    result: dict[str, Any] = {"device": str(device), "runs": [], "agreement": []}
    if not cuda:
        result["note"] = "no CUDA device: the steps and the agreement ran on the CPU, no sync check"
    compile_variants = [] if quick and not cuda else ["compile"]
    shapes = parameter_shapes("preactresnet18_w16")
    # The check the issue asks for first: fused=True never synchronises, at every granularity.
    for granularity in ("tensor", "group", "global"):
        result["runs"].append(_sync_calls(device, True, granularity, "error"))
        save(result)
    for fused in (True, False, *compile_variants):
        try:
            if cuda or fused is not True:  # (on the CPU fused=True already ran above)
                result["runs"].append(_sync_calls(device, fused, "tensor", "warn"))
            result["agreement"].append(_reference_agreement(device, fused, shapes))
        except Exception as error:  # a missing triton or C++ compiler: record, go on
            if fused != "compile":
                raise
            result["compile_error"] = _error_text(error, 600)
        save(result)
    strict = [r for r in result["runs"] if r["fused"] is True and r["mode"] == "error"]
    problems = [f"fused=True, granularity={r['granularity']}: host sync in {r.get('synced_in')}"
                for r in strict if r.get("synced")]
    problems += [f"agreement fused={a['fused']}: relative error {a['max_relative_error']:.2e}"
                 for a in result["agreement"] if not a["ok"]]
    result["status"] = "failed" if problems else "ok"
    result["problems"] = problems
    return result


# ------------------------------------------------------------------------ section: fp16 / amp
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4


class _AmpNet(nn.Module):
    """A small CNN without pooling (its CUDA backward uses atomics): two fp16 runs should repeat."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * (size // 2) ** 2, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _amp_setup(device: torch.device, steps: int, clip_norm: float | None = CLIP_NORM
               ) -> tuple[nn.Module, Any, list[tuple[torch.Tensor, ...]]]:
    """The model, its AGROptimizer(SGD) and ``steps`` batches; smaller on the CPU (fp16 is slow there)."""
    from agr_optim import AGROptimizer

    batch, size = (32, 16) if device.type == "cuda" else (8, 8)
    torch.manual_seed(0)
    model = _AmpNet(size).to(device)
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
                       clip_norm=clip_norm)
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(steps):
        x = torch.rand(batch, 3, size, size, generator=gen)
        x_adv = (x + 0.03 * torch.randn(x.shape, generator=gen).sign()).clamp(0, 1)
        data.append((x.to(device), x_adv.to(device), torch.randint(0, 10, (batch,), generator=gen).to(device)))
    return model, opt, data


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1).cpu() for p in model.parameters()])


def _copies(tensors: Any) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().double().cpu().clone() for t in tensors]


class _StepCheck:
    """One AGR step against its float64 reference, from the very gradients the step saw.

    Records the scaled clean gradient (before the stash), the scaled adversarial gradient, the
    scale, the parameters and the momentum buffers before ``step()``; the reference unscales in
    float64, reconstructs with the paper-style per-layer code (``benchmarks/_reference.py``) and
    applies torch's SGD rule (``b = m b + g + wd p``, the first ``b = g + wd p``; ``p -= lr b``).
    So the check is exact whatever fp16 did to the gradients: only the step is judged.
    """

    def __init__(self, model: nn.Module, opt: Any) -> None:
        self.model, self.opt = model, opt
        self.errors: list[float] = []
        self.clip_norm = math.inf if opt.clip_norm is None else opt.clip_norm  # (inf: min(1, inf) = 1)

    def clean(self) -> None:
        self._clean = _copies(p.grad for p in self.model.parameters())

    def before_step(self, scale: float) -> None:
        params = list(self.model.parameters())
        self._adversarial = _copies(p.grad for p in params)
        self._params = _copies(params)
        self._buffers = _copies(self.opt.state[p].get("momentum_buffer") if p in self.opt.state else None
                                for p in params)
        self._scale = scale

    def after_step(self) -> float:
        from ._reference import per_layer_reconstruct

        adversarial = [g / self._scale for g in self._adversarial]
        clean = [g / self._scale for g in self._clean]
        r = per_layer_reconstruct(adversarial, clean, self.clip_norm)
        want, got = [], []
        for p, p0, b, g in zip(self.model.parameters(), self._params, self._buffers, r, strict=True):
            d = g + WEIGHT_DECAY * p0
            b = d if b is None else MOMENTUM * b + d
            want.append((-LR * b).reshape(-1))
            got.append((p.detach().double().cpu() - p0).reshape(-1))
        error = _relative_error(torch.cat(got), torch.cat(want))
        self.errors.append(error)
        return error


def _amp_run(device: torch.device, steps: int, mode: str, inject_inf: dict[int, str] | None = None,
             clip_norm: float | None = CLIP_NORM) -> dict:
    """Train ``steps`` AGR steps; ``mode``: "fp32", "fp16" (autocast + ``scaler.step``) or
    "fp16_unscale" (``scaler.unscale_(opt)`` after both backward passes, then ``scaler.step``).
    Every step taken is checked against its float64 reference (:class:`_StepCheck`).
    ``inject_inf[i]`` = "adversarial" or "clean" writes an inf into that gradient at step i."""
    model, opt, data = _amp_setup(device, steps, clip_norm)
    loss_fn = nn.CrossEntropyLoss()
    fp16 = mode != "fp32"
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, growth_interval=10_000) if fp16 else None
    check = _StepCheck(model, opt)
    start = _flat_params(model)
    skipped_as_expected = []
    for i, (x, x_adv, y) in enumerate(data):
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
            clean_loss = loss_fn(model(x), y)
        (scaler.scale(clean_loss) if scaler else clean_loss).backward()
        first = next(model.parameters())
        clean_grad = first.grad  # the stash keeps this very tensor (no copy)
        check.clean()
        opt.stash_clean()
        with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
            adv_loss = loss_fn(model(x_adv), y)
        (scaler.scale(adv_loss) if scaler else adv_loss).backward()
        scale = scaler.get_scale() if scaler else 1.0
        where = (inject_inf or {}).get(i)
        if where is not None:
            target = first.grad if where == "adversarial" else clean_grad
            target.view(-1)[0] = float("inf")
            before, count = _flat_params(model), opt.step_count
        else:
            check.before_step(scale)
        if scaler is None:
            opt.step()
        else:
            if mode == "fp16_unscale":
                scaler.unscale_(opt)  # where a user clips by hand: after both backward passes
            scaler.step(opt)
            scaler.update()
        if where is not None:
            skipped_as_expected.append(torch.equal(before, _flat_params(model)) and opt.step_count == count
                                       and scaler is not None and scaler.get_scale() == scale * 0.5)
        else:
            check.after_step()
    return {"delta": _flat_params(model) - start, "step_count": opt.step_count, "step_errors": check.errors,
            "final_scale": scaler.get_scale() if scaler else None, "skipped_as_expected": skipped_as_expected}


def section_amp_fp16(device: torch.device, quick: bool, limit: float, save: Callable[[dict], None]) -> dict:
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    steps = 3 if quick else 6
    result: dict[str, Any] = {"device": str(device), "steps": steps, "scaler": f"torch.amp.GradScaler({device.type!r})",
                              "step_tolerance": STEP_TOL, "drift_tolerance": FP16_DRIFT_TOL}
    if device.type != "cuda":
        result["note"] = "no CUDA device: GradScaler('cpu') with CPU fp16 autocast, not the CUDA kernels"
    reference = _amp_run(device, steps, "fp32")
    fp16 = _amp_run(device, steps, "fp16")
    unscaled = _amp_run(device, steps, "fp16_unscale")
    # Clipping makes a segment's update blind to a common scale of both gradients (every
    # segment here is clipped at 0.1 once scaled): without clipping such an error shows.
    unclipped = _amp_run(device, steps, "fp16", clip_norm=None)
    inf = _amp_run(device, 3, "fp16", inject_inf={1: "adversarial", 2: "clean"})
    result.update(
        step_error={"fp32": max(reference["step_errors"]), "fp16": max(fp16["step_errors"]),
                    "fp16_unscale": max(unscaled["step_errors"]), "fp16_no_clip": max(unclipped["step_errors"])},
        fp16_drift_from_fp32=_relative_error(fp16["delta"], reference["delta"]),
        unscale_vs_step_relative_error=_relative_error(unscaled["delta"], fp16["delta"]),
        steps_taken={"fp32": reference["step_count"], "fp16": fp16["step_count"],
                     "fp16_unscale": unscaled["step_count"], "fp16_no_clip": unclipped["step_count"]},
        final_scale=fp16["final_scale"],
        inf_steps_skipped=inf["skipped_as_expected"],
        inf_run_steps_taken=inf["step_count"],
    )
    problems = [f"{mode}: a step differs from its float64 reference by {error:.2e}"
                for mode, error in result["step_error"].items() if not error <= STEP_TOL]
    if not result["fp16_drift_from_fp32"] <= FP16_DRIFT_TOL:
        problems.append(f"fp16 training drifted from fp32 by {result['fp16_drift_from_fp32']:.2e}")
    if set(result["steps_taken"].values()) != {steps}:
        problems.append(f"steps taken {result['steps_taken']} (expected {steps}: a skipped fp16 step)")
    if inf["skipped_as_expected"] != [True, True] or inf["step_count"] != 1:
        problems.append(f"inf in a gradient: skipped as expected {inf['skipped_as_expected']}, "
                        f"steps taken {inf['step_count']} (expected 1 of 3)")
    result["problems"] = problems
    result["status"] = "failed" if problems else "ok"
    return result


def section_accelerate_fp16(device: torch.device, quick: bool, limit: float, save: Callable[[dict], None]) -> dict:
    try:
        import accelerate
        from accelerate import Accelerator
    except ImportError as error:
        return {"status": "skipped", "reason": f"accelerate does not import: {error}"}
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    steps = 3 if quick else 6
    steps_model, opt, data = _amp_setup(device, steps)
    if cuda:
        accelerator = Accelerator(mixed_precision="fp16")
        model, prepared = accelerator.prepare(steps_model, opt)
        scaler, backward = accelerator.scaler, accelerator.backward
    else:
        # Accelerate makes fp16 and its GradScaler only on accelerators. On the CPU: its
        # AcceleratedOptimizer with a GradScaler("cpu") given by hand, the loss scaled by hand
        # (what accelerator.backward does with a scaler), in float32.
        from accelerate.optimizer import AcceleratedOptimizer

        accelerator = Accelerator(cpu=True)
        model = accelerator.prepare(steps_model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        prepared = AcceleratedOptimizer(opt, device_placement=False, scaler=scaler)

        def backward(loss: torch.Tensor) -> None:
            scaler.scale(loss).backward()

    result: dict[str, Any] = {"device": str(accelerator.device), "accelerate": accelerate.__version__,
                              "mixed_precision": accelerator.mixed_precision, "steps": steps,
                              "step_tolerance": STEP_TOL, "drift_tolerance": FP16_DRIFT_TOL,
                              "scaler": type(scaler).__name__ if scaler is not None else None}
    if not cuda:
        result["note"] = ("no CUDA device: Accelerate's AcceleratedOptimizer with a GradScaler('cpu') given by hand, "
                          "float32 (Accelerate makes fp16 and its scaler only on accelerators)")
    reference = _amp_run(device, steps, "fp32")
    agr = prepared.optimizer  # the AGROptimizer inside Accelerate's AcceleratedOptimizer
    check = _StepCheck(model, agr)
    loss_fn = nn.CrossEntropyLoss()
    start = _flat_params(model)
    skipped, accelerate_skipped = [], []

    def iteration(x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, inf: bool = False) -> bool:
        """One step in Accelerate's API; whether AGR skipped it (its step count did not move)."""
        prepared.zero_grad()
        backward(loss_fn(model(x), y))
        check.clean()
        agr.stash_clean()
        backward(loss_fn(model(x_adv), y))
        if inf:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        check.before_step(scaler.get_scale() if scaler is not None else 1.0)
        count = agr.step_count
        prepared.step()
        accelerate_skipped.append(bool(prepared.step_was_skipped))
        return agr.step_count == count

    for x, x_adv, y in data:
        skipped.append(iteration(x, x_adv, y))
        if not skipped[-1]:  # (Accelerate's default scale, 2**16, may overflow on a first step)
            check.after_step()
    result.update(step_error=max(check.errors, default=math.nan),
                  drift_from_fp32=_relative_error(_flat_params(model) - start, reference["delta"]),
                  steps_skipped=skipped, accelerate_step_was_skipped=accelerate_skipped, steps_taken=agr.step_count,
                  final_scale=scaler.get_scale() if scaler is not None else None)
    problems, warnings_ = [], []
    if scaler is not None:  # an inf must skip the step (GradScaler's contract)
        before = _flat_params(model)
        inf_skipped = iteration(*data[0], inf=True)
        result["inf_step_skipped"] = inf_skipped and torch.equal(before, _flat_params(model))
        if not result["inf_step_skipped"]:
            problems.append("an inf in the adversarial gradient did not skip the step")
        if accelerate_skipped != [*skipped, inf_skipped]:
            # AGROptimizer sets _step_supports_amp_scaling (GradScaler then always calls its step(),
            # which skips by itself), and Accelerate counts a step as taken when step() was called.
            warnings_.append(f"Accelerate's step_was_skipped {accelerate_skipped} disagrees with the steps AGR "
                             f"skipped {[*skipped, inf_skipped]}: an AcceleratedScheduler then steps the "
                             "learning rate on skipped steps")
    if scaler is None:
        problems.append("Accelerator(mixed_precision='fp16') created no GradScaler")
    if not result["step_error"] <= STEP_TOL:
        problems.append(f"a step differs from its float64 reference by {result['step_error']:.2e}")
    if not result["drift_from_fp32"] <= FP16_DRIFT_TOL and not any(skipped):
        problems.append(f"training drifted from fp32 by {result['drift_from_fp32']:.2e}")
    if agr.step_count == 0:
        problems.append(f"steps taken {agr.step_count} of {steps}, skipped {skipped}")
    result["problems"], result["warnings"] = problems, warnings_
    result["status"] = "failed" if problems else "ok"
    return result


# ------------------------------------------------------------------ section: reconstruction
def _cuda_memory(model_name: str) -> dict[str, Any]:
    """Peak GPU memory of a few real training steps per variant (``benchmarks/_memory.py``'s
    training loop, on the device): the caching allocator counts the live tensors exactly."""
    from . import _memory

    device = torch.device("cuda")
    rows: dict[str, dict[str, float]] = {}
    for variant in _memory.VARIANTS:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        row = _memory._train(model_name, variant, steps=3, batch=2, device="cuda")
        torch.cuda.synchronize(device)
        rows[variant] = {"peak_bytes": torch.cuda.max_memory_allocated(device) - base,
                         "param_bytes": row["param_bytes"]}
    plain, param_bytes = rows["plain"]["peak_bytes"], rows["plain"]["param_bytes"]
    for row in rows.values():
        row["extra_over_plain_bytes"] = row["peak_bytes"] - plain
        row["extra_over_plain_ratio_to_params"] = (row["peak_bytes"] - plain) / param_bytes
    return {"model": model_name, "steps": 3, "batch": 2, "param_bytes": param_bytes, "variants": rows,
            "target": {"name": "agr_fused extra / parameters", "limit": 1.25,
                       "value": rows["agr_fused"]["extra_over_plain_ratio_to_params"],
                       "met": rows["agr_fused"]["extra_over_plain_ratio_to_params"] <= 1.25}}


def section_reconstruct_benchmark(device: torch.device, quick: bool, limit: float,
                                  save: Callable[[dict], None]) -> dict:
    from . import reconstruct
    from ._shapes import parameter_shapes

    cuda = device.type == "cuda"
    deadline = time.monotonic() + limit
    models = ["preactresnet18", "wideresnet34_10"] if cuda and not quick else ["preactresnet18_w16"]
    repeats, warmup = (25, 3) if cuda and not quick else (3, 1)
    result: dict[str, Any] = {"device": str(device), "repeats": repeats, "timing": (
        "wall time with torch.cuda.synchronize() before and after every timed call" if cuda else
        "wall time (perf_counter)"), "results": [], "memory": [], "skipped_models": []}
    if not cuda:
        result["note"] = "no CUDA device: --quick shapes on the CPU, no compile, no memory rows"
    tensors = {name: len(parameter_shapes(name)) for name in models}
    compile_needs, compile_failed = _COMPILE_NEEDS_S, False
    for index, name in enumerate(models):
        left = deadline - time.monotonic()
        if left < 20:
            result["skipped_models"].append(name)
            continue
        compiled = cuda and not quick and not compile_failed and left >= compile_needs
        start = time.monotonic()
        model = reconstruct.run_model(name, device=device, repeats=repeats, warmup=warmup, peers=False,
                                      compiled=compiled, memory=False, quick=quick)
        spent = time.monotonic() - start
        if cuda and not quick and not compiled:
            model["compile_skipped"] = ("the compile failed on the previous model" if compile_failed else
                                        f"{left:.0f} s left, compiling needs about {compile_needs:.0f} s")
        if compiled:
            compile_failed = "compile_error" in model
            # The next model compiles about as many kernels as it has tensors; with a margin.
            if index + 1 < len(models):
                compile_needs = 1.3 * spent * tensors[models[index + 1]] / tensors[name]
        model["table"] = reconstruct.format_table(model)
        result["results"].append(model)
        save(result)
        if cuda and deadline - time.monotonic() >= 15:
            result["memory"].append(_cuda_memory(name))
            save(result)
    done = [m["model"] for m in result["results"]]
    result["status"] = "ok" if done else "failed"
    if result["skipped_models"]:
        result["reason"] = f"time limit: {', '.join(result['skipped_models'])} not run"
    return result


SECTION_FUNCTIONS: dict[str, Callable[[torch.device, bool, float, Callable[[dict], None]], dict]] = {
    "no_sync": section_no_sync,
    "amp_fp16": section_amp_fp16,
    "accelerate_fp16": section_accelerate_fp16,
    "reconstruct_benchmark": section_reconstruct_benchmark,
}


def _child(section: str, out: Path, limit: float, quick: bool, device_name: str) -> None:
    """A section in this (fresh) process: its result, partial ones included, goes to ``out``."""
    device = torch.device(device_name)

    def save(partial: dict) -> None:
        _write_json(out, {**partial, "status": "timeout", "partial": True})

    try:
        result = SECTION_FUNCTIONS[section](device, quick, limit, save)
    except Exception as error:
        partial = json.loads(out.read_text()) if out.exists() else {}
        result = {**partial, "status": "error", "partial": bool(partial), "error": _error_text(error)}
    _write_json(out, result)


# --------------------------------------------------------------------- section: CUDA tests
def is_cuda_test(item: Any) -> bool:
    """A test that needs CUDA: marked ``@pytest.mark.cuda``, or skipped by a ``skipif`` whose
    reason names CUDA or a GPU (the convention of tests written before the marker)."""
    if item.get_closest_marker("cuda") is not None:
        return True
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        if re.search(r"\b(cuda|gpu)\b", reason, re.IGNORECASE):
            return True
    return False


def pytest_addoption(parser: Any) -> None:
    """Loaded as a pytest plugin (``-p benchmarks.gpu_check``): ``--cuda-only`` keeps the CUDA tests."""
    parser.addoption("--cuda-only", action="store_true", help="run only the tests that need CUDA")


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    if not config.getoption("--cuda-only"):
        return
    keep = [item for item in items if is_cuda_test(item)]
    drop = [item for item in items if not is_cuda_test(item)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and per-test outcomes from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None, f"no testsuite in {path}"
    tests = []
    for case in suite.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "")[:300]
                break
        tests.append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0.0), "message": message})
    # A module that does not import shows as one test with an error "collection failure".
    broken = [t for t in tests if t["outcome"] == "error" and "collection failure" in t["message"]]
    tests = [t for t in tests if t not in broken]
    count = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {"collected": len(tests), "passed": count["passed"], "failed": count["failed"],
            "errors": count["error"], "skipped": count["skipped"], "tests": tests,
            "collection_errors": [t["id"].strip(":") for t in broken]}


def cuda_test_command(junit: Path, paths: tuple[str, ...] = ("tests",)) -> list[str]:
    """pytest on the CUDA tests only (this module as a plugin), JUnit XML to ``junit``. A test
    module that does not import on this machine must not stop the CUDA tests of the others."""
    return [sys.executable, "-m", "pytest", *paths, "-p", "benchmarks.gpu_check", "--cuda-only", "-q",
            "-p", "no:cacheprovider", "--continue-on-collection-errors", f"--junitxml={junit}"]


def section_cuda_tests(out_dir: Path, limit: float, cuda: bool) -> dict[str, Any]:
    junit = out_dir / "cuda_tests.xml"
    command = cuda_test_command(junit)
    done = _run_command(command, timeout=limit)
    result: dict[str, Any] = {"command": " ".join(command[1:]), "returncode": done["returncode"],
                              "output_tail": (done["stdout"] + done["stderr"])[-3000:]}
    if done["timed_out"]:
        return {**result, "status": "timeout", "reason": f"pytest ran past {limit:.0f} s"}
    if not junit.exists():
        return {**result, "status": "error", "error": "pytest wrote no JUnit XML"}
    result.update(parse_junit(junit))
    # pytest's exit code 5: nothing collected (every test deselected), which is a failure here.
    bad_exit = done["returncode"] not in (0, 5)
    if result["failed"] or result["errors"] or result["collection_errors"] or bad_exit or result["collected"] == 0:
        result["status"] = "failed"
        if result["collection_errors"]:  # their CUDA tests, if any, did not run
            result["reason"] = f"test modules that do not import: {', '.join(result['collection_errors'])}"
    elif not cuda:
        result["status"] = "skipped"
        result["reason"] = f"no CUDA device: {result['collected']} CUDA tests collected, {result['skipped']} skipped"
    elif result["passed"] == 0:
        result["status"] = "failed"
        result["reason"] = "no CUDA test passed (all skipped on a CUDA machine)"
    else:
        result["status"] = "ok"
    return result


# ----------------------------------------------------------------------- section: training
_EPOCH_KEY = re.compile(r"(sec|second|time|_s$).*epoch|epoch.*(sec|second|time|_s$)", re.IGNORECASE)


def _epoch_timings(data: Any, prefix: str = "") -> dict[str, Any]:
    """Numbers (or lists of numbers) under keys that name seconds per epoch, anywhere in a JSON."""
    found: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            numeric = _finite(value) or (isinstance(value, list) and value and all(_finite(v) for v in value))
            if _EPOCH_KEY.search(str(key)) and numeric:
                found[path] = value
            else:
                found.update(_epoch_timings(value, path))
    elif isinstance(data, list):
        for index, value in enumerate(data[:50]):
            found.update(_epoch_timings(value, f"{prefix}[{index}]"))
    return found


def _agr_off_flag(help_text: str) -> list[str] | None:
    """The training command's switch for a run without AGR, if its --help shows one."""
    if re.search(r"--no-agr(?![\w-])", help_text):
        return ["--no-agr"]
    match = re.search(r"--agr\s+\{([^}]*)\}", help_text)
    if match:
        for choice in ("off", "none", "no", "false"):
            if choice in [c.strip() for c in match.group(1).split(",")]:
                return ["--agr", choice]
    return None


#: The training run: the command the issue names, for one epoch.
TRAIN_ARGS = ["--preset", "quick", "--dataset", "digits", "--model", "smallcnn", "--epochs", "1"]
TRAIN_RUN_S = 90.0  # the AGR run's bound; the run without AGR gets what the section has left


def _fresh_folder(out_dir: Path, name: str) -> Path:
    """``DIR/name``, or ``DIR/name_2``... when a previous check left it non-empty (the command
    refuses a used --out folder, and earlier results are not ours to delete)."""
    folder, n = out_dir / name, 2
    while folder.exists() and any(folder.iterdir()):
        folder, n = out_dir / f"{name}_{n}", n + 1
    return folder


def section_training(out_dir: Path, limit: float, cuda: bool) -> dict[str, Any]:
    try:
        found = importlib.util.find_spec("agr_optim.train") is not None
    except ImportError as error:  # agr_optim itself does not import
        return {"status": "error", "error": f"agr_optim does not import: {error}"}
    if not found:
        return {"status": "skipped", "reason": "skipped: no training command (agr_optim.train does not exist)"}
    deadline = time.monotonic() + limit
    base = [sys.executable, "-m", "agr_optim.train"]
    shown = _run_command([*base, "--help"], timeout=min(30.0, limit))
    help_text = shown["stdout"]
    if shown["returncode"] != 0:
        return {"status": "failed", "reason": f"`python -m agr_optim.train --help` exited with {shown['returncode']}",
                "output_tail": (shown["stdout"] + shown["stderr"])[-2000:]}
    missing = [flag for flag in (*TRAIN_ARGS[::2], "--device", "--out") if flag not in help_text]
    if missing:
        return {"status": "failed", "reason": f"agr_optim.train --help does not offer {', '.join(missing)}"}
    # AGR on for the whole (single) epoch where the command lets us say so.
    agr_on = ["--agr"] if re.search(r"--agr(?![\w-])", help_text) else []
    agr_on += ["--agr-start-epoch", "0"] if "--agr-start-epoch" in help_text else []
    agr_off = _agr_off_flag(help_text)
    device = "cuda" if cuda else "cpu"
    result: dict[str, Any] = {"device": device, "agr_on_flags": agr_on, "agr_off_flags": agr_off, "runs": {}}
    if not cuda:
        result.update(status="skipped", reason="no CUDA device: the training run is a GPU check (the command's --help "
                      "offers every flag it uses)")
        return result

    def train(extra: list[str], name: str) -> dict[str, Any]:
        folder = _fresh_folder(out_dir, name)
        command = [*base, *TRAIN_ARGS, "--device", device, "--out", str(folder), *extra]
        done = _run_command(command, timeout=min(TRAIN_RUN_S, deadline - time.monotonic()))
        run: dict[str, Any] = {"command": "python " + " ".join(command[1:]), "returncode": done["returncode"],
                               "timed_out": done["timed_out"], "wall_s": done["seconds"],
                               "output_tail": (done["stdout"] + done["stderr"])[-2000:], "json": {}}
        for path in sorted(folder.rglob("*.json")) if folder.exists() else []:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                run["json"][str(path.relative_to(out_dir))] = f"unreadable: {error}"
                continue
            run["json"][str(path.relative_to(out_dir))] = {
                "keys": sorted(data)[:40] if isinstance(data, dict) else type(data).__name__,
                "epoch_timings": _epoch_timings(data)}
        timings = [v for j in run["json"].values() if isinstance(j, dict) for v in j["epoch_timings"].values()]
        run["seconds_per_epoch"] = next((v for v in timings if _finite(v)), None)
        return run

    agr = result["runs"]["agr"] = train(agr_on, "train")
    if agr_off is None:
        result["agr_off"] = "not offered by `python -m agr_optim.train --help` (no --no-agr or --agr off)"
    elif agr["returncode"] != 0 or deadline - time.monotonic() < 20:
        result["agr_off"] = "not run: the AGR run failed" if agr["returncode"] != 0 else "not run: no time left"
    else:
        result["runs"]["plain"] = train(agr_off, "train_no_agr")
    result["seconds_per_epoch"] = {arm: r["seconds_per_epoch"] for arm, r in result["runs"].items()}
    if agr["timed_out"]:
        result.update(status="timeout", reason="the AGR training run ran past its limit")
    elif agr["returncode"] != 0:
        result.update(status="failed", reason=f"agr_optim.train exited with {agr['returncode']}")
    elif "plain" in result["runs"] and result["runs"]["plain"]["returncode"] != 0:
        result.update(status="failed", reason="the run without AGR failed")
    else:
        result["status"] = "ok"
    return result


# -------------------------------------------------------------------------------- the driver
def _plan_limit(name: str, remaining: float, later: int, overrides: dict[str, float]) -> float:
    """This section's limit: its cap, and never more than the budget can spare for it."""
    cap = overrides.get(name, SECTIONS[name])
    return min(cap, remaining - _FINAL_S - _KEEP_S * later)


def _run_section(name: str, out_dir: Path, limit: float, quick: bool, cuda: bool) -> dict[str, Any]:
    if name == "cuda_tests":
        return section_cuda_tests(out_dir, limit, cuda)
    if name == "training":
        return section_training(out_dir, limit, cuda)
    sections = out_dir / "sections"
    sections.mkdir(exist_ok=True)
    out = sections / f"{name}.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--child", name, "--child-out", str(out),
               "--child-limit", f"{max(limit - _CHILD_MARGIN_S, 1.0):.1f}", "--device", "cuda" if cuda else "cpu",
               *(["--quick"] if quick else [])]
    # The child plans with its limit less a margin (to write its result); the parent kills it at the limit.
    done = _run_command(command, timeout=limit)
    result = json.loads(out.read_text()) if out.exists() else {}
    if done["timed_out"]:
        result.update(status="timeout", reason=f"ran past its limit of {limit:.0f} s", partial=bool(result))
    elif not result:
        result = {"status": "error", "error": f"the section's process exited with {done['returncode']} and wrote "
                  f"nothing: {done['stderr'][-1500:]}"}
    elif result.get("status") == "timeout":  # the child died after a partial save
        result.update(status="error", error=f"the section's process exited with {done['returncode']}: "
                      f"{done['stderr'][-1500:]}")
    return result


def run(out_dir: Path, *, budget: float, quick: bool, sections: list[str], overrides: dict[str, float],
        command: str) -> dict[str, Any]:
    start = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    quick = quick or not cuda
    report: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "command": command, "started_at": _now(),
                              "budget_s": budget, "quick": quick, "cuda": cuda, "environment": {}, "sections": {}}
    try:
        report["environment"] = environment()
    except Exception as error:  # nothing here should stop the checks
        report["environment"] = {"error": _error_text(error, 600)}
    order = [name for name in SECTIONS if name in sections]
    for index, name in enumerate(order):
        remaining = budget - (time.monotonic() - start)
        limit = _plan_limit(name, remaining, len(order) - index - 1, overrides)
        section_start = time.monotonic()
        if limit < _MIN_S and name not in overrides:
            # Not run for want of time: a timeout of the run as a whole, not a skip.
            result = {"status": "timeout", "reason": f"not started: budget exhausted ({remaining:.0f} s of "
                      f"{budget:.0f} s left)"}
        else:
            try:
                result = _run_section(name, out_dir, limit, quick, cuda)
            except Exception as error:
                result = {"status": "error", "error": _error_text(error)}
        result["seconds"] = time.monotonic() - section_start
        result["limit_s"] = max(limit, 0.0)
        if result.get("status") not in STATUSES:
            result = {**result, "status": "error", "error": f"no valid status: {result.get('status')!r}"}
        report["sections"][name] = result
        print(f"[{result['status']:>7}] {name} ({result['seconds']:.1f} s)", file=sys.stderr, flush=True)
    report["finished_at"] = _now()
    report["elapsed_s"] = time.monotonic() - start
    report["overall"] = "ok" if all(s["status"] in ("ok", "skipped") for s in report["sections"].values()) else \
        "failed"
    _write_json(out_dir / "gpu_check.json", report)
    summary = format_summary(report)
    (out_dir / "summary.txt").write_text(summary + "\n")
    print(summary, flush=True)
    return report


# ------------------------------------------------------------------------------- the summary
def _fmt(value: Any, spec: str = ".3g") -> str:
    return format(value, spec) if _finite(value) else str(value)


def _describe(name: str, s: dict[str, Any]) -> list[str]:
    """The figures of one section, a few lines."""
    lines: list[str] = []
    if name == "no_sync" and "runs" in s:
        for r in s["runs"]:
            label = f"fused={r['fused']!s:7} {r['granularity']:6} ({r['mode']})"
            if r.get("synced") is None:
                lines.append(f"{label}: ran {r.get('step_count')} steps, sync not checked (no CUDA)")
            elif r.get("synced") and "syncs_per_call" not in r:
                lines.append(f"{label}: HOST SYNC in {r['synced_in']}: {r['error']}")
            elif "syncs_per_call" in r:
                per = ", ".join(f"{k} {_fmt(v)}" for k, v in r["syncs_per_call"].items())
                lines.append(f"{label}: {'syncs per call: ' + per if r['synced'] else 'no host sync'}")
        for a in s.get("agreement", []):
            lines.append(f"reconstruct fused={a['fused']!s:7} vs float64 per-layer reference: max relative error "
                         f"{_fmt(a['max_relative_error'])} (tol {a['tolerance']:g}) {'ok' if a['ok'] else 'FAILED'}")
        if s.get("compile_error"):
            lines.append("compile path: " + s["compile_error"].strip().splitlines()[-1][:200])
    elif name == "amp_fp16" and "step_error" in s:
        errors = ", ".join(f"{mode} {_fmt(e)}" for mode, e in s["step_error"].items())
        lines.append(f"{s['scaler']}, {s['steps']} steps; each step against its float64 reference: {errors} "
                     f"(tol {s['step_tolerance']:g})")
        lines.append(f"fp16 training drift from fp32 {_fmt(s['fp16_drift_from_fp32'])} (sanity bound "
                     f"{s['drift_tolerance']:g}); unscale_() then step() vs step(): "
                     f"{_fmt(s['unscale_vs_step_relative_error'])}")
        lines.append(f"inf in the adversarial / the stashed clean gradient skipped the step: {s['inf_steps_skipped']}; "
                     f"final scale {_fmt(s['final_scale'])}")
    elif name == "accelerate_fp16" and "step_error" in s:
        lines.append(f"accelerate {s['accelerate']}, mixed_precision={s['mixed_precision']}, scaler {s['scaler']}, "
                     f"{s['steps_taken']} of {s['steps']} steps taken; each step against its float64 reference "
                     f"{_fmt(s['step_error'])} (tol {s['step_tolerance']:g}); drift from fp32 "
                     f"{_fmt(s['drift_from_fp32'])} (sanity bound {s['drift_tolerance']:g})")
    elif name == "cuda_tests" and "collected" in s:
        lines.append(f"{s['collected']} collected: {s['passed']} passed, {s['failed']} failed, {s['errors']} errors, "
                     f"{s['skipped']} skipped")
        lines += [f"{t['outcome'].upper()} {t['id']}: {t['message'][:150]}" for t in s["tests"]
                  if t["outcome"] in ("failed", "error")]
    elif name == "reconstruct_benchmark":
        for model in s.get("results", []):
            lines += model["table"].splitlines()
            if model.get("compile_error"):
                lines.append("  compile error: " + model["compile_error"][:200])
        for memory in s.get("memory", []):
            fused = memory["variants"]["agr_fused"]
            lines.append(f"GPU memory {memory['model']}: AGR fused extra peak "
                         f"{fused['extra_over_plain_bytes'] / 2**20:.1f} MiB = "
                         f"{fused['extra_over_plain_ratio_to_params']:.2f} x parameters (<= 1.25)")
    elif name == "training" and "runs" in s:
        for arm, r in s["runs"].items():
            lines.append(f"{arm}: exit {r['returncode']}, {r['wall_s']:.1f} s wall, seconds per epoch "
                         f"{_fmt(r['seconds_per_epoch'])}: {r['command']}")
        if s.get("agr_off"):
            lines.append(f"AGR off: {s['agr_off']}")
    for problem in s.get("problems", []):
        lines.append(f"PROBLEM: {problem}")
    for warning in s.get("warnings", []):
        lines.append(f"warning: {warning}")
    if s.get("note"):
        lines.append(f"note: {s['note']}")
    return lines


def format_summary(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"agr_optim GPU check ({report['started_at']}): {report['elapsed_s']:.1f} s of a "
             f"{report['budget_s']:.0f} s budget, overall {report['overall'].upper()}"]
    lines.append(f"torch {env.get('torch')} (CUDA build {env.get('torch_cuda')}), Python {env.get('python')}, "
                 f"commit {str(env.get('git_commit'))[:10]}, sources {str(env.get('source_sha256'))[:12]}")
    if report["cuda"]:
        for d in env.get("devices", []):
            lines.append(f"device: {d['name']} (sm {d['capability']}, {d['total_memory_gib']} GiB), cuDNN "
                         f"{env.get('cudnn')}, driver {env.get('driver')}")
    else:
        lines.append("NO CUDA DEVICE: only the CPU parts ran (quick shapes); nothing below is a GPU result")
    for name, s in report["sections"].items():
        head = f"[{s['status']:>7}] {name} ({s['seconds']:.1f} s of {s['limit_s']:.0f} s)"
        if s.get("reason"):
            head += f": {s['reason']}"
        lines.append(head)
        lines += [f"    {line}" for line in _describe(name, s)]
        if s.get("error"):
            lines.append("    error: " + s["error"].strip().splitlines()[-1][:300])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Checks and benchmarks for a CUDA machine (docs/benchmarks.rst)")
    parser.add_argument("--out", help="folder for gpu_check.json, summary.txt and the sections' files")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 480)")
    parser.add_argument("--quick", action="store_true", help="the quick shapes even on CUDA (always without CUDA)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="run only these sections")
    parser.add_argument("--section-limit", action="append", default=[], metavar="NAME=SECONDS",
                        help="override a section's time cap")
    parser.add_argument("--child", choices=list(SECTION_FUNCTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--child-limit", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, Path(args.child_out), args.child_limit, args.quick, args.device)
        return 0
    if not args.out:
        parser.error("--out DIR is required")
    if not args.budget > 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    overrides = {}
    for item in args.section_limit:
        name, _, seconds = item.partition("=")
        if name not in SECTIONS or not re.fullmatch(r"\d+(\.\d+)?", seconds):
            parser.error(f"--section-limit takes NAME=SECONDS with NAME one of {', '.join(SECTIONS)}, got {item!r}")
        overrides[name] = float(seconds)
    command = "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv)
    # Absolute: the sections' processes and pytest run in the repository root.
    report = run(Path(args.out).resolve(), budget=args.budget, quick=args.quick, sections=args.sections,
                 overrides=overrides, command=command)
    return 0 if report["overall"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
