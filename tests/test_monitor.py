"""StatsAccumulator: epoch means of AGR's statistics against numpy over the raw gradients.

The references are computed here in numpy float64 from the gradients themselves (norms, dot
products, the paper's rule for the reconstructed norm, ``|a - c|`` from the vectors), not from
the library's per-segment statistics.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from agr_optim import AGROptimizer, ReconstructionStats, StatsAccumulator
from agr_optim.functional import statistics

MEANS = (
    "cosine", "projection_rate", "norm_adversarial", "norm_clean", "norm_difference", "l2_distance",
    "norm_reconstructed", "clip_rate",
)
RTOL = 1e-9  # float64 gradients: the library sums in float64; a few hundred roundings


# ---------------------------------------------------------------------- numpy reference
def segment_figures(a: np.ndarray, c: np.ndarray, clip_norm: float | None) -> dict[str, float]:
    na, nc = float(np.linalg.norm(a)), float(np.linalg.norm(c))
    d = float(a @ c)
    cos = d / (na * nc) if na * nc > 0 else 0.0
    if cos <= 0:
        r = a - d / nc**2 * c if nc > 0 else a
    else:
        r = cos * c + (1 - cos) * a
    nr = float(np.linalg.norm(r))
    return {
        "cosine": cos, "projection_rate": float(cos <= 0), "norm_adversarial": na, "norm_clean": nc,
        "norm_difference": na - nc, "l2_distance": float(np.linalg.norm(a - c)), "norm_reconstructed": nr,
        "clip_rate": float(clip_norm is not None and nr > clip_norm),
    }


def reference(steps: list[list[tuple[np.ndarray, np.ndarray]]], clip_norm, ratio) -> tuple[dict, list[list[bool]]]:
    """Pooled means over (step, segment) pairs left after the near-zero rule; also the kept masks."""
    rows, kept = [], []
    for pairs in steps:
        na = [float(np.linalg.norm(a)) for a, _ in pairs]
        nc = [float(np.linalg.norm(c)) for _, c in pairs]
        keep = [
            ratio is None or (x > ratio * max(na) and y > ratio * max(nc)) for x, y in zip(na, nc, strict=True)
        ]
        kept.append(keep)
        rows += [segment_figures(a, c, clip_norm) for (a, c), k in zip(pairs, keep, strict=True) if k]
    out = {key: float(np.mean([row[key] for row in rows])) if rows else math.nan for key in MEANS}
    out["steps"] = float(len(steps))
    out["segments"] = float(len(rows))
    out["near_zero_segments"] = float(sum(not k for keep in kept for k in keep))
    return out, kept


def assert_dict_close(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    for key, value in expected.items():
        assert isinstance(got[key], float), key
        if math.isnan(value):
            assert math.isnan(got[key]), (key, got[key])
        else:
            assert got[key] == pytest.approx(value, rel=RTOL, abs=1e-300), key


# ---------------------------------------------------------------------- data
SIZES = (5, 3, 7, 1, 4)


def random_steps(num_steps: int = 5, seed: int = 0) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Gradients of five segments; segment 3 is a batch-norm-like bias (|a| ~ 1e-9 of the others)."""
    rng = np.random.default_rng(seed)
    steps = []
    for step in range(num_steps):
        pairs = []
        for index, size in enumerate(SIZES):
            scale = float(np.exp(rng.normal(0, 1)))
            a = rng.normal(0, scale, size)
            c = 0.6 * a + rng.normal(0, scale, size) if index % 2 else rng.normal(0, scale, size)
            if index == 3:
                a = a * 1e-9
            if step == 2 and index == 1:
                c = np.zeros(size)  # an exact zero: its cosine 0 is a convention
            pairs.append((a, c))
        steps.append(pairs)
    return steps


def stats_of(pairs, clip_norm, granularity="tensor") -> ReconstructionStats:
    adversarial = [torch.tensor(a) for a, _ in pairs]
    clean = [torch.tensor(c) for _, c in pairs]
    return statistics(adversarial, clean, clip_norm=clip_norm, granularity=granularity)


def make_stats(device: str = "cpu", **values) -> ReconstructionStats:
    """Statistics built by field name (fields not given: zeros, False for the flags)."""
    n = len(next(iter(values.values())))
    fields = {}
    for field in dataclasses.fields(ReconstructionStats):
        if field.name in values:
            value = values[field.name]
            fields[field.name] = value if isinstance(value, torch.Tensor) else torch.tensor(
                value, dtype=torch.bool if field.name == "projected" else torch.float64, device=device
            )
        elif field.name in ("projected", "out_of_range"):
            fields[field.name] = torch.zeros(n, dtype=torch.bool, device=device)
        else:
            fields[field.name] = torch.zeros(n, dtype=torch.float64, device=device)
    return ReconstructionStats(**fields)


