"""Trials, adaptive σ grids, and the sweep loop that runs them through the store.

A *trial* is one accuracy measurement: one scope (a walking site, or global), one σ, one
repeat. Its identity (scope, site, noise model, σ, repeat, mode) seeds its noise and keys
its stored result, so results do not depend on batching, executors or execution order.

A *curve* is the set of trials of one scope. Its σ grid is either given by the user, or
grown in rounds: a coarse log grid, extended by decades until the accuracy falls past
half-way, then refined at 4 and 8 points per decade where it falls. Every decision
depends only on measured accuracies, so a resumed sweep takes the same decisions and
finds their trials in the store.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from wnplan.fit import CurvePoint, fit_curve
from wnplan.noise import derive_seed
from wnplan.store import Store, TrialResult, trial_key

if TYPE_CHECKING:
    from wnplan.executors import Executor

logger = logging.getLogger(__name__)

COARSE_DECADES = range(-3, 3)  # 1e-3 … 1e2
SIGMA_MIN = 1e-6
SIGMA_MAX = 1e10
MAX_ROUNDS = 40
FALL_MARGIN = 0.1  # fraction of the accuracy range that counts as "not yet falling" / "fallen"
TAIL_MARGIN = 0.15  # screened points this close to the top or bottom get one full-data repeat


@dataclass(frozen=True)
class Trial:
    """One accuracy measurement: a scope at one σ and one repeat.

    Attributes:
        scope: "walking" (noise at one site) or "global" (noise at `sites`).
        sites: indices of the noisy sites.
        site_names: their names, which enter the identity so it survives re-indexing.
        sigma: σ in the profile's reference (absolute, or relative to each site's statistic).
        repeat: repeat number, 0-based; each repeat draws independent noise.
        sigma_pair: for mixed-noise maps, (σ_mul, σ_add) in place of `sigma`.
        order: for mixed-noise maps, "mul-first" or "add-first".
        samples: size of the evenly strided data subset the trial runs on; None for all data.
    """

    scope: str
    sites: tuple[int, ...]
    site_names: tuple[str, ...]
    sigma: float
    repeat: int
    sigma_pair: tuple[float, float] | None = None
    order: str | None = None
    samples: int | None = None

    def identity(self, noise: dict[str, Any], mode: str, seed: int) -> dict[str, Any]:
        identity = {
            "scope": self.scope,
            "sites": list(self.site_names),
            "noise": noise,
            "sigma": self.sigma,
            "repeat": self.repeat,
            "mode": mode,
            "seed": seed,
        }
        if self.sigma_pair is not None:
            identity["sigma_pair"] = list(self.sigma_pair)
            identity["order"] = self.order
        if self.samples is not None:
            identity["samples"] = self.samples
        return identity


@dataclass
class Curve:
    """The σ grid and results of one scope (one walking site, or the global scope).

    Attributes:
        scope: "walking" or "global".
        sites: indices of the noisy sites.
        site_names: their names.
        a_max: clean accuracy, the top of the curve.
        a_min: chance accuracy, the bottom of the curve.
        fixed_grid: the user's σ values, run exactly as given; None for the adaptive grid.
        clean: (correct, samples) of the clean model, the curve's point at σ = 0.
        screen_samples: size of the data subset on which the coarse grid is screened; None
            screens nothing and runs every point on the full data.
        target_error: relative standard error of µ at which refinement stops; None stops
            after the crossing is bracketed.
        max_trials: the most trials this curve may run.
        fit_space: "linear" or "log", for the fits that decide refinement.
        reasons: why each full-data σ was added ("coarse", "extend", "refine", "crossing",
            "repeat", "given").
        results: repeat results per full-data σ.
        screen: results per σ on the screening subset.
    """

    scope: str
    sites: tuple[int, ...]
    site_names: tuple[str, ...]
    a_max: float
    a_min: float
    fixed_grid: tuple[float, ...] | None = None
    clean: tuple[int, int] | None = None
    screen_samples: int | None = None
    target_error: float | None = None
    max_trials: int | None = None
    fit_space: str = "log"
    reasons: dict[float, str] = field(default_factory=dict)
    results: dict[float, list[TrialResult]] = field(default_factory=dict)
    screen: dict[float, list[TrialResult]] = field(default_factory=dict)
    _phase: str = "start"
    _trials: int = 0

    def next_trials(self, repeats: int) -> list[Trial]:
        """Return the next round of trials; empty when the curve is complete."""
        trials = self._next_trials(repeats)
        self._trials += len(trials)
        return trials

    def _next_trials(self, repeats: int) -> list[Trial]:
        if self.fixed_grid is not None:
            return [] if self.reasons else self._full({sigma: "given" for sigma in self.fixed_grid}, repeats)
        if self.a_max - self.a_min <= 0:
            return []  # a model at chance has no fall to measure; the fit reports it

        if self.screen_samples is not None and self._phase in ("start", "screen"):
            trials = self._screen_round()
            if trials:
                return trials
            self._phase = "refine"
            return self._from_screen(repeats)

        if self._phase in ("start", "refine"):
            self._phase = "refine"
            new = _next_sigmas(self.mean_accuracies(), self.a_max, self.a_min, set(self.reasons))
            if new:
                return self._full(new, repeats)
            self._phase = "improve"
        if self._phase == "improve":
            trials = self._improve(repeats)
            if trials:
                return trials
            self._phase = "done"
        return []

    def _screen_round(self) -> list[Trial]:
        """Screen the coarse grid, extended by decades, on the subset with one repeat."""
        self._phase = "screen"
        if not self.screen:
            new = {round_sigma(10.0**k) for k in COARSE_DECADES}
        else:
            accuracy = _means(self.screen)
            new = set(_extension(accuracy, self.a_max, self.a_min, set(self.screen)))
        for sigma in new:
            self.screen.setdefault(sigma, [])
        return [self._trial(sigma, 0, self.screen_samples) for sigma in sorted(new)]

    def _from_screen(self, repeats: int) -> list[Trial]:
        """Return the full-data trials: 4 points per decade across the fall the screen found.

        One more point a decade past the fall anchors the floor, so that the fit does not
        mistake the tail of the fall for a plateau above chance. Points whose screened accuracy
        is near the top or the bottom carry little information about µ and get one repeat;
        the others get `repeats`.
        """
        accuracy = _means(self.screen)
        start, end = _fall(accuracy, self.a_max, self.a_min)
        grid = {round_sigma(start), round_sigma(end), *_log_grid(start, end, 4)}
        if end * 10.0 <= SIGMA_MAX:
            grid.add(round_sigma(end * 10.0))

        screened = sorted(accuracy)
        span = self.a_max - self.a_min
        trials = []
        for sigma in sorted(grid):
            self.reasons[sigma] = "refine"
            estimate = float(np.interp(math.log10(sigma), np.log10(screened), [accuracy[s] for s in screened]))
            flat = estimate >= self.a_max - TAIL_MARGIN * span or estimate <= self.a_min + TAIL_MARGIN * span
            trials.extend(self._trial(sigma, repeat) for repeat in range(1 if flat else repeats))
        return trials

    def _improve(self, repeats: int) -> list[Trial]:
        """Add repeats at the two points nearest µ until its error meets the target."""
        if self.target_error is None:
            return []
        if self.max_trials is not None and self._trials + 2 * repeats > self.max_trials:
            return []
        fit = fit_curve(self.curve_points(), chance=self.a_min, space=self.fit_space)
        if fit.status != "ok" or fit.midpoint is None or fit.statistical_error is None:
            return []
        # More repeats shrink the sampling error only, not the misfit part of midpoint_error.
        if fit.statistical_error <= self.target_error * fit.midpoint:
            return []
        nearest = sorted(self.results, key=lambda sigma: abs(math.log10(sigma / fit.midpoint)))[:2]
        trials = []
        for sigma in nearest:
            done = len(self.results[sigma])
            self.reasons[sigma] = "repeat"
            trials.extend(self._trial(sigma, repeat) for repeat in range(done, done + repeats))
        return trials

    def _full(self, new: dict[float, str], repeats: int) -> list[Trial]:
        fresh = {sigma: reason for sigma, reason in new.items() if sigma not in self.reasons}
        self.reasons.update(fresh)
        return [self._trial(sigma, repeat) for sigma in fresh for repeat in range(repeats)]

    def _trial(self, sigma: float, repeat: int, samples: int | None = None) -> Trial:
        return Trial(self.scope, self.sites, self.site_names, sigma, repeat, samples=samples)

    def add(self, trial: Trial, result: TrialResult) -> None:
        """Record a finished trial of this curve."""
        target = self.screen if trial.samples is not None else self.results
        target.setdefault(trial.sigma, []).append(result)

    def mean_accuracies(self) -> dict[float, float]:
        return _means(self.results)

    def points(self) -> list[dict[str, Any]]:
        """Return the measured points as JSON records: clean, screened, then full-data, by σ."""
        records = []
        if self.clean is not None:
            correct, samples = self.clean
            records.append(_point(0.0, [TrialResult(correct, samples)], "clean"))
        records.extend(_point(sigma, results, "screen") for sigma, results in sorted(self.screen.items()))
        records.extend(
            _point(sigma, results, self.reasons.get(sigma, "given")) for sigma, results in sorted(self.results.items())
        )
        return records

    def curve_points(self) -> list[CurvePoint]:
        """Return the points the fit uses: the clean point and the full-data points."""
        return [
            CurvePoint(record["sigma"], record["accuracy"], record["stderr"], record["samples"], record["repeats"])
            for record in self.points()
            if record["reason"] != "screen"
        ]


def _point(sigma: float, results: list[TrialResult], reason: str) -> dict[str, Any]:
    accuracies = np.array([result.accuracy for result in results])
    stderr = float(accuracies.std(ddof=1) / math.sqrt(len(accuracies))) if len(accuracies) > 1 else 0.0
    return {
        "sigma": sigma,
        "accuracy": float(accuracies.mean()),
        "stderr": stderr,
        "samples": int(results[0].total),
        "repeats": len(results),
        "reason": reason,
    }


def _means(results: dict[float, list[TrialResult]]) -> dict[float, float]:
    return {
        sigma: float(np.mean([result.accuracy for result in values]))
        for sigma, values in sorted(results.items())
        if values
    }


def _extension(accuracy: dict[float, float], a_max: float, a_min: float, tried: set[float]) -> dict[float, str]:
    """Return decades beyond the grid while the curve has not crossed half-way."""
    sigmas = sorted(accuracy)
    half = a_min + (a_max - a_min) / 2
    largest, smallest = sigmas[-1], sigmas[0]
    if accuracy[largest] > half and largest < SIGMA_MAX:
        return _new({largest * 10.0, largest * 100.0}, tried, "extend")
    if accuracy[smallest] < half and smallest > SIGMA_MIN:
        return _new({smallest / 10.0, smallest / 100.0}, tried, "extend")
    return {}


def _fall(accuracy: dict[float, float], a_max: float, a_min: float) -> tuple[float, float]:
    """Return the last σ still near the top and the first σ near the bottom after it."""
    sigmas = sorted(accuracy)
    span = a_max - a_min
    high = [sigma for sigma in sigmas if accuracy[sigma] >= a_max - FALL_MARGIN * span]
    low = [sigma for sigma in sigmas if accuracy[sigma] <= a_min + FALL_MARGIN * span]
    start = max([sigma for sigma in high if not low or sigma < low[-1]], default=sigmas[0])
    end = min([sigma for sigma in low if sigma > start], default=sigmas[-1])
    return start, end


def _next_sigmas(accuracy: dict[float, float], a_max: float, a_min: float, tried: set[float]) -> dict[float, str]:
    if not accuracy:
        return {round_sigma(10.0**k): "coarse" for k in COARSE_DECADES}
    extension = _extension(accuracy, a_max, a_min, tried)
    if extension:
        return extension

    start, end = _fall(accuracy, a_max, a_min)
    proposals = _new(set(_log_grid(start, end, 4)), tried, "refine")
    if proposals:
        return proposals

    half = a_min + (a_max - a_min) / 2
    sigmas = sorted(accuracy)
    above = [sigma for sigma in sigmas if accuracy[sigma] > half]
    below = [sigma for sigma in sigmas if accuracy[sigma] <= half and (not above or sigma > above[0])]
    if above and below:
        bracket = [sigma for sigma in above if sigma < below[0]]
        if bracket:
            return _new(set(_log_grid(max(bracket), below[0], 8)), tried, "crossing")
    return {}


def _log_grid(start: float, end: float, per_decade: int) -> list[float]:
    """Return grid points k/per_decade decades apart that lie strictly between start and end."""
    if end <= start:
        return []
    first = math.floor(math.log10(start) * per_decade) + 1
    last = math.ceil(math.log10(end) * per_decade) - 1
    return [round_sigma(10.0 ** (k / per_decade)) for k in range(first, last + 1)]


def round_sigma(sigma: float) -> float:
    """Round σ to 6 significant digits, so grid points are identical across rounds."""
    return float(f"{sigma:.6g}")


def _new(candidates: Iterable[float], tried: set[float], reason: str) -> dict[float, str]:
    rounded = {round_sigma(sigma) for sigma in candidates}
    return {sigma: reason for sigma in sorted(rounded) if sigma not in tried and SIGMA_MIN <= sigma <= SIGMA_MAX}


@dataclass
class SweepContext:
    """What identifies a sweep's trials in the store."""

    model_sha256: str
    data_sha256: str
    noise: dict[str, Any]
    mode: str
    seed: int
    store: Store | None
    fresh: bool = False

    def key(self, trial: Trial) -> str:
        return trial_key(self.model_sha256, self.data_sha256, self.identity(trial))

    def identity(self, trial: Trial) -> dict[str, Any]:
        return trial.identity(self.noise, self.mode, self.seed)

    def noise_seed(self, trial: Trial) -> int:
        return derive_seed(self.seed, self.identity(trial))


