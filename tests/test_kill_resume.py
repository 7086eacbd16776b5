"""Killed and interrupted runs of a real `wnplan profile` subprocess.

The kill test starts `wnplan profile` on the trained digits perceptron of conftest.py with a
given σ grid (120 trials), and kills it with SIGKILL at random points. Two rounds in three
wait until the store has gained a random share (at least one) of the remaining trials, then
a further random delay of up to 30 ms, so that kills land between and during commits. The
other rounds, and every round once all trials are stored, kill at a random time within the
length of an uninterrupted run, which also hits start-up, fitting and the writing of the
output file.

After each round, SQLite's integrity check must pass, no stored trial may be lost or
rewritten, and the output file must be absent or complete. The same command then starts
again. After the last round the run finishes, and its profile must be byte-identical to an
uninterrupted run, with no trial computed twice: each finished run's summary line must
report as computed exactly the trials that the store lacked.

WNPLAN_KILL_ROUNDS sets the number of kill rounds (default 5, which CI runs);
WNPLAN_KILL_SEED sets the seed of the kill points (default 0).
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wnplan.data import load_data

KILL_ROUNDS = int(os.environ.get("WNPLAN_KILL_ROUNDS", "5"))
KILL_SEED = int(os.environ.get("WNPLAN_KILL_SEED", "0"))
SIGMAS = "0.05,0.2,0.5,1,2,5"
REPEATS = 4
TRIALS = 5 * 6 * REPEATS  # 4 walking curves and the global curve, 6 σ values, 4 repeats
SUMMARY = re.compile(r"profile done: (\d+) trials \((\d+) computed, (\d+) from the store\)")
START_TIMEOUT = 300.0  # seconds a run may take; imports alone take several seconds on a loaded machine

logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def inputs(digits_mlp, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The model and its data as a .npz file, so that each subprocess skips loading the digits."""
    folder = tmp_path_factory.mktemp("kill_inputs")
    data = load_data("digits")
    np.savez(folder / "digits.npz", x=data.x, y=data.y)
    return {"model": digits_mlp.onnx, "data": folder / "digits.npz"}


def command(inputs: dict[str, Path], folder: Path, verbose: bool = True) -> list[str]:
    return [
        sys.executable, "-m", "wnplan", *(["-v"] if verbose else []), "profile", str(inputs["model"]),
        "--data", str(inputs["data"]), "--sigmas", SIGMAS, "--repeats", str(REPEATS), "--threads", "1",
        "--store", str(folder / "store.sqlite"), "--out", str(folder / "profile.json"),
    ]


def environment() -> dict[str, str]:
    # A wide console keeps the summary line on one line; one thread keeps the load small.
    return {**os.environ, "COLUMNS": "400", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def stored_rows(store: Path) -> dict[str, tuple[int, float]]:
    """Return each stored trial's (correct, finished time), read through a read-only connection."""
    if not store.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30.0) as connection:
            rows = connection.execute("SELECT key, correct, finished FROM trials").fetchall()
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            return {}
        raise
    return {key: (correct, finished) for key, correct, finished in rows}


def integrity(store: Path) -> str:
    with sqlite3.connect(store, timeout=30.0) as connection:
        return connection.execute("PRAGMA integrity_check").fetchone()[0]


def summary(stderr: str) -> tuple[int, int, int]:
    """Return (total, computed, reused) from a verbose run's summary line."""
    found = SUMMARY.search(" ".join(stderr.split()))
    assert found, stderr
    return tuple(int(value) for value in found.groups())


def finish(arguments: list[str], folder: Path) -> tuple[str, tuple[int, int, int], float]:
    """Run the command to completion; return its profile, (total, computed, reused) and seconds."""
    started = time.monotonic()
    done = subprocess.run(
        arguments, cwd=folder, env=environment(), capture_output=True, text=True, timeout=START_TIMEOUT
    )
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    return (folder / "profile.json").read_text(), summary(done.stderr), seconds