# ---------------------------------------------------------------------- the means
@pytest.mark.parametrize("ratio", [1e-4, 0.0, None, 0.3])
@pytest.mark.parametrize("clip_norm", [1.0, None])
def test_means_match_numpy_over_several_steps(ratio, clip_norm) -> None:
    steps = random_steps()
    acc = StatsAccumulator(min_norm_ratio=ratio)
    for pairs in steps:
        assert acc.update(stats_of(pairs, clip_norm)) is True
    expected, kept = reference(steps, clip_norm, ratio)
    assert_dict_close(acc.compute(), expected)
    assert acc.steps == 5
    if ratio == 1e-4:  # the bias-like segment every step, the exact zero once, nothing else
        assert [i for keep in kept for i, k in enumerate(keep) if not k] == [3, 3, 1, 3, 3, 3]
    if ratio is None:
        assert expected["near_zero_segments"] == 0
    if clip_norm is not None:
        assert 0 < expected["clip_rate"] < 1  # the data clips some segments and not others


def test_near_zero_segment_would_skew_the_projection_rate() -> None:
    # What the default is for: the noise segment's cosine moves the rate; left out, it does not.
    steps = random_steps(num_steps=8)
    with_noise = StatsAccumulator(min_norm_ratio=None)
    default = StatsAccumulator()
    for pairs in steps:
        pairs = [(a, c) if i != 3 else (a, -np.sign(a @ c) * c) for i, (a, c) in enumerate(pairs)]  # cos <= 0
        with_noise.update(stats_of(pairs, None))
        default.update(stats_of(pairs, None))
    expected, _ = reference([[p for i, p in enumerate(s) if i != 3] for s in steps], None, 0.0)
    got = default.compute()
    assert got["projection_rate"] == pytest.approx(expected["projection_rate"], rel=RTOL)
    assert with_noise.compute()["projection_rate"] > got["projection_rate"]


def test_from_the_optimizer_with_names() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.1), clip_norm=0.5)
    acc = StatsAccumulator(model)
    names = [n for n, _ in model.named_parameters()]
    steps = []
    for _ in range(4):
        x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        clean = [p.grad.numpy().ravel().copy() for p in model.parameters()]
        opt.stash_clean()
        nn.functional.cross_entropy(model(x + 0.3 * torch.randn_like(x)), y).backward()
        adversarial = [p.grad.numpy().ravel().copy() for p in model.parameters()]
        opt.step()
        assert acc.update(opt) is True
        assert acc.update(opt) is False  # the same last_stats: not counted twice
        steps.append(list(zip(adversarial, clean, strict=True)))
    expected, _ = reference(steps, 0.5, 1e-4)
    for index, name in enumerate(names):
        per_name, _ = reference([[s[index]] for s in steps], 0.5, None)
        expected.update({f"{key}/{name}": per_name[key] for key in MEANS})
    got = acc.compute()
    assert_dict_close(got, expected)
    assert acc.compute(prefix="agr/") == {f"agr/{k}": v for k, v in got.items()}


def test_per_name_entries_for_segments_of_several_parameters() -> None:
    params = nn.ParameterDict({f"p{i}": nn.Parameter(torch.zeros(size, dtype=torch.float64)) for i, size in
                               enumerate(SIZES)})
    acc = StatsAccumulator(params)
    steps = random_steps(num_steps=3)
    for pairs in steps:
        members = tuple(params.values())
        acc.update(stats_of(pairs, 2.0, granularity="global"), segment_params=[members])
    expected, _ = reference([[(np.concatenate([a for a, _ in s]), np.concatenate([c for _, c in s]))] for s in steps],
                            2.0, 1e-4)
    expected.update({f"{key}/p0+4": expected[key] for key in MEANS})
    assert_dict_close(acc.compute(), expected)


