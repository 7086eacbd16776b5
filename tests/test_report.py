"""Tests for reports (wnplan.report): figures, the HTML page, and the terminal chart.

A real profile, plan and check of the example MLP with BatchNorm (300 Fashion-MNIST samples,
six σ values, 2 repeats) come from the real pipeline. Trained-mode and mixed-noise-map
profiles are synthesized: logistic curves with seeded noise (seed 0), fitted by the real
`fit_curve`, and valid under the profile schema. The browser test opens report.html in
headless Chromium through chromedriver, with DNS resolution disabled, so it reaches no network.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from scipy.special import expit

from wnplan.errors import FileFormatError, SettingsError
from wnplan.fit import CurvePoint, fit_curve
from wnplan.plan import AllocationSettings, allocate
from wnplan.profiler import ProfileSettings, profile
from wnplan.records import validate, write_record
from wnplan.report import load_sources, terminal_chart, write_report
from wnplan.report.extras import last_binarization, last_histograms, preserved_accuracy
from wnplan.report.plan_plots import uniform_executions
from wnplan.report.sources import CurveData, curve_data
from wnplan.simulate import check
from wnplan.train.records import (
    activation_histogram,
    binarization_record,
    binary_levels,
    preserved_relative_accuracy,
    ternary_levels,
)

REPOSITORY = Path(__file__).resolve().parents[1]
EXAMPLE_MODEL = REPOSITORY / "examples" / "models" / "mlp_bn.onnx"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SYNTHETIC_SEED = 0
SIGMAS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
CHANCE = 0.1
CLEAN = 0.9


# --- fixtures: a real profile, plan and check ---


@pytest.fixture(scope="module")
def real_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Profile, plan and check files of the example MLP, side by side in one folder."""
    folder = tmp_path_factory.mktemp("real")
    settings = ProfileSettings(repeats=2, sigmas=(0.03, 0.1, 0.3, 1.0, 3.0, 10.0), seed=0)
    record = profile(EXAMPLE_MODEL, settings=settings, limit=300, store=None)
    profile_path = write_record(record, "profile", folder / "profile.json")

    plan_settings = AllocationSettings(budget=22, method="paper", search_budget=0)
    plan = allocate(record, plan_settings, profile_path="profile.json")
    plan_path = write_record(plan, "plan", folder / "plan.json")
    result = check(plan, repeats=2, seed=0, plan_path=plan_path)
    result["plan"]["path"] = "plan.json"  # relative, so the report must look beside the check
    check_path = write_record(result, "check", folder / "check.json")
    return {"profile": profile_path, "plan": plan_path, "check": check_path}


@pytest.fixture(scope="module")
def check_report(real_files, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], str]:
    """The paths written for the real check, and its page's text."""
    paths = write_report(real_files["check"], tmp_path_factory.mktemp("check-report"))
    return paths, paths[-1].read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def profile_report(real_files, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], str]:
    """The paths written for the real profile, and its page's text."""
    paths = write_report(real_files["profile"], tmp_path_factory.mktemp("profile-report"))
    return paths, paths[-1].read_text(encoding="utf-8")


# --- synthetic profiles ---


def _points(sigmas, accuracies, rng, stderr=0.006, samples=500, repeats=3, extras=None) -> list[dict]:
    points = []
    for position, (sigma, accuracy) in enumerate(zip(sigmas, accuracies, strict=True)):
        noisy = float(np.clip(accuracy + rng.normal(0.0, stderr), 0.0, 1.0))
        point = {"sigma": float(sigma), "accuracy": noisy, "stderr": stderr, "samples": samples,
                 "repeats": repeats, "reason": "given"}
        if extras is not None:
            point["records"] = extras(position, float(sigma))
        points.append(point)
    return points


def _curve(points: list[dict]) -> dict:
    fit = fit_curve([CurvePoint(p["sigma"], p["accuracy"], p["stderr"], p["samples"], p["repeats"]) for p in points],
                    chance=CHANCE)
    return {"points": points, "fit": fit.to_dict()}


def _logistic(midpoint: float, floor: float = CHANCE) -> np.ndarray:
    sigma = np.array(SIGMAS)
    return floor + (CLEAN - floor) * expit(-(sigma - midpoint) / (0.4 * midpoint))


