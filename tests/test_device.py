"""Tests for device selection: `--device cpu|cuda` and `wnplan.runtime.set_device`.

The CLI runs use the shipped example examples/models/mlp_bn (.onnx and .pt2) on the first
500 samples of its declared data, the Fashion-MNIST test split. They measure walking noise
at sites 0 and 1 on the σ grid 0.5, 2, 8, with one repeat and seed 0.

Without a GPU (torch.cuda.is_available() is False, and onnxruntime has no
CUDAExecutionProvider), the tests check the one-line errors and exit code 2 of
`--device cuda`. With a GPU, those tests skip, and the GPU tests run the same profile on cuda
and compare it with cpu. Every skip states its reason, which `pytest -ra` shows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import assert_usage_error, read_json, run_cli
from torch import nn

from wnplan import records, runtime
from wnplan.cli import main
from wnplan.data import load_data
from wnplan.errors import SettingsError
from wnplan.executors import EvaluationJob, build_runner
from wnplan.models.torch_backend import build_graph_module, copy_to_device, retarget_created_tensors
from wnplan.noise import NoiseSpec
from wnplan.ray_executor import gpu_share

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"
FORMATS = ("onnx", "pt2")
SMALL_PROFILE = [
    "--limit", "500", "--sigmas", "0.5,2,8", "--repeats", "1", "--sites", "0,1", "--seed", "0", "--threads", "1",
]
# 5 of 500 samples: the most a point's accuracy may move between devices, from float
# rounding that flips the argmax of samples near a decision boundary.
DEVICE_ACCURACY_TOLERANCE = 0.01

TORCH_CUDA = torch.cuda.is_available()
ONNX_CUDA = runtime.CUDA_PROVIDER in onnxruntime.get_available_providers()
CUDA_AVAILABLE = {"pt2": TORCH_CUDA, "onnx": ONNX_CUDA}
CUDA_ERROR = {
    "pt2": ("torch.cuda.is_available() is False", "use --device cpu"),
    "onnx": ("has no CUDAExecutionProvider", "install onnxruntime-gpu", "use --device cpu"),
}

needs_torch_cuda = pytest.mark.skipif(not TORCH_CUDA, reason="no CUDA GPU on this machine")
needs_onnx_cuda = pytest.mark.skipif(
    not ONNX_CUDA, reason="onnxruntime has no CUDAExecutionProvider on this machine (install onnxruntime-gpu)"
)
needs_fashion_mnist = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="Fashion-MNIST is not installed (Debian package dataset-fashion-mnist)",
)
pytestmark = needs_fashion_mnist


@pytest.fixture(autouse=True)
def cpu_afterwards():
    """Start and end every test on the cpu, since the device is process-wide state."""
    runtime.set_device("cpu")
    yield
    runtime.set_device("cpu")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory, so default output files and the store land in tmp_path."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def example(model_format: str) -> Path:
    return EXAMPLES / f"mlp_bn.{model_format}"


def run_chain(folder: Path, model_format: str, device: str) -> dict[str, Path]:
    """Run profile (walking and global), allocate and check on `device`; return the files."""
    files = {kind: folder / f"{kind}-{device}.json" for kind in ("profile", "plan", "check")}
    commands = [
        ["profile", example(model_format), *SMALL_PROFILE, "--scope", "both", "--store", "none"],
        ["allocate", files["profile"], "--budget", "4", "--search-budget", "0", "--threads", "1"],
        ["check", files["plan"], "--repeats", "2", "--threads", "1"],
    ]
    for command, out in zip(commands, files.values(), strict=True):
        with pytest.raises(SystemExit) as exit_info:
            main([str(part) for part in command] + ["--device", device, "--out", str(out)])
        # check exits 1 when the plan misses its target, which is a result, not an error.
        assert exit_info.value.code in (None, 0, 1), command
    return files


@pytest.fixture(scope="module", params=FORMATS)
def cpu_chain(request, tmp_path_factory) -> tuple[str, dict[str, Path]]:
    """(format, files) of profile, allocate and check run with --device cpu."""
    folder = tmp_path_factory.mktemp(f"cpu-{request.param}")
    return request.param, run_chain(folder, request.param, "cpu")


def skip_if_cuda_works(model_format: str) -> None:
    if CUDA_AVAILABLE[model_format]:
        pytest.skip(f"CUDA is available for {model_format} models on this machine; the no-GPU error cannot occur")


# --- runtime ---


def test_runtime_device_default_is_cpu():
    printed = subprocess.run(
        [sys.executable, "-c", "from wnplan import runtime; print(runtime.device())"],
        capture_output=True, text=True, check=True, timeout=60,
    )

    assert printed.stdout.strip() == "cpu"


def test_evaluation_job_device_defaults_to_cpu():
    job = EvaluationJob("model.onnx", None, False, None, NoiseSpec(), {}, {})

    assert job.device == "cpu"


def test_runtime_set_device_rejects_unknown_name():
    with pytest.raises(SettingsError, match=r"^invalid --device 'tpu': expected one of cpu, cuda$"):
        runtime.set_device("tpu")
    assert runtime.device() == "cpu"


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_runtime_cpu_always_available(backend):
    runtime.set_device("cpu", backend)

    assert runtime.device() == "cpu"


@pytest.mark.skipif(TORCH_CUDA, reason="torch finds a CUDA GPU on this machine; the no-GPU error cannot occur")
def test_runtime_cuda_without_torch_gpu():
    with pytest.raises(SettingsError) as raised:
        runtime.set_device("cuda", "torch")

    message = str(raised.value)
    assert "torch.cuda.is_available() is False" in message
    assert "use --device cpu" in message
    assert "\n" not in message
    assert runtime.device() == "cpu"


@pytest.mark.skipif(ONNX_CUDA, reason="onnxruntime has a CUDAExecutionProvider; the no-provider error cannot occur")
def test_runtime_cuda_without_onnx_provider():
    with pytest.raises(SettingsError) as raised:
        runtime.set_device("cuda", "onnx")

    message = str(raised.value)
    assert "has no CUDAExecutionProvider" in message
    assert "install onnxruntime-gpu" in message
    assert "use --device cpu" in message
    assert runtime.device() == "cpu"


def test_runtime_cuda_name_without_backend_is_accepted():
    runtime.set_device("cuda")

    assert runtime.device() == "cuda"


# --- workers take the device from the job ---


def test_evaluation_job_takes_process_device():
    runtime.set_device("cuda")
    job = EvaluationJob("model.onnx", None, False, None, NoiseSpec(), {}, {})

    assert job.device == "cuda"


@pytest.mark.parametrize("model_format", FORMATS)
def test_build_runner_sets_job_device(model_format):
    data = load_data("fashion-mnist:test", (0.5, 0.5), 8)
    job = EvaluationJob(str(example(model_format)), None, False, data, NoiseSpec(), {}, {}, device="cuda")

    if CUDA_AVAILABLE[model_format]:
        build_runner(job)
    else:
        with pytest.raises(SettingsError, match="use --device cpu"):
            build_runner(job)
    assert runtime.device() == "cuda"


@pytest.mark.parametrize(
    ("gpus", "actors", "share"),
    [(1, 1, 1.0), (4, 2, 1.0), (1, 2, 0.5), (2, 3, 0.5), (1, 3, 0.3333), (2, 8, 0.25)],
)
def test_gpu_share_fits_actors_on_gpus(gpus, actors, share):
    assert gpu_share(gpus, actors) == share


def test_gpu_share_rejects_cluster_without_gpu():
    with pytest.raises(SettingsError, match=r"the Ray cluster has no GPU.*use --device cpu"):
        gpu_share(0, 2)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'wnplan[ray]')")
@pytest.mark.skipif(TORCH_CUDA, reason="a local Ray cluster on this machine would have a GPU")
def test_ray_executor_rejects_cuda_without_cluster_gpu():
    from wnplan.ray_executor import RayExecutor, import_ray

    data = load_data("fashion-mnist:test", (0.5, 0.5), 8)
    job = EvaluationJob(str(example("pt2")), None, False, data, NoiseSpec(), {}, {}, device="cuda")
    ray = import_ray()
    connected_before = ray.is_initialized()

    with pytest.raises(SettingsError, match="the Ray cluster has no GPU"):
        RayExecutor(job, "local", workers=1)
    assert ray.is_initialized() == connected_before


# --- torch graphs on another device ---


class CreatesTensors(nn.Module):
    """A Linear (4 → 3) plus a buffer and a tensor created in forward: (N, 4) → (N, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("offset", torch.arange(3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.offset + torch.ones(x.shape[0], 3)


@pytest.fixture
def created_tensors_module() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(CreatesTensors().eval(), (torch.zeros(2, 4),), dynamic_shapes=({0: batch},))
    return program.module()


def _input_and_output(module: torch.fx.GraphModule) -> tuple[torch.fx.Node, torch.fx.Node]:
    nodes = list(module.graph.nodes)
    placeholder = next(node for node in nodes if node.op == "placeholder")
    output = next(node for node in nodes if node.op == "output").args[0]
    return placeholder, output[0] if isinstance(output, (tuple, list)) else output


def test_copy_to_device_leaves_source_unchanged(created_tensors_module):
    source = created_tensors_module
    before = {name: value.clone() for name, value in source.state_dict().items()}

    moved = copy_to_device(source, torch.device("cpu"))
    with torch.no_grad():
        for parameter in moved.parameters():
            parameter.add_(1.0)

    assert all(copied is not original for copied, original in zip(moved.parameters(), source.parameters(), strict=True))
    for name, value in source.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_graph_on_copied_root_matches_source(created_tensors_module):
    source = created_tensors_module
    placeholder, output = _input_and_output(source)
    root = copy_to_device(source, torch.device("cpu"))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))

    built = build_graph_module(source, [placeholder], [output], root=root, device=torch.device("cpu"))

    assert torch.equal(built(x)[0], source(x))


def test_retarget_created_tensors_moves_cpu_factories(created_tensors_module):
    source = created_tensors_module
    placeholder, output = _input_and_output(source)
    built = build_graph_module(source, [placeholder], [output])

    changed = retarget_created_tensors(built.graph, torch.device("meta"))

    assert changed, "the graph should create a tensor with torch.ones"
    placed = [node.kwargs["device"] for node in built.graph.nodes if "device" in node.kwargs]
    assert placed
    assert all(device.type == "meta" for device in placed)


# --- CLI on the cpu ---


def test_cli_commands_list_device_option(capsys):
    for command in ("profile", "allocate", "check"):
        code, out, _ = run_cli(capsys, command, "--help")

        assert code == 0
        assert "--device" in out, command


def test_cli_cpu_chain_records_device(cpu_chain):
    _, files = cpu_chain
    profile = read_json(files["profile"])
    check = read_json(files["check"])

    assert profile["settings"]["device"] == "cpu"
    assert [site["index"] for site in profile["sites"] if site["walking"]] == [0, 1]
    assert profile["global"]["fit"]["midpoint"] is not None
    assert read_json(files["plan"])["budget"] == 4
    assert {"plan", "uniform", "clean"} <= set(check["results"])


def test_cli_cpu_profile_matches_default_device(capsys, workdir, cpu_chain):
    model_format, files = cpu_chain
    out = workdir / "default.json"

    code, _, err = run_cli(
        capsys, "profile", example(model_format), *SMALL_PROFILE, "--scope", "both", "--store", "none", "--out", out
    )

    assert code == 0, err
    assert out.read_bytes() == files["profile"].read_bytes()


def test_cli_profile_trained_mode_on_cpu(capsys, workdir):
    options = ["--limit", "200", "--sigmas", "0.5", "--repeats", "1", "--scope", "walking", "--sites", "1",
               "--train-limit", "256", "--epochs", "1", "--threads", "1", "--store", "none"]

    code, _, err = run_cli(capsys, "profile", example("pt2"), "--mode", "trained", "--device", "cpu", *options)

    assert code == 0, err
    profile = read_json(workdir / "wnplan-profile.json")
    assert profile["settings"]["mode"] == "trained"
    assert profile["settings"]["device"] == "cpu"


def test_profile_without_device_reads(cpu_chain, tmp_path):
    """Profiles written before the device was recorded still read."""
    _, files = cpu_chain
    profile = read_json(files["profile"])
    del profile["settings"]["device"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(profile, sort_keys=True))

    assert "device" not in records.read_record(old, "profile")["settings"]


# --- CLI errors ---


@pytest.mark.parametrize("model_format", FORMATS)
def test_cli_profile_cuda_without_gpu(capsys, workdir, model_format):
    skip_if_cuda_works(model_format)

    line = assert_usage_error(run_cli(capsys, "profile", example(model_format), *SMALL_PROFILE, "--device", "cuda"))

    for fragment in CUDA_ERROR[model_format]:
        assert fragment in line
    assert os.listdir(workdir) == []  # no profile, and no store


def test_cli_allocate_cuda_without_gpu(capsys, workdir, cpu_chain):
    model_format, files = cpu_chain
    skip_if_cuda_works(model_format)

    line = assert_usage_error(run_cli(capsys, "allocate", files["profile"], "--budget", "4", "--device", "cuda"))

    for fragment in CUDA_ERROR[model_format]:
        assert fragment in line
    assert not (workdir / "wnplan-plan.json").exists()


def test_cli_check_cuda_without_gpu(capsys, workdir, cpu_chain):
    model_format, files = cpu_chain
    skip_if_cuda_works(model_format)

    line = assert_usage_error(run_cli(capsys, "check", files["plan"], "--repeats", "2", "--device", "cuda"))

    for fragment in CUDA_ERROR[model_format]:
        assert fragment in line
    assert not (workdir / "wnplan-check.json").exists()


@pytest.mark.parametrize("command", ["profile", "allocate", "check"])
def test_cli_unknown_device(capsys, workdir, cpu_chain, command):
    _, files = cpu_chain
    source = {"profile": example("pt2"), "allocate": files["profile"], "check": files["plan"]}[command]
    extra = ["--budget", "4"] if command == "allocate" else []

    line = assert_usage_error(run_cli(capsys, command, source, *extra, "--device", "gpu"))

    assert "invalid --device 'gpu': expected one of cpu, cuda" in line
    assert os.listdir(workdir) == []


@pytest.mark.parametrize("mode", ["trained", "both"])
def test_cli_trained_mode_rejects_cuda(capsys, workdir, mode):
    result = run_cli(capsys, "profile", example("pt2"), *SMALL_PROFILE, "--mode", mode, "--device", "cuda")
    line = assert_usage_error(result)

    assert "invalid --device 'cuda'" in line
    assert "trained mode runs on the cpu only" in line
    assert os.listdir(workdir) == []


# --- GPU: the same profile on both devices ---


def _assert_profiles_agree(cpu: dict, cuda: dict) -> None:
    assert cuda["settings"]["device"] == "cuda"
    assert cpu["settings"]["device"] == "cpu"
    assert abs(cuda["clean"]["accuracy"] - cpu["clean"]["accuracy"]) <= DEVICE_ACCURACY_TOLERANCE
    for cpu_site, cuda_site in zip(cpu["sites"], cuda["sites"], strict=True):
        if cpu_site["walking"] is None:
            continue
        cpu_points = cpu_site["walking"]["points"]
        cuda_points = cuda_site["walking"]["points"]
        assert [point["sigma"] for point in cuda_points] == [point["sigma"] for point in cpu_points]
        for cpu_point, cuda_point in zip(cpu_points, cuda_points, strict=True):
            difference = abs(cuda_point["accuracy"] - cpu_point["accuracy"])
            assert difference <= DEVICE_ACCURACY_TOLERANCE, (cpu_site["index"], cpu_point["sigma"], difference)


def _assert_checks_agree(cpu: dict, cuda: dict) -> None:
    assert set(cuda["results"]) == set(cpu["results"])
    for name, cpu_result in cpu["results"].items():
        difference = abs(cuda["results"][name]["accuracy"] - cpu_result["accuracy"])
        assert difference <= DEVICE_ACCURACY_TOLERANCE, (name, difference)


@needs_torch_cuda
def test_gpu_torch_chain_matches_cpu(tmp_path):
    cpu = run_chain(tmp_path, "pt2", "cpu")
    cuda = run_chain(tmp_path, "pt2", "cuda")

    _assert_profiles_agree(read_json(cpu["profile"]), read_json(cuda["profile"]))
    _assert_checks_agree(read_json(cpu["check"]), read_json(cuda["check"]))


@needs_onnx_cuda
def test_gpu_onnx_chain_matches_cpu(tmp_path):
    cpu = run_chain(tmp_path, "onnx", "cpu")
    cuda = run_chain(tmp_path, "onnx", "cuda")

    _assert_profiles_agree(read_json(cpu["profile"]), read_json(cuda["profile"]))
    _assert_checks_agree(read_json(cpu["check"]), read_json(cuda["check"]))


@needs_torch_cuda
def test_gpu_torch_model_outputs_on_cpu():
    from wnplan.models import load_model

    x = load_data("fashion-mnist:test", (0.5, 0.5), 64).x
    on_cpu = load_model(example("pt2")).run(x)
    runtime.set_device("cuda", "torch")
    on_cuda = load_model(example("pt2")).run(x)

    assert isinstance(on_cuda, np.ndarray)
    assert on_cuda.dtype == on_cpu.dtype
    np.testing.assert_allclose(on_cuda, on_cpu, rtol=1e-4, atol=1e-4)

