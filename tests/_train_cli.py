"""Running ``agr-train`` in the test process: shared by tests/test_train.py and tests/test_run_folder.py."""

from __future__ import annotations

from agr_optim import train as train_mod


def run(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr)."""
    try:
        code = train_mod.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(stderr: str) -> str:
    """``stderr`` if it is one ``agr-train: error:`` line (a refusal or a stop), else fail."""
    assert stderr.count("\n") == 1 and stderr.startswith("agr-train: error:"), stderr
    return stderr
