"""Refining an allocation with the accelerator simulator in the loop.

Per-site predictions ignore that noisy sites interact, so the allocation that minimises
the sum of predicted losses can be worse in simulation than the 1/µ rule. The search
therefore measures candidate allocations on a *search half* of the evaluation data (the
samples with even index) and keeps the best:

1. The starting candidates (the 1/µ rule and the predicted optimum) are measured, and the
   better one becomes the incumbent, so the result is never ranked below the 1/µ rule.
2. Moves shift one execution (then two) from one site to another. They are measured in
   batches, in the order of their predicted gain, and the best move of the first batch that
   raises the simulated accuracy is taken.
3. The search stops when a full pass over the moves finds no improvement, or when its time
   budget runs out.

Every candidate is measured with the same noise draws (common random numbers), so
differences between candidates are not drowned in draw-to-draw noise. The other half of the
data (odd indices) is never used here. `wnplan check` reports the final figures on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wnplan.data import Dataset
from wnplan.evaluate import evaluate_allocations
from wnplan.models import Model
from wnplan.noise import SiteNoise, derive_seed

logger = logging.getLogger(__name__)

SEARCH_HALF = "even"
MOVE_SIZES = (1, 2)
HOLDOUT_HALF = "odd"


def split_half(data: Dataset, half: str) -> Dataset:
    """Return the samples with even (`"even"`) or odd (`"odd"`) index."""
    start = 0 if half == SEARCH_HALF else 1
    return data.subset(np.arange(start, len(data), 2), f"[{half} half]")


@dataclass
class SearchResult:
    """The outcome of a simulator-in-the-loop search.

    Attributes:
        counts: the chosen executions per site (in the order of the search's sites).
        start: name of the starting candidate that won ("paper" or "predicted").
        accuracies: simulated search-half accuracy of each starting candidate and the result.
        evaluations: allocations measured.
        moves: moves taken, as (from site position, to site position, executions moved).
        stopped: why the search ended ("converged" or "time budget").
    """

    counts: list[int]
    start: str
    accuracies: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0
    moves: list[tuple[int, int, int]] = field(default_factory=list)
    stopped: str = "converged"

    def to_dict(self, site_indices: Sequence[int]) -> dict[str, Any]:
        return {
            "start": self.start,
            "search_accuracy": self.accuracies,
            "evaluations": self.evaluations,
            "moves": [
                {"from": site_indices[source], "to": site_indices[target], "executions": amount}
                for source, target, amount in self.moves
            ],
            "stopped": self.stopped,
        }


class AllocationSimulator:
    """Measures allocations on the search half with fixed noise draws.

    Args:
        model: the model.
        data: the search half of the evaluation data.
        site_indices: the sites whose executions are searched.
        levels: maps (position among the sites, executions) to that site's absolute noise.
        repeats: noise draws per measurement; draw r has the same seed for every allocation.
        seed: base seed of the draws.
    """

    def __init__(
        self,
        model: Model,
        data: Dataset,
        site_indices: Sequence[int],
        levels: Callable[[int, int], SiteNoise],
        repeats: int,
        seed: int,
    ) -> None:
        self.model = model
        self.data = data
        self.site_indices = list(site_indices)
        self.levels = levels
        self.seeds = [derive_seed(seed, {"search": repeat}) for repeat in range(repeats)]
        self._cache: dict[tuple[int, ...], float] = {}

    @property
    def evaluations(self) -> int:
        return len(self._cache)

    def accuracies(self, candidates: Sequence[Sequence[int]]) -> list[float]:
        """Return the mean accuracy of each allocation over the fixed draws.

        Allocations not measured before are measured together, on the same draws.
        """
        new = [tuple(counts) for counts in dict.fromkeys(tuple(counts) for counts in candidates)]
        new = [counts for counts in new if counts not in self._cache]
        if new:
            level_sets = [
                {
                    index: self.levels(position, count)
                    for position, (index, count) in enumerate(zip(self.site_indices, counts, strict=True))
                }
                for counts in new
            ]
            totals = np.zeros(len(new))
            for seed in self.seeds:
                totals += evaluate_allocations(self.model, self.data, level_sets, seed)
            for counts, total in zip(new, totals, strict=True):
                self._cache[counts] = float(total) / (len(self.seeds) * len(self.data))
        return [self._cache[tuple(counts)] for counts in candidates]


def refine(
    simulator: AllocationSimulator,
    starts: Mapping[str, Sequence[int]],
    losses: Sequence[Sequence[float]],
    minimum: int,
    maximum: int,
    time_budget: float,
    progress: Callable[[int], None] | None = None,
    batch: int = 8,
) -> SearchResult:
    """Search for the allocation with the best simulated accuracy.

    Args:
        simulator: measures allocations on the search half.
        starts: starting allocations by name; "paper" must be among them.
        losses: `losses[i][k]` is site i's predicted loss with `minimum + k` executions,
            used to order the moves.
        minimum, maximum: bounds of each count.
        time_budget: seconds after which no new batch of moves is tried.
        progress: called with the number of allocations measured so far.
        batch: moves measured together on the same draws; the best improving one is taken.
    """
    deadline = time.monotonic() + time_budget
    names = list(starts)
    measured = simulator.accuracies([starts[name] for name in names])
    accuracies = dict(zip(names, measured, strict=True))
    # Ties keep the 1/µ rule: a move away from it must earn its place.
    best_name = max(accuracies, key=lambda name: (accuracies[name], name == "paper"))
    current = list(starts[best_name])
    current_accuracy = accuracies[best_name]
    result = SearchResult(current, best_name, dict(accuracies))

    while True:
        moves = _ranked_moves(current, losses, minimum, maximum)
        improved = False
        for first in range(0, len(moves), batch):
            if time.monotonic() > deadline:
                result.stopped = "time budget"
                break
            group = moves[first : first + batch]
            candidates = [_moved(current, move) for move in group]
            scores = simulator.accuracies(candidates)
            if progress:
                progress(simulator.evaluations)
            best = max(range(len(group)), key=lambda position: (scores[position], -position))
            if scores[best] > current_accuracy:
                logger.info("move %s: %.4f → %.4f", group[best], current_accuracy, scores[best])
                current, current_accuracy = candidates[best], scores[best]
                result.moves.append(group[best])
                improved = True
                break
        if not improved:
            break

    result.counts = current
    result.accuracies["result"] = current_accuracy
    result.evaluations = simulator.evaluations
    return result


def _moved(counts: Sequence[int], move: tuple[int, int, int]) -> list[int]:
    source, target, amount = move
    moved = list(counts)
    moved[source] -= amount
    moved[target] += amount
    return moved


def _ranked_moves(
    counts: Sequence[int], losses: Sequence[Sequence[float]], minimum: int, maximum: int
) -> list[tuple[int, int, int]]:
    """Return moves (source, target, amount) ordered by predicted gain, best first.

    Single executions are moved first; moves of two executions follow, so a pass can step
    over a neighbour that is no better.
    """
    ranked = []
    for amount in MOVE_SIZES:
        moves = []
        for source, source_count in enumerate(counts):
            if source_count - amount < minimum:
                continue
            cost = losses[source][source_count - amount - minimum] - losses[source][source_count - minimum]
            for target, target_count in enumerate(counts):
                if target == source or target_count + amount > maximum:
                    continue
                gain = losses[target][target_count - minimum] - losses[target][target_count + amount - minimum]
                moves.append((gain - cost, source, target))
        moves.sort(key=lambda move: (-move[0], move[1], move[2]))
        ranked.extend((source, target, amount) for _, source, target in moves)
    return ranked
