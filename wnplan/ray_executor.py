"""The Ray executor (`--ray`): run the chunks of a sweep on a Ray cluster.

Workers are Ray actors that each reserve one CPU, and with `--device cuda` an equal share of
the cluster's GPUs (see `gpu_share`). An actor builds its runner on its first chunk (loads
the model, pins its thread count and device) and keeps it. The executor hands each idle
actor one chunk at a time, taking the queued chunk with the lowest priority. It prefers an
actor that last ran the same scope and sites, because that actor still caches the clean
values at the walking site. The job and the model file's bytes are put in the object store
once.

Addresses:

- "local" starts a cluster on this machine that listens on 127.0.0.1 only, with usage
  statistics and the dashboard off. `close()` stops it.
- "auto" joins a running cluster: the one RAY_ADDRESS names, or else the one that
  `ray start` recorded on this machine.
- HOST:PORT (or ray://HOST:PORT for Ray Client) joins the cluster whose head node listens
  there. A loopback HOST is used as written, not replaced by the machine's network address.

Ray restarts an actor whose process dies (killed, out of memory, node lost), and runs the
chunk it was running again on the restarted actor, up to MAX_RETRIES times. Trial seeds
come from trial identities, so a chunk that runs again returns the same results.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import math
import os
import socket
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from wnplan import runtime
from wnplan.errors import SettingsError, WnplanError
from wnplan.executors import EvaluationJob, Executor, build_runner
from wnplan.models.base import file_sha256
from wnplan.store import TrialResult
from wnplan.sweep import Trial

logger = logging.getLogger(__name__)

RAY_MISSING = "--ray needs the ray package: pip install 'wnplan[ray]'"
MAX_RETRIES = 3  # restarts of a dead actor, and runs again of the chunk it was running
CONNECT_TIMEOUT_SECONDS = 5.0
# Ray replaces a loopback node address with the machine's network address unless this
# variable is "0" (Ray 2.60: ray/_private/services.py, get_node_ip_address).
LOOPBACK_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray logs a warning that a new local cluster requires a token (its default), which a
# wnplan user need not act on.
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
# Per-node cache of model files received from the driver, for nodes without the file.
MODEL_CACHE = Path(tempfile.gettempdir()) / "wnplan-models"


def import_ray() -> ModuleType:
    """Import ray with usage statistics off; raise SettingsError when it is not installed."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        import ray
    except ImportError:
        raise SettingsError(RAY_MISSING) from None
    return ray


class RayExecutor(Executor):
    """Runs chunks on Ray actors, one per CPU; the module docstring lists the addresses.

    Args:
        job: what the workers evaluate. Threads per worker default to 1.
        address: "local", "auto", HOST:PORT or ray://HOST:PORT.
        workers: actors to start. Default: the CPUs this process may use for "local"
            (which also sizes the local cluster), and the cluster's CPUs otherwise.

    Raises:
        SettingsError: ray is not installed, the address is invalid, the cluster failed
            to start or could not be reached, or the job's device is "cuda" and the
            cluster has no GPU.
    """

    def __init__(self, job: EvaluationJob, address: str, workers: int | None = None) -> None:
        if workers is not None and workers < 1:
            raise SettingsError(f"invalid number of Ray workers {workers}: expected at least 1")
        self._ray = import_ray()
        if job.threads is None:
            job = replace(job, threads=1)
        self._owns_connection = connect(self._ray, address, workers)
        self._actors: list[Any] = []
        self._closed = False
        try:
            count = workers or cluster_cpus(self._ray)
            self._start_actors(job, count)
        except BaseException:
            self.close()
            raise
        self._idle = list(range(count))
        self._last_scope: dict[int, tuple[Any, ...]] = {}
        self._queue: list[tuple[int, int, list[Trial]]] = []
        self._running: dict[Any, tuple[int, int]] = {}  # object ref → (ticket, actor index)
        self._ready: deque[tuple[int, int, TrialResult]] = deque()
        logger.info("running trials on %d Ray workers", count)

    def _start_actors(self, job: EvaluationJob, count: int) -> None:
        ray = self._ray
        # Ray hides every GPU from an actor that reserves none, so CUDA workers must reserve some.
        gpus_per_actor = gpu_share(ray.cluster_resources().get("GPU", 0), count) if job.device == "cuda" else 0
        model = Path(job.model_path)
        self._shipment = Shipment(ray.put(job), ray.put(model.read_bytes()), file_sha256(model))
        actor_class = ray.remote(
            num_cpus=1, num_gpus=gpus_per_actor, max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES
        )(ChunkWorker)
        self._actors = [actor_class.remote() for _ in range(count)]

    def submit(self, ticket: int, trials: Sequence[Trial], priority: int) -> None:
        heapq.heappush(self._queue, (priority, ticket, list(trials)))
        self._dispatch()

    def next_result(self) -> tuple[int, int, TrialResult]:
        while not self._ready:
            self._dispatch()
            if not self._running:
                raise RuntimeError("next_result called with no chunk outstanding")
            (done,), _ = self._ray.wait(list(self._running), num_returns=1)
            ticket, actor = self._running.pop(done)
            self._idle.append(actor)
            for position, result in enumerate(self._fetch(done, ticket)):
                self._ready.append((ticket, position, result))
        return self._ready.popleft()

    def _dispatch(self) -> None:
        while self._queue and self._idle:
            _, ticket, trials = heapq.heappop(self._queue)
            scope = chunk_scope(trials)
            actor = next((index for index in self._idle if self._last_scope.get(index) == scope), self._idle[0])
            self._idle.remove(actor)
            self._last_scope[actor] = scope
            self._running[self._actors[actor].run.remote(self._shipment, trials)] = (ticket, actor)

    def _fetch(self, ref: Any, ticket: int) -> list[TrialResult]:
        exceptions = self._ray.exceptions
        try:
            return self._ray.get(ref)
        except exceptions.RayTaskError as error:
            # A worker's error about the user's input reads as it would in this process.
            if isinstance(error.cause, WnplanError):
                raise error.cause from None
            raise
        except exceptions.RayActorError as error:
            raise RuntimeError(
                f"chunk {ticket} failed: its Ray worker died and {MAX_RETRIES} restarts did not finish it "
                + f"({type(error).__name__}); finished trials are in the store, so the same command "
                + "resumes the sweep"
            ) from error

    def close(self) -> None:
        """Stop the actors; stop the local cluster or disconnect if this executor connected."""
        if self._closed:
            return
        self._closed = True
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._owns_connection:
            self._ray.shutdown()


