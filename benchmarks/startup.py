"""Start-up time of the command line: what a user waits for before anything happens.

    python benchmarks/startup.py [--repeats 5]

Times `sparselab --help`, `validate` of every shipped matrix, `plan` of the smoke matrix and a
no-op `run` of it (every cell finished before), each in a fresh process, against the floor a
user cannot go below: `python -c "import torch"` (the pruning methods' validation imports it).
Targets (issue #20): `--help` under 1 s, `validate` and `plan` under 3 s. The median of the
repeats is recorded with the machine's load, since a busy 2-core machine doubles every number.
Results: benchmarks/results/startup.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, header  # noqa: E402

SHIPPED = sorted(str(p.relative_to(REPO)) for p in (REPO / "matrix").glob("*.yaml"))
DATA = REPO.parent / "shared" / "data"


def timed(command: list[str], env: dict[str, str], repeats: int) -> tuple[float, float]:
    """(median, min) wall seconds of `command` in fresh processes; it must succeed."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "SPARSELAB_HOME": f"{tmp}/home", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
               "OMP_NUM_THREADS": "1"}
        cli = [sys.executable, "-m", "sparselab"]
        data = ["--data-dir", str(DATA)] if DATA.is_dir() else []
        subprocess.run([*cli, "run", "matrix/smoke.yaml"], cwd=REPO, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # for the no-op run
        rows = [("python -c 'import torch' (floor)", [sys.executable, "-c", "import torch"], None),
                ("sparselab --help", [*cli, "--help"], 1.0),
                (f"sparselab validate matrix/*.yaml ({len(SHIPPED)} files)",
                 [*cli, "validate", *SHIPPED, *data], 3.0),
                ("sparselab plan matrix/smoke.yaml", [*cli, "plan", "matrix/smoke.yaml"], 3.0),
                ("sparselab run matrix/smoke.yaml (all cells finished: no-op)",
                 [*cli, "run", "matrix/smoke.yaml"], None)]
        load = os.getloadavg()[0]
        results = [(name, *timed(command, env, args.repeats), target)
                   for name, command, target in rows]
    lines = header("Command-line start-up") + [
        f"Load average at the start: {load:.2f} (1 min). Median and minimum of {args.repeats} "
        "fresh processes each.", "",
        "| command | median s | min s | target s |", "|---|---|---|---|"]
    lines += [f"| {name} | {median:.2f} | {low:.2f} | {target if target else ''} |"
              for name, median, low, target in results]
    out = REPO / "benchmarks" / "results" / "startup.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
