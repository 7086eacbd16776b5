"""Executors: where the trials of a sweep run.

The sweep hands an executor *chunks*: the trials of one round of one curve, which share a
site, so suffix reuse still applies inside a chunk. The executor reports results as they
finish, and the sweep commits them to the store on the driver. Every trial's noise seed
comes from its identity, so the results do not depend on the executor, the number of
workers, or the order in which chunks finish.

- `InProcessExecutor` (the default) runs chunks one at a time in this process, finishing
  one curve before starting the next so a site's clean values stay cached.
- `ProcessPoolExecutor` (`--workers N`) runs chunks in N local worker processes. The model
  is loaded and the data unpickled once per worker.

Workers take the driver's thread count and device from the job (see `EvaluationJob`).
"""

from __future__ import annotations

import concurrent.futures
import heapq
import logging
import multiprocessing
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wnplan import runtime
from wnplan.data import Dataset
from wnplan.errors import SettingsError
from wnplan.noise import NoiseSpec, derive_seed
from wnplan.store import TrialResult
from wnplan.sweep import Trial

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationJob:
    """Everything a worker needs to evaluate trials, shipped once per worker.

    Attributes:
        model_path: the model file.
        factory, trust: how to load it (see `wnplan.models.load_model`).
        data: the evaluation data.
        noise: the noise model.
        scales: per-site σ scale for relative σ.
        identity: the sweep-wide part of each trial identity (noise record, mode, seed).
        threads: thread count each worker uses, or None for the libraries' defaults.
        device: device each worker runs the model on, "cpu" or "cuda". Default: this
            process's device when the job is made (`wnplan.runtime.device()`).
        options: mode-specific settings (for example training settings and data).
    """

    model_path: str
    factory: str | None
    trust: bool
    data: Dataset
    noise: NoiseSpec
    scales: Mapping[int, float]
    identity: Mapping[str, Any]
    threads: int | None = None
    device: str = field(default_factory=runtime.device)
    options: Mapping[str, Any] = field(default_factory=dict)

    def noise_seed(self, trial: Trial) -> int:
        identity = trial.identity(self.identity["noise"], self.identity["mode"], self.identity["seed"])
        return derive_seed(self.identity["seed"], identity)


def build_runner(job: EvaluationJob) -> Callable[[Sequence[Trial]], Iterator[TrialResult]]:
    """Load the model and return the function that evaluates one chunk of trials."""
    from wnplan.evaluate import InferenceEvaluator
    from wnplan.models import load_model

    runtime.set_threads(job.threads)
    runtime.set_device(job.device)
    model = load_model(job.model_path, factory=job.factory, trust=job.trust, sample=job.data.x[:2])
    make = job.options.get("make_evaluator")
    if make is not None:
        return make(model, job).run_group
    return InferenceEvaluator(model, job.data, job.noise, job.scales, job.noise_seed).run_group


class Executor(ABC):
    """Runs chunks of trials; `next_result` returns results as they finish."""

    @abstractmethod
    def submit(self, ticket: int, trials: Sequence[Trial], priority: int) -> None:
        """Queue a chunk; lower `priority` runs first where the executor has a choice."""

    @abstractmethod
    def next_result(self) -> tuple[int, int, TrialResult]:
        """Block until a result is ready; return (ticket, position in its chunk, result)."""

    def close(self) -> None:  # noqa: B027 - executors without resources need no cleanup
        """Release workers and resources."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class InProcessExecutor(Executor):
    """Runs chunks one at a time in this process, each result yielded as it finishes."""

    def __init__(self, runner: Callable[[Sequence[Trial]], Iterator[TrialResult]]) -> None:
        self._runner = runner
        self._queue: list[tuple[int, int, Sequence[Trial]]] = []
        self._current: tuple[int, Iterator[tuple[int, TrialResult]]] | None = None

    def submit(self, ticket: int, trials: Sequence[Trial], priority: int) -> None:
        heapq.heappush(self._queue, (priority, ticket, trials))

    def next_result(self) -> tuple[int, int, TrialResult]:
        while True:
            if self._current is None:
                if not self._queue:
                    raise RuntimeError("next_result called with no chunk outstanding")
                _, ticket, trials = heapq.heappop(self._queue)
                self._current = (ticket, enumerate(self._runner(trials)))
            ticket, results = self._current
            item = next(results, None)
            if item is not None:
                return ticket, item[0], item[1]
            self._current = None


# Each worker process keeps its runner here, built once by the pool's initializer.
_worker_runner: Callable[[Sequence[Trial]], Iterator[TrialResult]] | None = None


def _initialize_worker(job: EvaluationJob) -> None:
    global _worker_runner
    _worker_runner = build_runner(job)


def _run_chunk(trials: Sequence[Trial]) -> list[TrialResult]:
    if _worker_runner is None:
        raise RuntimeError("worker was not initialized")
    return list(_worker_runner(trials))


class ProcessPoolExecutor(Executor):
    """Runs chunks in local worker processes; each worker loads the model once.

    Workers use one thread each unless the job says otherwise, so N workers do not
    oversubscribe N cores.
    """

    def __init__(self, job: EvaluationJob, workers: int) -> None:
        if workers < 1:
            raise SettingsError(f"invalid --workers {workers}: expected at least 1")
        if job.threads is None:
            job = _with_threads(job, 1)
        context = multiprocessing.get_context("spawn")
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_initialize_worker, initargs=(job,)
        )
        self._futures: dict[concurrent.futures.Future, int] = {}
        self._ready: deque[tuple[int, int, TrialResult]] = deque()

    def submit(self, ticket: int, trials: Sequence[Trial], priority: int) -> None:
        self._futures[self._pool.submit(_run_chunk, list(trials))] = ticket

    def next_result(self) -> tuple[int, int, TrialResult]:
        while not self._ready:
            if not self._futures:
                raise RuntimeError("next_result called with no chunk outstanding")
            done, _ = concurrent.futures.wait(self._futures, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                ticket = self._futures.pop(future)
                for position, result in enumerate(future.result()):
                    self._ready.append((ticket, position, result))
        return self._ready.popleft()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _with_threads(job: EvaluationJob, threads: int) -> EvaluationJob:
    from dataclasses import replace

    return replace(job, threads=threads)
