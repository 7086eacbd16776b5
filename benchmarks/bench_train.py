"""Benchmark vectorized noise-aware training against training the same models one after another.

For each model, K configurations (σ values × training seeds, additive noise at one site)
are trained for one epoch and then evaluated with noise, twice in the same process:

- vectorized: `wnplan.train.train` with `vectorize=True` (all K stacked in one computation),
  then `evaluate_noisy` stacked;
- one by one: the same functions with `vectorize=False`, which train each configuration
  with its own module copy and optimizer, as a training script would, and evaluate each
  model in turn.

Both use the same twin, data tensors, seeds, optimizer (fused Adam) and noise draws; the
twin and data are built before the clock starts. The one-by-one run copies the module once
per configuration (well under a millisecond for these models), which is counted.
Times are wall time (time.perf_counter) and process CPU time (time.process_time). The two
modes alternate `--repeats` times, and the table shows each mode's fastest run, because a
shared machine slows single runs by tens of percent. Every run is in the JSON. The ratio is
one-by-one ÷ vectorized. The largest accuracy difference between the two modes is reported
as a check.

Usage:
    python benchmarks/bench_train.py [--models mlp_bn,lenet5_bn] [--train-samples 10000]
        [--eval-samples 10000] [--repeats 3] [--threads N] [--sigmas 0.01,0.0316,...,31.6]
        [--seeds 3] [--profile] [--out benchmarks/results]

The default configurations are the size of one round of a trained-mode curve: 8 σ values
× 3 seeds = 24. The default thread count is torch's, all cores, as `wnplan profile` uses.

Writes train.json and train.md to --out and prints the table. Models this run does not measure
keep their earlier results in those files, each with the date and machine of its own run. `--profile` adds the top
operators of one vectorized and one one-by-one run of each model (torch.profiler) to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wnplan.data import load_data
from wnplan.models import load_model
from wnplan.noise import SiteNoise, derive_seed
from wnplan.train.measure import evaluate_noisy
from wnplan.train.trainer import TrainingConfig, TrainingSettings, train
from wnplan.train.twin import build_twin

MODELS_DIR = Path(__file__).resolve().parent.parent / "examples" / "models"
# Model file, and the site to train with noise: a BatchNorm output in the middle of each network.
MODELS = {"mlp_bn": ("mlp_bn.pt2", "fc2_bn"), "lenet5_bn": ("lenet5_bn.pt2", "conv2_bn")}
# One round of a trained-mode curve: 8 σ values (absolute, additive), 2 per decade, × 3 seeds.
SIGMAS = (0.01, 0.0316, 0.1, 0.316, 1.0, 3.16, 10.0, 31.6)
SEEDS = 3
BENCHMARK_SEED = 0
PROFILE_ROWS = 12


@dataclass(frozen=True)
class Timing:
    """Wall and CPU seconds of one phase."""

    wall: float
    cpu: float


def timed(function: Callable[[], Any]) -> tuple[Any, Timing]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, Timing(time.perf_counter() - wall, time.process_time() - cpu)


def configurations(site: int, sigmas: tuple[float, ...] = SIGMAS, seeds: int = SEEDS) -> list[TrainingConfig]:
    """Return σ × seed configurations with additive noise at one site (seeds derived from seed 0)."""
    configs = []
    for repeat in range(seeds):
        training_seed = derive_seed(BENCHMARK_SEED, {"repeat": repeat, "site": site})
        for sigma in sigmas:
            noise_seed = derive_seed(BENCHMARK_SEED, {"repeat": repeat, "site": site, "sigma": sigma})
            configs.append(TrainingConfig(((site, SiteNoise(sigma_add=sigma)),), training_seed, noise_seed))
    return configs


def run_mode(twin, configs, train_data, eval_data, vectorize: bool) -> dict[str, Any]:
    """Train and evaluate all configurations in one mode; return times and accuracies."""
    settings = TrainingSettings(vectorize=vectorize)
    trained, training = timed(lambda: train(twin, configs, train_data, settings))
    levels = [config.levels for config in configs]
    seeds = [config.noise_seed for config in configs]
    evaluation, evaluating = timed(lambda: evaluate_noisy(
        twin, levels, seeds, trained.tensors, eval_data, settings.eval_batch_size, vectorize, 0
    ))
    return {
        "train": training,
        "evaluate": evaluating,
        "accuracy": [correct / len(eval_data) for correct in evaluation.correct],
        "steps": trained.steps,
    }


def profile_mode(twin, configs, train_data, vectorize: bool) -> list[dict[str, Any]]:
    """Return the operators with the most self CPU time in one training run."""
    settings = TrainingSettings(vectorize=vectorize)
    with torch.profiler.profile() as profiler:
        train(twin, configs, train_data, settings)
    rows = sorted(profiler.key_averages(), key=lambda row: row.self_cpu_time_total, reverse=True)
    total = sum(row.self_cpu_time_total for row in rows)
    return [
        {"operator": row.key, "calls": row.count, "self_cpu_ms": round(row.self_cpu_time_total / 1000, 1),
         "share": round(row.self_cpu_time_total / total, 3)}
        for row in rows[:PROFILE_ROWS]
    ]


def measure_model(
    name: str, train_samples: int, eval_samples: int, repeats: int, profile: bool, report,
    sigmas: tuple[float, ...] = SIGMAS, seeds: int = SEEDS,
) -> dict[str, Any]:
    file_name, site_name = MODELS[name]
    model = load_model(MODELS_DIR / file_name)
    site = next(site.index for site in model.sites if site.name == site_name)
    twin = build_twin(model)
    train_data = load_data("fashion-mnist:train", (0.5, 0.5), limit=train_samples)
    eval_data = load_data("fashion-mnist:test", (0.5, 0.5), limit=eval_samples)
    configs = configurations(site, sigmas, seeds)

    runs: dict[str, list[dict[str, Any]]] = {"vectorized": [], "one_by_one": []}
    for repeat in range(repeats):
        report(f"{name}: {len(configs)} configurations at site {site} ({site_name}), run {repeat + 1}")
        runs["vectorized"].append(run_mode(twin, configs, train_data, eval_data, vectorize=True))
        runs["one_by_one"].append(run_mode(twin, configs, train_data, eval_data, vectorize=False))

    first_vectorized, first_alone = runs["vectorized"][0], runs["one_by_one"][0]
    result = {
        "model": file_name,
        "site": {"index": site, "name": site_name},
        "configurations": len(configs),
        "steps": first_vectorized["steps"],
        "vectorized": _fastest(runs["vectorized"]),
        "one_by_one": _fastest(runs["one_by_one"]),
        "runs": {mode: [_times(run) for run in mode_runs] for mode, mode_runs in runs.items()},
        "max_accuracy_difference": max(
            abs(a - b) for a, b in zip(first_vectorized["accuracy"], first_alone["accuracy"], strict=True)
        ),
    }
    for phase in ("train", "evaluate", "total"):
        for clock in ("wall", "cpu"):
            result.setdefault("ratio", {})[f"{phase}_{clock}"] = round(
                result["one_by_one"][phase][clock] / result["vectorized"][phase][clock], 2
            )
    if profile:
        report(f"{name}: profiling ...")
        result["profile"] = {
            "vectorized": profile_mode(twin, configs, train_data, vectorize=True),
            "one_by_one": profile_mode(twin, configs, train_data, vectorize=False),
        }
    return result


def _fastest(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Return, per phase and clock, the smallest time over the runs."""
    times = [_times(run) for run in runs]
    return {
        phase: {clock: min(entry[phase][clock] for entry in times) for clock in ("wall", "cpu")}
        for phase in ("train", "evaluate", "total")
    }


