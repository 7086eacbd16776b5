"""Train the example classifiers and export each one as `.pt2`, `.onnx` and a state dict.

Run from the repository root:

    python examples/train.py                      # train all five on Fashion-MNIST
    python examples/train.py --skip-existing      # keep models whose files exist already
    python examples/train.py --models mlp,lenet5 --epochs 10

For every model NAME the output folder receives `NAME.pt2` (torch.export, dynamic batch),
`NAME.onnx` (TorchScript-based exporter, opset 17, with `wnplan.data` and `wnplan.normalize`
metadata), `NAME.pt2.json` (the sidecar that declares the data for the `.pt2`) and `NAME.pt`
(the state dict for `examples.architectures:NAME`). `models.json` summarises all of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # `examples` is not an installed package, so a run as a script needs the repository root.
    sys.path.insert(0, str(REPO_ROOT))

from examples.architectures import ARCHITECTURES  # noqa: E402
from wnplan.data import FASHION_MNIST_DIR, Dataset, load_data  # noqa: E402

logger = logging.getLogger("examples.train")

DEFAULT_EPOCHS = 5
DEFAULT_OUT = REPO_ROOT / "examples" / "models"
NORMALIZE = (0.5, 0.5)
NORMALIZE_TEXT = "0.5,0.5"
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
ONNX_OPSET = 17
EXPORT_TOLERANCE = 1e-4
EVAL_BATCH_SIZE = 1000
CHECK_SAMPLES = 16
OUTPUT_SUFFIXES = (".pt2", ".onnx", ".pt2.json", ".pt")


class ExportCheckError(RuntimeError):
    """An exported model does not reproduce the logits of the trained torch module."""


@dataclass(frozen=True)
class DataChoice:
    """Training and evaluation data specifications, as `wnplan.data.load_data` reads them."""

    train: str
    test: str


@dataclass(frozen=True)
class TrainedModel:
    """A trained model with the numbers recorded beside its files.

    Attributes:
        name: the architecture name, a key of `ARCHITECTURES`.
        module: the trained module, in eval mode.
        test_accuracy: top-1 accuracy of the torch module on the test data, in [0, 1].
    """

    name: str
    module: nn.Module
    test_accuracy: float


def choose_data(name: str | None) -> DataChoice:
    """Pick the data sets: `fashion-mnist`, `digits`, or None for Fashion-MNIST when installed.

    Raises:
        ValueError: `name` is neither `fashion-mnist`, `digits` nor None.
    """
    if name is None:
        if FASHION_MNIST_DIR.is_dir():
            name = "fashion-mnist"
        else:
            logger.warning(
                "Fashion-MNIST is missing at %s, so the models train on scikit-learn's digits",
                FASHION_MNIST_DIR,
            )
            name = "digits"
    if name not in ("fashion-mnist", "digits"):
        raise ValueError(f"unknown data {name!r}: expected fashion-mnist or digits")
    return DataChoice(train=f"{name}:train", test=f"{name}:test")


def load_split(spec: str, limit: int | None = None) -> Dataset:
    """Load one split scaled to [0, 1] and then normalized with mean 0.5, std 0.5 to [−1, 1]."""
    return load_data(spec, normalize=NORMALIZE, limit=limit)


def train_model(name: str, train_set: Dataset, test_set: Dataset, epochs: int, seed: int) -> TrainedModel:
    """Train one architecture with Adam and a cosine learning-rate schedule.

    Args:
        name: a key of `ARCHITECTURES`.
        train_set: samples (N, 1, 28, 28), float32, and labels (N,).
        test_set: data on which the returned test accuracy is measured.
        epochs: passes over `train_set`.
        seed: seeds the weight initialisation and the shuffling order.
    """
    torch.manual_seed(seed)
    model = ARCHITECTURES[name]()
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(train_set.x)
    y = torch.from_numpy(train_set.y)
    batches_per_epoch = (len(train_set) + BATCH_SIZE - 1) // BATCH_SIZE

    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * batches_per_epoch)
    loss_function = nn.CrossEntropyLoss()

    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_set), generator=generator)
        total_loss = 0.0
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_function(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        logger.info(
            "%s: epoch %d/%d, training loss %.4f",
            name,
            epoch + 1,
            epochs,
            total_loss / len(train_set),
        )

    model.eval()
    accuracy = torch_accuracy(model, test_set)
    return TrainedModel(name, model, accuracy)


def torch_accuracy(model: nn.Module, dataset: Dataset) -> float:
    """Return the top-1 accuracy of `model` on `dataset`, in [0, 1]."""
    logits = np.concatenate([_torch_logits(model, chunk) for chunk in _chunks(dataset.x)], axis=0)
    return _accuracy(logits, dataset.y)


def onnx_accuracy(path: Path, dataset: Dataset) -> float:
    """Return the top-1 accuracy of the ONNX model at `path` run by onnxruntime."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(["logits"], {"input": chunk})[0] for chunk in _chunks(dataset.x)], axis=0)
    return _accuracy(logits, dataset.y)


