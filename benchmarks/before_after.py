"""The CPU host schedule before and after a change, back to back: ``python -m benchmarks.before_after``.

Each checkout (``--checkout NAME=PATH``: clones of this repository at the commits to compare)
runs the host-schedule rows of its own ``benchmarks/reconstruct.py`` (its ``Workload`` and
``build_cases``, the same code since a529617) in a fresh process with ``PYTHONPATH`` pointing
at it: the floor, the plain SGD step, ``AGROptimizer(SGD, fused=True)``'s step and
``reconstruct(fused=True)``, plus ``reconstruct_(fused=True)`` in place. Runs are interleaved
(each round runs every checkout once, in an order rotated from round to round) so that the load
of a shared machine falls on all alike. Reported per checkout and model: the median over runs,
and the range, of each run's median over repeats of the paired per-repeat ratios to the floor
(the AGR overhead is the AGR step minus the SGD step of the same repeat).

::

    git clone -q . /tmp/old && git -C /tmp/old checkout -q bee0e84
    git clone -q . /tmp/new
    python -m benchmarks.before_after --checkout before=/tmp/old --checkout after=/tmp/new --out ba.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODELS = ("preactresnet18", "wideresnet34_10")

#: Run inside a checkout (its own agr_optim and benchmarks): one JSON line of per-repeat seconds.
DRIVER = r"""
import json, sys
import torch
import agr_optim
from agr_optim import functional as F
from benchmarks import reconstruct as R
from benchmarks._shapes import parameter_shapes

name, repeats, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
work = R.Workload(parameter_shapes(name), torch.device("cpu"))
cases, _ = R.build_cases(work, peers=False, compiled=False)
cases = [c for c in cases if c.name in ("floor", "sgd_step", "agr_fused_step", "reconstruct_fused")]
inplace = [a.clone() for a in work.w_adv]
def run_inplace():
    for a, src in zip(inplace, work.w_adv):
        a.copy_(src)
    return R._timed(work.device, lambda: F.reconstruct_(inplace, work.w_clean, clip_norm=R.CLIP_NORM, fused=True))
cases.append(R.Case("reconstruct_inplace_fused", run_inplace))
for c in cases:
    for _ in range(3):
        c.run()
for r in range(repeats):
    s = r % len(cases)
    for c in cases[s:] + cases[:s]:
        c.times.append(c.run())
print(json.dumps({"model": name, "agr_optim": agr_optim.__file__, "times": {c.name: c.times for c in cases},
                  "threads": torch.get_num_threads()}))
"""


def _load() -> float | None:
    """The machine's 1-minute load average (Linux), recorded beside each run."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def run_once(checkout: Path, model: str, repeats: int, threads: int = 0) -> dict[str, Any]:
    """One run in ``checkout``; ``threads`` 0: torch's default."""
    load = _load()
    done = subprocess.run([sys.executable, "-c", DRIVER, model, str(repeats), str(threads)], cwd=checkout,
                          capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(checkout)})
    run = json.loads(done.stdout.strip().splitlines()[-1])
    run["times"] = {row: [round(t, 7) for t in times] for row, times in run["times"].items()}  # 0.1 us
    run["load_before"], run["load_after"] = load, _load()
    if not run["agr_optim"].startswith(str(checkout)):
        raise RuntimeError(f"{checkout}: the run imported agr_optim from {run['agr_optim']}, not from the checkout")
    return run


def per_run(times: dict[str, list[float]]) -> dict[str, float]:
    """One run's medians over repeats: ms of each row, paired ratios to the floor."""
    floor, sgd = times["floor"], times["sgd_step"]
    overhead = [a - p for a, p in zip(times["agr_fused_step"], sgd, strict=True)]
    ratios = {"agr_overhead_fused": overhead, **{n: times[n] for n in
                                                ("reconstruct_fused", "reconstruct_inplace_fused", "agr_fused_step")}}
    figures = {f"{name}_ms": statistics.median(t) * 1e3 for name, t in times.items()}
    for name, values in ratios.items():
        figures[f"{name}_over_floor"] = statistics.median(v / f for v, f in zip(values, floor, strict=True))
    return figures


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per checkout and model: every run's figures, their medians and ranges over runs."""
    summary: dict[str, Any] = {}
    for run in runs:
        entry = summary.setdefault(run["checkout"], {}).setdefault(run["model"], {"runs": []})
        entry["runs"].append(per_run(run["times"]))
    for models in summary.values():
        for entry in models.values():
            for key in entry["runs"][0]:
                values = [r[key] for r in entry["runs"]]
                entry[key] = {"median": statistics.median(values), "range": [min(values), max(values)]}
    return summary


def write_report(path: Path, report: dict[str, Any]) -> None:
    """The summary indented, each run's raw times on one line."""
    runs = ",\n".join("  " + json.dumps(run) for run in report["runs"])
    head = json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1)
    path.write_text(head[:-2] + ',\n "runs": [\n' + runs + "\n ]\n}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.before_after", description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", action="append", required=True, metavar="NAME=PATH",
                        help="a clone of this repository at a commit to compare (two or more)")
    parser.add_argument("--rounds", type=int, default=8, help="runs of every checkout and model (default 8)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per run (default 15)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each run (default: torch's)")
    parser.add_argument("--out", required=True, help="the JSON to write (raw times and the summary)")
    args = parser.parse_args(argv)
    checkouts = {}
    for item in args.checkout:
        name, _, path = item.partition("=")
        if not name or not (Path(path) / "agr_optim" / "__init__.py").is_file():
            parser.error(f"--checkout takes NAME=PATH with PATH a clone of this repository, got {item!r}")
        checkouts[name] = Path(path).resolve()
    runs = []
    names = list(checkouts)
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            for model in args.models:
                run = run_once(checkouts[name], model, args.repeats, args.threads)
                runs.append({"checkout": name, "round": round_, "finished": time.strftime("%H:%M:%S"), **run})
                print(f"round {round_} {name} {model}: AGR overhead "
                      f"{per_run(run['times'])['agr_overhead_fused_over_floor']:.2f} x floor", file=sys.stderr)
    commits = {name: subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                                    check=False).stdout.strip() for name, path in checkouts.items()}
    report = {"commits": commits, "rounds": args.rounds, "repeats": args.repeats, "threads": args.threads or None,
              "summary": summarize(runs), "runs": runs}
    write_report(Path(args.out), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
