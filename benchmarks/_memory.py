"""Peak resident memory of real training steps, each variant in a fresh process.

``python -m benchmarks._memory --model NAME --variant VARIANT`` trains the model for a few
steps (random CIFAR-sized batches, the paper's SGD: momentum 0.9, weight decay 5e-4) and prints
one JSON line with the peak RSS (``VmHWM`` on Linux). The parent compares each AGR variant with
plain SGD run the same way: the difference is the extra memory AGR needs. The parent runs the
children with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed, so that freed tensors leave the RSS at once
and the peak is that of the live tensors (repeatable to 0.1 MiB). Every AGR step runs
two real backward passes (clean, then adversarial), so the stash is what autograd produced.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

VARIANTS = ("plain", "agr_fused", "agr_device", "agr_loop", "per_layer_reference")
#: The ``fused`` setting of each AGR variant: ``agr_device`` is the accelerator schedule (flat
#: rows) forced on the CPU, whose allocations are those it makes on a GPU.
FUSED: dict[str, bool | str] = {"agr_fused": True, "agr_device": "device", "agr_loop": False}


def _peak_rss_bytes() -> int:
    """This process's peak RSS. ``VmHWM`` where there is one: ``ru_maxrss`` survives ``exec``,
    so in a child started by a large parent it reports the parent's size at the fork."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _train(model_name: str, variant: str, steps: int, batch: int, device: str = "cpu") -> dict[str, float]:
    """``device``: where to train (``benchmarks.gpu_check`` reads the CUDA allocator's peak around it)."""
    from agr_optim import AGROptimizer

    from ._reference import per_layer_reconstruct
    from ._shapes import build_model

    torch.manual_seed(0)
    model = build_model(model_name, device)
    params = [p for p in model.parameters()]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    sgd = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)
    opt = AGROptimizer(sgd, clip_norm=0.1, fused=FUSED[variant]) if variant in FUSED else sgd
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    start_rss = _peak_rss_bytes()
    for _ in range(steps):
        x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
        opt.zero_grad()
        if variant == "plain":
            loss_fn(model(x_adv), y).backward()
        elif variant == "per_layer_reference":
            loss_fn(model(x), y).backward()
            clean = [p.grad for p in params]
            for p in params:
                p.grad = None
            loss_fn(model(x_adv), y).backward()
            for p, r in zip(params, per_layer_reconstruct([p.grad for p in params], clean, 0.1), strict=True):
                p.grad = r
            del clean
        else:
            loss_fn(model(x), y).backward()
            opt.stash_clean()
            loss_fn(model(x_adv), y).backward()
        opt.step()
    return {"peak_rss_bytes": _peak_rss_bytes(), "rss_before_training_bytes": start_rss, "param_bytes": param_bytes}


def measure(model_name: str, variants: tuple[str, ...] = VARIANTS, steps: int = 3, batch: int = 2) -> dict:
    """Peak RSS of each variant in its own fresh interpreter; extra memory relative to plain SGD."""
    rows = {}
    for variant in variants:
        command = [sys.executable, "-m", "benchmarks._memory", "--model", model_name, "--variant", variant,
                   "--steps", str(steps), "--batch", str(batch)]
        # A fixed mmap threshold: glibc then maps every tensor above 64 KiB on its own and
        # unmaps it when freed. With its default, adaptive threshold, freed gradients stay in
        # the heap or not depending on the order of earlier frees, and the peak RSS of the same
        # run moved by up to 0.6x the parameters' bytes from one process to the next.
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run(command, capture_output=True, text=True, check=True, env=env,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    plain = rows["plain"]["peak_rss_bytes"]
    param_bytes = rows["plain"]["param_bytes"]
    for row in rows.values():
        row["extra_over_plain_bytes"] = row["peak_rss_bytes"] - plain
        row["extra_over_plain_ratio_to_params"] = (row["peak_rss_bytes"] - plain) / param_bytes
    return {"model": model_name, "steps": steps, "batch": batch, "param_bytes": param_bytes, "variants": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", required=True, choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(_train(args.model, args.variant, args.steps, args.batch)))


if __name__ == "__main__":
    main()
