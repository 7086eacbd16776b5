"""The embedded SQLite store of finished trials, which makes sweeps resumable.

Each trial is keyed by a hash of the model file, the preprocessed data and the trial's
identity (which includes the seed). A result is committed as soon as it is known, in WAL
mode, so a killed run loses at most the trials that were still running, and the database
is never left half-written. Timings live here and never in profile files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wnplan.errors import SettingsError

logger = logging.getLogger(__name__)

DEFAULT_STORE = Path(".wnplan") / "store.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS trials (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    data TEXT NOT NULL,
    identity TEXT NOT NULL,
    correct INTEGER NOT NULL,
    total INTEGER NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}',
    seconds REAL NOT NULL,
    finished REAL NOT NULL
)
"""


@dataclass(frozen=True)
class TrialResult:
    """One finished accuracy measurement.

    Attributes:
        correct: samples classified correctly.
        total: samples evaluated.
        extra: mode-specific records (for example weight statistics of a trained model).
        seconds: wall time of the trial, kept for estimates and never written to profiles.
    """

    correct: int
    total: int
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


def trial_key(model_sha256: str, data_sha256: str, identity: Mapping[str, Any]) -> str:
    """Return the store key of a trial: a hash of model, data and the trial's identity."""
    canonical = json.dumps({"model": model_sha256, "data": data_sha256, "trial": identity}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Store:
    """Finished trials in a SQLite file; use as a context manager or call `close`."""

    def __init__(self, path: str | Path = DEFAULT_STORE) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._connection = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=FULL")
            self._connection.execute(SCHEMA)
        except (OSError, sqlite3.Error) as error:
            raise SettingsError(
                f"cannot open the result store {str(self.path)!r} ({error}); pass a writable "
                "path with --store"
            ) from None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._connection.close()

    def get_many(self, keys: Iterable[str]) -> dict[str, TrialResult]:
        """Return the stored results among `keys`."""
        keys = list(keys)
        found: dict[str, TrialResult] = {}
        for start in range(0, len(keys), 500):
            batch = keys[start : start + 500]
            marks = ",".join("?" * len(batch))
            rows = self._connection.execute(
                f"SELECT key, correct, total, extra, seconds FROM trials WHERE key IN ({marks})", batch
            )
            for key, correct, total, extra, seconds in rows:
                found[key] = TrialResult(correct, total, json.loads(extra), seconds)
        return found

    def put(
        self,
        key: str,
        model: str,
        data: str,
        identity: Mapping[str, Any],
        result: TrialResult,
        replace: bool = False,
    ) -> None:
        """Commit one finished trial; an existing result is kept unless `replace` is set."""
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        self._connection.execute(
            f"{verb} INTO trials VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                model,
                data,
                json.dumps(identity, sort_keys=True),
                result.correct,
                result.total,
                json.dumps(result.extra, sort_keys=True, allow_nan=False),
                result.seconds,
                time.time(),
            ),
        )

    def mean_seconds(self, model: str) -> float | None:
        """Return the mean wall time of this model's stored trials, for time estimates."""
        row = self._connection.execute(
            "SELECT AVG(seconds) FROM trials WHERE model = ? AND seconds > 0", (model,)
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def count(self) -> int:
        return int(self._connection.execute("SELECT COUNT(*) FROM trials").fetchone()[0])
