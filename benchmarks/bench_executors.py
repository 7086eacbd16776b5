"""Benchmark the executors on one walking profile: in-process, worker processes and Ray.

Every configuration runs the same walking profile (every site of the model, a fixed σ
grid, fresh store), and the profiles must be byte-identical. Each run is split into
phases by wrapping the executor that `wnplan.profiler.make_executor` returns:

- start: building the executor (spawning worker processes, starting the Ray cluster);
- sweep: from the first submitted chunk to the last result (includes each worker's model
  load on its first chunk);
- close: stopping workers (and the local Ray cluster);
- other: loading, calibrating and fitting in the driver (the wall time minus the above).

Derived numbers, with W workers (1 in-process):

- speed-up: the baseline's time divided by this configuration's, for the wall time and
  for the sweep alone. The baseline is in-process with 1 thread, because each worker
  runs 1 thread;
- overhead per trial: (sweep × W − baseline sweep) / trials, the worker-seconds each trial
  costs beyond the 1-thread in-process sweep (0 with perfect scaling).

Usage:
    python benchmarks/bench_executors.py [--limit 5000] [--repeats 3] [--out benchmarks/results]

Writes executors.json and executors.md to --out and prints the table. The Ray row needs
`pip install 'wnplan[ray]'`; without ray it is left out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wnplan import profiler, records, runtime
from wnplan.executors import Executor
from wnplan.profiler import Execution, ProfileSettings
from wnplan.store import TrialResult
from wnplan.sweep import Trial

MODEL = Path(__file__).resolve().parent.parent / "examples" / "models" / "lenet5_bn.onnx"
SIGMAS = tuple(float(f"{sigma:.3g}") for sigma in np.logspace(-2, 1, 12))  # 0.01 … 10, absolute


@dataclass
class Phases:
    """Times of one run, in seconds (perf_counter)."""

    start: float = 0.0
    first_submit: float | None = None
    last_result: float | None = None
    close: float = 0.0


class TimedExecutor(Executor):
    """Wraps an executor and records when its sweep starts and ends and how long it closes."""

    def __init__(self, inner: Executor, phases: Phases) -> None:
        self._inner = inner
        self._phases = phases

    def submit(self, ticket: int, trials: Sequence[Trial], priority: int) -> None:
        if self._phases.first_submit is None:
            self._phases.first_submit = time.perf_counter()
        self._inner.submit(ticket, trials, priority)

    def next_result(self) -> tuple[int, int, TrialResult]:
        result = self._inner.next_result()
        self._phases.last_result = time.perf_counter()
        return result

    def close(self) -> None:
        started = time.perf_counter()
        self._inner.close()
        self._phases.close = time.perf_counter() - started


@dataclass(frozen=True)
class Configuration:
    """One way to run the profile.

    Attributes:
        name: the row label.
        workers: parallel workers (1 in-process).
        execution: what `profile` receives.
        threads: this process's thread count for the run (None: the libraries' defaults).
    """

    name: str
    workers: int
    execution: Execution
    threads: int | None = None


@dataclass
class Run:
    """The measured phases of one configuration."""

    name: str
    workers: int
    trials: int
    wall: float
    start: float
    sweep: float
    close: float
    profile_sha256: str
    load_average_before: float
    derived: dict[str, float] = field(default_factory=dict)


def measure(configuration: Configuration, limit: int, repeats: int) -> Run:
    """Run the walking profile once with a fresh store and return its phases."""
    phases = Phases()
    original = profiler.make_executor

    def timed_make_executor(job, execution, loaded) -> Executor:
        started = time.perf_counter()
        executor = original(job, execution, loaded)
        phases.start = time.perf_counter() - started
        return TimedExecutor(executor, phases)

    settings = ProfileSettings(scope="walking", repeats=repeats, sigmas=SIGMAS, seed=0)
    totals: list[int] = []
    load_average = os.getloadavg()[0]
    runtime.set_threads(configuration.threads)
    profiler.make_executor = timed_make_executor
    try:
        with tempfile.TemporaryDirectory(prefix="wnplan-bench-") as folder:
            started = time.perf_counter()
            record = profiler.profile(
                MODEL, None, settings, limit=limit, store=Path(folder) / "store.sqlite", fresh=True,
                execution=configuration.execution, progress=lambda done, total: totals.append(total),
            )
            wall = time.perf_counter() - started
    finally:
        profiler.make_executor = original
        runtime.set_threads(None)

    return Run(
        configuration.name, configuration.workers, totals[-1], wall, phases.start,
        phases.last_result - phases.first_submit, phases.close, records.record_sha256(record), load_average,
    )


def derive(runs: list[Run], baseline: Run) -> None:
    """Fill each run's speed-ups and overhead per trial against the baseline run."""
    for run in runs:
        run.derived = {
            "wall_speedup": baseline.wall / run.wall,
            "sweep_speedup": baseline.sweep / run.sweep,
            "overhead_ms_per_trial": 1000 * (run.sweep * run.workers - baseline.sweep) / run.trials,
        }