def _trained_extras(site: int):
    """Return a point-records builder: the trainer's layout at odd sites, the flat layout at even ones.

    Odd sites binarize: their activations are a cluster at zero and one at 2·grow.
    """
    rng = np.random.default_rng(SYNTHETIC_SEED + site)

    def extras(position: int, sigma: float) -> list[dict]:
        models = []
        for seed in range(2):
            grow = 1.0 + 0.3 * position + 0.05 * seed
            weights = {"fc1": 0.05 * grow, "fc2": 0.08 * grow, "logits": 0.1 * grow}
            reference = 0.85 - 0.01 * position
            if site % 2:
                clean = np.concatenate([np.zeros(40), rng.normal(2.0 * grow, 0.1, 40)])
                noisy = clean + rng.normal(0.0, sigma, clean.shape)
                models.append({
                    "weights": weights,
                    "activations": {"site": site, "samples": 80, "clean": activation_histogram(clean),
                                    "noisy": activation_histogram(noisy)},
                    "binarization": binarization_record(reference, reference - 0.005, reference - 0.002,
                                                        binary_levels(clean), ternary_levels(clean), 0.1),
                })
                continue
            values = np.linspace(-2, 2, 80)
            counts, edges = np.histogram(values, bins=12)
            log_counts, log_edges = np.histogram(np.abs(values) + 1e-3, bins=np.geomspace(1e-3, 10, 9))
            models.append({
                "weights": weights,
                "histogram": {"edges": edges.tolist(), "counts": counts.tolist(),
                              "log_edges": log_edges.tolist(), "log_counts": log_counts.tolist()},
                "binarization": {"accuracy_2_levels": reference - 0.3, "accuracy_3_levels": reference - 0.2,
                                 "reference": reference, "binarizes": False},
            })
        return models
    return extras


def _site(index: int, name: str, walking: dict | None, trained: dict | None = None) -> dict:
    site = {"index": index, "name": name, "op": "Gemm", "shape": [64], "parameters": 100,
            "statistics": {"rms": 1.0, "range": 4.0}, "normalization": False, "in_global": True,
            "walking": walking}
    if trained is not None:
        site["trained"] = trained
    return site


def synthetic_profile(mode: str = "inference") -> dict:
    """A six-site profile whose fits cover every status: ok, robust, sensitive, fallback, failed.

    With mode "both", every site also has a trained curve whose points carry per-model extras.
    """
    rng = np.random.default_rng(SYNTHETIC_SEED)
    sigma = np.array(SIGMAS)
    walking = {
        "input": _logistic(1.0),
        "robust_site": np.full(len(SIGMAS), CLEAN),
        "sensitive_site": np.where(sigma == 0, CLEAN, CHANCE),
        "step_site": np.where(sigma < 2.0, CLEAN, CHANCE),
        "dead_site": np.full(len(SIGMAS), CHANCE),
        "logits_with_a_rather_long_onnx_output_name": _logistic(5.0, floor=0.3),
    }
    sites = []
    for index, (name, accuracies) in enumerate(walking.items()):
        curve = _curve(_points(SIGMAS, accuracies, rng))
        trained = None
        if mode == "both":
            trained = _curve(_points(SIGMAS, _logistic(3.0 * (index + 1), floor=0.1 + 0.1 * (index % 2)), rng,
                                     extras=_trained_extras(index)))
        sites.append(_site(index, name, curve, trained))
    global_record = _curve(_points(SIGMAS, _logistic(0.5), rng)) | {"sites": list(range(len(sites)))}
    if mode == "both":
        global_record["trained"] = _curve(_points(SIGMAS, _logistic(2.0), rng))
    record = {
        "kind": "profile", "schema_version": 1, "wnplan_version": "0.1.0",
        "model": {"path": "synthetic.onnx", "sha256": "0" * 64, "format": "onnx"},
        "data": {"name": "synthetic", "samples": 500, "sha256": "0" * 64, "preprocessing": {}},
        "noise": {"kind": "additive", "reference": "rms"},
        "settings": {"scope": "both", "mode": mode, "repeats": 3, "seed": 0, "fit_space": "linear",
                     "grid": "given", "sigmas": [sigma for sigma in SIGMAS if sigma > 0]},
        "classes": 10, "chance": CHANCE,
        "clean": {"accuracy": CLEAN, "correct": 450, "samples": 500},
        "sites": sites, "global": global_record,
    }
    validate(record, "profile")
    return record


