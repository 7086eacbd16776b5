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

from wnplan.fit import CurvePoint
from wnplan.noise import derive_seed
from wnplan.store import Store, TrialResult, trial_key

if TYPE_CHECKING:
    from wnplan.executors import Executor

logger = logging.getLogger(__name__)

COARSE_DECADES = range(-3, 3)  # 1e-3 … 1e2
SIGMA_MIN = 1e-6
SIGMA_MAX = 1e10
MAX_ROUNDS = 12
FALL_MARGIN = 0.1  # fraction of the accuracy range that counts as "not yet falling" / "fallen"


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
    """

    scope: str
    sites: tuple[int, ...]
    site_names: tuple[str, ...]
    sigma: float
    repeat: int
    sigma_pair: tuple[float, float] | None = None
    order: str | None = None

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
        reasons: why each σ was added ("coarse", "extend", "refine", "crossing", "given").
        results: repeat results per σ.
    """

    scope: str
    sites: tuple[int, ...]
    site_names: tuple[str, ...]
    a_max: float
    a_min: float
    fixed_grid: tuple[float, ...] | None = None
    reasons: dict[float, str] = field(default_factory=dict)
    results: dict[float, list[TrialResult]] = field(default_factory=dict)

    def propose(self) -> dict[float, str]:
        """Return the next σ values to measure, with the reason for each; empty when done."""
        if self.fixed_grid is not None:
            return {} if self.reasons else {sigma: "given" for sigma in self.fixed_grid}
        if not self.reasons:
            return {10.0**k: "coarse" for k in COARSE_DECADES}
        return _next_sigmas(self.mean_accuracies(), self.a_max, self.a_min, set(self.reasons))

    def make_trial(self, sigma: float, repeat: int) -> Trial:
        return Trial(self.scope, self.sites, self.site_names, sigma, repeat)

    def mean_accuracies(self) -> dict[float, float]:
        return {
            sigma: float(np.mean([result.accuracy for result in results]))
            for sigma, results in sorted(self.results.items())
        }

    def points(self) -> list[dict[str, Any]]:
        """Return the measured points in σ order, as JSON records with their reason."""
        records = []
        for sigma, results in sorted(self.results.items()):
            accuracies = np.array([result.accuracy for result in results])
            stderr = float(accuracies.std(ddof=1) / math.sqrt(len(accuracies))) if len(accuracies) > 1 else 0.0
            records.append(
                {
                    "sigma": sigma,
                    "accuracy": float(accuracies.mean()),
                    "stderr": stderr,
                    "samples": int(results[0].total),
                    "repeats": len(results),
                    "reason": self.reasons.get(sigma, "given"),
                }
            )
        return records

    def curve_points(self) -> list[CurvePoint]:
        return [
            CurvePoint(record["sigma"], record["accuracy"], record["stderr"], record["samples"], record["repeats"])
            for record in self.points()
        ]


def _next_sigmas(accuracy: dict[float, float], a_max: float, a_min: float, tried: set[float]) -> dict[float, str]:
    sigmas = sorted(accuracy)
    span = a_max - a_min
    half = a_min + span / 2
    if span <= 0:
        return {}  # a model at chance has no fall to measure; the fit reports it

    largest, smallest = sigmas[-1], sigmas[0]
    if accuracy[largest] > half and largest < SIGMA_MAX:
        return _new({largest * 10.0, largest * 100.0}, tried, "extend")
    if accuracy[smallest] < half and smallest > SIGMA_MIN:
        return _new({smallest / 10.0, smallest / 100.0}, tried, "extend")

    # The fall lies between the last σ still near the top and the first σ near the bottom.
    high = [sigma for sigma in sigmas if accuracy[sigma] >= a_max - FALL_MARGIN * span]
    low = [sigma for sigma in sigmas if accuracy[sigma] <= a_min + FALL_MARGIN * span]
    start = max([sigma for sigma in high if not low or sigma < low[-1]], default=smallest)
    end = min([sigma for sigma in low if sigma > start], default=largest)
    proposals = _new(set(_log_grid(start, end, 4)), tried, "refine")
    if proposals:
        return proposals

    above = [sigma for sigma in sigmas if accuracy[sigma] > half]
    below = [sigma for sigma in sigmas if accuracy[sigma] <= half and (not above or sigma > above[0])]
    if above and below:
        bracket_low = max(sigma for sigma in above if sigma < below[0]) if any(s < below[0] for s in above) else None
        if bracket_low is not None:
            return _new(set(_log_grid(bracket_low, below[0], 8)), tried, "crossing")
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
            new = curve.propose()
            if not new:
                return
            rounds[position] += 1
            curve.reasons.update(new)
            trials = [curve.make_trial(key, repeat) for key in new for repeat in range(repeats)]
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
                chunk.keys[index], context.model_sha256, context.data_sha256, context.identity(trial), result,
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


def _finish(curve: Curve, chunk: _Chunk) -> None:
    for index, trial in enumerate(chunk.trials):
        key = trial.sigma_pair if trial.sigma_pair is not None else trial.sigma
        curve.results.setdefault(key, []).append(chunk.results[index])


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

    def propose(self) -> dict[tuple[float, float], str]:
        if self.reasons:
            return {}
        return {(mul, add): "grid" for mul in self.sigmas_mul for add in self.sigmas_add}

    def make_trial(self, pair: tuple[float, float], repeat: int) -> Trial:
        return Trial(self.scope, self.sites, self.site_names, 0.0, repeat, pair, self.order)

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
