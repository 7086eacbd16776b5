"""Benchmark a complete walking profile against the naive way, side by side in one run.

For each model and format, in one process and with one thread count:

1. engine: `wnplan.profiler.profile` with its defaults, scope "walking", no store;
2. naive: the research's way. The σ grid is fixed at 4 points per decade from 1e-2 to 1e10
   (49 points), with 5 repeats. Every trial is one full forward pass (`Model.run`) over the
   whole evaluation set, with its noise drawn by `draw_noise` from the trial's own seed.
   Nothing is reused between trials. Each site's curve, with the clean point at σ = 0, is
   then fitted by `fit_curve`;
3. the same trial list (naive grid points from 1e-2 to 1e2, 2 repeats, same seeds) through
   `InferenceEvaluator.run_group` (suffix reuse and stacking), set against the naive full
   passes of those trials. The correct counts must be equal;
4. trial counts of the adaptive grid against the fixed grid;
5. FLOPs counted from the graph (see `benchmarks.flops`) divided by wall time, against the
   dense matmul throughput measured in the same run, for the profile and for `wnplan check`.

`--naive-budget SECONDS` caps the naive profile of one model and format. Sites then run in
an order spread over the network until the budget is spent. Each site left out gets one
timed naive trial, and its time is projected as 245 such trials. The report marks such
totals as projected.

Usage:
    python -m benchmarks profile [--models mlp_bn,lenet5_bn] [--formats onnx,pt2]
        [--samples 10000] [--threads N] [--naive-budget S] [--quick] [--resume] [--out FILE]
    python -m benchmarks profile --render [--out FILE]   # rewrite the tables of a result

Times are wall-clock times of this process on a possibly shared machine. Each result records
the load average, and CPU times beside the wall times of the two profiles.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import wnplan.evaluate
import wnplan.noise
from benchmarks.flops import GraphFlops, count_flops
from wnplan import records, runtime
from wnplan.accelerator import load_accelerator
from wnplan.calibrate import CALIBRATION_SAMPLES
from wnplan.data import Dataset, load_data
from wnplan.evaluate import InferenceEvaluator, count_correct
from wnplan.fit import CurvePoint, fit_curve
from wnplan.models import Model, load_model
from wnplan.noise import NoiseSpec, SiteNoise, derive_seed, draw_noise
from wnplan.plan import AllocationSettings, allocate
from wnplan.profiler import ProfileSettings, profile
from wnplan.simulate import check
from wnplan.sweep import Trial, round_sigma

logger = logging.getLogger("benchmarks.profile")

ROOT = Path(__file__).resolve().parent.parent
MODELS_FOLDER = ROOT / "examples" / "models"
DATA = "fashion-mnist:test"
NORMALIZE = (0.5, 0.5)
NAIVE_SIGMAS = tuple(round_sigma(10.0 ** (k / 4)) for k in range(-8, 41))  # 1e-2 … 1e10
NAIVE_REPEATS = 5
COMPARED_RANGE = (1e-2, 1e2)
COMPARED_REPEATS = 2
CHECK_REPEATS = 10
CHECK_ACCELERATOR = "additive-generic"
SEARCH_SECONDS = 20.0
# The naive curves are fitted as the engine fits by default; the other space is a diagnostic.
FIT_SPACE = ProfileSettings().fit_space
OTHER_SPACE = "linear" if FIT_SPACE == "log" else "log"
MATMUL_SIZE = 2048
MATMUL_ROUNDS = 5
QUICK_SAMPLES = 2000
QUICK_NAIVE_BUDGET = 60.0


@dataclass(frozen=True)
class BenchSettings:
    """Settings of one benchmark run: models, formats, samples, threads, naive budget and seed."""

    models: tuple[str, ...]
    formats: tuple[str, ...]
    samples: int
    threads: int
    naive_budget: float | None
    seed: int = 0


class StageTimer:
    """Accumulates the wall time of wnplan's noise draws and noise application."""

    def __init__(self) -> None:
        self.draw = 0.0
        self.apply = 0.0

    @contextlib.contextmanager
    def instrument(self) -> Iterator[None]:
        """Time the engine's noise: the standard normal draws, and scaling and adding them.

        `draw` is the time inside `wnplan.noise.draw_standard`, which every noise path of the
        engine calls; `apply` is the rest of `noisy_into` and `apply_noise`.
        """
        original_standard = wnplan.noise.draw_standard
        original_into, original_apply = wnplan.evaluate.noisy_into, wnplan.evaluate.apply_noise
        wnplan.noise.draw_standard = self._timed(original_standard, "draw")
        # noisy_into draws through draw_standard: its own share is the rest of its time.
        wnplan.evaluate.noisy_into = self._timed(original_into, "apply", without="draw")
        wnplan.evaluate.apply_noise = self._timed(original_apply, "apply")
        try:
            yield
        finally:
            wnplan.noise.draw_standard = original_standard
            wnplan.evaluate.noisy_into, wnplan.evaluate.apply_noise = original_into, original_apply

    def _timed(self, function: Callable, total: str, without: str | None = None) -> Callable:
        """Return `function` adding its wall time to the attribute `total`, less the time `without` gained."""

        def timed(*arguments, **keywords):
            started = time.perf_counter()
            inner = getattr(self, without) if without else 0.0
            try:
                return function(*arguments, **keywords)
            finally:
                nested = getattr(self, without) - inner if without else 0.0
                setattr(self, total, getattr(self, total) + time.perf_counter() - started - nested)

        return timed


