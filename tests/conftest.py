"""Shared fixtures: tiny models exported to .pt2 and .onnx, and tiny data sets.

Every model here is built in code, exported into a session-scoped temporary folder, and
loaded through wnplan's real backends (torch.export and onnxruntime). Exports use
`torch.export.export` with a dynamic batch dimension and the TorchScript-based
`torch.onnx.export(dynamo=False, opset_version=17)`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from wnplan.data import load_data
from wnplan.profiler import ProfileSettings, profile

# Seeds of everything random in the fixtures, so failures reproduce.
TORCH_SEED = 0
DATA_SEED = 0

DIGITS_CLASSES = 10
DIGITS_SHAPE = (1, 28, 28)
RESIDUAL_SHAPE = (1, 6, 6)


def export_pt2(module: nn.Module, example: torch.Tensor, path: Path, dynamic: bool = True) -> Path:
    """Export `module` in eval mode with torch.export; the batch dimension is dynamic."""
    module = module.eval()
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    program = torch.export.export(module, (example,), dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return path


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    dynamic: bool = True,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export `module` in eval mode to ONNX opset 17 with the TorchScript exporter.

    Without `dynamic`, the batch dimension stays fixed at the example's batch size.
    `metadata` entries are written to the model's `metadata_props`.
    """
    module = module.eval()
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in torch 2.9+, but it is the one whose
        # output (folded BatchNorm, unnamed nodes) users of older toolchains produce.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes=axes,
        )
    if metadata:
        proto = onnx.load(str(path))
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key = key
            entry.value = value
        onnx.save(proto, str(path))
    return path


class ResidualConcatNet(nn.Module):
    """A stem conv, a residual block with an Add skip connection, a channel Concat, and a Linear.

    Shapes: (N, 1, 6, 6) → stem (N, 4, 6, 6) → residual block (N, 4, 6, 6) → concat with a
    1×1 conv branch (N, 6, 6, 6) → logits (N, 5).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, kernel_size=3, padding=1)
        self.side = nn.Conv2d(4, 2, kernel_size=1)
        self.fc = nn.Linear(6 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = torch.relu(self.stem(x))
        block = torch.relu(stem + self.conv2(torch.relu(self.conv1(stem))))
        merged = torch.cat([block, self.side(block)], dim=1)
        return self.fc(torch.flatten(merged, 1))


class SharedLinearNet(nn.Module):
    """Applies the same Linear (4 → 4) twice with a ReLU between, then an output Linear (4 → 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.shared(torch.relu(self.shared(x))))


def tiny_digits_mlp() -> nn.Module:
    """Return a 28×28 → 16 → 10 perceptron, the architecture of the `digits_mlp` fixture."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 16), nn.ReLU(), nn.Linear(16, DIGITS_CLASSES))


@dataclass(frozen=True)
class ExportedModel:
    """One network exported in both formats, with the module it came from (in eval mode)."""

    module: nn.Module
    pt2: Path
    onnx: Path

    def path(self, backend: str) -> Path:
        return self.pt2 if backend == "pt2" else self.onnx


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def residual_model(model_dir: Path) -> ExportedModel:
    """The residual Add + Concat network with random weights (seed 0), dynamic batch."""
    torch.manual_seed(TORCH_SEED)
    module = ResidualConcatNet().eval()
    example = torch.randn(2, *RESIDUAL_SHAPE)
    return ExportedModel(
        module,
        export_pt2(module, example, model_dir / "residual.pt2"),
        export_onnx(module, example, model_dir / "residual.onnx"),
    )


@pytest.fixture(scope="session")
def residual_fixed_batch_onnx(model_dir: Path, residual_model: ExportedModel) -> Path:
    """The residual network exported to ONNX with batch size 1 fixed (no dynamic axes)."""
    example = torch.zeros(1, *RESIDUAL_SHAPE)
    return export_onnx(residual_model.module, example, model_dir / "residual_batch1.onnx", dynamic=False)


@pytest.fixture(scope="session")
def residual_inputs() -> np.ndarray:
    """Ten standard-normal samples of shape (1, 6, 6), float32, seed 0."""
    return np.random.default_rng(DATA_SEED).standard_normal((10, *RESIDUAL_SHAPE)).astype(np.float32)


@pytest.fixture(scope="session")
def digits_mlp(model_dir: Path) -> ExportedModel:
    """The tiny perceptron trained on `digits:train`, without a data declaration.

    It reaches about 94 % on the first 200 test samples. Training: full batch, Adam with
    learning rate 0.02, 60 steps, torch seed 0, on one thread, because two threads made these
    small steps about 30 times slower on a loaded two-core machine.
    """
    torch.manual_seed(TORCH_SEED)
    train = load_data("digits:train")
    x = torch.from_numpy(train.x)
    y = torch.from_numpy(train.y)
    module = tiny_digits_mlp()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.02)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(60):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(module(x), y)
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    module.eval()
    example = x[:2]
    return ExportedModel(
        module,
        export_pt2(module, example, model_dir / "digits_mlp.pt2"),
        export_onnx(module, example, model_dir / "digits_mlp.onnx"),
    )


@pytest.fixture(scope="session")
def digits_mlp_declared(model_dir: Path, digits_mlp: ExportedModel) -> Path:
    """The trained perceptron as ONNX that declares `digits` as its data in metadata_props."""
    example = torch.zeros(2, *DIGITS_SHAPE)
    return export_onnx(
        digits_mlp.module, example, model_dir / "digits_mlp_declared.onnx", metadata={"wnplan.data": "digits"}
    )


@pytest.fixture(scope="session")
def digits_profile(digits_mlp: ExportedModel) -> dict:
    """A walking + global profile of the trained perceptron on 200 digits samples.

    σ grid 0.01, 0.1, 1, 10 (absolute), 2 repeats, seed 0, no store.
    """
    settings = ProfileSettings(scope="both", repeats=2, sigmas=(0.01, 0.1, 1.0, 10.0), seed=0)
    return profile(digits_mlp.onnx, "digits", settings, limit=200, store=None)


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    """Write arrays to an uncompressed .npz file and return its path."""
    np.savez(path, **arrays)
    return path


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def run_cli(capsys: pytest.CaptureFixture, *arguments: str | Path) -> tuple[int, str, str]:
    """Run `wnplan ARGUMENTS` in this process and return (exit code, stdout, stderr)."""
    from wnplan.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(argument) for argument in arguments])
    captured = capsys.readouterr()
    code = exit_info.value.code
    return (0 if code is None else code), captured.out, captured.err


def assert_usage_error(result: tuple[int, str, str], *fragments: str) -> str:
    """Check the bad-input contract (exit 2, one stderr line, no traceback); return the line."""
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("wnplan: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
