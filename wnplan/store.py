"""The embedded SQLite store of finished trials, which makes sweeps resumable.

Each trial is keyed by a hash of the model file, the preprocessed data and the trial's
identity (which includes the seed). A result is committed as soon as it is known, each
insert in its own transaction, in WAL mode with `synchronous=FULL`. A killed run (SIGKILL,
Ctrl-C, power loss) therefore loses at most the trials that were still running, and SQLite
never leaves the database half-written. Timings live here and never in profile files.
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

from wnplan.errors import StoreError

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
COLUMNS = ("key", "model", "data", "identity", "correct", "total", "extra", "seconds", "finished")
# Seconds to wait for another process's write to finish before giving up.
LOCK_TIMEOUT = 30.0


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
            # isolation_level=None: every statement commits on its own, so each trial is one
            # atomic transaction.
            self._connection = sqlite3.connect(str(self.path), timeout=LOCK_TIMEOUT, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise StoreError(
                f"cannot open the result store {str(self.path)!r} ({error}); pass a writable " +
                "path with --store"
            ) from None
        try:
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=FULL")
            self._connection.execute(SCHEMA)
            columns = tuple(row[1] for row in self._connection.execute("PRAGMA table_info(trials)"))
        except sqlite3.Error as error:
            self._connection.close()
            raise self._damaged(error) from None
        if columns != COLUMNS:
            self._connection.close()
            raise StoreError(
                f"{str(self.path)!r} is not a wnplan result store (its trials table has columns " +
                f"{', '.join(columns)}); pass another path with --store"
            )

    def _damaged(self, error: sqlite3.Error) -> StoreError:
        """Return the error for a store that SQLite cannot use, saying what to do."""
        if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
            return StoreError(
                f"the result store {str(self.path)!r} stayed locked by another process for " +
                f"{LOCK_TIMEOUT:.0f} s ({error}); wait for the other wnplan run, or pass another --store"
            )
        return StoreError(
            f"the result store {str(self.path)!r} is unreadable or not a SQLite database ({error}); " +
            "move it away or pass another --store (its stored trials are then measured again)"
        )

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._connection.close()

    def get_many(self, keys: Iterable[str]) -> dict[str, TrialResult]:
        """Return the stored results among `keys`.

        A row that does not hold a valid result (edited by hand, or written by another tool)
        is deleted with a warning, so its trial is measured again and stored anew.
        """
        keys = list(keys)
        found: dict[str, TrialResult] = {}
        try:
            for start in range(0, len(keys), 500):
                batch = keys[start : start + 500]
                marks = ",".join("?" * len(batch))
                rows = self._connection.execute(
                    f"SELECT key, correct, total, extra, seconds FROM trials WHERE key IN ({marks})", batch
                ).fetchall()
                for key, correct, total, extra, seconds in rows:
                    result = _result_from_row(correct, total, extra, seconds)
                    if result is None:
                        logger.warning("deleting an invalid stored result for trial %s from %s", key, self.path)
                        self._connection.execute("DELETE FROM trials WHERE key = ?", (key,))
                    else:
                        found[key] = result
        except sqlite3.Error as error:
            raise self._damaged(error) from None
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
        row = (
            key,
            model,
            data,
            json.dumps(identity, sort_keys=True),
            result.correct,
            result.total,
            json.dumps(result.extra, sort_keys=True, allow_nan=False),
            result.seconds,
            time.time(),
        )
        try:
            self._connection.execute(f"{verb} INTO trials VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        except sqlite3.Error as error:
            raise self._damaged(error) from None

    def mean_seconds(self, model: str) -> float | None:
        """Return the mean wall time of this model's stored trials, for time estimates."""
        try:
            row = self._connection.execute(
                "SELECT AVG(seconds) FROM trials WHERE model = ? AND seconds > 0", (model,)
            ).fetchone()
        except sqlite3.Error as error:
            raise self._damaged(error) from None
        return float(row[0]) if row and isinstance(row[0], (int, float)) else None

    def count(self) -> int:
        try:
            return int(self._connection.execute("SELECT COUNT(*) FROM trials").fetchone()[0])
        except sqlite3.Error as error:
            raise self._damaged(error) from None


def _result_from_row(correct: Any, total: Any, extra: Any, seconds: Any) -> TrialResult | None:
    """Return the stored result, or None when a column holds a value no trial produces."""
    if not (isinstance(correct, int) and isinstance(total, int) and 0 <= correct <= total and total > 0):
        return None
    try:
        record = json.loads(extra)
    except (TypeError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    return TrialResult(correct, total, record, float(seconds) if isinstance(seconds, (int, float)) else 0.0)
