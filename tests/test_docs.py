"""The Sphinx site builds with warnings as errors, and its examples run (``-b doctest``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx")

DOCS = Path(__file__).resolve().parents[1] / "docs"


def sphinx(builder: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder, str(DOCS), str(out),
         "-d", str(out / ".doctrees")],
        capture_output=True, text=True, timeout=300, check=False,
    )


@pytest.mark.slow
def test_html_builds_without_warnings(tmp_path: Path) -> None:
    run = sphinx("html", tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    for page in ("index", "quickstart", "algorithm", "api"):
        assert (tmp_path / f"{page}.html").is_file()
    api = (tmp_path / "api.html").read_text()
    for name in ("AGROptimizer", "ReconstructionStats", "reconstruct_", "stash_clean", "last_stats"):
        assert name in api, f"{name} missing from the API page"
    algorithm = (tmp_path / "algorithm.html").read_text()
    assert "@inproceedings" in algorithm and "Tong" in algorithm


@pytest.mark.slow
def test_doctests_in_the_docs_pass(tmp_path: Path) -> None:
    run = sphinx("doctest", tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = (tmp_path / "output.txt").read_text()
    assert "0 failures in tests" in summary, summary
