"""Tests for the command line (wnplan.cli.main), run in-process.

Every bad input must end with exit code 2, exactly one line on stderr that starts with
"wnplan: error:", no traceback, and no output file. The end-to-end test chains profile,
allocate and check through their default file names in a temporary working directory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_usage_error, read_json, run_cli, write_npz

from wnplan import __version__
from wnplan.data import load_data

# A small, fixed grid keeps every profile run short: 4 σ values × 2 repeats per curve.
PROFILE_OPTIONS = ["--data", "digits", "--limit", "50", "--sigmas", "0.1,1,3,10", "--repeats", "2"]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory, so default output files and the store land in tmp_path."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def profile_file(digits_profile, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    path.write_text(json.dumps(digits_profile, indent=2, sort_keys=True))
    return path


def _profile(capsys, model, out: Path, *extra: str) -> tuple[int, str, str]:
    store = out.parent / "store.sqlite"
    return run_cli(capsys, "profile", model, *PROFILE_OPTIONS, "--out", out, "--store", store, *extra)


# --- version and help ---


def test_cli_version_prints_version(capsys):
    code, out, err = run_cli(capsys, "--version")

    assert code == 0
    assert out.strip() == f"wnplan {__version__}"
    assert err == ""


def test_cli_without_arguments_prints_help(capsys):
    code, out, _ = run_cli(capsys)

    assert code == 0
    assert "profile" in out
    assert "allocate" in out


# --- profile: bad input ---


def test_cli_profile_missing_model(capsys, workdir):
    result = _profile(capsys, workdir / "absent.onnx", workdir / "out.json")

    assert_usage_error(result, "model file not found", "absent.onnx")
    assert not (workdir / "out.json").exists()


def test_cli_profile_wrong_extension(capsys, workdir):
    model = workdir / "model.txt"
    model.write_text("not a model")

    result = _profile(capsys, model, workdir / "out.json")

    assert_usage_error(result, "unsupported model file", "model.txt")
    assert not (workdir / "out.json").exists()


def test_cli_profile_corrupted_onnx(capsys, workdir):
    model = workdir / "random.onnx"
    model.write_bytes(np.random.default_rng(0).bytes(2048))

    result = _profile(capsys, model, workdir / "out.json")

    assert_usage_error(result, "random.onnx")
    assert not (workdir / "out.json").exists()


def test_cli_profile_unknown_noise(capsys, workdir, digits_mlp):
    result = _profile(capsys, digits_mlp.onnx, workdir / "out.json", "--noise", "pink")

    assert_usage_error(result, "'pink'", "additive")
    assert not (workdir / "out.json").exists()


def test_cli_profile_unknown_site(capsys, workdir, digits_mlp):
    result = _profile(capsys, digits_mlp.onnx, workdir / "out.json", "--sites", "0,classifier.9")

    assert_usage_error(result, "'classifier.9'", "wnplan sites")
    assert not (workdir / "out.json").exists()
    assert not (workdir / "store.sqlite").exists() or _row_count(workdir / "store.sqlite") == 0


def _row_count(store: Path) -> int:
    import sqlite3

    with sqlite3.connect(store) as connection:
        return int(connection.execute("SELECT COUNT(*) FROM trials").fetchone()[0])


def test_cli_profile_zero_repeats(capsys, workdir, digits_mlp):
    result = _profile(capsys, digits_mlp.onnx, workdir / "out.json", "--repeats", "0")

    assert_usage_error(result, "--repeats 0")
    assert not (workdir / "out.json").exists()


@pytest.mark.parametrize("sigmas", ["0.1,abc", "0,1", "-1", "nan", "0.1,inf", ",", "1,1e39", "1,,2", "1.0000001e10"])
def test_cli_profile_bad_sigmas(capsys, workdir, digits_mlp, sigmas):
    result = _profile(capsys, digits_mlp.onnx, workdir / "out.json", "--sigmas", sigmas)

    assert_usage_error(result, "--sigmas")
    assert not (workdir / "out.json").exists()


def test_cli_profile_non_integer_repeats(capsys, workdir, digits_mlp):
    result = _profile(capsys, digits_mlp.onnx, workdir / "out.json", "--repeats", "two")

    assert_usage_error(result, "--repeats")
    assert not (workdir / "out.json").exists()


def test_cli_profile_missing_declaration(capsys, workdir, digits_mlp):
    out = workdir / "out.json"

    result = run_cli(capsys, "profile", digits_mlp.onnx, "--sigmas", "1", "--out", out)

    assert_usage_error(result, "declares no data", "--data")
    assert not out.exists()


def test_cli_profile_data_of_wrong_shape(capsys, workdir, digits_mlp):
    data = write_npz(workdir / "flat.npz", x=np.zeros((8, 64), np.float32), y=np.arange(8) % 10)
    out = workdir / "out.json"

    result = run_cli(capsys, "profile", digits_mlp.onnx, "--data", data, "--sigmas", "1", "--out", out)

    assert_usage_error(result, "(64,)", "1, 28, 28")
    assert not out.exists()


def test_cli_profile_labels_beyond_classes(capsys, workdir, digits_mlp):
    data = write_npz(workdir / "labels.npz", x=np.zeros((8, 1, 28, 28), np.float32), y=np.arange(8) + 5)
    out = workdir / "out.json"

    result = run_cli(capsys, "profile", digits_mlp.onnx, "--data", data, "--sigmas", "1", "--out", out)

    assert_usage_error(result, "labels go up to 12", "10 classes")
    assert not out.exists()


@pytest.mark.parametrize(
    ("option", "value", "shown"),
    [
        ("--limit", "0", "--limit 0"),
        ("--normalize", "abc", "--normalize"),
        ("--mix-ratio", "2", "--mix-ratio 2"),
        ("--threads", "0", "--threads 0"),
        ("--scope", "sideways", "'sideways'"),
        ("--relative", "peak", "'peak'"),
        ("--fit-space", "cubic", "'cubic'"),
        ("--order", "random", "'random'"),
    ],
)
def test_cli_profile_invalid_option_value(capsys, workdir, digits_mlp, option, value, shown):
    result = _profile(capsys, digits_mlp.onnx, workdir / "out.json", option, value)

    assert_usage_error(result, shown)
    assert not (workdir / "out.json").exists()


def test_cli_profile_store_is_a_folder(capsys, workdir, digits_mlp):
    out = workdir / "out.json"

    result = run_cli(capsys, "profile", digits_mlp.onnx, *PROFILE_OPTIONS, "--out", out, "--store", workdir)

    assert_usage_error(result, "result store", "--store")
    assert not out.exists()


def test_cli_profile_unknown_option(capsys, workdir, digits_mlp):
    result = run_cli(capsys, "profile", digits_mlp.onnx, "--sigma-grid", "1")

    assert_usage_error(result, "--sigma-grid")


# --- allocate and check: bad input ---


def test_cli_allocate_missing_profile(capsys, workdir):
    result = run_cli(capsys, "allocate", workdir / "absent.json", "--budget", "8", "--out", workdir / "plan.json")

    assert_usage_error(result, "profile file not found", "absent.json")
    assert not (workdir / "plan.json").exists()


def test_cli_allocate_without_budget(capsys, workdir, profile_file):
    result = run_cli(capsys, "allocate", profile_file, "--out", workdir / "plan.json")

    assert_usage_error(result, "--budget")
    assert not (workdir / "plan.json").exists()


def test_cli_allocate_budget_below_sites(capsys, workdir, profile_file):
    plan = workdir / "plan.json"

    result = run_cli(capsys, "allocate", profile_file, "--budget", "3", "--method", "paper", "--out", plan)

    assert_usage_error(result, "--budget 3", "4 unshielded sites", "--budget 4 or more")
    assert not plan.exists()


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("classes", "ten", "field classes"),
        ("clean", {"accuracy": 2.0, "correct": 1, "samples": 1}, "field clean/accuracy"),
        ("sites", [], "field sites"),
        ("schema_version", 99, "field schema_version"),
    ],
)
def test_cli_allocate_broken_profile(capsys, workdir, digits_profile, field, value, shown):
    broken = json.loads(json.dumps(digits_profile))
    broken[field] = value
    path = workdir / "broken.json"
    path.write_text(json.dumps(broken))

    result = run_cli(capsys, "allocate", path, "--budget", "8", "--out", workdir / "plan.json")

    assert_usage_error(result, "invalid profile file", shown)
    assert not (workdir / "plan.json").exists()


def test_cli_allocate_profile_missing_field(capsys, workdir, digits_profile):
    broken = json.loads(json.dumps(digits_profile))
    del broken["sites"][1]["walking"]["fit"]["status"]
    path = workdir / "broken.json"
    path.write_text(json.dumps(broken))

    result = run_cli(capsys, "allocate", path, "--budget", "8", "--out", workdir / "plan.json")

    assert_usage_error(result, "sites/1/walking/fit", "status")
    assert not (workdir / "plan.json").exists()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"kind": "plan"}', "NaN"])
def test_cli_allocate_unreadable_profile(capsys, workdir, content):
    path = workdir / "broken.json"
    path.write_text(content)

    result = run_cli(capsys, "allocate", path, "--budget", "8", "--out", workdir / "plan.json")

    assert_usage_error(result, "broken.json")
    assert not (workdir / "plan.json").exists()


def test_cli_check_missing_plan(capsys, workdir):
    result = run_cli(capsys, "check", workdir / "absent.json", "--out", workdir / "check.json")

    assert_usage_error(result, "plan file not found", "absent.json")
    assert not (workdir / "check.json").exists()


def test_cli_check_given_profile_file(capsys, workdir, profile_file):
    result = run_cli(capsys, "check", profile_file, "--out", workdir / "check.json")

    assert_usage_error(result, "profile file", "plan file is needed")
    assert not (workdir / "check.json").exists()


def test_cli_check_zero_repeats(capsys, workdir, profile_file):
    plan = workdir / "plan.json"
    assert run_cli(capsys, "allocate", profile_file, "--budget", "8", "--method", "paper", "--out", plan)[0] == 0

    result = run_cli(capsys, "check", plan, "--repeats", "0", "--out", workdir / "check.json")

    assert_usage_error(result, "--repeats 0")
    assert not (workdir / "check.json").exists()


def test_cli_sites_missing_model(capsys, workdir):
    assert_usage_error(run_cli(capsys, "sites", workdir / "absent.pt2"), "absent.pt2")


# --- end to end ---


def test_cli_sites_lists_model_sites(capsys, digits_mlp):
    code, out, _ = run_cli(capsys, "sites", digits_mlp.pt2, "--json")

    assert code == 0
    sites = json.loads(out)
    assert [site["op"] for site in sites] == ["input", "linear", "relu", "linear"]
    assert sites[1]["parameters"] == 28 * 28 * 16 + 16


def test_cli_profile_dry_run_writes_nothing(capsys, workdir, digits_mlp):
    code, out, _ = run_cli(capsys, "profile", digits_mlp.onnx, *PROFILE_OPTIONS, "--scope", "both", "--dry-run")

    assert code == 0
    assert "40 trials on 50 samples" in out  # (4 walking + 1 global curves) × 4 σ × 2 repeats
    assert not (workdir / "wnplan-profile.json").exists()
    assert not (workdir / ".wnplan").exists()


def test_cli_profile_uses_declared_data(capsys, workdir, digits_mlp_declared):
    options = ["--noise", "additive", "--sigmas", "1", "--repeats", "2", "--limit", "30"]

    code, _, err = run_cli(capsys, "profile", digits_mlp_declared, *options)

    assert code == 0, err
    profile = read_json(workdir / "wnplan-profile.json")
    assert profile["data"]["name"] == "digits"
    assert profile["data"]["samples"] == 30


def test_cli_profile_allocate_check_chain(capsys, workdir, digits_mlp):
    budget = 8
    options = ["--data", "digits", "--limit", "200", "--scope", "both", "--sigmas", "0.01,0.1,1,10", "--repeats", "2"]

    code, _, err = run_cli(capsys, "profile", digits_mlp.onnx, *options)
    assert code == 0, err
    code, _, err = run_cli(capsys, "allocate", "--budget", str(budget))
    assert code == 0, err
    code, out, err = run_cli(capsys, "check", "--repeats", "3", "--json")

    profile = read_json(workdir / "wnplan-profile.json")
    plan = read_json(workdir / "wnplan-plan.json")
    check = read_json(workdir / "wnplan-check.json")
    assert (workdir / ".wnplan" / "store.sqlite").is_file()
    assert profile["clean"]["samples"] == 200
    assert profile["global"]["fit"]["midpoint"] is not None
    assert sum(site["executions"] for site in plan["sites"]) == budget
    assert plan["total_executions"] == budget
    assert plan["profile"]["path"] == "wnplan-profile.json"
    assert {"plan", "uniform", "clean"} <= set(check["results"])
    assert check["results"]["plan"]["repeats"] == 3
    assert 0.0 <= check["results"]["plan"]["accuracy"] <= 1.0
    assert json.loads(out) == check
    assert code == (0 if check["verdict"]["passed"] else 1), err


def test_cli_profile_rerun_reuses_store(capsys, workdir, digits_mlp):
    out = workdir / "profile.json"
    assert _profile(capsys, digits_mlp.onnx, out)[0] == 0
    first = out.read_text()
    out.unlink()

    code, _, err = _profile(capsys, digits_mlp.onnx, out)

    assert code == 0, err
    assert out.read_text() == first
    assert _row_count(workdir / "store.sqlite") == 5 * 4 * 2  # 4 walking and 1 global curve, 4 σ, 2 repeats


def test_cli_check_below_min_accuracy_exits_1(capsys, workdir, digits_mlp):
    run_cli(capsys, "profile", digits_mlp.onnx, *PROFILE_OPTIONS, "--scope", "both")
    run_cli(capsys, "allocate", "--budget", "8", "--method", "paper")

    code, _, err = run_cli(capsys, "check", "--repeats", "2", "--min-accuracy", "1.0")

    assert read_json(workdir / "wnplan-check.json")["verdict"]["passed"] is False
    assert "check failed" in err
    assert code == 1


FACTORY_SOURCE = """
def build():
    raise KeyboardInterrupt