def synthetic_maps_profile(mode: str = "inference") -> dict:
    """A mixed-noise profile with maps at site 1 in both orders, inference-only and trained."""
    record = synthetic_profile(mode)
    record["noise"] = {"kind": "mixed", "order": "mul-first", "mix_ratio": 0.5, "reference": "absolute"}
    axis = np.geomspace(0.01, 100, 9)
    mul, add = np.meshgrid(np.log10(axis), np.log10(axis), indexing="ij")
    maps = []
    for order in ("mul-first", "add-first"):
        for map_mode in ("inference", "trained"):
            survives = map_mode == "trained" and order == "mul-first"
            # Multiplicative-first training survives σ_add up to ten times σ_mul. Otherwise
            # both components must stay below about 1.
            limit = np.maximum(mul + 1.0, 0.0) if survives else np.zeros_like(add)
            ceiling = 3.0 if survives else 0.0
            accuracy = CHANCE + (CLEAN - CHANCE) * expit(-3 * (add - limit)) * expit(-3 * (mul - ceiling))
            maps.append({"site": 1, "name": record["sites"][1]["name"], "order": order, "mode": map_mode,
                         "sigma_mul": axis.tolist(), "sigma_add": axis.tolist(),
                         "accuracy": accuracy.tolist(), "stderr": np.full_like(accuracy, 0.01).tolist(),
                         "repeats": 2, "samples": 500})
    record["maps"] = maps
    validate(record, "profile")
    return record


@pytest.fixture(scope="module")
def extras_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[Path], str]:
    """A report of a synthetic profile with trained results and four mixed-noise maps."""
    record = synthetic_maps_profile("both")
    paths = write_report(record, tmp_path_factory.mktemp("extras-report"))
    return record, paths, paths[-1].read_text(encoding="utf-8")


# --- helpers ---


class _TagBalance(HTMLParser):
    """Collect open elements and report tags that close out of order."""

    VOID: ClassVar[set[str]] = {
        "meta", "img", "br", "hr", "link", "input", "col", "source", "wbr", "area", "base", "embed", "track",
    }

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.doctype = ""

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag, attrs) -> None:
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def _assert_figure_files(out: Path, stem: str) -> None:
    assert (out / f"{stem}.png").read_bytes().startswith(PNG_SIGNATURE), stem
    root = ElementTree.parse(out / f"{stem}.svg").getroot()
    assert root.tag.endswith("svg"), stem


# --- profile, plan and check reports ---


