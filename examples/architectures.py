"""Small classifiers for 28×28 single-channel images, built with plain `torch.nn`.

Each factory returns an untrained module that maps input of shape (N, 1, 28, 28), float32, to
logits of shape (N, 10). The layer names (`fc1`, `conv1_bn`, `block.conv2`, `branch3x3`, ...)
become the site names that wnplan lists, so each name identifies its layer.

Sites that `torch.export` yields, the model input included:

- `mlp` (8 sites): Linear 64 → ReLU, three times, then Linear to 10 classes.
- `mlp_bn` (11): as `mlp`, with BatchNorm1d between each hidden Linear and its ReLU.
- `lenet5` (12): conv6-5×5, ReLU, maxpool2, conv16-5×5, ReLU, maxpool2, FC120, ReLU, FC84,
  ReLU, FC10.
- `lenet5_bn` (16): as `lenet5`, with BatchNorm after every conv and FC except the last.
- `rescnn` (16): stem conv, a residual block closed by an Add, two branches joined by a
  Concat, global average pool, FC.

These are importable as `examples.architectures:NAME`, the `module:factory` form that wnplan
takes beside a state dict.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

NUM_CLASSES = 10
HIDDEN_UNITS = 64


def mlp() -> nn.Module:
    """Build a three-hidden-layer perceptron: Flatten, (Linear 64, ReLU) × 3, Linear 10."""
    return _mlp(batch_norm=False)


def mlp_bn() -> nn.Module:
    """Build `mlp` with BatchNorm1d between each hidden Linear and its ReLU."""
    return _mlp(batch_norm=True)


def lenet5() -> nn.Module:
    """Build LeNet-5 for 28×28 input without padding (28 → 24 → 12 → 8 → 4)."""
    return LeNet5(batch_norm=False)


def lenet5_bn() -> nn.Module:
    """Build `lenet5` with BatchNorm after every conv and FC layer except the last."""
    return LeNet5(batch_norm=True)


def rescnn() -> nn.Module:
    """Build a small CNN with a residual Add and a channel Concat of two branches."""
    return ResCNN()


def _mlp(batch_norm: bool) -> nn.Sequential:
    layers: dict[str, nn.Module] = {"flatten": nn.Flatten()}
    in_features = 28 * 28
    for index in (1, 2, 3):
        layers.update(_layer_block(f"fc{index}", nn.Linear(in_features, HIDDEN_UNITS), batch_norm))
        in_features = HIDDEN_UNITS
    layers["fc4"] = nn.Linear(in_features, NUM_CLASSES)
    return nn.Sequential(OrderedDict(layers))


class LeNet5(nn.Sequential):
    """LeNet-5 with max pooling and ReLU, optionally with BatchNorm before each ReLU.

    The layers are named `conv1`, `pool1`, `conv2`, `pool2`, `flatten`, `fc1`, `fc2` and `fc3`.
    Each conv and each hidden FC layer is followed by `<layer>_bn` (when `batch_norm` is set)
    and `<layer>_relu`.

    Args:
        batch_norm: insert BatchNorm2d after both convs and BatchNorm1d after `fc1` and `fc2`.
    """

    def __init__(self, batch_norm: bool) -> None:
        layers: dict[str, nn.Module] = {}
        layers.update(_layer_block("conv1", nn.Conv2d(1, 6, kernel_size=5), batch_norm))
        layers["pool1"] = nn.MaxPool2d(2)
        layers.update(_layer_block("conv2", nn.Conv2d(6, 16, kernel_size=5), batch_norm))
        layers["pool2"] = nn.MaxPool2d(2)
        layers["flatten"] = nn.Flatten()
        layers.update(_layer_block("fc1", nn.Linear(16 * 4 * 4, 120), batch_norm))
        layers.update(_layer_block("fc2", nn.Linear(120, 84), batch_norm))
        layers["fc3"] = nn.Linear(84, NUM_CLASSES)
        super().__init__(OrderedDict(layers))


def _layer_block(name: str, layer: nn.Conv2d | nn.Linear, batch_norm: bool) -> dict[str, nn.Module]:
    """Return `layer`, then its BatchNorm when `batch_norm` is set, then ReLU, keyed by name."""
    block: dict[str, nn.Module] = {name: layer}
    if batch_norm and isinstance(layer, nn.Conv2d):
        block[f"{name}_bn"] = nn.BatchNorm2d(layer.out_channels)
    elif batch_norm:
        block[f"{name}_bn"] = nn.BatchNorm1d(layer.out_features)
    block[f"{name}_relu"] = nn.ReLU()
    return block


class ResidualBlock(nn.Module):
    """Two 3×3 convs whose output is added to the block input, then ReLU.

    Args:
        channels: input and output channel count.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (N, C, H, W) to (N, C, H, W)."""
        out = self.conv2(self.relu1(self.conv1(x)))
        return self.relu2(out + x)


class ResCNN(nn.Module):
    """Stem conv, residual block, two concatenated branches, global average pool, FC.

    Shapes: (N, 1, 28, 28) → stem and pool (N, 16, 14, 14) → residual block and pool
    (N, 16, 7, 7) → concat (N, 32, 7, 7) → mean over H and W (N, 32) → logits (N, 10).
    """

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, kernel_size=3, padding=1)
        self.stem_relu = nn.ReLU()
        self.stem_pool = nn.MaxPool2d(2)
        self.block = ResidualBlock(channels)
        self.pool = nn.MaxPool2d(2)
        self.branch3x3 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.branch1x1 = nn.Conv2d(channels, channels, kernel_size=1)
        self.merge_relu = nn.ReLU()
        self.fc = nn.Linear(2 * channels, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (N, 1, 28, 28) to logits (N, 10)."""
        x = self.stem_pool(self.stem_relu(self.stem(x)))
        x = self.pool(self.block(x))
        x = torch.cat([self.branch3x3(x), self.branch1x1(x)], dim=1)
        x = self.merge_relu(x)
        return self.fc(torch.mean(x, dim=(2, 3)))


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "mlp": mlp,
    "mlp_bn": mlp_bn,
    "lenet5": lenet5,
    "lenet5_bn": lenet5_bn,
    "rescnn": rescnn,
}