def test_names_refused_when_they_cannot_be_found() -> None:
    model = nn.Linear(2, 2)
    acc = StatsAccumulator(model)
    stats = make_stats(cosine=[0.5, 0.5], norm_adversarial=[1.0, 1.0], norm_clean=[1.0, 1.0])
    with pytest.raises(TypeError, match="segment_params="):
        acc.update(stats)
    with pytest.raises(ValueError, match="has 1 segments but the statistics have 2"):
        acc.update(stats, segment_params=[(model.weight,)])
    with pytest.raises(ValueError, match=r"segment_params\[1\] holds a parameter \(shape \(3,\)\) that is not in"):
        acc.update(stats, segment_params=[(model.weight,), (nn.Parameter(torch.zeros(3)),)])
    with pytest.raises(TypeError, match="AGROptimizer or a ReconstructionStats"):
        acc.update(stats.to_dict())
    with pytest.raises(TypeError, match="segment_params is for a ReconstructionStats"):
        StatsAccumulator().update(AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.1)),
                                  segment_params=[(model.weight,)])
    assert acc.steps == 0 and acc.compute()["steps"] == 0.0


# ---------------------------------------------------------------------- no host sync
def test_update_reads_nothing_back_from_the_device() -> None:
    # On the meta device every read of a value (.item(), .tolist(), bool(), a Python branch on a
    # tensor) raises: update() must be tensor ops only. compute() reads, and so fails there.
    model = nn.Linear(3, 2, device="meta")
    acc = StatsAccumulator(model)
    for _ in range(3):
        stats = make_stats(
            "meta",
            **{name: torch.empty(2, device="meta", dtype=torch.float32) for name in (
                "cosine", "norm_adversarial", "norm_clean", "norm_reconstructed", "clip_scale")},
        )
        assert acc.update(stats, segment_params=[(model.weight,), (model.bias,)]) is True
    plain = StatsAccumulator(min_norm_ratio=None)
    plain.update(stats)
    state = acc.state_dict()
    assert state["totals"].device.type == "meta" and state["per_name"].shape == (2, 9)
    with pytest.raises((RuntimeError, NotImplementedError)):
        acc.compute()


# ---------------------------------------------------------------------- edges
def test_no_steps_gives_nan_means_and_zero_counts() -> None:
    acc = StatsAccumulator(nn.Linear(2, 2))
    got = acc.compute()
    assert set(got) == {"steps", "segments", "near_zero_segments", *MEANS}
    assert got["steps"] == got["segments"] == got["near_zero_segments"] == 0.0
    assert all(math.isnan(got[key]) for key in MEANS)
    # A step whose every segment is near zero counts as a step with no pairs.
    plain = StatsAccumulator()
    plain.update(make_stats(cosine=[0.3, 0.2], norm_adversarial=[0.0, 1.0], norm_clean=[1.0, 0.0]))
    got = plain.compute()
    assert (got["steps"], got["segments"], got["near_zero_segments"]) == (1.0, 0.0, 2.0)
    assert all(math.isnan(got[key]) for key in MEANS)
    plain.update(make_stats(cosine=[], norm_adversarial=[], norm_clean=[]))  # no segments at all
    assert plain.compute()["steps"] == 2.0


def test_warm_start_without_clean_pass_is_skipped_and_with_it_is_logged() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    reference_model = nn.Linear(4, 3)
    reference_model.load_state_dict(model.state_dict())
    opt = AGROptimizer(torch.optim.SGD(model.parameters(), lr=0.1), clip_norm=0.01, start_step=3)
    sgd = torch.optim.SGD(reference_model.parameters(), lr=0.1)
    acc = StatsAccumulator()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    x_adv = x + 0.2 * torch.randn_like(x)
    counted = []
    for step in range(3):  # all warm start; steps 1 and 2 log, paying the clean pass
        opt.zero_grad()
        if step > 0:
            nn.functional.cross_entropy(model(x), y).backward()
            opt.stash_clean()
        nn.functional.cross_entropy(model(x_adv), y).backward()
        opt.step()
        counted.append(acc.update(opt))
        sgd.zero_grad()
        nn.functional.cross_entropy(reference_model(x_adv), y).backward()
        sgd.step()
        # The update stays the adversarial gradient, unclipped (clip 0.01 would show).
        for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    assert counted == [False, True, True]
    got = acc.compute()
    assert got["steps"] == 2.0 and got["segments"] == 4.0 and got["clip_rate"] == 1.0  # what AGR would clip


def test_non_finite_statistics_are_not_hidden() -> None:
    acc = StatsAccumulator()
    acc.update(make_stats(cosine=[0.5, math.nan], norm_adversarial=[1.0, math.nan], norm_clean=[1.0, 1e-9]))
    got = acc.compute()
    assert got["segments"] == 2.0 and math.isnan(got["cosine"]) and math.isnan(got["norm_adversarial"])
    acc = StatsAccumulator()
    acc.update(make_stats(cosine=[0.5, 0.0], norm_adversarial=[1.0, math.inf], norm_clean=[1.0, 1.0]))
    got = acc.compute()
    assert got["segments"] == 2.0 and got["l2_distance"] == math.inf and got["norm_adversarial"] == math.inf


