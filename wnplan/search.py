"""Refining an allocation with the accelerator simulator in the loop.

Per-site predictions ignore that noisy sites interact, so the allocation that minimises
the sum of predicted losses can be worse in simulation than the 1/µ rule. The search
therefore measures candidate allocations on a *search half* of the evaluation data (the
samples with even index) and keeps the best:

1. The starting candidates (the 1/µ rule and the predicted optimum) are measured, and the
   better one becomes the incumbent, so the result is never ranked below the 1/µ rule.
2. Moves shift one execution from one site to another. They are tried in the order of their
   predicted gain, and the first move that raises the simulated accuracy is taken.
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
from wnplan.evaluate import evaluate_noisy
from wnplan.models import Model
from wnplan.noise import SiteNoise, derive_seed

logger = logging.getLogger(__name__)

SEARCH_HALF = "even"
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
        moves: moves taken, as (from site position, to site position).
        stopped: why the search ended ("converged" or "time budget").
    """

    counts: list[int]
    start: str
    accuracies: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0
    moves: list[tuple[int, int]] = field(default_factory=list)
    stopped: str = "converged"

    def to_dict(self, site_indices: Sequence[int]) -> dict[str, Any]:
        return {
            "start": self.start,
            "search_accuracy": self.accuracies,
            "evaluations": self.evaluations,
            "moves": [{"from": site_indices[a], "to": site_indices[b]} for a, b in self.moves],
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

    def accuracy(self, counts: Sequence[int]) -> float:
        """Return the mean accuracy of an allocation over the fixed draws."""
        key = tuple(counts)
        if key not in self._cache:
            levels = {
                index: self.levels(position, count)
                for position, (index, count) in enumerate(zip(self.site_indices, counts, strict=True))
            }
            correct = [evaluate_noisy(self.model, self.data, levels, seed) for seed in self.seeds]
            self._cache[key] = float(np.mean(correct)) / len(self.data)
        return self._cache[key]


def refine(
    simulator: AllocationSimulator,
    starts: Mapping[str, Sequence[int]],
    losses: Sequence[Sequence[float]],
    minimum: int,
    maximum: int,
    time_budget: float,
    progress: Callable[[int], None] | None = None,
) -> SearchResult:
    """Search for the allocation with the best simulated accuracy.

    Args:
        simulator: measures allocations on the search half.
        starts: starting allocations by name; "paper" must be among them.
        losses: `losses[i][k]` is site i's predicted loss with `minimum + k` executions,
            used to order the moves.
        minimum, maximum: bounds of each count.
        time_budget: seconds after which no new move is tried.
        progress: called with the number of allocations measured so far.
    """
    deadline = time.monotonic() + time_budget
    accuracies = {name: simulator.accuracy(counts) for name, counts in starts.items()}
    # Ties keep the 1/µ rule: a move away from it must earn its place.
    best_name = max(accuracies, key=lambda name: (accuracies[name], name == "paper"))
    current = list(starts[best_name])
    current_accuracy = accuracies[best_name]
    result = SearchResult(current, best_name, dict(accuracies))

    improved = True
    while improved:
        improved = False
        for source, target in _ranked_moves(current, losses, minimum, maximum):
            if time.monotonic() > deadline:
                result.stopped = "time budget"
                improved = False
                break
            candidate = list(current)
            candidate[source] -= 1
            candidate[target] += 1
            accuracy = simulator.accuracy(candidate)
            if progress:
                progress(simulator.evaluations)
            if accuracy > current_accuracy:
                logger.info("move %d → %d: %.4f → %.4f", source, target, current_accuracy, accuracy)
                current, current_accuracy = candidate, accuracy
                result.moves.append((source, target))
                improved = True
                break

    result.counts = current
    result.accuracies["result"] = current_accuracy
    result.evaluations = simulator.evaluations
    return result


def _ranked_moves(
    counts: Sequence[int], losses: Sequence[Sequence[float]], minimum: int, maximum: int
) -> list[tuple[int, int]]:
    """Return moves (source, target) ordered by predicted gain, best first."""
    moves = []
    for source, source_count in enumerate(counts):
        if source_count <= minimum:
            continue
        cost = losses[source][source_count - 1 - minimum] - losses[source][source_count - minimum]
        for target, target_count in enumerate(counts):
            if target == source or target_count >= maximum:
                continue
            gain = losses[target][target_count - minimum] - losses[target][target_count + 1 - minimum]
            moves.append((gain - cost, source, target))
    moves.sort(key=lambda move: (-move[0], move[1], move[2]))
    return [(source, target) for _, source, target in moves]