@dataclass(frozen=True)
class Shipment:
    """References to the job and to the model file's bytes, carried by every chunk call.

    Ray passes references nested in an argument as references, so an actor fetches the
    job only when it builds its runner, and the model bytes only when its node lacks the
    file. The shipment goes with each call, not to the actor's constructor, because Ray
    2.60 cannot always restart an actor whose constructor arguments are in the object
    store.

    Attributes:
        job: reference to the EvaluationJob.
        model: reference to the model file's bytes.
        model_sha256: the sha256 of the driver's model file.
    """

    job: Any
    model: Any
    model_sha256: str


class ChunkWorker:
    """The body of a Ray actor: builds the runner on its first chunk and keeps it."""

    def __init__(self) -> None:
        self._runner: Callable[[Sequence[Trial]], Iterator[TrialResult]] | None = None

    def run(self, shipment: Shipment, trials: Sequence[Trial]) -> list[TrialResult]:
        if self._runner is None:
            import ray

            self._runner = build_runner(local_model(ray.get(shipment.job), shipment))
        return list(self._runner(trials))


def local_model(job: EvaluationJob, shipment: Shipment) -> EvaluationJob:
    """Return the job with a path on this node that contains the driver's model file.

    The job's own path is kept when the file there has the driver's sha256. Otherwise the
    bytes come from the object store into MODEL_CACHE, so nodes need no shared file system.
    """
    path = Path(job.model_path)
    if path.is_file() and file_sha256(path) == shipment.model_sha256:
        return job
    if path.is_file():
        logger.warning("%s on this node differs from the driver's model file; using the driver's copy", path)
    cached = MODEL_CACHE / shipment.model_sha256 / path.name
    if not (cached.is_file() and file_sha256(cached) == shipment.model_sha256):
        import ray

        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        partial.write_bytes(ray.get(shipment.model))
        os.replace(partial, cached)
    return replace(job, model_path=str(cached))


def chunk_scope(trials: Sequence[Trial]) -> tuple[Any, ...]:
    """Return what the trials of a chunk share: scope and sites."""
    return (trials[0].scope, trials[0].sites) if trials else ()


def connect(ray: ModuleType, address: str, workers: int | None) -> bool:
    """Connect this process to Ray; return whether this call made the connection.

    A process that is already connected keeps its connection, and `address` is ignored.

    Raises:
        SettingsError: the address is invalid, or the cluster failed to start or could not
            be reached.
    """
    if ray.is_initialized():
        logger.info("this process is already connected to Ray; using that connection instead of --ray %s", address)
        return False
    if address == "local":
        start_local_cluster(ray, workers or runtime.default_threads())
    elif address == "auto":
        _join_auto(ray)
    else:
        join_cluster(ray, address, "--ray")
    return True


def start_local_cluster(ray: ModuleType, cpus: int) -> None:
    """Start a Ray cluster with `cpus` CPUs on this machine that listens on 127.0.0.1 only.

    Raises:
        SettingsError: the cluster failed to start, or it did not take a loopback address.
    """
    try:
        with _loopback_node_address(ray, True), _quiet_logger(AUTH_LOGGER):
            ray.init(
                address="local", num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                log_to_driver=False, configure_logging=False,
            )
    except (ConnectionError, RuntimeError, OSError, ValueError) as error:
        raise SettingsError(
            f"failed to start a local Ray cluster: {_first_line(error)}; check that /tmp is writable "
            + "and that `ray --version` runs"
        ) from None
    node = ray.util.get_node_ip_address()
    if not _is_loopback(node):
        ray.shutdown()
        raise SettingsError(
            f"the local Ray cluster took the network address {node}, not 127.0.0.1; set "
            + f"{LOOPBACK_VARIABLE}=0 in the environment before starting wnplan"
        )
    logger.info("started a local Ray cluster on 127.0.0.1 with %d CPUs", cpus)


