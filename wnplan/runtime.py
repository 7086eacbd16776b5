"""Process-wide execution settings: thread counts for onnxruntime and torch, and the device.

Worker processes get the same settings through `wnplan.executors.EvaluationJob`, which
carries them to `build_runner`.
"""

from __future__ import annotations

import functools
import logging
import os

from wnplan.errors import SettingsError

logger = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")
BACKENDS = ("torch", "onnx")
CUDA_PROVIDER = "CUDAExecutionProvider"

_threads: int | None = None
_device: str = "cpu"


def set_threads(count: int | None) -> None:
    """Set the thread count that onnxruntime sessions and torch use from now on.

    None leaves each library's default (all cores), which oversubscribes the machine when
    several worker processes run at once.
    """
    global _threads
    _threads = count
    if count is not None:
        import torch

        torch.set_num_threads(count)
        logger.debug("using %d threads", count)


def threads() -> int | None:
    """Return the configured thread count, or None for the libraries' defaults."""
    return _threads


def default_threads() -> int:
    """Return the number of cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS
        return os.cpu_count() or 1


def set_device(name: str, backend: str | None = None) -> None:
    """Set the device that models loaded from now on run on.

    Models keep the device they were loaded with. Noise is drawn with numpy on the CPU
    for every device, so both devices see the same draws.

    Args:
        name: "cpu" or "cuda". With "cuda", torch models run on the current CUDA device
            and ONNX models on onnxruntime's CUDAExecutionProvider.
        backend: "torch" or "onnx" to also check that this device can run models of that
            backend; None checks nothing beyond the name.

    Raises:
        SettingsError: the name is not a device, or (with `backend`) the device is not
            available. The setting is unchanged then.
    """
    global _device
    check_device(name, backend)
    _device = name
    logger.debug("running models on %s", name)


def device() -> str:
    """Return the configured device: "cpu" (the default) or "cuda"."""
    return _device


def check_device(name: str, backend: str | None = None) -> None:
    """Raise SettingsError unless `name` is a device that can run models of `backend`.

    Availability is probed once per process: `torch.cuda.is_available()` for torch, and
    onnxruntime's available providers for ONNX. A None backend checks only the name.
    """
    if name not in DEVICES:
        raise SettingsError(f"invalid --device {name!r}: expected one of {', '.join(DEVICES)}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if name == "cpu" or backend is None:
        return
    if backend == "torch" and not _torch_cuda_available():
        import torch

        raise SettingsError(
            f"--device cuda: torch {torch.__version__} finds no usable CUDA GPU (torch.cuda.is_available() "
            + "is False); install a CUDA build of torch and a GPU driver, or use --device cpu"
        )
    if backend == "onnx" and CUDA_PROVIDER not in _onnx_providers():
        import onnxruntime

        raise SettingsError(
            f"--device cuda: onnxruntime {onnxruntime.__version__} has no {CUDA_PROVIDER} (available: "
            + f"{', '.join(_onnx_providers())}); install onnxruntime-gpu in place of onnxruntime, or use --device cpu"
        )


@functools.cache
def _torch_cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@functools.cache
def _onnx_providers() -> tuple[str, ...]:
    import onnxruntime

    return tuple(onnxruntime.get_available_providers())