def _times(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    total = Timing(run["train"].wall + run["evaluate"].wall, run["train"].cpu + run["evaluate"].cpu)
    return {
        phase: {"wall": round(timing.wall, 2), "cpu": round(timing.cpu, 2)}
        for phase, timing in (("train", run["train"]), ("evaluate", run["evaluate"]), ("total", total))
    }


def markdown_table(results: list[dict[str, Any]]) -> str:
    columns = [
        "model", "configs", "steps", "train vectorized (CPU s)", "train one by one (CPU s)", "train ratio (CPU)",
        "train ratio (wall)", "total vectorized (CPU s)", "total one by one (CPU s)", "total ratio (CPU)",
        "max Δ accuracy", "train / eval samples", "measured (UTC)", "threads",
    ]
    lines = [_row(columns), _row(["---"] * len(columns))]
    for result in results:
        vectorized, alone, ratio = result["vectorized"], result["one_by_one"], result["ratio"]
        lines.append(_row([
            f"{result['model']} ({result['site']['name']})", result["configurations"], result["steps"],
            vectorized["train"]["cpu"], alone["train"]["cpu"], f"{ratio['train_cpu']}×", f"{ratio['train_wall']}×",
            vectorized["total"]["cpu"], alone["total"]["cpu"], f"{ratio['total_cpu']}×",
            f"{result['max_accuracy_difference']:.4f}",
            f"{result['run']['train_samples']} / {result['run']['eval_samples']}", result["run"]["date"],
            result["run"]["machine"]["torch_threads"],
        ]))
    lines.append("")
    lines.append("Fastest of the repeated runs. CPU seconds (time.process_time) count every thread; wall-clock")
    lines.append("times and every run are in train.json.")
    return "\n".join(lines) + "\n"


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def machine(threads: int) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "load_average": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks train", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--train-samples", type=int, default=10000, help="Fashion-MNIST training images")
    parser.add_argument("--eval-samples", type=int, default=10000, help="Fashion-MNIST test images")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode; the fastest counts")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--profile", action="store_true", help="add a torch.profiler table per model and mode")
    parser.add_argument("--sigmas", default=",".join(str(sigma) for sigma in SIGMAS),
                        help="comma-separated absolute σ values of the configurations")
    parser.add_argument("--seeds", type=int, default=SEEDS, help="training seeds per σ")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for train.json and train.md (default: benchmarks/results)")
    arguments = parser.parse_args(argv)

    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    started = machine(torch.get_num_threads())
    sizes = (arguments.train_samples, arguments.eval_samples, arguments.repeats)
    sigmas = tuple(float(value) for value in arguments.sigmas.split(","))
    results = [
        measure_model(name, *sizes, arguments.profile, print, sigmas, arguments.seeds)
        for name in arguments.models.split(",")
    ]
    run = {
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": started,
        "load_average_after": list(os.getloadavg()),
        "noise": {"kind": "additive", "sigmas": list(sigmas), "seeds": arguments.seeds},
        "train_samples": arguments.train_samples,
        "eval_samples": arguments.eval_samples,
        "repeats": arguments.repeats,
    }
    for result in results:
        result["run"] = run
    merged = merged_results(arguments.out / "train.json", results)
    table = markdown_table(merged)
    record = {"benchmark": "vectorized noise-aware training versus one by one", "results": merged, "table": table}
    arguments.out.mkdir(parents=True, exist_ok=True)
    for name, text in (("train.json", json.dumps(record, indent=2, sort_keys=True) + "\n"), ("train.md", table)):
        temporary = arguments.out / f".{name}.tmp"
        temporary.write_text(text)
        temporary.replace(arguments.out / name)
    print(table)


def merged_results(path: Path, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the new results, plus the earlier results in `path` of models this run did not measure.

    Each result keeps its own `run` (date, machine, sizes), so a table that mixes runs shows it.
    """
    measured = {result["model"] for result in results}
    earlier: list[dict[str, Any]] = []
    if path.exists():
        try:
            earlier = [result for result in json.loads(path.read_text())["results"]
                       if result["model"] not in measured and "run" in result]
        except (ValueError, KeyError, TypeError) as error:
            print(f"not keeping the earlier results in {path}: cannot read them ({error})")
    order = [file_name for file_name, _ in MODELS.values()]
    return sorted(earlier + results, key=lambda result: _position(order, result["model"]))


def _position(order: list[str], model: str) -> int:
    return order.index(model) if model in order else len(order)


if __name__ == "__main__":
    main()