# ---------------------------------------------------------------------------- the engine


def run_engine(path: Path, settings: BenchSettings) -> dict[str, Any]:
    """Run wnplan's default walking profile and return its record, wall time and noise time."""
    timer = StageTimer()
    load_before = os.getloadavg()[0]
    with timer.instrument():
        started, cpu_started = time.perf_counter(), time.process_time()
        record = profile(
            path, DATA, ProfileSettings(scope="walking", seed=settings.seed),
            normalize=",".join(str(value) for value in NORMALIZE), limit=settings.samples, store=None,
        )
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "record": record,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "noise_draw_seconds": timer.draw,
        "noise_apply_seconds": timer.apply,
        "load_average_before": load_before,
    }


def engine_trials(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Return per site the trials the adaptive grid ran and their full-data equivalent."""
    samples = record["data"]["samples"]
    counts = []
    for site in record["sites"]:
        points = [point for point in site["walking"]["points"] if point["reason"] != "clean"]
        counts.append(
            {
                "site": site["index"],
                "trials": sum(point["repeats"] for point in points),
                "full_data_trials": sum(point["repeats"] * point["samples"] for point in points) / samples,
                "screen_trials": sum(point["repeats"] for point in points if point["reason"] == "screen"),
            }
        )
    return counts


# ----------------------------------------------------------------------------- the naive way


def naive_seed(base_seed: int, site_name: str, sigma: float, repeat: int) -> int:
    """Return the noise seed of one naive trial, which depends only on the trial."""
    return derive_seed(base_seed, {"benchmark": "naive", "site": site_name, "sigma": sigma, "repeat": repeat})


def naive_trial(model: Model, data: Dataset, site: int, sigma: float, seed: int) -> tuple[int, float, float]:
    """Run one naive trial: draw the noise, then one full forward pass over all the data.

    Returns:
        (correct predictions, seconds drawing noise, seconds in total).
    """
    started = time.perf_counter()
    noise = draw_noise(SiteNoise(sigma, 0.0), (len(data), *model.sites[site].shape), seed, site, 0)
    drawn = time.perf_counter()
    correct = count_correct(model.run(data.x, {site: noise}), data.y)
    return correct, drawn - started, time.perf_counter() - started


def spread_order(count: int) -> list[int]:
    """Return 0 … count−1 ordered so that every prefix spreads over the range (ends first)."""
    if count <= 2:
        return list(range(count))
    order = [0, count - 1]
    gaps = [(0, count - 1)]
    while len(order) < count:
        gaps.sort(key=lambda gap: gap[0] - gap[1])
        low, high = gaps.pop(0)
        if high - low < 2:
            continue
        middle = (low + high) // 2
        order.append(middle)
        gaps.extend([(low, middle), (middle, high)])
    return order


def run_naive(path: Path, settings: BenchSettings) -> dict[str, Any]:
    """Profile every site the naive way, or as many as the budget allows, and fit each curve."""
    load_before = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), time.process_time()
    data = load_data(DATA, NORMALIZE, settings.samples)
    model = load_model(path, sample=data.x[:2])
    clean_logits = model.run(data.x)
    clean = count_correct(clean_logits, data.y)
    chance = 1.0 / clean_logits.shape[1]
    setup_seconds = time.perf_counter() - started

    sites: dict[int, dict[str, Any]] = {}
    elapsed = setup_seconds
    for index in spread_order(len(model.sites)):
        if settings.naive_budget is not None and sites and elapsed >= settings.naive_budget:
            break
        sites[index] = naive_site(model, data, index, clean, chance, settings.seed)
        elapsed += sites[index]["seconds"]
        logger.info(
            "naive %s site %d: %.1f s, µ = %s (%s)", path.name, index, sites[index]["seconds"],
            sites[index]["fit"]["midpoint"], sites[index]["fit"]["status"],
        )

    cpu_seconds = time.process_time() - cpu_started
    projected = {}
    for index in range(len(model.sites)):
        if index not in sites:
            _, _, seconds = naive_trial(model, data, index, 1.0, naive_seed(settings.seed, "projection", 1.0, index))
            projected[index] = seconds * len(NAIVE_SIGMAS) * NAIVE_REPEATS
    return {
        "model": model,
        "data": data,
        "setup_seconds": setup_seconds,
        "seconds": elapsed,
        "cpu_seconds": cpu_seconds,
        "projected_seconds": elapsed + sum(projected.values()),
        "projected_sites": projected,
        "sites": sites,
        "clean": clean,
        "load_average_before": load_before,
    }


def naive_site(model: Model, data: Dataset, index: int, clean: int, chance: float, seed: int) -> dict[str, Any]:
    """Measure one site's 49 × 5 trials with full passes, fit its curve, and time both."""
    started = time.perf_counter()
    name = model.sites[index].name
    samples = len(data)
    points = [CurvePoint(0.0, clean / samples, 0.0, samples, 1)]
    trials = []
    draw_seconds = 0.0
    for sigma in NAIVE_SIGMAS:
        counts = []
        for repeat in range(NAIVE_REPEATS):
            correct, drawing, seconds = naive_trial(model, data, index, sigma, naive_seed(seed, name, sigma, repeat))
            counts.append(correct)
            draw_seconds += drawing
            trials.append({"sigma": sigma, "repeat": repeat, "correct": correct, "seconds": seconds})
        accuracies = np.asarray(counts) / samples
        stderr = float(accuracies.std(ddof=1) / math.sqrt(len(accuracies)))
        points.append(CurvePoint(sigma, float(accuracies.mean()), stderr, samples, NAIVE_REPEATS))
    fit = fit_curve(points, chance=chance, space=FIT_SPACE)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "noise_draw_seconds": draw_seconds,
        "trials": trials,
        "points": [
            {"sigma": point.sigma, "accuracy": point.accuracy, "stderr": point.stderr, "repeats": point.repeats}
            for point in points
        ],
        "fit": fit.to_dict(),
        # Not timed: the same points fitted in the other space, to tell fit effects from measurement effects.
        "fit_other": fit_curve(points, chance=chance, space=OTHER_SPACE).to_dict(),
    }