"""


def test_cli_interrupt_exits_130(capsys, workdir, monkeypatch, digits_mlp):
    import torch

    (workdir / "wnplan_interrupting_factory.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(workdir))
    weights = workdir / "weights.pt"
    torch.save(digits_mlp.module.state_dict(), weights)
    out = workdir / "out.json"

    code, _, err = run_cli(
        capsys, "profile", weights, "--factory", "wnplan_interrupting_factory:build", *PROFILE_OPTIONS, "--out", out
    )

    assert "wnplan: error: interrupted" in err
    assert code == 130
    assert not out.exists()


def test_cli_output_files_follow_umask(capsys, workdir, digits_mlp):
    umask = os.umask(0o022)
    try:
        code, _, err = _profile(capsys, digits_mlp.onnx, workdir / "out.json")
    finally:
        os.umask(umask)

    assert code == 0, err
    assert (workdir / "out.json").stat().st_mode & 0o777 == 0o644


# --- output paths, threads and trained-mode input ---


@pytest.mark.parametrize("out", ["", "folder"])
def test_cli_profile_rejects_unwritable_out(capsys, workdir, digits_mlp, out):
    (workdir / "folder").mkdir()

    result = run_cli(capsys, "profile", digits_mlp.onnx, *PROFILE_OPTIONS, "--out", out, "--store", "none")

    assert_usage_error(result, "invalid --out")
    assert sorted(path.name for path in workdir.iterdir()) == ["folder"]  # nothing written, no store


def test_cli_allocate_rejects_folder_out(capsys, workdir, profile_file):
    (workdir / "plans").mkdir()

    result = run_cli(capsys, "allocate", profile_file, "--budget", "20", "--out", workdir / "plans")

    assert_usage_error(result, "invalid --out", "it is a folder")


def test_cli_profile_rejects_absurd_threads(capsys, workdir, digits_mlp):
    result = _profile(capsys, digits_mlp.onnx, workdir / "out.json", "--threads", "100000")

    assert_usage_error(result, "invalid --threads 100000")


def test_cli_profile_checks_training_options_in_inference_mode(capsys, workdir, digits_mlp):
    result = _profile(capsys, digits_mlp.onnx, workdir / "out.json", "--epochs", "0")

    assert_usage_error(result, "invalid --epochs 0")


def _trained(capsys, workdir, model, train_data):
    return _profile(
        capsys, model, workdir / "out.json", "--mode", "trained", "--scope", "walking", "--sites", "0",
        "--train-data", train_data, "--train-limit", "64", "--store", "none",
    )


def test_cli_trained_rejects_training_samples_of_other_shape(capsys, workdir, digits_mlp):
    data = workdir / "wide.npz"
    np.savez(data, x=np.zeros((64, 10), np.float32), y=np.zeros(64, np.int64))

    result = _trained(capsys, workdir, digits_mlp.onnx, data)

    assert_usage_error(result, "training samples", "(10,)", "--train-data")
    assert not (workdir / "out.json").exists()


def test_cli_trained_rejects_labels_beyond_classes(capsys, workdir, digits_mlp):
    data = workdir / "labels.npz"
    digits = load_data("digits:train", limit=64)
    np.savez(data, x=digits.x, y=np.full(64, 12, np.int64))

    result = _trained(capsys, workdir, digits_mlp.onnx, data)

    assert_usage_error(result, "training labels", "12", "10 classes")
    assert not (workdir / "out.json").exists()


def test_cli_trained_dry_run_gives_no_time(capsys, workdir, digits_mlp):
    code, out, _ = _profile(
        capsys, digits_mlp.onnx, workdir / "out.json", "--mode", "trained", "--scope", "walking", "--sites", "0",
        "--dry-run",
    )

    assert code == 0
    assert "leaves out" in out
    assert "estimated time" not in out


def test_cli_dry_run_json_gives_estimate(capsys, workdir, digits_mlp):
    code, out, _ = _profile(capsys, digits_mlp.onnx, workdir / "out.json", "--scope", "both", "--dry-run", "--json")

    estimate = json.loads(out)
    assert code == 0
    assert estimate["trials"] == 40
    assert estimate["samples"] == 50
    assert estimate["estimated_seconds"] > 0


def test_cli_trained_dry_run_checks_training_data(capsys, workdir, digits_mlp):
    result = _profile(
        capsys, digits_mlp.onnx, workdir / "out.json", "--mode", "trained", "--train-data", workdir / "absent.npz",
        "--dry-run",
    )

    assert_usage_error(result, "absent.npz")


def test_cli_trained_warns_when_training_diverges(capsys, caplog, workdir, digits_mlp):
    with caplog.at_level(logging.WARNING, logger="wnplan"):
        code, _, _ = _profile(
            capsys, digits_mlp.onnx, workdir / "out.json", "--mode", "trained", "--scope", "walking", "--sites", "0",
            "--sigmas", "0.1", "--repeats", "1", "--train-limit", "64", "--lr", "1e300",
        )

    assert code == 0
    assert "without noise" in caplog.text
    assert "lower --lr" in caplog.text


def test_cli_allocate_warns_on_trained_profile(capsys, caplog, workdir, digits_mlp):
    profile = workdir / "trained.json"
    code, _, err = run_cli(
        capsys, "profile", digits_mlp.onnx, *PROFILE_OPTIONS, "--mode", "trained", "--scope", "both",
        "--train-limit", "64", "--store", "none", "--out", profile,
    )
    assert code == 0, err
    used = json.loads(profile.read_text())["settings"]["training"]["train_data_used"]
    assert used["name"] == "digits:train"
    assert used["samples"] == 64

    with caplog.at_level(logging.WARNING, logger="wnplan"):
        code, _, err = run_cli(capsys, "allocate", profile, "--budget", "8", "--method", "paper",
                               "--out", workdir / "plan.json")

    assert code == 0, err
    assert "holds noise-trained curves" in caplog.text


def test_cli_profile_out_on_proc(capsys, workdir, digits_mlp):
    result = run_cli(capsys, "profile", digits_mlp.onnx, *PROFILE_OPTIONS, "--out", "/proc/profile.json",
                     "--store", "none")

    assert_usage_error(result, "invalid --out", "cannot write into '/proc'")


def test_cli_profile_negative_workers(capsys, workdir, digits_mlp):
    result = _profile(capsys, digits_mlp.onnx, workdir / "out.json", "--workers", "-1")

    assert_usage_error(result, "invalid --workers -1", "expected 0")


def test_cli_profile_warns_on_unused_training_options(capsys, caplog, workdir, digits_mlp):
    with caplog.at_level(logging.WARNING, logger="wnplan"):
        code, _, err = _profile(capsys, digits_mlp.onnx, workdir / "out.json", "--epochs", "3", "--from-scratch")

    assert code == 0, err
    assert "--epochs, --from-scratch apply only to trained mode" in caplog.text


def test_cli_profile_trained_rejects_training_split_as_data(capsys, workdir, digits_mlp):
    result = _profile(capsys, digits_mlp.onnx, workdir / "out.json", "--mode", "trained", "--data", "digits:train")

    assert_usage_error(result, "--train-data digits:train", "--data digits:test")
    assert not (workdir / "out.json").exists()


def test_cli_profile_missing_model_without_data(capsys, workdir):
    result = run_cli(capsys, "profile", workdir / "absent.pt2", "--out", workdir / "out.json")

    assert_usage_error(result, "model file not found")


def test_cli_trained_warns_when_training_on_evaluation_data(capsys, caplog, workdir, digits_mlp):
    with caplog.at_level(logging.WARNING, logger="wnplan"):
        code, _, err = _profile(
            capsys, digits_mlp.onnx, workdir / "out.json", "--mode", "trained", "--data", "digits:test",
            "--train-data", "digits:test", "--train-limit", "50", "--dry-run",
        )

    assert code == 0, err
    assert "same samples as the evaluation data" in caplog.text



def test_cli_trained_dry_run_rejects_workers(capsys, workdir, digits_mlp):
    result = _profile(capsys, digits_mlp.onnx, workdir / "out.json", "--mode", "trained", "--workers", "2", "--dry-run")

    assert_usage_error(result, "drop --workers")