def start_and_stop(
    arguments: list[str], folder: Path, rows_to_wait: int, delay: float, stop: int
) -> tuple[bool, int, str]:
    """Start the command, wait for `rows_to_wait` stored trials and `delay` seconds, send `stop`.

    Returns whether the signal was sent (False when the run ended first), the exit code,
    and the run's stderr.
    """
    store = folder / "store.sqlite"
    log = folder / "stderr.txt"
    with open(log, "w") as stream:
        process = subprocess.Popen(arguments, cwd=folder, env=environment(), stdout=subprocess.DEVNULL, stderr=stream)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while len(stored_rows(store)) < rows_to_wait and process.poll() is None:
                assert time.monotonic() < deadline, "the profile run stalled"
                time.sleep(0.002)
            time.sleep(delay)
            if process.poll() is not None:
                return False, process.returncode, log.read_text()
            process.send_signal(stop)
            process.wait(timeout=START_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return True, process.returncode, log.read_text()


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, float]:
    """The profile of one uninterrupted run, with a store of its own, and the run's seconds."""
    folder = tmp_path_factory.mktemp("kill_reference")
    text, counts, seconds = finish(command(inputs, folder), folder)
    assert counts == (TRIALS, TRIALS, 0)
    return text, seconds


def test_profile_survives_random_sigkills(inputs, reference, tmp_path):
    expected, reference_seconds = reference
    rng = random.Random(KILL_SEED)
    arguments = command(inputs, tmp_path)
    store = tmp_path / "store.sqlite"
    kills = 0

    for round_number in range(KILL_ROUNDS):
        before = stored_rows(store)
        if rng.random() < 1 / 3 or len(before) == TRIALS:
            target, delay = 0, rng.uniform(0.0, reference_seconds)
        else:
            share = rng.uniform(0.0, 2.0) / (KILL_ROUNDS - round_number + 1)
            new_trials = max(1, int(share * (TRIALS - len(before))))
            target, delay = len(before) + new_trials, rng.uniform(0.0, 0.03)
        signalled, code, err = start_and_stop(arguments, tmp_path, target, delay, signal.SIGKILL)
        after = stored_rows(store)
        outcome = "killed" if signalled else f"finished with exit code {code}"
        logger.info(
            "round %d: %s, stored trials %d -> %d (kill after %d stored and %.3f s)",
            round_number, outcome, len(before), len(after), target, delay,
        )

        if signalled:
            kills += 1
            assert code == -signal.SIGKILL
        else:
            assert code == 0, err
            assert summary(err) == (TRIALS, TRIALS - len(before), len(before))
        assert integrity(store) == "ok"
        assert {key: after[key] for key in before} == before  # nothing lost or rewritten
        output = tmp_path / "profile.json"
        if output.exists():  # a killed write leaves the previous file or none, never a partial one
            assert output.read_text() == expected

    rows_before = len(stored_rows(store))
    text, counts, _ = finish(arguments, tmp_path)
    logger.info("final run: %d trials, %d computed, %d from the store", *counts)

    assert kills >= (KILL_ROUNDS + 1) // 2, "most rounds must end in a kill, not a finished run"
    assert counts == (TRIALS, TRIALS - rows_before, rows_before)  # no finished trial computed twice
    assert text == expected


def test_profile_interrupted_by_ctrl_c_resumes(inputs, reference, tmp_path):
    arguments = command(inputs, tmp_path, verbose=False)

    signalled, code, err = start_and_stop(arguments, tmp_path, TRIALS // 3, 0.0, signal.SIGINT)
    stored = stored_rows(tmp_path / "store.sqlite")
    lines = err.strip().splitlines()
    text, (total, computed, reused), _ = finish(command(inputs, tmp_path), tmp_path)

    assert signalled
    assert code == 130
    assert lines == [
        f"wnplan: error: interrupted; finished trials are kept in the store {tmp_path / 'store.sqlite'}, "
        + "and the same command resumes from them"
    ]
    assert integrity(tmp_path / "store.sqlite") == "ok"
    assert len(stored) >= TRIALS // 3
    assert (total, computed, reused) == (TRIALS, TRIALS - len(stored), len(stored))
    assert text == reference[0]