# ------------------------------------------------------------------- same trials, two ways


def compare_trials(naive: dict[str, Any], settings: BenchSettings) -> dict[str, Any]:
    """Run the naive trials with σ in COMPARED_RANGE and repeats < 2 through the engine's evaluator.

    The full-pass side reuses the timings of those trials from the naive profile, so both
    sides run identical trials with identical noise.
    """
    model, data = naive["model"], naive["data"]
    low, high = COMPARED_RANGE
    by_site = {
        index: [
            trial for trial in site["trials"] if low <= trial["sigma"] <= high and trial["repeat"] < COMPARED_REPEATS
        ]
        for index, site in naive["sites"].items()
    }

    def seed_of(trial: Trial) -> int:
        return naive_seed(settings.seed, trial.site_names[0], trial.sigma, trial.repeat)

    evaluator = InferenceEvaluator(model, data, NoiseSpec(), {}, seed_of)
    timer = StageTimer()
    mismatches = []
    with timer.instrument():
        started = time.perf_counter()
        for index, listed in by_site.items():
            name = model.sites[index].name
            trials = [Trial("walking", (index,), (name,), item["sigma"], item["repeat"]) for item in listed]
            for item, result in zip(listed, evaluator.run_group(trials), strict=True):
                if result.correct != item["correct"]:
                    mismatches.append(
                        {"site": index, "sigma": item["sigma"], "repeat": item["repeat"],
                         "full_pass": item["correct"], "engine": result.correct}
                    )
        engine_seconds = time.perf_counter() - started

    count = sum(len(listed) for listed in by_site.values())
    naive_seconds = sum(trial["seconds"] for listed in by_site.values() for trial in listed)
    return {
        "trials": count,
        "sites": sorted(by_site),
        "engine_seconds": engine_seconds,
        "full_pass_seconds": naive_seconds,
        "engine_trials_per_second": count / engine_seconds,
        "full_pass_trials_per_second": count / naive_seconds,
        "speedup": naive_seconds / engine_seconds,
        "engine_noise_draw_seconds": timer.draw,
        "mismatches": mismatches,
    }


