"""Exceptions that wnplan raises for bad input.

Every exception here is a `WnplanError`. The CLI prints its message as one line on stderr and
exits with code 2, so each message names the bad value, what is allowed, and how to fix it.
"""

from __future__ import annotations


class WnplanError(Exception):
    """Base class for errors caused by the user's input or settings (CLI exit code 2)."""


class ModelError(WnplanError):
    """The model file is missing, unreadable, or of a kind wnplan cannot run."""


class DataError(WnplanError):
    """The evaluation or training data is missing, malformed, or does not fit the model."""


class SiteError(WnplanError):
    """A site selection names no site of the model."""


class SettingsError(WnplanError):
    """An option has an invalid value or conflicts with another option."""


class FileFormatError(WnplanError):
    """A profile, plan, check or accelerator file is not valid."""


class StoreError(SettingsError):
    """The result store cannot be opened, is locked too long, or is not a wnplan store."""