def join_cluster(ray: ModuleType, address: str, source: str) -> None:
    """Connect to the running cluster at HOST:PORT or ray://HOST:PORT.

    Args:
        ray: the ray module.
        address: the head node's address.
        source: the option or variable that named the address, for error messages.

    Raises:
        SettingsError: the address is invalid, or the cluster could not be reached.
    """
    host, port = parse_address(address, source)
    _check_reachable(address, source, host, port)
    try:
        # NOTE: no test covers ray:// (Ray Client), which also needs the ray[client] extra.
        with _loopback_node_address(ray, _is_loopback(host)):
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise SettingsError(
            f"failed to join the Ray cluster at {address} ({source}): {_first_line(error)}; check that "
            + "the cluster runs the same ray and Python versions as this machine"
        ) from None
    logger.info("joined the Ray cluster at %s", address)


def gpu_share(gpus: float, actors: int) -> float:
    """Return the GPUs each of `actors` actors reserves on a cluster with `gpus` GPUs.

    With k = ceil(actors / gpus) actors per GPU, each actor reserves 1/k of a GPU, and never
    more than one GPU. The share is rounded down to the 0.0001 steps that Ray accepts.

    Raises:
        SettingsError: the cluster has no GPU.
    """
    if gpus <= 0:
        raise SettingsError(
            "--device cuda with --ray: the Ray cluster has no GPU; start its nodes on machines with "
            + "GPUs (`ray start --num-gpus N`), or use --device cpu"
        )
    per_gpu = math.ceil(actors / gpus)
    return math.floor(10000 / per_gpu) / 10000


def cluster_cpus(ray: ModuleType) -> int:
    """Return the number of CPUs of the connected cluster (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def parse_address(address: str, source: str = "--ray") -> tuple[str, int]:
    """Split HOST:PORT or ray://HOST:PORT; raise SettingsError for anything else."""
    text = address.removeprefix("ray://")
    host, separator, port = text.rpartition(":")
    host = host.strip("[]")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(
            f"invalid {source} {address!r}: expected auto, local, or the HOST:PORT of a Ray head node "
            + "(for example 127.0.0.1:6379)"
        )
    return host, int(port)


def _join_auto(ray: ModuleType) -> None:
    named = os.environ.get("RAY_ADDRESS", "")
    if named not in ("", "auto", "local"):
        join_cluster(ray, named, "RAY_ADDRESS")
        return
    try:
        ray.init(address="auto", log_to_driver=False, configure_logging=False)
    except ConnectionError:
        raise SettingsError(
            "--ray auto found no running Ray cluster on this machine: start one with `ray start --head`, "
            + "set RAY_ADDRESS=HOST:PORT, or pass --ray local"
        ) from None
    except (RuntimeError, ValueError) as error:
        raise SettingsError(f"--ray auto failed to join a Ray cluster: {_first_line(error)}") from None
    logger.info("joined the Ray cluster that `ray start` recorded on this machine")


def _check_reachable(address: str, source: str, host: str, port: int) -> None:
    """Open and close one TCP connection to the named head node, so a wrong address fails fast.

    ray.init retries an unreachable head node for minutes before it gives up.
    """
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise SettingsError(
            f"cannot reach the Ray cluster at {address} ({source}): {reason}; start its head node with "
            + f"`ray start --head --port={port}` or correct the address"
        ) from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def _loopback_node_address(ray: ModuleType, enabled: bool) -> Iterator[None]:
    """Keep Ray from replacing a loopback node address with the network address, while active.

    Ray copies LOOPBACK_VARIABLE into a module constant when it is imported, and the
    processes that ray.init starts read the variable from their environment.
    """
    if not enabled:
        yield
        return
    # NOTE: a private Ray constant (ray._private.ray_constants in Ray 2.60). Where it is
    # missing, start_local_cluster still rejects a cluster that took a network address.
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    has_constant = hasattr(constants, "ENABLE_RAY_CLUSTER")
    previous_constant = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    previous_variable = os.environ.get(LOOPBACK_VARIABLE)
    os.environ[LOOPBACK_VARIABLE] = "0"
    if has_constant:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if has_constant:
            constants.ENABLE_RAY_CLUSTER = previous_constant
        if previous_variable is None:
            os.environ.pop(LOOPBACK_VARIABLE, None)
        else:
            os.environ[LOOPBACK_VARIABLE] = previous_variable


@contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Drop a logger's records below ERROR while active."""
    quieted = logging.getLogger(name)
    previous = quieted.level
    quieted.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quieted.setLevel(previous)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