# ------------------------------------------------------------------------ agreement of µ


def agreement(engine_record: dict[str, Any], naive: dict[str, Any], space: str = FIT_SPACE) -> list[dict[str, Any]]:
    """Compare each naive site's fit with the engine's.

    Rule: sites whose fit failed or is robust in either profile agree when their statuses are
    equal, and their µ is not compared (it is a bound or absent). Otherwise the two agree
    when |µ1 − µ2| ≤ e1 + e2, with e the standard error of µ from each fit (for a fallback,
    the half-width of the bracketing interval). z = |µ1 − µ2| / √(e1² + e2²) is reported too.

    With `space=OTHER_SPACE`, both curves are fitted again in that space: the engine's from the
    full-data points in its record (as the engine fits them), the naive one from its points.
    """
    rows = []
    chance = engine_record["chance"]
    for index, site in sorted(naive["sites"].items()):
        ours = engine_record["sites"][index]["walking"]["fit"]
        theirs = site["fit"]
        if space == OTHER_SPACE:
            points = [
                CurvePoint(point["sigma"], point["accuracy"], point["stderr"], point["samples"], point["repeats"])
                for point in engine_record["sites"][index]["walking"]["points"]
                if point["reason"] != "screen"
            ]
            ours = fit_curve(points, chance=chance, space=OTHER_SPACE).to_dict()
            theirs = site["fit_other"]
        row = {
            "site": index,
            "name": engine_record["sites"][index]["name"],
            "engine": _fit_summary(ours),
            "naive": _fit_summary(theirs),
        }
        if space == FIT_SPACE:
            # The measured points of both ways, so that other fits can be tried offline.
            row["engine_points"] = engine_record["sites"][index]["walking"]["points"]
            row["naive_points"] = site["points"]
        bounded = {"failed", "robust"} & {ours["status"], theirs["status"]}
        if bounded:
            row["rule"] = "status"
            row["agree"] = ours["status"] == theirs["status"]
        else:
            difference = abs(ours["midpoint"] - theirs["midpoint"])
            errors = (ours["midpoint_error"] or 0.0, theirs["midpoint_error"] or 0.0)
            row["rule"] = "|µ1 − µ2| ≤ e1 + e2"
            row["agree"] = difference <= sum(errors)
            combined = math.hypot(*errors)
            row["z"] = difference / combined if combined > 0 else None
        rows.append(row)
    return rows


def _fit_summary(fit: dict[str, Any]) -> dict[str, Any]:
    return {"status": fit["status"], "midpoint": fit["midpoint"], "midpoint_error": fit["midpoint_error"]}


# ------------------------------------------------------------------- FLOPs and throughput


def matmul_throughput(threads: int) -> dict[str, float]:
    """Return the best dense float32 matmul rate (FLOP/s) of torch and numpy on this machine."""
    import threadpoolctl
    import torch

    size = MATMUL_SIZE
    flops = 2.0 * size**3
    generator = np.random.default_rng(0)
    a = generator.standard_normal((size, size), dtype=np.float32)
    b = generator.standard_normal((size, size), dtype=np.float32)

    torch.set_num_threads(threads)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch.mm(ta, tb)
    torch_best = min(_timed(lambda: torch.mm(ta, tb)) for _ in range(MATMUL_ROUNDS))

    with threadpoolctl.threadpool_limits(threads):
        np.matmul(a, b)
        numpy_best = min(_timed(lambda: np.matmul(a, b)) for _ in range(MATMUL_ROUNDS))
    return {"torch_mm": flops / torch_best, "numpy_matmul": flops / numpy_best, "size": size}