@dataclass
class _Chunk:
    curve: int
    trials: list[Trial]
    keys: list[str]
    missing: set[int]
    results: dict[int, TrialResult]


def run_sweep(
    curves: Sequence[Curve],
    repeats: int,
    context: SweepContext,
    executor: Executor,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Measure every curve until its grid is complete; return trial counts.

    Each round of a curve is one chunk. Trials found in the store are reused; the others go
    to the executor, and each result is committed to the store as soon as it arrives, so a
    killed run keeps every finished trial. `progress(done, total)` is called as trials
    finish; the total grows when the adaptive grid adds points.
    """
    counts = {"total": 0, "computed": 0, "reused": 0}
    chunks: dict[int, _Chunk] = {}
    rounds = dict.fromkeys(range(len(curves)), 0)

    def report() -> None:
        if progress:
            progress(counts["computed"] + counts["reused"], counts["total"])

    def schedule(position: int) -> None:
        # Rounds whose trials are all stored complete at once, so loop until work is queued.
        while rounds[position] < MAX_ROUNDS:
            curve = curves[position]
            trials = curve.next_trials(repeats)
            if not trials:
                return
            rounds[position] += 1
            chunk = _lookup(position, trials, context)
            counts["total"] += len(trials)
            counts["reused"] += len(trials) - len(chunk.missing)
            report()
            if chunk.missing:
                ticket = len(chunks)
                chunks[ticket] = chunk
                executor.submit(ticket, [trials[index] for index in sorted(chunk.missing)], priority=position)
                return
            _finish(curve, chunk)

    for position in range(len(curves)):
        schedule(position)

    outstanding = {ticket for ticket, chunk in chunks.items() if chunk.missing}
    while outstanding:
        ticket, offset, result = executor.next_result()
        chunk = chunks[ticket]
        index = sorted(chunk.missing)[offset]
        chunk.results[index] = result
        if context.store is not None:
            trial = chunk.trials[index]
            context.store.put(
                chunk.keys[index],
                context.model_sha256,
                context.data_sha256,
                context.identity(trial),
                result,
                replace=context.fresh,
            )
        counts["computed"] += 1
        report()
        if len(chunk.results) == len(chunk.trials):
            outstanding.discard(ticket)
            _finish(curves[chunk.curve], chunk)
            schedule(chunk.curve)
            outstanding |= {number for number, other in chunks.items() if len(other.results) < len(other.trials)}
    return counts


def _lookup(position: int, trials: list[Trial], context: SweepContext) -> _Chunk:
    keys = [context.key(trial) for trial in trials]
    use_store = context.store is not None and not context.fresh
    stored = context.store.get_many(keys) if use_store else {}
    results = {index: stored[key] for index, key in enumerate(keys) if key in stored}
    missing = {index for index in range(len(trials)) if index not in results}
    return _Chunk(position, trials, keys, missing, results)


def _finish(curve: Curve | GridCurve, chunk: _Chunk) -> None:
    for index, trial in enumerate(chunk.trials):
        curve.add(trial, chunk.results[index])


@dataclass
class GridCurve:
    """A mixed-noise map of one site: accuracy over a σ_mul × σ_add grid in one order.

    Attributes:
        sites: the site index, as a one-element tuple.
        site_names: its name.
        order: "mul-first" or "add-first".
        sigmas_mul, sigmas_add: the grid axes, in the profile's reference.
    """

    sites: tuple[int, ...]
    site_names: tuple[str, ...]
    order: str
    sigmas_mul: tuple[float, ...]
    sigmas_add: tuple[float, ...]
    scope: str = "walking"
    reasons: dict[tuple[float, float], str] = field(default_factory=dict)
    results: dict[tuple[float, float], list[TrialResult]] = field(default_factory=dict)

    def next_trials(self, repeats: int) -> list[Trial]:
        if self.reasons:
            return []
        pairs = [(mul, add) for mul in self.sigmas_mul for add in self.sigmas_add]
        self.reasons.update(dict.fromkeys(pairs, "grid"))
        return [
            Trial(self.scope, self.sites, self.site_names, 0.0, repeat, pair, self.order)
            for pair in pairs
            for repeat in range(repeats)
        ]

    def add(self, trial: Trial, result: TrialResult) -> None:
        self.results.setdefault(trial.sigma_pair, []).append(result)

    def record(self) -> dict[str, Any]:
        """Return the map as a JSON record: rows follow σ_mul, columns σ_add."""
        accuracy, stderr = [], []
        for mul in self.sigmas_mul:
            accuracy.append([])
            stderr.append([])
            for add in self.sigmas_add:
                values = np.array([result.accuracy for result in self.results[(mul, add)]])
                accuracy[-1].append(float(values.mean()))
                error = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
                stderr[-1].append(float(error))
        some = next(iter(self.results.values()))
        return {
            "site": self.sites[0],
            "name": self.site_names[0],
            "order": self.order,
            "sigma_mul": list(self.sigmas_mul),
            "sigma_add": list(self.sigmas_add),
            "accuracy": accuracy,
            "stderr": stderr,
            "repeats": len(some),
            "samples": some[0].total,
        }
