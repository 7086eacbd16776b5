"""Tests for the executors (wnplan.executors, wnplan.ray_executor): identical results wherever trials run.

Every sweep here runs the trained digits perceptron of conftest.py on 200 digits samples
with the σ grid 0.1, 1, 3 and 2 repeats, seed 0. Trial seeds come from trial identities,
so profiles must match the in-process profile byte for byte (no tolerance).

The Ray tests start real clusters that listen on 127.0.0.1 only. The CLI starts one in a
subprocess. This process starts one module-scoped cluster with 2 CPUs, which the other Ray
tests share, because RayExecutor reuses the connection of a connected process. Subprocess
drivers join that cluster by address. Starting a cluster takes about 10 s. The Ray tests
skip when ray is not installed.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from wnplan import records
from wnplan.calibrate import reference_scales, site_statistics
from wnplan.errors import DataError, SettingsError
from wnplan.evaluate import InferenceEvaluator
from wnplan.executors import EvaluationJob, InProcessExecutor, ProcessPoolExecutor, build_runner
from wnplan.models.base import file_sha256
from wnplan.profiler import Execution, ProfileSettings, build_curves, clean_accuracy, load_model_and_data, profile
from wnplan.ray_executor import RAY_MISSING, parse_address
from wnplan.sweep import Curve, SweepContext, run_sweep

LIMIT = 200
GRID = (0.1, 1.0, 3.0)
REPEATS = 2
BOTH = ProfileSettings(scope="both", repeats=REPEATS, sigmas=GRID, seed=0)
WALKING = ProfileSettings(scope="walking", repeats=REPEATS, sigmas=GRID, seed=0)
RAY_WORKERS = 2
SUBPROCESS_TIMEOUT_SECONDS = 300

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'wnplan[ray]')"
)


def _profile_json(model: Path, settings: ProfileSettings, execution: Execution | None = None) -> str:
    return records.dumps(profile(model, "digits", settings, limit=LIMIT, store=None, execution=execution))


@pytest.fixture(scope="module")
def walking_reference(digits_mlp) -> str:
    """The in-process walking profile, as canonical JSON."""
    return _profile_json(digits_mlp.onnx, WALKING)


def _sweep_parts(model: Path, options: dict | None = None) -> tuple[list[Curve], SweepContext, EvaluationJob]:
    """Build the walking curves, sweep context and job that `profile` builds for WALKING."""
    loaded, dataset = load_model_and_data(model, "digits", limit=LIMIT)
    correct, classes = clean_accuracy(loaded, dataset)
    curves, _ = build_curves(loaded, WALKING, (correct, len(dataset)), classes)
    scales = reference_scales(site_statistics(loaded, dataset), WALKING.noise.reference)
    context = SweepContext(loaded.sha256, dataset.sha256, WALKING.noise.to_dict(), WALKING.mode, WALKING.seed, None)
    identity = {"noise": context.noise, "mode": context.mode, "seed": context.seed}
    job = EvaluationJob(str(model), None, False, dataset, WALKING.noise, scales, identity, options=options or {})
    return curves, context, job


def _points(curves: list[Curve]) -> list[list[dict]]:
    return [curve.points() for curve in curves]


@pytest.fixture(scope="module")
def sweep_reference(digits_mlp) -> list[list[dict]]:
    """The walking curves' points measured in this process."""
    curves, context, job = _sweep_parts(digits_mlp.onnx)
    run_sweep(curves, REPEATS, context, InProcessExecutor(build_runner(job)))
    return _points(curves)


