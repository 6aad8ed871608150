"""How far the paper preset's step is from the AGR authors' step: each departure measured.

Run from the repository root::

    python -m benchmarks.authors_departures                       # the table of docs/reproducing.rst
    python -m benchmarks.authors_departures --quick --out /tmp/d.json

Each departure is measured by running the recipes twice from the same initial weights, on the
same batches, with the same random starts (the global stream seeded before every step) and the
same AVmixup draws: once with ``authors=True`` (the authors' step, checked bit for bit against a
re-implementation of their code in ``tests/test_authors_step.py``), once as ``agr-train --preset
paper`` runs it (the default step, ``clean_pass="gradient"``: the clean forward pass on every step,
the clean gradient in the AGR arm). Everything else is the same, so the difference is the
departure's alone; for AWP, MART and AVmixup both runs use the authors' PGD, so that only the
step's own departure remains (the PGD row measures the PGD).

Setup (the defaults): PreActResNet-18 at width 16 (``benchmarks._shapes``, 56 parameter tensors,
700k parameters, no input normalisation), float32, 10 classes, batches of 32 random CIFAR-sized
images (uniform bytes / 255, as the CIFAR pickles hold) with uniform random labels, torch SGD
(lr 0.1, momentum 0.9, weight decay 5e-4), PGD-10 (eps 8/255, step 2/255, uniform start), AWP
gamma 0.01, MART beta 6; the AGR arm is :class:`~agr_optim.AGROptimizer` (clip 0.1 per tensor)
active from the first step. Relative differences are ``||a - b|| / ||b||`` of the two runs'
*changes* from the common start (parameters, or BatchNorm buffers), the authors' run as ``b``: over
all parameters at once ("global") and per tensor (min, median, max over the tensors); for the
parameters also of the weights themselves (``"of_the_weights"``).
Two controls give the scale: a first update is set beside the paper step's first update with
other random starts of the attack (the attack's own noise), and a comparison after several steps
beside the paper step against itself from weights one float32 step apart (``torch.nextafter``):
PGD's sign steps amplify any difference, so after a few steps that control is far from zero, and
a departure is only visible above it.
A benchmark, not a test: no figure is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from agr_optim import AGROptimizer
from agr_optim.recipes import PGD, avmixup_step, awp_step, mart_step, pgd_at_step

from ._shapes import PreActResNet18

STEPS = {"at": pgd_at_step, "mart": mart_step, "awp": awp_step, "avmixup": avmixup_step}
EPS = 8 / 255


class Setup:
    def __init__(self, *, width: int, batch: int, steps: int, short: int, threads: int) -> None:
        self.width, self.batch, self.steps, self.short, self.threads = width, batch, steps, short, threads
        g = torch.Generator().manual_seed(1)
        self.batches = []
        for _ in range(steps):
            x = torch.randint(0, 256, (batch, 3, 32, 32), generator=g).float() / 255
            self.batches.append((x, torch.randint(0, 10, (batch,), generator=g)))

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return PreActResNet18(width=self.width).train()

    def describe(self) -> dict[str, Any]:
        return {
            "model": f"PreActResNet-18 at width {self.width} (benchmarks._shapes), float32, 10 classes",
            "parameters": sum(p.numel() for p in self.model().parameters()),
            "data": f"batches of {self.batch} uniform random bytes / 255 (3x32x32), uniform random labels",
            "optimizer": "torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)",
            "agr_arm": "AGROptimizer(clip_norm=0.1, granularity='tensor', start_step=0)",
            "attack": "PGD-10, eps 8/255, step 2/255, uniform start",
            "awp_gamma": 0.01, "mart_beta": 6.0, "avmixup_gamma": 2.0,
            "steps_long": self.steps, "steps_short": self.short,
        }


class Run:
    """``count`` steps of one recipe; records the parameters after each step, the BatchNorm
    buffers after the first, the gradients accumulated in the first step (clean first, then
    adversarial: post-accumulate hooks) and the AGR statistics of every step."""

    def __init__(
        self, setup: Setup, method: str, arm: str, count: int, *, nudge: bool = False, seed: int = 1000, **kwargs: Any
    ) -> None:
        model = setup.model()
        self.start = [p.detach().clone() for p in model.parameters()]
        if nudge:  # the control: every weight one float32 step up, nothing else changed
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
        self.buffers0 = {k: v.clone() for k, v in model.named_buffers() if v.is_floating_point()}
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        opt = sgd if arm == "plain" else AGROptimizer(sgd, clip_norm=0.1)
        extra: dict[str, Any] = {}
        if method == "awp":
            extra["gamma"] = 0.01
        if method == "avmixup":
            extra["generator"] = torch.Generator().manual_seed(21)
        grads: list[list[Tensor]] = [[] for _ in model.parameters()]
        hooks = [
            p.register_post_accumulate_grad_hook(lambda p, i=i: grads[i].append(p.grad.detach().clone()))
            for i, p in enumerate(model.parameters())
        ]
        self.params: list[list[Tensor]] = []
        self.stats: list[Any] = []
        for i, (x, y) in enumerate(setup.batches[:count]):
            torch.manual_seed(seed + i)
            STEPS[method](model, opt, x, y, **extra, **kwargs)
            self.params.append([p.detach().clone() for p in model.parameters()])
            self.stats.append(getattr(opt, "last_stats", None))
            if i == 0:
                self.first_grads = [list(g) for g in grads]
                self.buffers1 = {k: v.clone() for k, v in model.named_buffers() if v.is_floating_point()}
                for h in hooks:
                    h.remove()


def _rel(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    num = torch.stack([((x - y).double() ** 2).sum() for x, y in zip(a, b, strict=True)]).sum().sqrt()
    den = torch.stack([(y.double() ** 2).sum() for y in b]).sum().sqrt()
    return float(num / den)


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _moves(run: Run, step: int) -> list[Tensor]:
    return [p - p0 for p, p0 in zip(run.params[step], run.start, strict=True)]


def _compare(paper: Run, authors: Run, step: int) -> dict[str, Any]:
    """The two runs' parameter changes after ``step + 1`` steps, relative to the authors' change
    (and, under ``"of_the_weights"``, the difference of the weights relative to the authors' weights)."""
    a, b = _moves(paper, step), _moves(authors, step)
    wa, wb = paper.params[step], authors.params[step]
    return {
        "global": _rel(a, b),
        "per_tensor": _spread([_rel([x], [y]) for x, y in zip(a, b, strict=True)]),
        "of_the_weights": {
            "global": _rel(wa, wb),
            "per_tensor": _spread([_rel([x], [y]) for x, y in zip(wa, wb, strict=True)]),
        },
    }


def _pair(setup: Setup, method: str, arm: str, count: int, paper_attack: PGD) -> tuple[Run, Run]:
    paper = Run(setup, method, arm, count, attack=paper_attack, clean_pass="gradient")
    authors = Run(setup, method, arm, count, authors=True)
    return paper, authors


def _control(setup: Setup, method: str, arm: str, count: int, paper_attack: PGD, paper: Run) -> dict[str, Any]:
    """The noise floor: the paper step against itself from weights one float32 step apart."""
    nudged = Run(setup, method, arm, count, nudge=True, attack=paper_attack, clean_pass="gradient")
    return _compare(nudged, paper, count - 1)


def _other_start(setup: Setup, method: str, arm: str, paper_attack: PGD, paper: Run) -> dict[str, Any]:
    """The attack's own noise: the paper step's first update against itself with other random starts."""
    other = Run(setup, method, arm, 1, seed=2000, attack=paper_attack, clean_pass="gradient")
    return _compare(other, paper, 0)


class _AuthorsArithmeticClamped:
    """Their PGD's arithmetic with every iterate clamped to [0, 1] (what their discarded
    ``image_adv.clamp(0., 1.)`` meant): separates the clamp from the rounding of the projection."""

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        model.eval()
        try:
            x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
            for _ in range(10):
                x_adv.requires_grad_(True)
                loss = torch.nn.functional.cross_entropy(model(x_adv), y)
                (g,) = torch.autograd.grad(loss, x_adv)
                delta = (x_adv.detach() + 2 / 255 * g.sign() - x).clamp(-EPS, EPS)
                x_adv = (x + delta).clamp(0, 1)
            return x_adv.detach()
        finally:
            model.train()


def _logged(stats: Any) -> dict[str, float]:
    """The statistics the authors log for a step: means over the parameter tensors."""
    return {"cosine": float(stats.cosine.double().mean()), "projection_rate": float(stats.projected.double().mean())}


def measure_pgd(setup: Setup) -> dict[str, Any]:
    model = setup.model()
    x, y = setup.batches[0]
    seen: list[Tensor] = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    torch.manual_seed(1000)
    theirs = PGD(authors=True)(model, x, y)
    hook.remove()
    torch.manual_seed(1000)
    ours = PGD()(model, x, y)
    torch.manual_seed(1000)
    clamped = _AuthorsArithmeticClamped()(model, x, y)
    differ = theirs != ours
    gap = (theirs - ours).abs() / EPS
    outside = torch.stack([((t < 0) | (t > 1)).double().mean() for t in seen[1:]])  # the iterates after the start
    result: dict[str, Any] = {
        "first_batch": {
            "fraction_elements_differ": float(differ.double().mean()),
            "max_abs_difference_over_eps": float(gap.max()),
            "mean_abs_difference_over_eps_where_differ": float(gap[differ].mean()) if differ.any() else 0.0,
            "fraction_differ_clamp_alone": float((theirs != clamped).double().mean()),
            "fraction_differ_projection_rounding_alone": float((clamped != ours).double().mean()),
            "fraction_pixels_within_eps_of_0_or_1": float(((x < EPS) | (x > 1 - EPS)).double().mean()),
            "fraction_attacked_points_outside_0_1": float(outside.mean()),
        }
    }
    for arm in ("plain", "agr"):
        paper, authors = _pair(setup, "at", arm, setup.steps, PGD())
        result[arm] = {
            "first_update": _compare(paper, authors, 0),
            "control_first_update_other_random_start": _other_start(setup, "at", arm, PGD(), paper),
            f"after_{setup.steps}_steps": _compare(paper, authors, -1),
            f"control_after_{setup.steps}_steps": _control(setup, "at", arm, setup.steps, PGD(), paper),
        }
    return result


def measure_awp(setup: Setup) -> dict[str, Any]:
    theirs_pgd = PGD(authors=True)
    result: dict[str, Any] = {}
    paper, authors = _pair(setup, "awp", "agr", setup.short, theirs_pgd)
    clean_p = [g[0] for g in paper.first_grads]
    clean_a = [g[0] for g in authors.first_grads]
    per_tensor = [_rel([p], [a]) for p, a in zip(clean_p, clean_a, strict=True)]
    result["clean_gradient_first_step"] = {
        "global": _rel(clean_p, clean_a),
        "per_tensor": _spread(per_tensor),
        "tensors_that_differ": sum(v > 1e-5 for v in per_tensor),
        "tensors": len(per_tensor),
    }
    result["agr"] = {
        "first_update": _compare(paper, authors, 0),
        "control_first_update_other_random_start": _other_start(setup, "awp", "agr", theirs_pgd, paper),
        f"after_{setup.short}_steps": _compare(paper, authors, -1),
        "logged_statistics_first_step": {"paper": _logged(paper.stats[0]), "authors": _logged(authors.stats[0])},
        f"logged_statistics_mean_of_{setup.short}_steps": {
            name: {k: statistics.mean(_logged(s)[k] for s in run.stats) for k in ("cosine", "projection_rate")}
            for name, run in (("paper", paper), ("authors", authors))
        },
    }
    result["agr"][f"control_after_{setup.short}_steps"] = _control(setup, "awp", "agr", setup.short, theirs_pgd, paper)
    paper, authors = _pair(setup, "awp", "plain", setup.short, theirs_pgd)
    result["plain"] = {
        "first_update": _compare(paper, authors, 0),
        f"after_{setup.short}_steps": _compare(paper, authors, -1),
        f"control_after_{setup.short}_steps": _control(setup, "awp", "plain", setup.short, theirs_pgd, paper),
    }
    return result


def measure_batch_norm(setup: Setup, method: str) -> dict[str, Any]:
    theirs_pgd = PGD(authors=True)
    result: dict[str, Any] = {}
    for arm in ("plain", "agr"):
        paper, authors = _pair(setup, method, arm, setup.short, theirs_pgd)
        entry: dict[str, Any] = {
            "first_update": _compare(paper, authors, 0),
            f"after_{setup.short}_steps": _compare(paper, authors, -1),
            f"control_after_{setup.short}_steps": _control(setup, method, arm, setup.short, theirs_pgd, paper),
        }
        if arm == "plain":
            buffers: dict[str, Any] = {}
            for kind in ("running_mean", "running_var"):
                names = [k for k in paper.buffers1 if k.endswith(kind)]
                moved = [
                    _rel([paper.buffers1[k] - paper.buffers0[k]], [authors.buffers1[k] - authors.buffers0[k]])
                    for k in names
                ]
                absolute = [_rel([paper.buffers1[k]], [authors.buffers1[k]]) for k in names]
                buffers[kind] = {
                    "of_the_change": _spread(moved), "of_the_value": _spread(absolute), "layers": len(names)
                }
            result["batch_norm_after_one_step"] = buffers
        result[arm] = entry
    return result


REPORTING_ONLY = [
    "train loss: the authors log the last batch's loss_train_clean and loss_train_adv (StepOutput.clean_loss "
    "and .loss of the last step), agr-train the epoch mean",
    "train accuracy: the authors count it on output_adv = Model(imgs_adv) (StepOutput.logits_adv; for "
    "AVmixup an extra train-mode pass on x_adv), agr-train on the adversarial objective's logits (AVmixup: the "
    "mixed inputs)",
    "evaluation: the authors seed nothing: PGD-20's random starts continue the global stream of training; "
    "agr-train seeds them with 10000 + seed every epoch (the same starts for every epoch and both arms); their "
    "evaluation attack is their PGD (iterates not clamped), with batches of 128",
]


def _fmt(entry: dict[str, Any]) -> str:
    t = entry["per_tensor"]
    text = f"{entry['global']:.3g} (per tensor {t['min']:.2g} .. {t['max']:.2g}, median {t['median']:.2g})"
    if "of_the_weights" in entry:
        w = entry["of_the_weights"]
        wt = w["per_tensor"]
        text += f" [of the weights {w['global']:.2g}, per tensor {wt['min']:.2g} .. {wt['max']:.2g}]"
    return text


def print_table(report: dict[str, Any]) -> None:
    s, p = report["setup"], report["pgd"]
    long, short = f"after_{s['steps_long']}_steps", f"after_{s['steps_short']}_steps"
    fb = p["first_batch"]
    print(f"setup: {s['model']}, {s['parameters']} parameters; {s['data']}")
    print("PGD (iterates not clamped to [0, 1]), PGD-AT:")
    print(f"  first batch: {fb['fraction_elements_differ']:.1%} of adversarial-input elements differ, by up to "
          f"{fb['max_abs_difference_over_eps']:.2f} eps "
          f"(mean {fb['mean_abs_difference_over_eps_where_differ']:.2f} eps); "
          f"{fb['fraction_pixels_within_eps_of_0_or_1']:.1%} of pixels lie within eps of 0 or 1, "
          f"{fb['fraction_attacked_points_outside_0_1']:.1%} of the attacked points are outside [0, 1]")
    print(f"  of which the clamp alone {fb['fraction_differ_clamp_alone']:.1%}, the projection's rounding alone "
          f"{fb['fraction_differ_projection_rounding_alone']:.1%}")
    for arm in ("plain", "agr"):
        print(f"  {arm:5s} first update {_fmt(p[arm]['first_update'])} (other random start: "
              f"{_fmt(p[arm]['control_first_update_other_random_start'])})")
        print(f"        {long}: {_fmt(p[arm][long])}; control {_fmt(p[arm]['control_' + long])}")
    a = report["awp"]
    cg = a["clean_gradient_first_step"]
    print("AWP (clean gradient at w+v, step at w+v, v subtracted after):")
    print(f"  clean gradient: {cg['global']:.3g} globally, per tensor {cg['per_tensor']['min']:.2g} .. "
          f"{cg['per_tensor']['max']:.2g} (median {cg['per_tensor']['median']:.2g}; {cg['tensors_that_differ']} of "
          f"{cg['tensors']} tensors differ)")
    print(f"  agr   other random start: {_fmt(a['agr']['control_first_update_other_random_start'])}")
    for arm in ("agr", "plain"):
        print(f"  {arm:5s} first update {_fmt(a[arm]['first_update'])}; {short}: {_fmt(a[arm][short])}; "
              f"control {_fmt(a[arm]['control_' + short])}")
    ls = a["agr"]["logged_statistics_first_step"]
    print(f"  logged statistics, first step: cosine {ls['paper']['cosine']:.4f} (paper) vs "
          f"{ls['authors']['cosine']:.4f} "
          f"(authors), projection rate {ls['paper']['projection_rate']:.3f} vs {ls['authors']['projection_rate']:.3f}")
    for method in ("mart", "avmixup"):
        m = report[method]
        bn = m["batch_norm_after_one_step"]
        print(f"{method.upper()} (extra train-mode forward passes):")
        for kind in ("running_mean", "running_var"):
            c, v = bn[kind]["of_the_change"], bn[kind]["of_the_value"]
            print(f"  {kind} after one step: change {c['min']:.2g} .. {c['max']:.2g} (median {c['median']:.2g}), "
                  f"value {v['min']:.2g} .. {v['max']:.2g}")
        for arm in ("plain", "agr"):
            print(f"  {arm:5s} first update {_fmt(m[arm]['first_update'])}; {short}: {_fmt(m[arm][short])}; "
                  f"control {_fmt(m[arm]['control_' + short])}")
    print("reporting only:")
    for line in report["reporting_only"]:
        print(f"  - {line}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.authors_departures", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--width", type=int, default=16, help="PreActResNet-18's first width (default 16)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="steps of the long PGD comparison (default 20)")
    parser.add_argument("--short", type=int, default=5, help="steps of the other comparisons (default 5)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="width 4, batch 8, 2 and 2 steps: a smoke run")
    parser.add_argument("--out", default="docs/results_data/authors_departures.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.batch, args.steps, args.short = 4, 8, 2, 2
    torch.set_num_threads(args.threads)
    setup = Setup(width=args.width, batch=args.batch, steps=args.steps, short=args.short, threads=args.threads)
    start = time.perf_counter()
    measures: dict[str, Callable[[], dict[str, Any]]] = {
        "pgd": lambda: measure_pgd(setup),
        "awp": lambda: measure_awp(setup),
        "mart": lambda: measure_batch_norm(setup, "mart"),
        "avmixup": lambda: measure_batch_norm(setup, "avmixup"),
    }
    report: dict[str, Any] = {"setup": setup.describe()}
    for name, measure in measures.items():
        report[name] = measure()
        print(f"[{name}: {time.perf_counter() - start:.0f} s]", file=sys.stderr)
    report["reporting_only"] = REPORTING_ONLY
    report.update({
        "quick": args.quick, "seconds": time.perf_counter() - start, "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "threads": args.threads,
    })
    print_table(report)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
