"""The `wnplan` command line: sites, profile, allocate, check.

Results go to stdout (tables, or JSON with --json) and to the named files; diagnostics and
progress bars go to stderr. Exit codes: 0 success, 1 when `check` finds that the plan misses
its target, 2 for bad input or usage (one line on stderr, no traceback, no output file).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from typer.exceptions import TyperException

from wnplan import records, runtime
from wnplan._version import __version__
from wnplan.errors import SettingsError, WnplanError
from wnplan.noise import NOISE_KINDS, NOISE_ORDERS, NoiseSpec
from wnplan.store import DEFAULT_STORE

logger = logging.getLogger("wnplan")

# More threads than this is a typo rather than a machine; onnxruntime fails to start with 100,000.
MAX_THREADS = 1024
TRAINED_PROFILE_WARNING = (
    "%s holds noise-trained curves: the plan follows the µ of models fine-tuned with noise, while "
    + "the search and `wnplan check` run the model file as it is. To deploy that model, allocate from "
    + "an inference-mode profile"
)

stdout = Console()
stderr = Console(stderr=True)

app = typer.Typer(
    name="wnplan",
    help="Per-layer noise robustness profiles and deployment plans for noisy (analog) accelerators.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"wnplan {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details to stderr.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=stderr, show_path=False, show_time=False)],
    )


ModelArgument = Annotated[Path, typer.Argument(help="Model file: .onnx, .pt2, or a state dict with --factory.")]
FactoryOption = Annotated[
    str | None, typer.Option(help="package.module:function that builds the architecture of a state dict.")
]
TrustOption = Annotated[
    bool, typer.Option("--trust", help="Load files that can run code: pickled modules, and .pt2 programs without wnplan's safety checks.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
DeviceOption = Annotated[
    str,
    typer.Option(
        help="Where models run: cpu, or cuda (torch on the GPU; ONNX on onnxruntime's CUDAExecutionProvider). Noise is drawn on the CPU for both."
    ),
]


@app.command()
def sites(
    model: ModelArgument,
    data: Annotated[str | None, typer.Option(help="Data, needed only for state dicts.")] = None,
    factory: FactoryOption = None,
    trust: TrustOption = False,
    as_json: JsonOption = False,
) -> None:
    """List the noise sites of a model: index, name, op, output shape and parameter count."""
    from wnplan.models import load_model
    from wnplan.profiler import resolve_data

    sample = None
    if factory is not None or trust or data is not None:
        sample = resolve_data(model, data, None, 2).x
    loaded = load_model(model, factory=factory, trust=trust, sample=sample)
    if as_json:
        stdout.print_json(json.dumps([site.to_dict() for site in loaded.sites]))
        return
    table = Table(title=f"{len(loaded.sites)} sites of {model}")
    for column in ("index", "name", "op", "shape", "parameters"):
        table.add_column(column, justify="right" if column in ("index", "parameters") else "left")
    for site in loaded.sites:
        table.add_row(str(site.index), site.name, site.op, "×".join(map(str, site.shape)), str(site.parameters))
    stdout.print(table)


def _parse_sigmas(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    parts = text.split(",")
    try:
        if any(not part.strip() for part in parts):
            raise ValueError("empty entry")
        return tuple(float(part) for part in parts)
    except ValueError:
        raise SettingsError(f"invalid --sigmas {text!r}: expected comma-separated numbers such as 0.01,0.1,1") from None


@app.command()
def profile(
    ctx: typer.Context,
    model: ModelArgument,
    data: Annotated[
        str | None,
        typer.Option(
            help="Evaluation data: a .npz file (x, y), an IDX folder, fashion-mnist[:test|:train] or digits[:test|:train]. Default: the model's declared data."
        ),
    ] = None,
    noise: Annotated[str, typer.Option(help=f"Noise kind: {', '.join(NOISE_KINDS)}.")] = "additive",
    order: Annotated[str, typer.Option(help=f"Order of mixed noise: {', '.join(NOISE_ORDERS)}.")] = "mul-first",
    mix_ratio: Annotated[float, typer.Option(help="Mixed noise ratio r: σ_add = A·r, σ_mul = A·(1−r).")] = 0.5,
    scope: Annotated[
        str,
        typer.Option(
            help="walking (one site at a time), global (all sites at once) or both. The global midpoint is check's default σ."
        ),
    ] = "both",
    sites_selection: Annotated[
        str | None,
        typer.Option(
            "--sites",
            help="Sites for walking noise: indices, ranges (2-5), names or op types, comma-separated. Default: all.",
        ),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            help="inference: the clean-trained model runs with noise; trained: each point fine-tunes (or trains) a copy with that noise; both."
        ),
    ] = "inference",
    train_data: Annotated[
        str | None,
        typer.Option(
            help="Trained mode: training data, in the forms of --data. Default: the :train split of a built-in --data."
        ),
    ] = None,
    train_limit: Annotated[
        int | None, typer.Option(help="Trained mode: use only the first N training samples.")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Trained mode: epochs per trained model.")] = 1,
    lr: Annotated[float, typer.Option(help="Trained mode: (peak) learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Trained mode: samples per training step.")] = 128,
    optimizer: Annotated[str, typer.Option(help="Trained mode: adam or sgd.")] = "adam",
    schedule: Annotated[str, typer.Option(help="Trained mode: cosine or none.")] = "cosine",
    from_scratch: Annotated[
        bool,
        typer.Option("--from-scratch", help="Trained mode: re-initialise the weights instead of fine-tuning them."),
    ] = False,
    clamp_weights: Annotated[
        float | None,
        typer.Option(
            help="Trained mode: clamp conv/linear weights (not BatchNorm, not biases) to [−C, C] after each step."
        ),
    ] = None,
    grad: Annotated[
        str, typer.Option(help="Trained mode: forward-only (noise ignored by the backward pass) or autograd.")
    ] = "forward-only",
    repeats: Annotated[int, typer.Option(help="Independent noise draws per σ.")] = 3,
    sigmas: Annotated[
        str | None, typer.Option(help="σ values to run exactly, comma-separated. Default: an adaptive log grid.")
    ] = None,
    relative: Annotated[
        str | None, typer.Option(help="Make σ relative to each site's clean rms or range. Default: absolute σ.")
    ] = None,
    fit_space: Annotated[str, typer.Option(help="Fit the logistic in σ (linear) or in log10 σ (log).")] = "log",
    global_include_norm: Annotated[
        bool, typer.Option("--global-include-norm", help="Also put global noise on normalization (BatchNorm) sites.")
    ] = False,
    screen_samples: Annotated[
        int,
        typer.Option(
            help="Adaptive grid, inference curves: locate each curve's fall on this many evenly spread samples first; 0 uses all data."
        ),
    ] = 1000,
    target_error: Annotated[
        float,
        typer.Option(
            help="Adaptive grid, inference curves: add repeats near µ until its sampling error (the standard error without the fit's "
            + "misfit factor) is below this fraction of µ; 0 turns it off."
        ),
    ] = 0.05,
    max_trials: Annotated[int, typer.Option(help="The most trials one curve (site or global) may run.")] = 200,
    grid: Annotated[
        bool,
        typer.Option(
            "--grid",
            help="With --noise mixed and --sites: map accuracy over σ_mul × σ_add (log grids, both orders) instead of curves.",
        ),
    ] = False,
    normalize: Annotated[
        str | None,
        typer.Option(help="MEAN,STD applied after scaling images to [0, 1]. Default: the model's declaration."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N samples.")] = None,
    seed: Annotated[
        int, typer.Option(help="Base seed; each trial's noise derives from it and the trial's identity.")
    ] = 0,
    out: Annotated[Path, typer.Option(help="Profile file to write.")] = records.DEFAULT_PATHS["profile"],
    store: Annotated[
        str, typer.Option(help="SQLite store of finished trials, for resuming; none keeps results in memory only.")
    ] = str(DEFAULT_STORE),
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore stored results and measure again.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the trial count and an estimated time (a JSON object with --json), then stop.")
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            help="Threads for onnxruntime and torch. Default: the libraries' own; 1 per worker with --workers."
        ),
    ] = None,
    device: DeviceOption = "cpu",
    workers: Annotated[
        int,
        typer.Option(
            help="Run trials in N local worker processes (0: in this process); with --ray, the number of Ray workers."
        ),
    ] = 0,
    ray: Annotated[
        str | None,
        typer.Option(
            help="Run trials on a Ray cluster: auto (join a running one), local (start one on 127.0.0.1), or HOST:PORT."
        ),
    ] = None,
    factory: FactoryOption = None,
    trust: TrustOption = False,
    as_json: JsonOption = False,
) -> None:
    """Measure how much noise each site (and the whole model) tolerates; write a profile."""
    from wnplan.profiler import (
        Execution,
        ProfileSettings,
        check_in_process,
        check_trainable,
        clean_accuracy,
        count_trials,
        load_model_and_data,
        load_training_data,
    )
    from wnplan.profiler import profile as run_profile

    _set_threads(threads)
    records.check_output_path(out)
    # Check the name first, so that an unknown name is reported as unknown, not as trained mode's cpu-only rule.
    runtime.check_device(device)
    spec = NoiseSpec(noise, order, mix_ratio, relative or "absolute")
    settings = ProfileSettings(
        noise=spec,
        scope=scope,
        sites=sites_selection,
        mode=mode,
        repeats=repeats,
        sigmas=_parse_sigmas(sigmas),
        seed=seed,
        fit_space=fit_space,
        global_include_norm=global_include_norm,
        maps=grid,
        screen_samples=screen_samples,
        target_error=target_error,
        max_trials=max_trials,
        training=_training_settings(
            mode, epochs, lr, batch_size, optimizer, schedule, from_scratch, clamp_weights, grad, train_limit, device
        ),
        train_data=train_data,
    )
    if mode == "inference":
        _warn_unused_training_options(ctx)
    _set_device(device, model.suffix.lower().lstrip("."))
    if dry_run:
        loaded, dataset = load_model_and_data(model, data, normalize, limit, factory, trust)
        trials, exact = count_trials(loaded, settings)
        approx = "" if exact else "about "
        estimate = {"trials": trials, "exact": exact, "samples": len(dataset), "estimated_seconds": None}
        if settings.mode != "inference":
            import numpy as np

            _, classes = clean_accuracy(loaded, dataset.subset(np.arange(min(len(dataset), 64)), ":dry-run"))
            check_in_process(Execution(workers=workers, ray=ray, factory=factory, trust=trust))
            load_training_data(settings, dataset, normalize, classes)
            check_trainable(loaded, settings)
            # NOTE: the estimate times one forward pass per trial and cannot predict training time.
            message = (
                f"{approx}{trials} trials on {len(dataset)} samples; each trained model trains "
                + f"{settings.training.epochs} epoch(s) first, which this estimate leaves out, so no time is given"
            )
        else:
            seconds = _estimate_seconds(loaded, dataset) * trials
            estimate["estimated_seconds"] = seconds
            message = f"{approx}{trials} trials on {len(dataset)} samples; estimated time {approx}{seconds:.0f} s"
        if as_json:
            stdout.print_json(json.dumps(estimate))
        else:
            stdout.print(message)
        return

    _interrupted_note["text"] = (
        "nothing was kept (--store none)" if store == "none"
        else f"finished trials are kept in the store {store}, and the same command resumes from them"
    )
    with _progress("profiling") as advance:
        record = run_profile(
            model,
            data,
            settings,
            normalize=normalize,
            limit=limit,
            factory=factory,
            trust=trust,
            store=None if store == "none" else store,
            fresh=fresh,
            progress=advance,
            execution=Execution(workers=workers, ray=ray, factory=factory, trust=trust),
        )
    records.write_record(record, "profile", out)
    if as_json:
        stdout.print_json(records.dumps(record))
    else:
        _print_profile(record)
        stderr.print(f"wrote {out}")


def _training_settings(
    mode, epochs, lr, batch_size, optimizer, schedule, from_scratch, clamp_weights, grad, train_limit, device
):
    from wnplan.train.trainer import TrainingSettings

    # Built in every mode, so that a bad training option is reported even where it is unused.
    settings = TrainingSettings(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        optimizer=optimizer,
        schedule=schedule,
        from_scratch=from_scratch,
        clamp_weights=clamp_weights,
        grad=grad,
        train_limit=train_limit,
        device=device if mode != "inference" else "cpu",
    )
    return None if mode == "inference" else settings


# Options that only trained mode reads, by their parameter names in `profile`.
TRAINING_PARAMETERS = (
    "train_data", "train_limit", "epochs", "lr", "batch_size", "optimizer", "schedule", "from_scratch",
    "clamp_weights", "grad",
)


def _warn_unused_training_options(ctx: typer.Context) -> None:
    """Log a warning naming the training options given on the command line of an inference-only profile."""
    passed = [
        f"--{name.replace('_', '-')}" for name in TRAINING_PARAMETERS
        if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"
    ]
    if passed:
        logger.warning(
            "%s %s only to trained mode and %s ignored; pass --mode trained or --mode both to train",
            ", ".join(passed), "applies" if len(passed) == 1 else "apply", "is" if len(passed) == 1 else "are",
        )


def _estimate_seconds(loaded, dataset) -> float:
    import time

    sample = dataset.x[: min(len(dataset), 512)]
    started = time.perf_counter()
    loaded.run(sample)
    per_sample = (time.perf_counter() - started) / sample.shape[0]
    return per_sample * len(dataset)


def _print_profile(record: dict) -> None:
    clean = record["clean"]
    table = Table(
        title=f"{record['model']['path']}: clean accuracy {clean['accuracy']:.4f} on {clean['samples']} samples"
    )
    both = record["settings"]["mode"] == "both"
    main = "trained µ" if record["settings"]["mode"] == "trained" else "µ"
    columns = ["site", "name", "op", main, "± error", "status"]
    if both:
        columns += ["trained µ", "± error ", "trained status"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("name", "op", "status", "trained status") else "right")
    for site in record["sites"]:
        if site["walking"] is None:
            continue
        cells = [*_fit_cells(site["walking"]["fit"])]
        if both:
            cells += [*_fit_cells(site["trained"]["fit"])] if site.get("trained") else ["—", "—", ""]
        table.add_row(str(site["index"]), site["name"], site["op"], *cells)
    if record["global"] is not None:
        cells = [*_fit_cells(record["global"]["fit"])]
        if both:
            trained = record["global"].get("trained")
            cells += [*_fit_cells(trained["fit"])] if trained else ["—", "—", ""]
        table.add_row("all", "global", "", *cells)
    if table.row_count:
        stdout.print(table)
    for grid in record.get("maps", []):
        stdout.print(_map_table(grid))


def _map_table(grid: dict) -> Table:
    table = Table(
        title=f"mixed noise at site {grid['site']} ({grid['name']}), {grid['order']}: accuracy, rows σ_mul, columns σ_add"
    )
    table.add_column("σ_mul \\ σ_add", justify="right")
    for add in grid["sigma_add"]:
        table.add_column(f"{add:g}", justify="right")
    for mul, row in zip(grid["sigma_mul"], grid["accuracy"], strict=True):
        table.add_row(f"{mul:g}", *(f"{value:.2f}" for value in row))
    return table


def _fit_cells(fit: dict) -> tuple[str, str, str]:
    midpoint = fit.get("midpoint")
    error = fit.get("midpoint_error")
    prefix = ">" if fit.get("lower_bound") else "<" if fit.get("upper_bound") else ""
    shown = "—" if midpoint is None else f"{prefix}{midpoint:.4g}"
    return shown, "—" if error is None else f"{error:.2g}", fit["status"]


AcceleratorOption = Annotated[
    str | None,
    typer.Option("--accelerator", help="Accelerator profile: a shipped name (see `wnplan profiles`) or a TOML file."),
]


@app.command()
def allocate(
    profile_path: Annotated[Path, typer.Argument(metavar="[PROFILE]", help="Profile file.")] = records.DEFAULT_PATHS[
        "profile"
    ],
    budget: Annotated[int, typer.Option(help="Total executions over the unshielded profiled sites.")] = ...,
    method: Annotated[
        str,
        typer.Option(
            help="optimal: predicted optimum refined by simulation; paper: executions ∝ 1/µ; uniform: as even as possible."
        ),
    ] = "optimal",
    accelerator: AcceleratorOption = None,
    max_drop: Annotated[
        float, typer.Option(help="Accepted accuracy drop of the whole model for bit-width hints (fraction).")
    ] = 0.01,
    shield: Annotated[
        str, typer.Option(help="none, auto, or sites to run noise-free (indices, names or op types, comma-separated).")
    ] = "none",
    max_shielded: Annotated[int, typer.Option(help="The most sites --shield auto may shield.")] = 2,
    min_accuracy: Annotated[
        float | None, typer.Option(help="Predicted accuracy (fraction) that --shield auto aims for.")
    ] = None,
    min_executions: Annotated[int, typer.Option(help="Fewest executions of an unshielded site.")] = 1,
    max_executions: Annotated[
        int | None, typer.Option(help="Most executions of one site. Default: the budget.")
    ] = None,
    search_budget: Annotated[
        float,
        typer.Option(
            help="Seconds the optimal method may spend simulating candidate plans; 0 keeps the predicted optimum."
        ),
    ] = 60.0,
    search_repeats: Annotated[int, typer.Option(help="Noise draws per candidate plan in the search.")] = 8,
    seed: Annotated[int, typer.Option(help="Base seed of the search's noise draws.")] = 0,
    out: Annotated[Path, typer.Option(help="Plan file to write.")] = records.DEFAULT_PATHS["plan"],
    threads: Annotated[int | None, typer.Option(help="Threads for onnxruntime and torch.")] = None,
    device: DeviceOption = "cpu",
    as_json: JsonOption = False,
) -> None:
    """Spread a budget of executions over the profiled sites, hint bit widths, shield sites; write a plan."""
    from wnplan.accelerator import load_accelerator
    from wnplan.plan import AllocationSettings
    from wnplan.plan import allocate as run_allocate

    _set_threads(threads)
    records.check_output_path(out)
    profile_record = records.read_record(profile_path, "profile")
    _set_device(device, profile_record["model"]["format"])
    if profile_record["settings"].get("mode") == "trained":
        logger.warning(TRAINED_PROFILE_WARNING, profile_path)
    settings = AllocationSettings(
        budget=budget,
        method=method,
        accelerator=load_accelerator(accelerator) if accelerator else None,
        max_drop=max_drop,
        shield=shield,
        max_shielded=max_shielded,
        min_accuracy=min_accuracy,
        min_executions=min_executions,
        max_executions=max_executions,
        search_budget=search_budget,
        search_repeats=search_repeats,
        seed=seed,
    )
    with _progress("searching") as advance:
        plan = run_allocate(
            profile_record, settings, profile_path=profile_path, progress=lambda done: advance(done, None)
        )
    records.write_record(plan, "plan", out)
    if as_json:
        stdout.print_json(records.dumps(plan))
        return
    _print_plan(plan)
    stderr.print(f"wrote {out}")


def _print_plan(plan: dict) -> None:
    predicted = plan["predicted_accuracy"]
    title = f"{plan['method']} plan, budget {plan['budget']}"
    if predicted is not None:
        title += f", predicted accuracy {predicted:.4f}"
    table = Table(title=title)
    for column in ("site", "name", "op", "µ", "executions", "bits", "predicted", "shield"):
        table.add_column(column, justify="left" if column in ("name", "op", "shield") else "right")
    for site in plan["sites"]:
        predicted_site = site.get("predicted_accuracy")
        bits = site["bits"].get("bits")
        table.add_row(
            str(site["index"]),
            site["name"],
            site["op"],
            f"{site['midpoint']:.4g}",
            str(site["executions"]),
            "—" if bits is None else str(bits),
            "—" if predicted_site is None else f"{predicted_site:.4f}",
            site.get("shield_reason", "") if site["shield"] else "",
        )
    stdout.print(table)


@app.command()
def check(
    plan_path: Annotated[Path, typer.Argument(metavar="[PLAN]", help="Plan file.")] = records.DEFAULT_PATHS["plan"],
    accelerator: AcceleratorOption = None,
    sigma: Annotated[
        float | None,
        typer.Option(
            help="Without --accelerator: σ before averaging, in the profile's reference. Default: the profile's global midpoint."
        ),
    ] = None,
    quantize: Annotated[
        bool, typer.Option("--quantize", help="Fake-quantize each unshielded site at its hinted bit width.")
    ] = False,
    repeats: Annotated[int, typer.Option(help="Noise draws per allocation.")] = 10,
    min_accuracy: Annotated[
        float | None, typer.Option(help="Fail (exit 1) when the plan's accuracy is below this fraction.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Base seed of the noise draws.")] = 0,
    out: Annotated[Path, typer.Option(help="Check file to write.")] = records.DEFAULT_PATHS["check"],
    threads: Annotated[int | None, typer.Option(help="Threads for onnxruntime and torch.")] = None,
    device: DeviceOption = "cpu",
    as_json: JsonOption = False,
) -> None:
    """Simulate the noisy accelerator: the plan against uniform, paper and clean; write the results."""
    from wnplan.accelerator import load_accelerator
    from wnplan.simulate import check as run_check

    _set_threads(threads)
    records.check_output_path(out)
    plan = records.read_record(plan_path, "plan")
    _set_device(device, plan["profile"]["model"]["format"])
    accelerator_profile = load_accelerator(accelerator) if accelerator else None
    total = 3 * repeats
    with _progress("checking", total=total) as advance:
        done = [0]

        def step() -> None:
            done[0] += 1
            advance(done[0], total)

        result = run_check(
            plan,
            accelerator=accelerator_profile,
            sigma=sigma,
            quantize=quantize,
            repeats=repeats,
            seed=seed,
            min_accuracy=min_accuracy,
            plan_path=plan_path,
            progress=step,
        )
    records.write_record(result, "check", out)
    if as_json:
        stdout.print_json(records.dumps(result))
    else:
        _print_check(result)
        stderr.print(f"wrote {out}")
    if not result["verdict"]["passed"]:
        stderr.print(f"check failed: {result['verdict']['reason']}")
        raise typer.Exit(1)


@app.command("profiles")
def list_profiles(as_json: JsonOption = False) -> None:
    """List the shipped accelerator profiles."""
    from wnplan.accelerator import list_accelerators

    accelerators = list_accelerators()
    if as_json:
        stdout.print_json(json.dumps([accelerator.to_dict() for accelerator in accelerators]))
        return
    table = Table(title="accelerator profiles (use with --accelerator NAME)")
    for column in ("name", "noise", "σ_add", "σ_mul", "reference", "bits", "description"):
        table.add_column(column)
    for accelerator in accelerators:
        noise = accelerator.kind + (f" ({accelerator.order})" if accelerator.kind == "mixed" else "")
        table.add_row(
            accelerator.name,
            noise,
            f"{accelerator.sigma_add:g}",
            f"{accelerator.sigma_mul:g}",
            accelerator.reference,
            ",".join(map(str, accelerator.bit_widths)),
            accelerator.description,
        )
    stdout.print(table)


@app.command("export-onnx")
def export_onnx(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan file.")],
    model: Annotated[Path, typer.Argument(metavar="MODEL.onnx", help="The ONNX model the plan was made for.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="ONNX file to write.")] = ...,
) -> None:
    """Write the plan into an ONNX model as per-node metadata (executions, bit hint, shield)."""
    from wnplan.export import export_plan_to_onnx

    plan = records.read_record(plan_path, "plan")
    annotated = export_plan_to_onnx(plan, model, out)
    stderr.print(f"wrote {out} ({annotated} nodes annotated)")


@app.command()
def report(
    source: Annotated[
        Path | None,
        typer.Argument(
            metavar="[FILE]",
            help="A profile, plan or check file. Default: the first of wnplan-check.json, wnplan-plan.json, wnplan-profile.json that exists.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the figures (PNG and SVG) and report.html.")] = Path(
        "wnplan-report"
    ),
    terminal: Annotated[
        bool, typer.Option("--terminal", help="Print a text bar chart of µ per site instead of writing files.")
    ] = False,
) -> None:
    """Draw the profile, plan and check: figures (PNG, SVG) and a self-contained report.html."""
    from wnplan.report import load_sources, terminal_chart, write_report

    if source is None:
        candidates = [records.DEFAULT_PATHS[kind] for kind in ("check", "plan", "profile")]
        source = next((path for path in candidates if path.is_file()), None)
        if source is None:
            raise SettingsError("no wnplan-check.json, wnplan-plan.json or wnplan-profile.json here; pass a FILE")
    if terminal:
        stdout.print(terminal_chart(load_sources(source).profile), markup=False, highlight=False)
        return
    written = write_report(source, out)
    stderr.print(f"wrote {len(written)} files to {out}; open {out / 'report.html'}")


def _print_check(result: dict) -> None:
    settings = result["settings"]
    where = (
        f"σ = {settings['sigma']:.4g} ({settings['sigma_source']})"
        if settings["sigma"] is not None
        else f"accelerator {settings['accelerator']['name']}"
    )
    half = " on the held-out half" if settings.get("data_half") == "odd" else ""
    draws = "1 draw" if settings["repeats"] == 1 else f"{settings['repeats']} draws"
    table = Table(title=f"accuracy at {where}, {draws}{half}")
    for column in ("allocation", "accuracy", "95% interval", "predicted"):
        table.add_column(column, justify="left" if column == "allocation" else "right")
    for name, entry in result["results"].items():
        predicted = entry.get("predicted_accuracy")
        table.add_row(
            name,
            f"{entry['accuracy']:.4f}",
            f"[{entry['ci_low']:.4f}, {entry['ci_high']:.4f}]",
            "—" if predicted is None else f"{predicted:.4f}",
        )
    stdout.print(table)
    stdout.print(("passed: " if result["verdict"]["passed"] else "FAILED: ") + result["verdict"]["reason"])


def _set_threads(threads: int | None) -> None:
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise SettingsError(f"invalid --threads {threads}: expected 1 to {MAX_THREADS}, such as the number of cores")
    runtime.set_threads(threads)


def _set_device(device: str, model_format: str) -> None:
    """Run models on `device`, after checking that it can run models of this format."""
    runtime.set_device(device, "onnx" if model_format == "onnx" else "torch")


class _progress:
    """A rich progress bar on stderr whose total can grow; yields `advance(done, total)`."""

    def __init__(self, description: str, total: int | None = None) -> None:
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            transient=True,
            disable=not stderr.is_terminal and os.environ.get("WNPLAN_PROGRESS") != "1",
        )
        self._task = self._bar.add_task(description, total=total)

    def __enter__(self):
        self._bar.start()
        return lambda done, total: self._bar.update(self._task, completed=done, total=total)

    def __exit__(self, *exc_info: object) -> None:
        self._bar.stop()


INTERRUPTED_MESSAGE = "interrupted"
# What an interrupted run leaves behind. `profile` sets it once its store is chosen.
_interrupted_note = {"text": ""}


def interrupted_message() -> str:
    """Return the message for Ctrl-C: what was interrupted, and what of its work was kept."""
    note = _interrupted_note["text"]
    return f"{INTERRUPTED_MESSAGE}; {note}" if note else INTERRUPTED_MESSAGE


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; turn bad input into one line on stderr and exit code 2."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="wnplan", standalone_mode=False)
    except WnplanError as error:
        _fail(str(error))
    except typer.Exit as exit_request:
        sys.exit(exit_request.exit_code)
    except typer.Abort:
        _fail(interrupted_message(), code=130)
    except TyperException as error:
        if type(error).__name__ == "NoArgsIsHelpError":
            print(error.format_message())
            sys.exit(0)
        _fail(error.format_message())
    except KeyboardInterrupt:
        _fail(interrupted_message(), code=130)
    # Without standalone mode, an Exit raised inside a command comes back as its code.
    code = code if isinstance(code, int) else 0
    if code == 130:
        _fail(interrupted_message(), code=130)
    sys.exit(code)


def _fail(message: str, code: int = 2) -> None:
    text = " ".join(message.split())
    print(f"wnplan: error: {text}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