def _timed(function: Callable[[], Any]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def engine_flops(record: dict[str, Any], graph: GraphFlops) -> float:
    """Return the FLOPs a walking profile needs, by the conventions of `benchmarks.flops`.

    Each trial at site k computes the suffix after k and adds the noise (1 per element) for
    each of its samples. Each site's prefix runs once per data set it was measured on (all
    data, and the screening subset). The clean accuracy is one full pass, and calibration
    one full pass over its first samples.
    """
    samples = record["data"]["samples"]
    total = 0.0
    for site in record["sites"]:
        index = site["index"]
        points = [point for point in site["walking"]["points"] if point["reason"] != "clean"]
        per_sample = graph.downstream[index] + graph.site_elements[index]
        total += sum(point["repeats"] * point["samples"] * per_sample for point in points)
        data_sets = {point["samples"] for point in points}
        total += graph.upstream(index) * sum(data_sets)
    total += graph.total * (samples + min(samples, CALIBRATION_SAMPLES))
    return total


def naive_flops(naive: dict[str, Any], graph: GraphFlops) -> float:
    """Return the FLOPs of the naive sites measured: a full pass and the noise per trial, plus the clean pass."""
    samples = len(naive["data"])
    trials = len(NAIVE_SIGMAS) * NAIVE_REPEATS
    total = float(graph.total * samples)
    for index in naive["sites"]:
        total += trials * samples * (graph.total + graph.site_elements[index])
    return total


def run_check(engine_record: dict[str, Any], graph: GraphFlops, settings: BenchSettings) -> dict[str, Any]:
    """Plan for an accelerator, then time `check` with 10 repeats on the held-out half."""
    with tempfile.TemporaryDirectory(prefix="wnplan-bench-") as folder:
        profile_path = records.write_record(engine_record, "profile", Path(folder) / "profile.json")
        accelerator = load_accelerator(CHECK_ACCELERATOR)
        allocation = AllocationSettings(
            budget=2 * len(engine_record["sites"]), accelerator=accelerator, search_budget=SEARCH_SECONDS,
            seed=settings.seed,
        )
        started = time.perf_counter()
        plan = allocate(engine_record, allocation, profile_path=profile_path)
        allocate_seconds = time.perf_counter() - started
        plan_path = records.write_record(plan, "plan", Path(folder) / "plan.json")

        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        result = check(plan, repeats=CHECK_REPEATS, seed=settings.seed, plan_path=plan_path)
        seconds = time.perf_counter() - started

    samples = result["settings"]["samples"]
    noisy = [site for site in plan["sites"] if not site["shield"]]
    allocations = sum(1 for name in result["results"] if name != "clean")
    noise_elements = sum(graph.site_elements[site["index"]] for site in noisy)
    flops = samples * (
        (CHECK_REPEATS * allocations + 1) * graph.total + CHECK_REPEATS * allocations * noise_elements
    )
    return {
        "seconds": seconds,
        "allocate_seconds": allocate_seconds,
        "samples": samples,
        "data_half": result["settings"]["data_half"],
        "allocations": allocations,
        "repeats": CHECK_REPEATS,
        "flops": flops,
        "flops_per_second": flops / seconds,
        "load_average_before": load_before,
        "passed": result["verdict"]["passed"],
    }


# ------------------------------------------------------------------------------ one case


def run_case(name: str, model_format: str, settings: BenchSettings) -> dict[str, Any]:
    """Measure one model in one format: engine, naive, same trials, counts, FLOPs and check."""
    path = MODELS_FOLDER / f"{name}.{model_format}"
    logger.info("%s: engine profile", path.name)
    engine = run_engine(path, settings)
    logger.info("%s: engine took %.1f s. Naive profile", path.name, engine["seconds"])
    naive = run_naive(path, settings)
    if naive["data"].sha256 != engine["record"]["data"]["sha256"]:
        raise RuntimeError("the naive way and the engine loaded different data (hash mismatch); check --samples")
    logger.info(
        "%s: naive took %.1f s (projected %.1f s). Same trials, two ways",
        path.name, naive["seconds"], naive["projected_seconds"],
    )
    same = compare_trials(naive, settings)
    graph = count_flops(naive["model"])
    logger.info("%s: plan check", path.name)
    checked = run_check(engine["record"], graph, settings)

    record = engine["record"]
    counts = engine_trials(record)
    sites = len(record["sites"])
    engine_work = engine_flops(record, graph)
    naive_work = naive_flops(naive, graph)
    complete = not naive["projected_sites"]
    naive_seconds = naive["seconds"] if complete else naive["projected_seconds"]
    rows = agreement(record, naive)
    rows_other = agreement(record, naive, space=OTHER_SPACE)
    return {
        "model": name,
        "format": model_format,
        "path": str(path.relative_to(ROOT)),
        "samples": record["data"]["samples"],
        "sites": sites,
        "clean_accuracy": record["clean"]["accuracy"],
        "time": {
            "engine_seconds": engine["seconds"],
            "engine_cpu_seconds": engine["cpu_seconds"],
            "naive_seconds": naive["seconds"],
            "naive_cpu_seconds": naive["cpu_seconds"],
            "naive_complete": complete,
            "naive_sites_measured": sorted(naive["sites"]),
            "naive_projected_seconds": naive["projected_seconds"],
            "naive_projected_per_site": naive["projected_sites"],
            "naive_setup_seconds": naive["setup_seconds"],
            "ratio": naive_seconds / engine["seconds"],
            "ratio_projected": not complete,
            "engine_load_average_before": engine["load_average_before"],
            "naive_load_average_before": naive["load_average_before"],
        },
        "agreement": {
            "rule": "statuses equal where either fit failed or is robust; otherwise |µ1 − µ2| ≤ e1 + e2",
            "sites_compared": len(rows),
            "sites_agreeing": sum(row["agree"] for row in rows),
            "sites": rows,
        },
        "agreement_other": {
            "rule": f"the same rule, with both curves fitted again in {OTHER_SPACE} σ (a diagnostic)",
            "space": OTHER_SPACE,
            "sites_compared": len(rows_other),
            "sites_agreeing": sum(row["agree"] for row in rows_other),
            "sites": rows_other,
        },
        "same_trials": same,
        "trials": {
            "engine": sum(count["trials"] for count in counts),
            "engine_full_data": sum(count["full_data_trials"] for count in counts),
            "naive": sites * len(NAIVE_SIGMAS) * NAIVE_REPEATS,
            "ratio": sites * len(NAIVE_SIGMAS) * NAIVE_REPEATS / sum(count["trials"] for count in counts),
            "ratio_full_data": sites * len(NAIVE_SIGMAS) * NAIVE_REPEATS
            / sum(count["full_data_trials"] for count in counts),
            "per_site": counts,
        },
        "flops": {
            "graph": graph.to_dict(),
            "engine": engine_work,
            "engine_per_second": engine_work / engine["seconds"],
            "engine_per_cpu_second": engine_work / engine["cpu_seconds"],
            "engine_noise_draw_share": engine["noise_draw_seconds"] / engine["seconds"],
            "engine_noise_apply_share": engine["noise_apply_seconds"] / engine["seconds"],
            "naive": naive_work,
            "naive_per_second": naive_work / naive["seconds"],
            "naive_per_cpu_second": naive_work / naive["cpu_seconds"],
            "naive_noise_draw_share": sum(site["noise_draw_seconds"] for site in naive["sites"].values())
            / naive["seconds"],
            "check": checked,
        },
    }


# ------------------------------------------------------------------------------- reports


def markdown(result: dict[str, Any]) -> str:
    """Return the summary tables of a benchmark result as markdown."""
    cases = result["cases"]
    matmul = result["matmul"]
    machine_line = " ".join(
        [
            f"Machine: {result['machine']['cpus']} cores ({result['machine']['processor']}),",
            f"{result['threads']} threads, {result['samples']} samples,",
            f"load average {result['machine']['load_average_1min']:.1f} at the start.",
            f"Matmul {MATMUL_SIZE}² float32 at the start: torch {matmul['torch_mm'] / 1e9:.1f} GFLOP/s,",
            f"numpy {matmul['numpy_matmul'] / 1e9:.1f} GFLOP/s (best of {MATMUL_ROUNDS}).",
            "Best matmul rate in the run, the reference of every % below:",
            f"{result['matmul_reference'] / 1e9:.1f} GFLOP/s.",
        ]
    )
    lines = [machine_line, ""]

    lines += _table(
        ["model", "format", "sites", "engine (s)", "naive (s)", "naive / engine", "µ agree",
         f"µ agree, {OTHER_SPACE}-σ refit", "trials engine / naive", "fewer trials (full-data)"],
        [_time_row(case) for case in cases],
    )
    lines += _table(
        ["model", "format", "same trials", "engine trials/s", "full-pass trials/s", "speed-up", "equal counts",
         "engine GFLOP/s (% matmul)", "naive GFLOP/s (% matmul)", "check GFLOP/s (% matmul)",
         "engine noise draw share"],
        [_throughput_row(case) for case in cases],
    )
    if any(case["time"]["ratio_projected"] for case in cases):
        lines += [
            "\\* projected: the naive profile ran on part of the sites within --naive-budget; "
            + "each other site is 245 × one timed naive trial.",
            "",
        ]
    lines += site_tables(cases)
    return "\n".join(lines) + "\n"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _time_row(case: dict[str, Any]) -> list[str]:
    timing, trials = case["time"], case["trials"]
    mark = "*" if timing["ratio_projected"] else ""
    naive_seconds = timing["naive_projected_seconds"] if timing["ratio_projected"] else timing["naive_seconds"]
    return [
        case["model"],
        case["format"],
        str(case["sites"]),
        f"{timing['engine_seconds']:.1f}",
        f"{naive_seconds:.1f}{mark}",
        f"{timing['ratio']:.1f}×{mark}",
        f"{case['agreement']['sites_agreeing']}/{case['agreement']['sites_compared']}",
        f"{case['agreement_other']['sites_agreeing']}/{case['agreement_other']['sites_compared']}",
        f"{trials['engine']} / {trials['naive']}",
        f"{trials['ratio']:.1f}× ({trials['ratio_full_data']:.1f}×)",
    ]


def _throughput_row(case: dict[str, Any]) -> list[str]:
    same, flops = case["same_trials"], case["flops"]
    equal = same["trials"] - len(same["mismatches"])

    def rate(per_second: float, share: float) -> str:
        return f"{per_second / 1e9:.2f} ({100 * share:.1f} %)"

    return [
        case["model"],
        case["format"],
        str(same["trials"]),
        f"{same['engine_trials_per_second']:.1f}",
        f"{same['full_pass_trials_per_second']:.2f}",
        f"{same['speedup']:.1f}×",
        f"{equal}/{same['trials']}",
        rate(flops["engine_per_second"], flops["engine_share_of_matmul"]),
        rate(flops["naive_per_second"], flops["naive_share_of_matmul"]),
        rate(flops["check"]["flops_per_second"], flops["check_share_of_matmul"]),
        "–" if flops["engine_noise_draw_share"] is None else f"{100 * flops['engine_noise_draw_share']:.0f} %",
    ]


def site_tables(cases: Sequence[dict[str, Any]]) -> list[str]:
    """Return one markdown table per case with each site's µ from both ways."""
    lines = []
    for case in cases:
        lines += [f"{case['model']}.{case['format']}: µ ± standard error (status)", ""]
        rows = []
        for row, row_other in zip(case["agreement"]["sites"], case["agreement_other"]["sites"], strict=True):
            rows.append(
                [
                    str(row["site"]),
                    row["name"],
                    _show_fit(row["engine"]),
                    _show_fit(row["naive"]),
                    "yes" if row["agree"] else "NO",
                    "" if row.get("z") is None else f"{row['z']:.2f}",
                    "yes" if row_other["agree"] else "NO",
                ]
            )
        lines += _table(["site", "name", "engine", "naive", "agree", "z", f"agree, {OTHER_SPACE}-σ refit"], rows)
    return lines


def _show_fit(fit: dict[str, Any]) -> str:
    if fit["midpoint"] is None:
        return f"– ({fit['status']})"
    error = fit["midpoint_error"]
    midpoint = f"{fit['midpoint']:.4g}" if error is None else f"{fit['midpoint']:.4g} ± {error:.2g}"
    return f"{midpoint} ({fit['status']})"


def machine() -> dict[str, Any]:
    processor = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": runtime.default_threads(),
        "processor": processor,
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0],
    }