def _cli(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m wnplan` in a subprocess (a fresh process that is not connected to Ray)."""
    return subprocess.run(
        [sys.executable, "-m", "wnplan", *arguments], capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT_SECONDS, env=env, check=False,
    )


def _cli_walking(
    model: Path, folder: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the WALKING profile through the CLI; return the process and the profile path."""
    out = folder / "profile.json"
    result = _cli(
        "profile", str(model), "--data", "digits", "--limit", str(LIMIT), "--sigmas", ",".join(map(str, GRID)),
        "--repeats", str(REPEATS), "--scope", "walking", "--seed", "0", "--store", str(folder / "store.sqlite"),
        "--out", str(out), *extra, env=env,
    )
    return result, out


# --- process pool ---


def test_process_pool_matches_in_process(digits_mlp):
    in_process = _profile_json(digits_mlp.onnx, BOTH)
    pooled = _profile_json(digits_mlp.onnx, BOTH, Execution(workers=2))
    assert pooled == in_process


@pytest.mark.parametrize("workers", [0, -1])
def test_process_pool_rejects_too_few_workers(digits_mlp, workers):
    _, _, job = _sweep_parts(digits_mlp.onnx)
    with pytest.raises(SettingsError, match=rf"invalid --workers {workers}: expected at least 1"):
        ProcessPoolExecutor(job, workers)


# --- Ray: settings that fail before any cluster starts ---


def test_ray_missing_gives_one_line_error(digits_mlp, tmp_path):
    # A None entry in sys.modules makes `import ray` raise ImportError, as if ray were not installed.
    script = "import sys; sys.modules['ray'] = None; from wnplan.cli import main; main(sys.argv[1:])"
    out = tmp_path / "profile.json"
    result = subprocess.run(
        [sys.executable, "-c", script, "profile", str(digits_mlp.onnx), "--data", "digits", "--limit", "50",
         "--sigmas", "1", "--repeats", "1", "--store", str(tmp_path / "store.sqlite"), "--out", str(out),
         "--ray", "local"],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_SECONDS, check=False,
    )
    assert result.returncode == 2
    assert result.stderr == f"wnplan: error: {RAY_MISSING}\n"
    assert not out.exists()


@pytest.mark.parametrize("address", ["bogus", "head:", ":6379", "head:0", "head:65536", "head:port", "ray://head"])
def test_ray_address_invalid(address):
    with pytest.raises(SettingsError, match="expected auto, local, or the HOST:PORT of a Ray head node"):
        parse_address(address)


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1:6379", ("127.0.0.1", 6379)), ("ray://head.example:10001", ("head.example", 10001)),
     ("[::1]:6379", ("::1", 6379))],
)
def test_ray_address_parsed(address, expected):
    assert parse_address(address) == expected


@needs_ray
def test_ray_unreachable_address_fails_fast():
    from wnplan.ray_executor import import_ray, join_cluster

    # A bound socket that does not listen refuses connections, and holding it keeps the port ours.
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        with pytest.raises(SettingsError, match=rf"cannot reach the Ray cluster at 127\.0\.0\.1:{port}") as raised:
            join_cluster(import_ray(), f"127.0.0.1:{port}", "--ray")
    assert "Connection refused" in str(raised.value)
    assert "ray start --head" in str(raised.value)


# --- Ray: a cluster started by the CLI ---


@needs_ray
def test_ray_cli_local_matches_in_process(digits_mlp, tmp_path, walking_reference):
    result, out = _cli_walking(digits_mlp.onnx, tmp_path, "--ray", "local")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert out.read_text() == walking_reference


# --- Ray: one cluster in this process, shared by the tests below ---


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster with RAY_WORKERS CPUs, started and stopped by this process."""
    from wnplan.ray_executor import import_ray, start_local_cluster

    ray = import_ray()
    start_local_cluster(ray, RAY_WORKERS)
    yield ray
    ray.shutdown()


@pytest.fixture
def pickled_by_value(ray_cluster):
    """Make Ray ship this module's functions by value, since workers cannot import tests."""
    module = sys.modules[__name__]
    ray_cluster.cloudpickle.register_pickle_by_value(module)
    yield
    ray_cluster.cloudpickle.unregister_pickle_by_value(module)


@needs_ray
def test_ray_local_cluster_uses_loopback(ray_cluster):
    nodes = ray_cluster.nodes()
    assert [node["NodeManagerAddress"] for node in nodes] == ["127.0.0.1"]
    assert ray_cluster.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert ray_cluster.cluster_resources()["CPU"] == RAY_WORKERS


@needs_ray
def test_ray_profile_matches_in_process(ray_cluster, digits_mlp, walking_reference):
    assert _profile_json(digits_mlp.onnx, WALKING, Execution(ray="local")) == walking_reference


def make_evaluator_dying_once(marker: Path, model, job: EvaluationJob) -> DyingOnce:
    """Return an evaluator whose process exits in its first chunk if it creates `marker` first."""
    return DyingOnce(InferenceEvaluator(model, job.data, job.noise, job.scales, job.noise_seed), marker)


class DyingOnce:
    """Wraps an evaluator; the first `run_group` call of all processes ends its process."""

    def __init__(self, evaluator: InferenceEvaluator, marker: Path) -> None:
        self.evaluator = evaluator
        self.marker = marker

    def run_group(self, trials):
        try:
            # O_EXCL: exactly one process creates the marker, and only that one exits.
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return self.evaluator.run_group(trials)
        os._exit(1)


@needs_ray
def test_ray_worker_death_retried(ray_cluster, pickled_by_value, digits_mlp, tmp_path, sweep_reference):
    from wnplan.ray_executor import RayExecutor

    marker = tmp_path / "died"
    dying = functools.partial(make_evaluator_dying_once, marker)
    curves, context, job = _sweep_parts(digits_mlp.onnx, {"make_evaluator": dying})
    with RayExecutor(job, "local") as executor:
        counts = run_sweep(curves, REPEATS, context, executor)

    assert marker.exists(), "no worker exited, so nothing was retried"
    assert counts["computed"] == counts["total"]
    assert _points(curves) == sweep_reference


@needs_ray
@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_ray_worker_uses_shipped_model(ray_cluster, digits_mlp, tmp_path, sweep_reference, change):
    from wnplan.ray_executor import MODEL_CACHE, RayExecutor

    model = tmp_path / "model.onnx"
    shutil.copyfile(digits_mlp.onnx, model)
    cached = MODEL_CACHE / file_sha256(model)
    shutil.rmtree(cached, ignore_errors=True)
    curves, context, job = _sweep_parts(model)
    try:
        with RayExecutor(job, "local") as executor:
            # Workers load the model on their first chunk, after the driver shipped its bytes.
            if change == "deleted":
                model.unlink()
            else:
                model.write_bytes(b"a different file at the same path")
            run_sweep(curves, REPEATS, context, executor)
        assert (cached / model.name).is_file()
    finally:
        shutil.rmtree(cached, ignore_errors=True)
    assert _points(curves) == sweep_reference


def make_evaluator_rejecting_data(model, job: EvaluationJob):
    raise DataError(f"data {job.data.name!r} rejected by the worker")


@needs_ray
def test_ray_worker_error_reaches_driver(ray_cluster, pickled_by_value, digits_mlp):
    from wnplan.ray_executor import RayExecutor

    curves, context, job = _sweep_parts(digits_mlp.onnx, {"make_evaluator": make_evaluator_rejecting_data})
    with RayExecutor(job, "local") as executor, pytest.raises(DataError, match="data 'digits' rejected by the worker"):
        run_sweep(curves, REPEATS, context, executor)


@needs_ray
def test_ray_joins_cluster_by_address(ray_cluster, digits_mlp, tmp_path, walking_reference):
    address = ray_cluster.get_runtime_context().gcs_address
    result, out = _cli_walking(digits_mlp.onnx, tmp_path, "--ray", address)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == walking_reference


@needs_ray
def test_ray_auto_joins_ray_address(ray_cluster, digits_mlp, tmp_path, walking_reference):
    environment = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    result, out = _cli_walking(digits_mlp.onnx, tmp_path, "--ray", "auto", env=environment)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == walking_reference