def export_model(
    trained: TrainedModel,
    out_dir: Path,
    data: DataChoice,
    epochs: int,
    seed: int,
    example: torch.Tensor,
) -> dict[str, Any]:
    """Write the four files of one model into `out_dir` and return its sidecar record.

    The files are written into a temporary folder inside `out_dir` and then moved into place,
    so an interrupted run never leaves a partial file that `--skip-existing` would keep.

    Args:
        trained: the trained model, in eval mode.
        out_dir: destination folder, created when missing.
        data: the data the model was trained and tested on.
        epochs: training epochs, recorded in the sidecar.
        seed: training seed, recorded in the sidecar.
        example: a batch (N, 1, 28, 28) with N >= 2, used to trace the model.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    name = trained.name
    model = trained.module.eval()
    sidecar = {
        "architecture": f"examples.architectures:{name}",
        "data": data.test,
        "epochs": epochs,
        "exporter": {
            "onnx": {
                "function": "torch.onnx.export",
                "dynamo": False,
                "opset": ONNX_OPSET,
                "mode": "eval",
                "dynamic_axes": {"input": [0], "logits": [0]},
            },
            "pt2": {"function": "torch.export.export", "dynamic_dims": {"input": [0]}},
            "torch": torch.__version__,
        },
        "normalize": NORMALIZE_TEXT,
        "seed": seed,
        "test_accuracy": trained.test_accuracy,
        "train_data": data.train,
    }

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{name}-") as staging_text:
        staging = Path(staging_text)
        _export_pt2(model, example, staging / f"{name}.pt2")
        _export_onnx(model, example, staging / f"{name}.onnx", data.test)
        torch.save(model.state_dict(), staging / f"{name}.pt")
        _write_json(staging / f"{name}.pt2.json", sidecar)
        for suffix in OUTPUT_SUFFIXES:
            os.replace(staging / f"{name}{suffix}", out_dir / f"{name}{suffix}")
    return sidecar


def _export_pt2(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, data_spec: str) -> None:
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated since torch 2.9 and warns on every call.
        # It is used on purpose because it folds Conv+BatchNorm in eval mode.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )

    graph = onnx.load(str(path))
    declared = {"wnplan.data": data_spec, "wnplan.normalize": NORMALIZE_TEXT}
    kept = [prop for prop in graph.metadata_props if prop.key not in declared]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    for key, value in declared.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))


def verify_exports(model: nn.Module, out_dir: Path, name: str, samples: np.ndarray) -> None:
    """Check that the saved `.onnx` and `.pt2` reproduce the torch logits on `samples`.

    Both exports are run on the whole batch and on a single sample, so the dynamic batch
    dimension is exercised too.

    Raises:
        ExportCheckError: a logit differs from the torch module's by more than 1e-4.
    """
    session = ort.InferenceSession(str(out_dir / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    program = torch.export.load(out_dir / f"{name}.pt2").module()
    for batch in (samples, samples[:1]):
        expected = _torch_logits(model, batch)
        from_onnx = session.run(["logits"], {"input": batch})[0]
        with torch.no_grad():
            from_pt2 = program(torch.from_numpy(batch)).numpy()
        for label, actual in (("ONNX", from_onnx), ("pt2", from_pt2)):
            difference = float(np.max(np.abs(actual - expected)))
            if actual.shape != expected.shape or difference > EXPORT_TOLERANCE:
                shapes = f"shape {actual.shape}, expected {expected.shape}"
                raise ExportCheckError(
                    f"{name}: the {label} export differs from the torch model by {difference:.3g}"
                    + f" on a batch of {len(batch)} ({shapes}, tolerance {EXPORT_TOLERANCE})"
                )


def has_all_outputs(out_dir: Path, name: str) -> bool:
    """Return whether all four files of model `name` exist in `out_dir`."""
    return all((out_dir / f"{name}{suffix}").is_file() for suffix in OUTPUT_SUFFIXES)


def write_summary(out_dir: Path, records: dict[str, dict[str, Any]]) -> Path:
    """Merge `records` into `out_dir/models.json`, keeping entries of models not retrained.

    Entries of models that have a sidecar but no entry yet are filled from the sidecar.
    """
    path = out_dir / "models.json"
    models: dict[str, dict[str, Any]] = {}
    if path.is_file():
        try:
            models = dict(json.loads(path.read_text()).get("models", {}))
        except (json.JSONDecodeError, AttributeError):
            logger.warning("%s is not valid JSON, so a new summary replaces it", path)
    for sidecar_path in sorted(out_dir.glob("*.pt2.json")):
        name = sidecar_path.name.removesuffix(".pt2.json")
        if name not in models and name in ARCHITECTURES:
            models[name] = _summary_entry(json.loads(sidecar_path.read_text()), None)
    models.update(records)
    _write_json(path, {"models": models})
    return path


def _summary_entry(sidecar: dict[str, Any], onnx_test_accuracy: float | None) -> dict[str, Any]:
    keys = ("architecture", "data", "epochs", "normalize", "seed", "test_accuracy", "train_data")
    entry = {key: sidecar[key] for key in keys}
    entry["onnx_test_accuracy"] = onnx_test_accuracy
    return entry


def run(
    names: Sequence[str],
    out_dir: Path,
    epochs: int,
    seed: int,
    data: DataChoice,
    skip_existing: bool = False,
    limit: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Train, export and verify each named model, then update `models.json`.

    Args:
        names: keys of `ARCHITECTURES`.
        out_dir: folder that receives the files.
        epochs: training epochs per model.
        seed: seed for initialisation and shuffling, the same for every model.
        data: training and test data specifications.
        skip_existing: leave models whose four files exist already untouched.
        limit: use only the first `limit` training and test samples (for quick runs).

    Returns:
        The `models.json` entry of each model trained in this call.
    """
    pending = [name for name in names if not (skip_existing and has_all_outputs(out_dir, name))]
    for name in names:
        if name not in pending:
            logger.info("%s: all files exist in %s, skipped", name, out_dir)
    if not pending:
        return {}

    train_set = load_split(data.train, limit)
    test_set = load_split(data.test, limit)
    # Four rows (repeated when the test data is smaller) keep torch.export from
    # specialising the batch dimension to 1.
    example = torch.from_numpy(test_set.x[np.arange(4) % len(test_set)])
    check_samples = test_set.x[:CHECK_SAMPLES]

    records: dict[str, dict[str, Any]] = {}
    for name in pending:
        started = time.perf_counter()
        trained = train_model(name, train_set, test_set, epochs, seed)
        sidecar = export_model(trained, out_dir, data, epochs, seed, example)
        verify_exports(trained.module, out_dir, name, check_samples)
        onnx_test_accuracy = onnx_accuracy(out_dir / f"{name}.onnx", test_set)
        records[name] = _summary_entry(sidecar, onnx_test_accuracy)
        logger.info(
            "%s: test accuracy %.4f (torch), %.4f (ONNX), %.1f s",
            name,
            trained.test_accuracy,
            onnx_test_accuracy,
            time.perf_counter() - started,
        )

    write_summary(out_dir, records)
    return records


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line of this script."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default=",".join(ARCHITECTURES),
        help=f"comma-separated architectures to train (default: {','.join(ARCHITECTURES)})",
    )
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs per model")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip models whose .pt2, .onnx, .pt2.json and .pt files all exist",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation and shuffling")
    parser.add_argument(
        "--data",
        choices=("fashion-mnist", "digits"),
        default=None,
        help="training data (default: fashion-mnist, or digits when Fashion-MNIST is missing)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only the first N training and test samples (quick runs)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: the number of CPU cores)",
    )
    args = parser.parse_args(argv)

    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in names if name not in ARCHITECTURES]
    if unknown or not names:
        parser.error(f"invalid --models {args.models!r}: choose from {', '.join(ARCHITECTURES)}")
    args.models = names
    if args.epochs < 1:
        parser.error(f"invalid --epochs {args.epochs}: expected a positive number")
    if args.limit is not None and args.limit < 1:
        parser.error(f"invalid --limit {args.limit}: expected a positive number of samples")
    if args.threads is not None and args.threads < 1:
        parser.error(f"invalid --threads {args.threads}: expected a positive number")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    started = time.perf_counter()
    run(
        args.models,
        args.out,
        args.epochs,
        args.seed,
        choose_data(args.data),
        skip_existing=args.skip_existing,
        limit=args.limit,
    )
    logger.info("done in %.1f s, files in %s", time.perf_counter() - started, args.out)
    return 0


def _chunks(x: np.ndarray) -> list[np.ndarray]:
    return [x[start : start + EVAL_BATCH_SIZE] for start in range(0, len(x), EVAL_BATCH_SIZE)]


def _torch_logits(model: nn.Module, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(batch)).numpy()


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def _write_json(path: Path, content: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(content, indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(temporary, path)


if __name__ == "__main__":
    sys.exit(main())
