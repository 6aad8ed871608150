"""One title for the paper everywhere, and one BibTeX: ``agr_optim.CITATION``."""

from __future__ import annotations

import re
from pathlib import Path

import agr_optim
from agr_optim._citation import TITLE

ROOT = Path(__file__).resolve().parents[1]
WRONG = "Adversarial Training with Adaptive Gradient Reconstruction"  # what older docstrings said


def test_readme_bibtex_is_agr_optim_citation() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bibtex\n(.*?)\n```", readme, flags=re.S)
    assert blocks == [agr_optim.CITATION]


def test_citation_holds_the_title() -> None:
    title = re.search(r"title\s*=\s*\{(.*?)\},", agr_optim.CITATION, flags=re.S)
    assert title and " ".join(title.group(1).split()) == TITLE
    assert TITLE == (
        "Balancing Generalization and Robustness in Adversarial Training via Steering through Clean and "
        "Adversarial Gradient Directions"
    )


def test_no_file_names_the_paper_otherwise() -> None:
    patterns = ("*.md", "*.toml", "*.cfg", "agr_optim/**/*.py", "docs/**/*.rst", "docs/**/*.py", "examples/**/*.py",
                "benchmarks/**/*.py", "tests/**/*.py")
    files = {path for pattern in patterns for path in ROOT.glob(pattern) if "_build" not in path.parts}
    files.discard(Path(__file__).resolve())
    assert len(files) > 30  # the globs found the project
    offenders = [
        str(path.relative_to(ROOT)) for path in sorted(files)
        if WRONG.lower() in " ".join(path.read_text(errors="replace").split()).lower()
    ]
    assert offenders == []