def write_result(result: dict[str, Any], out: Path) -> None:
    """Write the JSON result and its markdown tables next to it, each atomically."""
    set_matmul_shares(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    texts = {out: json.dumps(result, indent=2, sort_keys=True) + "\n", out.with_suffix(".md"): markdown(result)}
    for path, text in texts.items():
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(text)
        temporary.replace(path)


def run_benchmark(settings: BenchSettings, out: Path, resume: bool) -> dict[str, Any]:
    """Run every case, writing the result after each so that a stopped run keeps its cases."""
    runtime.set_threads(settings.threads)
    done: list[dict[str, Any]] = []
    if resume and out.exists():
        previous = json.loads(out.read_text())
        done = [case for case in previous.get("cases", []) if case["samples"] == settings.samples]
    result = {
        "benchmark": "profile",
        "machine": machine(),
        "threads": settings.threads,
        "samples": settings.samples,
        "data": f"{DATA}, normalize {NORMALIZE}",
        "noise": "additive, absolute σ",
        "naive": {"sigmas": list(NAIVE_SIGMAS), "repeats": NAIVE_REPEATS, "budget_seconds": settings.naive_budget},
        "matmul": matmul_throughput(settings.threads),
        "cases": done,
        "complete": False,
    }
    result["matmul_after_cases"] = []

    finished = {(case["model"], case["format"]) for case in done}
    for name in settings.models:
        for model_format in settings.formats:
            if (name, model_format) in finished:
                logger.info("%s.%s: kept from %s", name, model_format, out)
                continue
            result["cases"].append(run_case(name, model_format, settings))
            result["matmul_after_cases"].append(matmul_throughput(settings.threads))
            write_result(result, out)

    result["load_average_1min_after"] = os.getloadavg()[0]
    result["complete"] = True
    write_result(result, out)
    return result


def set_matmul_shares(result: dict[str, Any]) -> None:
    """Set each case's FLOP rates as shares of the best matmul rate measured in the run.

    The matmul is timed at the start and after each case, and the best of all of them is the
    reference. On a shared machine that best rate is the one closest to the machine's limit.
    Rates per CPU-second are set against the reference per thread, which separates slow code
    from a small share of the cores.
    """
    measured = [result["matmul"], *result.get("matmul_after_cases", [])]
    if "matmul_after" in result:
        measured.append(result["matmul_after"])
    reference = max(max(item["torch_mm"], item["numpy_matmul"]) for item in measured)
    result["matmul_reference"] = reference
    per_thread = reference / result["threads"]
    for case in result["cases"]:
        flops = case["flops"]
        flops["engine_share_of_matmul"] = flops["engine_per_second"] / reference
        flops["naive_share_of_matmul"] = flops["naive_per_second"] / reference
        flops["check_share_of_matmul"] = flops["check"]["flops_per_second"] / reference
        if "engine_per_cpu_second" in flops:
            flops["engine_cpu_share_of_matmul"] = flops["engine_per_cpu_second"] / per_thread
            flops["naive_cpu_share_of_matmul"] = flops["naive_per_cpu_second"] / per_thread


def parse_arguments(argv: Sequence[str] | None) -> tuple[BenchSettings, Path, bool, bool]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks profile", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="mlp_bn,lenet5_bn", help="Comma-separated example models (from examples/models)."
    )
    parser.add_argument("--formats", default="onnx,pt2", help="Comma-separated formats: onnx, pt2.")
    parser.add_argument(
        "--samples", type=int, default=None, help="Evaluation samples, the first N of the test set (default 10000)."
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="Threads for torch and onnxruntime (default: the cores)."
    )
    parser.add_argument(
        "--naive-budget", type=float, default=None,
        help="Seconds for the naive profile of one model and format; the rest is projected (default: no limit).",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help=f"Smoke run: {QUICK_SAMPLES} samples, naive budget {QUICK_NAIVE_BUDGET:.0f} s.",
    )
    parser.add_argument(
        "--resume", action="store_true", help="Keep the cases already in --out with the same sample count."
    )
    parser.add_argument("--seed", type=int, default=0, help="Base seed of the noise of both ways.")
    parser.add_argument(
        "--render", action="store_true",
        help="Measure nothing: rewrite the markdown tables (and shares) of the existing --out file.",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "profile.json",
        help="JSON result file; the markdown tables go next to it (same name, .md).",
    )
    arguments = parser.parse_args(argv)

    samples = arguments.samples or (QUICK_SAMPLES if arguments.quick else 10000)
    budget = arguments.naive_budget
    if budget is None and arguments.quick:
        budget = QUICK_NAIVE_BUDGET
    formats = tuple(item for item in arguments.formats.split(",") if item)
    bad = [item for item in formats if item not in ("onnx", "pt2")]
    if bad:
        parser.error(f"invalid --formats value {bad[0]!r}: expected onnx, pt2 or both (onnx,pt2)")
    models = tuple(item for item in arguments.models.split(",") if item)
    missing = [name for name in models for item in formats if not (MODELS_FOLDER / f"{name}.{item}").is_file()]
    if missing:
        parser.error(f"model {missing[0]!r} not found in {MODELS_FOLDER}; run examples/train.py or pick another")
    if samples < 100:
        parser.error(f"invalid --samples {samples}: expected at least 100")
    threads = arguments.threads or runtime.default_threads()
    settings = BenchSettings(models, formats, samples, threads, budget, arguments.seed)
    return settings, arguments.out, arguments.resume, arguments.render


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark from the command line and print its tables."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings, out, resume, render = parse_arguments(argv)
    if render:
        if not out.is_file():
            raise SystemExit(f"--render: result file {out} not found; run the benchmark first or pass --out FILE")
        result = json.loads(out.read_text())
        write_result(result, out)
    else:
        result = run_benchmark(settings, out, resume)
    print(markdown(result))


if __name__ == "__main__":
    main()
