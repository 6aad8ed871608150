"""``--preset authors`` / ``--authors-step``, the clip note and ``summary.json``'s best since AGR
(issue 16, items 1, 4 and 5, agr-train's half): what agr-train adds on top of the recipes'
``authors=True`` (which ``tests/test_authors_step.py`` checks against the authors' algorithm)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _training import cli_args, read_metrics, run

from agr_optim.recipes import PGD, avmixup_step, mart_step
from agr_optim.training import ConfigError, Trainer, load_data, resolve
from agr_optim.training.reporting import MOSTLY_CLIPPED, clip_note


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(tmp_path, **flags):
    base = {"out": str(tmp_path / "run"), "epochs": 2, "agr_start_epoch": 1, "attack_steps": 2, "eval_steps": 2,
            "eval_every": 1, "batch_size": 128, "warm_start_stats": True}
    return resolve({**base, **flags})[0]


def test_the_authors_preset_is_the_paper_preset_with_their_step():
    cfg, sources = resolve({"out": "x", "preset": "authors", "data_dir": "somewhere"})
    paper, _ = resolve({"out": "x", "preset": "paper", "data_dir": "somewhere"})
    assert cfg.authors_step and not paper.authors_step and sources["authors_step"] == "preset authors"
    differing = {k for k in cfg.to_json() if cfg.to_json()[k] != paper.to_json()[k]}
    assert differing == {"authors_step", "preset"}


@pytest.mark.parametrize(
    "flags, message",
    [({"clean_pass": "needed"}, "--clean-pass must be always with --authors-step"),
     ({"method": "trades", "trades_attack": "kl"}, "--trades-attack must be ce with --authors-step")],
)
def test_what_the_authors_step_cannot_be_is_refused_up_front(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        resolve({"out": str(tmp_path), "authors_step": True, **flags})


@pytest.mark.parametrize("method", ["at", "mart", "avmixup"])
def test_the_engine_runs_the_recipes_authors_step_and_logs_their_way(tmp_path, method):
    """An epoch of ``Trainer`` with ``authors_step`` is the recipes' ``authors=True`` step with their
    PGD (same weights, BatchNorm buffers and optimizer state), its training loss the last batch's
    and its training accuracy on the adversarial logits."""
    cfg = _cfg(tmp_path, authors_step=True, method=method, agr_start_epoch=0)
    data = load_data(cfg)
    trainer, twin = Trainer(cfg, data), Trainer(cfg, data)
    row = trainer.train_epoch()
    attack = PGD(cfg.eps, cfg.attack_step, cfg.attack_steps, authors=True)
    losses, correct = [], 0
    with twin.own_streams():
        twin.model.train()
        opt = twin.optimizer_for(0)
        for x, y in twin.training_batches():
            if method == "at":
                from agr_optim.recipes import pgd_at_step

                out = pgd_at_step(twin.model, opt, x, y, attack=attack, clean_pass="always", authors=True)
            elif method == "mart":
                out = mart_step(twin.model, opt, x, y, beta=cfg.beta, attack=attack, clean_pass="always",
                                authors=True)
            else:
                out = avmixup_step(twin.model, opt, x, y, attack=attack, generator=twin.augment_rng,
                                   clean_pass="always", authors=True)
            losses.append(out.loss.item())
            correct += int((out.logits_adv.argmax(1) == y).sum())
    for (name, a), b in zip(trainer.module.state_dict().items(), twin.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert row["train_loss"] == pytest.approx(losses[-1], rel=1e-12)
    assert row["train_robust_acc"] == pytest.approx(correct / data.y_train.shape[0], rel=1e-12)
    if len(losses) > 1:
        assert not math.isclose(row["train_loss"], sum(losses) / len(losses), rel_tol=1e-9)


def test_summary_gives_the_best_overall_and_since_agr(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = run(cli_args(out=out, epochs=3, agr_start_epoch=1, eval_every=1, attack_steps=1, eval_steps=1),
                     capsys)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = read_metrics(out)
    agr_rows = [r for r in rows if r["agr_active"] == "1"]
    best_agr = max(agr_rows, key=lambda r: float(r["test_robust_acc"]))
    assert summary["best_agr"]["epoch"] == int(best_agr["epoch"])
    assert summary["best_agr"]["test_robust_acc"] == pytest.approx(float(best_agr["test_robust_acc"]))
    best = max(rows, key=lambda r: float(r["test_robust_acc"]))
    assert summary["best"]["epoch"] == int(best["epoch"])
    assert summary["best_predates_agr"] == (best["agr_active"] == "0")


def test_a_mostly_clipped_epoch_gets_a_note(tmp_path):
    cfg = _cfg(tmp_path)
    row = {"epoch": 7, "agr_active": 1, "agr_clip_rate": MOSTLY_CLIPPED + 0.3}
    note = clip_note(cfg, row)
    assert note is not None and "clipped 80 % of the segments in epoch 7" in note and "--clip-norm 0.1" in note
    assert clip_note(cfg, {**row, "agr_clip_rate": MOSTLY_CLIPPED}) is None
    assert clip_note(cfg, {**row, "agr_active": 0}) is None  # the warm start's statistics: no AGR step
    assert clip_note(_cfg(tmp_path, clip_norm=0), row) is None


def test_agr_train_prints_the_note(tmp_path, capsys):
    # A clip far below the gradients' norms: every segment is clipped.
    code, stdout, _ = run(cli_args(out=tmp_path / "run", epochs=2, agr_start_epoch=1, eval_every=2,
                                   attack_steps=1, eval_steps=1, clip_norm=1e-6), capsys)
    assert code == 0
    assert "agr-train: note: AGR clipped 100 % of the segments in epoch 1" in stdout
