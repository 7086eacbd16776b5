"""Process-wide execution settings: thread counts for onnxruntime and torch."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

_threads: int | None = None


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
