"""Integer allocation rules: how a budget of executions is split over sites.

All rules keep the sum exactly at the budget and every count within [minimum, maximum].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from wnplan.errors import SettingsError


def check_bounds(sites: int, budget: int, minimum: int, maximum: int) -> None:
    """Raise SettingsError unless `budget` can be split over `sites` within the bounds."""
    if minimum < 0 or maximum < minimum:
        raise SettingsError(
            f"invalid execution bounds: --min-executions {minimum} and --max-executions {maximum}; "
            + "expected 0 ≤ min ≤ max"
        )
    if sites * minimum > budget:
        raise SettingsError(
            f"--budget {budget} is smaller than {minimum} execution(s) for each of the {sites} "
            + f"unshielded sites; pass --budget {sites * minimum} or more"
        )
    if sites * maximum < budget:
        raise SettingsError(
            f"--budget {budget} exceeds --max-executions {maximum} for each of the {sites} "
            + f"unshielded sites; raise --max-executions to at least {-(-budget // sites)}"
        )


def uniform_counts(sites: int, budget: int) -> list[int]:
    """Spread `budget` over `sites` as evenly as possible, extras to the first sites."""
    base, extra = divmod(budget, sites)
    return [base + (1 if position < extra else 0) for position in range(sites)]


def proportional_counts(
    weights: Sequence[float], budget: int, minimum: int = 1, maximum: int | None = None
) -> list[int]:
    """Round `budget · w_i / Σw` to integers that sum to `budget`, within [minimum, maximum].

    The continuous shares are clip(λ·w_i, minimum, maximum), with λ chosen by bisection so
    that they sum to the budget. This is the proportional rule with shares outside the
    bounds held at the bound and the rest of the budget shared again among the others. The
    fractions are then rounded by largest remainder (ties go to the earlier site).
    """
    weights = np.asarray(weights, dtype=np.float64)
    count = len(weights)
    maximum = budget if maximum is None else maximum
    check_bounds(count, budget, minimum, maximum)
    if np.any(~np.isfinite(weights)) or np.any(weights <= 0):
        raise SettingsError("allocation weights must be positive and finite")

    def shares_at(log_scale: float) -> np.ndarray:
        return np.clip(np.exp(log_scale + np.log(weights)), minimum, maximum)

    # Bisection in log λ resolves weights that span hundreds of decades.
    low = math.log(max(minimum, 1e-300) / budget) - float(np.log(weights).max()) - 1.0
    high = math.log(budget + 1.0) - float(np.log(weights).min()) + 1.0
    for _ in range(300):
        middle = (low + high) / 2
        if shares_at(middle).sum() < budget:
            low = middle
        else:
            high = middle
    shares = shares_at(high)

    counts = np.minimum(np.floor(shares + 1e-9).astype(int), maximum)
    remainders = shares - counts
    order = sorted(range(count), key=lambda i: (-remainders[i], i))
    missing = budget - int(counts.sum())
    for position in reversed(order):
        # Rounding can only overshoot by float error; take it back where the remainder is smallest.
        if missing >= 0:
            break
        if counts[position] > minimum:
            counts[position] -= 1
            missing += 1
    for position in order:
        if missing <= 0:
            break
        if counts[position] < maximum:
            counts[position] += 1
            missing -= 1
    return [int(value) for value in counts]


def optimal_counts(losses: Sequence[Sequence[float]], budget: int, minimum: int, maximum: int) -> list[int]:
    """Return counts that minimise Σ losses[i][n_i − minimum] with Σ n_i = budget.

    `losses[i][k]` is site i's predicted loss with `minimum + k` executions, for k up to
    `maximum − minimum`. Dynamic programming over sites and spent budget gives the exact
    optimum of this separable objective, whatever the shape of each loss curve. Ties go to
    the allocation that gives more executions to earlier sites.
    """
    sites = len(losses)
    check_bounds(sites, budget, minimum, maximum)
    spare = budget - sites * minimum
    table = np.full((sites + 1, spare + 1), np.inf)
    choice = np.zeros((sites + 1, spare + 1), dtype=int)
    table[sites, 0] = 0.0
    for site in range(sites - 1, -1, -1):
        options = min(maximum - minimum, spare)
        for left in range(spare + 1):
            best, best_extra = np.inf, 0
            for extra in range(min(options, left), -1, -1):
                value = losses[site][extra] + table[site + 1, left - extra]
                if value < best - 1e-12:
                    best, best_extra = value, extra
            table[site, left] = best
            choice[site, left] = best_extra

    counts, left = [], spare
    for site in range(sites):
        extra = int(choice[site, left])
        counts.append(minimum + extra)
        left -= extra
    return counts