def markdown_table(runs: list[Run]) -> str:
    header = (
        "| configuration | workers | trials | wall (s) | start (s) | sweep (s) | close (s) "
        + "| wall speed-up | sweep speed-up | overhead per trial (ms) | load average before |"
    )
    lines = [header, "|" + " --- |" * 11]
    for run in runs:
        lines.append(
            f"| {run.name} | {run.workers} | {run.trials} | {run.wall:.1f} | {run.start:.1f} | {run.sweep:.1f} "
            + f"| {run.close:.1f} | {run.derived['wall_speedup']:.2f} | {run.derived['sweep_speedup']:.2f} "
            + f"| {run.derived['overhead_ms_per_trial']:.1f} | {run.load_average_before:.1f} |"
        )
    return "\n".join(lines) + "\n"


def configurations(workers: int) -> list[Configuration]:
    chosen = [
        Configuration("in-process, default threads", 1, Execution()),
        Configuration("in-process, 1 thread", 1, Execution(), threads=1),
        Configuration(f"--workers {workers}", workers, Execution(workers=workers)),
    ]
    if importlib.util.find_spec("ray") is not None:
        chosen.append(Configuration(f"--ray local ({workers} workers)", workers, Execution(ray="local")))
    return chosen


def cpu_model() -> str:
    """Return the processor's model name from /proc/cpuinfo, or the machine type elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def machine() -> dict[str, Any]:
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "processor": cpu_model(),
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0],
    }


def run_benchmark(limit: int, repeats: int, workers: int, report: Callable[[str], None]) -> dict[str, Any]:
    """Run every configuration and return the JSON record."""
    before = machine()
    runs = []
    for configuration in configurations(workers):
        report(f"running {configuration.name} …")
        runs.append(measure(configuration, limit, repeats))
        report(f"  {runs[-1].wall:.1f} s")
    hashes = {run.profile_sha256 for run in runs}
    if len(hashes) != 1:
        raise SystemExit(f"profiles differ between configurations: {sorted(hashes)}")
    derive(runs, next(run for run in runs if run.name == "in-process, 1 thread"))
    return {
        "benchmark": "executors",
        "model": str(MODEL.relative_to(MODEL.parents[2])),
        "data": "fashion-mnist:test (the model's declared data)",
        "limit": limit,
        "sigmas": list(SIGMAS),
        "repeats": repeats,
        "scope": "walking",
        "machine_before": before,
        "load_average_1min_after": os.getloadavg()[0],
        "identical_profiles": True,
        "runs": [run.__dict__ for run in runs],
        "table": markdown_table(runs),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks executors", description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=5000, help="Evaluation samples (first N of the test set).")
    parser.add_argument("--repeats", type=int, default=3, help="Noise draws per σ.")
    parser.add_argument("--workers", type=int, default=2, help="Workers of the parallel configurations.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="Folder for the result files.")
    arguments = parser.parse_args(argv)

    result = run_benchmark(arguments.limit, arguments.repeats, arguments.workers, print)
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / "executors.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (arguments.out / "executors.md").write_text(result["table"])
    print(result["table"])


if __name__ == "__main__":
    main()