def test_l2_distance_is_stable_at_the_ends_of_the_range() -> None:
    big, tiny = 1e200, 1e-200  # squares overflow or underflow in float64
    acc = StatsAccumulator(min_norm_ratio=None)
    acc.update(make_stats(cosine=[0.5], norm_adversarial=[big], norm_clean=[big]))
    assert acc.compute()["l2_distance"] == pytest.approx(big, rel=1e-12)  # |a|=|c|, 60 degrees
    acc = StatsAccumulator(min_norm_ratio=None)
    acc.update(make_stats(cosine=[0.0], norm_adversarial=[3 * tiny], norm_clean=[4 * tiny]))
    assert acc.compute()["l2_distance"] == pytest.approx(5 * tiny, rel=1e-12)
    acc = StatsAccumulator(min_norm_ratio=None)
    acc.update(make_stats(cosine=[math.nextafter(1.0, 2.0), -1.0], norm_adversarial=[2.0, 2.0], norm_clean=[2.0, 1.0]))
    # cos rounded above 1 gives 0, not NaN; antiparallel gives |a| + |c|.
    assert acc.compute()["l2_distance"] == pytest.approx((0.0 + 3.0) / 2, rel=1e-12)


def test_reset_and_bad_arguments() -> None:
    acc = StatsAccumulator()
    acc.update(make_stats(cosine=[0.5], norm_adversarial=[1.0], norm_clean=[1.0]))
    acc.reset()
    assert acc.steps == 0 and math.isnan(acc.compute()["cosine"])
    for bad in (-1e-3, math.nan, True, "1e-4"):
        with pytest.raises(ValueError, match="Invalid min_norm_ratio"):
            StatsAccumulator(min_norm_ratio=bad)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        StatsAccumulator([nn.Parameter(torch.zeros(2))])
    bad = make_stats(cosine=[0.5, 0.2], norm_adversarial=[1.0, 1.0], norm_clean=[1.0, 1.0])
    bad = dataclasses.replace(bad, clip_scale=torch.ones(3))
    with pytest.raises(ValueError, match="clip_scale has 3 entries"):
        acc.update(bad)
    with pytest.raises(TypeError, match="prefix must be a str"):
        acc.compute(prefix=1)
    assert acc.steps == 0


# ---------------------------------------------------------------------- resuming
def test_state_dict_resumes_the_epoch() -> None:
    steps = random_steps(num_steps=4)
    model = nn.ParameterDict({f"p{i}": nn.Parameter(torch.zeros(n, dtype=torch.float64)) for i, n in enumerate(SIZES)})
    members = [(p,) for p in model.values()]
    whole = StatsAccumulator(model)
    first = StatsAccumulator(model)
    for pairs in steps[:2]:
        first.update(stats_of(pairs, 1.0), segment_params=members)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = StatsAccumulator(model)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for pairs in steps[2:]:
        resumed.update(stats_of(pairs, 1.0), segment_params=members)
    for pairs in steps:
        whole.update(stats_of(pairs, 1.0), segment_params=members)
    assert resumed.compute() == pytest.approx(whole.compute(), rel=1e-15, nan_ok=True)
    assert resumed.steps == 4


def test_load_state_dict_checks_before_changing_anything() -> None:
    acc = StatsAccumulator()
    acc.update(make_stats(cosine=[0.5], norm_adversarial=[1.0], norm_clean=[1.0]))
    before = acc.compute()
    good = StatsAccumulator().state_dict()
    with pytest.raises(ValueError, match="saved with min_norm_ratio=None"):
        acc.load_state_dict(StatsAccumulator(min_norm_ratio=None).state_dict())
    with pytest.raises(ValueError, match="keys"):
        acc.load_state_dict({**good, "extra": 1})
    with pytest.raises(ValueError, match="totals"):
        acc.load_state_dict({**good, "steps": 1, "totals": torch.zeros(4)})
    with pytest.raises(ValueError, match="exactly when"):
        acc.load_state_dict({**good, "steps": 2})
    with pytest.raises(ValueError, match="per_name"):
        acc.load_state_dict({**good, "names": ["w"]})
    assert acc.compute() == before
