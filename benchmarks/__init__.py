"""Benchmarks of agr_optim: ``python -m benchmarks.reconstruct [--quick] [--out FILE.json]``.

Not part of the installed package; run from the repository root. See docs/benchmarks.rst.
"""
