"""The parts of ``agr-train`` (:mod:`agr_optim.train`) that other code reuses.

Today: :mod:`agr_optim.training.run_folder`, the run folder's file safety (atomic durable writes,
checksummed checkpoints, the folder lock, the test-only fault hook). The rest of ``train.py``
(settings, engine, command line, reporting) is to follow as ``config.py``, ``engine.py``,
``cli.py`` and ``reporting.py``.
"""
