"""Shared test settings: the hypothesis profile, the seed fixture, and the path to ``_asserts``."""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# The tests import their shared assertions as `from _asserts import ...`; with
# --import-mode=importlib the tests folder is not on sys.path by itself.
sys.path.insert(0, os.path.dirname(__file__))

# deadline=None: the first example of a test pays for torch's lazy initialisation.
# The seed fixture below is autouse, so every @given test "uses" a function-scoped fixture;
# that is harmless here (hypothesis draws its own data; the fixture only resets the RNGs).
settings.register_profile(
    "agr",
    deadline=None,
    max_examples=60,
    stateful_step_count=30,  # rules per sequence of tests/test_state_machine.py (it runs 4 x max_examples)
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# A longer run, for hunting: HYPOTHESIS_PROFILE=agr-thorough python3 -m pytest tests
# (the state machine then runs 8,000 sequences of up to 50 rules).
settings.register_profile(
    "agr-thorough", parent=settings.get_profile("agr"), max_examples=2000, stateful_step_count=50
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "agr"))


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test starts from the same random state (torch, numpy, random)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    return 0


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is faster and spares the shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