def test_report_profile_writes_figures_and_page(profile_report):
    paths, page = profile_report
    out = paths[-1].parent

    names = {path.name for path in paths}
    for stem in ("midpoints", "curves", "global-curve"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names
        _assert_figure_files(out, stem)
    assert paths[-1].name == "report.html"
    assert page.count('src="data:image/png;base64,') == 3
    assert "plan-executions.png" not in names


def test_report_page_is_balanced_html5(check_report):
    _, page = check_report
    parser = _TagBalance()

    parser.feed(page)
    parser.close()

    assert parser.doctype.lower() == "doctype html"
    assert parser.problems == []
    assert parser.stack == []
    assert "Content-Security-Policy" in page


def test_report_page_has_no_external_reference(check_report):
    _, page = check_report

    assert "http://" not in page
    assert "https://" not in page
    assert 'src="data:' in page


def test_report_page_lists_sites(real_files, profile_report):
    record = json.loads(real_files["profile"].read_text())
    _, page = profile_report

    assert f"{record['clean']['accuracy']:.4f}" in page
    for site in record["sites"]:
        assert f"<td>{site['name']}</td>" in page
    assert "global µ, inference-only" in page


def test_report_plan_follows_relative_profile_path(real_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the plan names "profile.json", found only beside the plan

    paths = write_report(real_files["plan"], "out")

    names = {path.name for path in paths}
    assert {"plan-executions.png", "plan-executions.svg", "midpoints.png"} <= names
    _assert_figure_files(tmp_path / "out", "plan-executions")
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert '<section id="plan">' in page
    assert '<section id="check">' not in page


def test_report_check_shows_every_allocation(check_report):
    paths, page = check_report

    assert {"check.png", "check.svg", "plan-executions.png"} <= {path.name for path in paths}
    _assert_figure_files(paths[-1].parent, "check")
    for allocation in ("plan", "uniform", "paper", "clean"):
        assert f"<td>{allocation}</td>" in page
    assert "95% interval" in page
    assert '<section id="plan">' in page


def test_report_uniform_baseline_matches_check(real_files):
    sources = load_sources(real_files["check"])

    measured = sources.check["results"]["uniform"]["executions"]

    assert uniform_executions(sources.plan, sources.check) == measured
    assert uniform_executions(sources.plan) == measured  # recomputed without the check
    assert sum(measured) == sources.plan["budget"]


def test_report_png_identical_across_reports(profile_report, check_report):
    # Both reports draw the same profile, so its figures must match byte for byte.
    first, second = profile_report[0][-1].parent, check_report[0][-1].parent

    for stem in ("midpoints", "curves", "global-curve"):
        assert (first / f"{stem}.png").read_bytes() == (second / f"{stem}.png").read_bytes()


# --- synthetic profiles: statuses, trained mode, maps ---


def test_report_synthetic_statuses(tmp_path):
    record = synthetic_profile()
    statuses = [site["walking"]["fit"]["status"] for site in record["sites"]]

    paths = write_report(record, tmp_path)

    assert set(statuses) == {"ok", "robust", "sensitive", "fallback", "failed"}
    assert (tmp_path / "midpoints.png") in paths
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    for status in statuses:
        assert f"<td>{status}</td>" in page


def test_report_trained_both_draws_extras(extras_report):
    _, paths, page = extras_report
    out = paths[-1].parent

    names = {path.name for path in paths}
    for stem in ("trained-preserved", "trained-binarization", "trained-weights", "trained-histograms"):
        _assert_figure_files(out, stem)
        assert f"{stem}.png" in names
    assert "Self-binarization test" in page
    assert "µ ± s.e., noise-aware trained" in page
    assert "global µ, noise-aware trained" in page


def test_report_extras_read_both_layouts():
    record = synthetic_profile("both")
    trainer_site, flat_site = (curve_data(record["sites"][index]["trained"]) for index in (1, 2))

    sigma, histograms = last_histograms(trainer_site)
    assert sigma == SIGMAS[-1]
    assert [histogram.label for histogram in histograms] == ["without noise", "with noise"]
    assert len(histograms[0].edges) == len(histograms[0].counts) + 1
    assert [histogram.label for histogram in last_histograms(flat_site)[1]] == ["activations"]

    test = last_binarization(trainer_site)[1]
    assert test["binarizes"] is True
    assert test["accuracy_2_levels"] == pytest.approx(test["reference"] - 0.005)
    assert last_binarization(flat_site)[1]["binarizes"] is False


def test_report_preserved_accuracy_matches_trainer():
    record = synthetic_profile("both")

    for site in record["sites"]:
        for curve in (site["walking"], site["trained"]):
            without_zero = [point for point in curve["points"] if point["sigma"] > 0]
            ours = preserved_accuracy(curve_data({"points": without_zero, "fit": curve["fit"]}), CLEAN)
            assert ours == pytest.approx(preserved_relative_accuracy(without_zero, CLEAN))
            assert preserved_accuracy(curve_data(curve), CLEAN) == pytest.approx(
                preserved_relative_accuracy(curve["points"], CLEAN)
            )


def test_report_trained_only_profile_labels_trained(tmp_path):
    record = synthetic_profile()
    record["settings"]["mode"] = "trained"

    write_report(record, tmp_path)

    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "µ ± s.e., noise-aware trained" in page
    assert "inference-only" not in page


def test_report_maps_one_figure_per_map(extras_report):
    record, paths, page = extras_report

    maps = sorted(path.name for path in paths if path.name.startswith("map-") and path.suffix == ".png")
    assert len(maps) == len(record["maps"]) == 4
    assert "map-site01-mul-first-trained.png" in maps
    _assert_figure_files(paths[-1].parent, "map-site01-add-first-inference")
    assert '<section id="maps">' in page


def test_report_map_wrong_shape_raises(tmp_path):
    record = synthetic_maps_profile()
    record["maps"][0]["accuracy"] = record["maps"][0]["accuracy"][:-1]

    with pytest.raises(FileFormatError, match=r"shape \(8, 9\), expected \(9, 9\)"):
        write_report(record, tmp_path)

    assert list(tmp_path.iterdir()) == []  # found before anything was drawn


def test_report_leaves_pyplot_unloaded(real_files, tmp_path):
    # Figures are drawn on Figure objects directly, so no pyplot backend or global state is set up.
    script = "\n".join([
        "import sys",
        "from wnplan.report import write_report",
        f"write_report({str(real_files['profile'])!r}, {str(tmp_path)!r})",
        "print('matplotlib.pyplot' in sys.modules)",
    ])

    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)

    assert completed.stdout.strip() == "False"


# --- bad input ---


def test_report_missing_source_raises(tmp_path):
    with pytest.raises(FileFormatError, match="report source not found"):
        write_report(tmp_path / "absent.json", tmp_path / "out")


def test_report_unknown_kind_raises(tmp_path):
    source = tmp_path / "other.json"
    source.write_text(json.dumps({"kind": "inventory"}))

    with pytest.raises(FileFormatError, match="kind is 'inventory'"):
        write_report(source, tmp_path / "out")


def test_report_changed_profile_raises(real_files, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(real_files["plan"].parent, folder)
    changed = json.loads((folder / "profile.json").read_text())
    changed["clean"]["correct"] -= 1
    write_record(changed, "profile", folder / "profile.json")

    with pytest.raises(SettingsError, match="changed since the plan was made"):
        write_report(folder / "plan.json", tmp_path / "out")


def test_report_out_dir_is_a_file_raises(real_files, tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("")

    with pytest.raises(SettingsError, match="cannot create the report folder"):
        write_report(real_files["profile"], blocker)


def test_report_without_matplotlib_raises(real_files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail

    with pytest.raises(SettingsError, match="pip install 'wnplan\\[report\\]'"):
        write_report(real_files["profile"], tmp_path)


# --- terminal chart ---


def test_terminal_chart_fits_80_columns(real_files):
    record = json.loads(real_files["profile"].read_text())

    chart = terminal_chart(record)

    lines = chart.splitlines()
    assert max(len(line) for line in lines) <= 80
    for site in record["sites"]:
        assert any(line.startswith(f"{site['index']} ") for line in lines)
    assert any(line.startswith("global") for line in lines)


def test_terminal_chart_bars_are_log_scaled():
    record = synthetic_profile()
    for index, midpoint in enumerate((0.1, 1.0, 10.0)):
        site = record["sites"][index]
        site["name"] = f"s{index}"
        exact = {"status": "ok", "midpoint": midpoint, "midpoint_error": 0.01}
        exact |= {"lower_bound": False, "upper_bound": False}
        site["walking"]["fit"] = site["walking"]["fit"] | exact
    record["sites"] = record["sites"][:3]
    record["global"] = None

    lines = {line.split()[0]: line for line in terminal_chart(record).splitlines() if line[:1].isdigit()}

    lengths = [sum(char in "█▏▎▍▌▋▊▉" for char in lines[str(index)]) for index in range(3)]
    assert lengths[0] < lengths[1] < lengths[2]
    assert abs((lengths[2] - lengths[1]) - (lengths[1] - lengths[0])) <= 1  # equal steps per decade


def test_terminal_chart_marks_bounds_and_missing():
    record = synthetic_profile()

    lines = terminal_chart(record).splitlines()

    robust = next(line for line in lines if line.startswith("1 robust_site"))
    sensitive = next(line for line in lines if line.startswith("2 sensitive_site"))
    failed = next(line for line in lines if line.startswith("4 dead_site"))
    assert "▶" in robust
    assert "> " in robust
    assert "◀" in sensitive
    assert "no µ (failed)" in failed


def test_terminal_chart_tags_modes_when_both():
    chart = terminal_chart(synthetic_profile("both"))

    assert any(" I █" in line or " I ▏" in line for line in chart.splitlines())
    assert any(" T █" in line for line in chart.splitlines())
    assert max(len(line) for line in chart.splitlines()) <= 80


def test_terminal_chart_narrow_width_raises():
    with pytest.raises(SettingsError, match="invalid chart width 20"):
        terminal_chart(synthetic_profile(), width=20)


# --- the page in a real browser ---


def _browser_or_skip() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("headless Chromium is not installed: apt-get install chromium chromium-driver")
    pytest.importorskip("selenium", reason="selenium is not installed: pip install selenium")
    return chromium, driver


def test_report_page_renders_in_chromium(extras_report, tmp_path, monkeypatch):
    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _, paths, _ = extras_report
    page = paths[-1]
    figures = sum(1 for path in paths if path.suffix == ".png")

    # Selenium Manager must not look for drivers online: both paths are given, and it stays offline.
    monkeypatch.setenv("SE_OFFLINE", "true")
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--host-resolver-rules=MAP * ~NOTFOUND"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        browser.get(page.resolve().as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(image => [image.complete, image.naturalWidth, image.alt]);"
        )
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        title = browser.title
    finally:
        browser.quit()

    assert len(images) == figures
    assert [alt for complete, width, alt in images if not complete or width <= 0] == []
    assert errors == []
    assert title.startswith("wnplan report")


def test_report_binarization_skips_undecided_points():
    decided = binarization_record(0.8, 0.795, 0.79, (0.5, 1.0), (0.5, 1.0), 0.1)
    at_chance = binarization_record(0.1, 0.1, 0.1, (0.5, 1.0), (0.5, 1.0), 0.1)
    points = tuple({"sigma": sigma, "records": [{"binarization": test}]}
                   for sigma, test in ((1.0, decided), (100.0, at_chance)))
    curve = CurveData(np.array([1.0, 100.0]), np.array([0.8, 0.1]), np.zeros(2), {}, points)

    sigma, test = last_binarization(curve)

    assert sigma == 1.0
    assert test["binarizes"] is True
