"""Model backends behind one interface, and the loader that picks one from the file.

Formats, and whether loading them can run code from the file:

- `.onnx`: run by onnxruntime. An ONNX file is data; external data files are read only from
  the model's folder.
- `.pt2`: a `torch.export` program. `torch.export.load` can run code from the file (shape
  expressions and guards are evaluated as Python, and objects are unpickled), so without
  `trust=True` the archive is checked first (see `pt2_check`) and weights are unpickled
  with torch's restricted `weights_only` unpickler.
- a state dict (`.pt`, `.pth`) with `factory="package.module:function"`, which builds the
  architecture; the weights are read with `weights_only=True`. The factory's own code runs.
- a pickled full module, only with `trust=True`, because unpickling runs arbitrary code.
- TorchScript archives are rejected without being loaded, with or without `trust`.

Models declare their data either in ONNX `metadata_props` (`wnplan.data`, `wnplan.normalize`)
or in a JSON sidecar next to the file (`MODEL.json`, for example `lenet5.pt2.json`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import pickle
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from wnplan.errors import ModelError
from wnplan.models.base import DataDeclaration, Model, Site, Suffix, file_sha256

logger = logging.getLogger(__name__)

__all__ = ["DataDeclaration", "Model", "Site", "Suffix", "load_model", "model_sha256", "read_declaration"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# Exception types that torch.load raises for damaged files, and for pickles that its restricted
# unpickler rejects.
TORCH_LOAD_ERRORS = (
    pickle.UnpicklingError, RuntimeError, ValueError, KeyError, EOFError, TypeError, AttributeError,
    IndexError, OverflowError, RecursionError, OSError, zipfile.BadZipFile, NotImplementedError,
)


def load_model(
    path: str | Path,
    factory: str | None = None,
    trust: bool = False,
    sample: np.ndarray | None = None,
) -> Model:
    """Load a model file into the backend for its format.

    Args:
        path: the model file.
        factory: `package.module:function` that builds the architecture, for state dicts.
        trust: allow unpickling a full module (runs code from the file).
        sample: a batch of input samples, shape (N, ...); needed to export state-dict and
            pickled modules, whose input shape the file does not record. ONNX models with
            dynamic dimensions are probed with it.

    Raises:
        ModelError: the file is missing, unreadable, or of an unsupported kind.
        DataError: `sample` does not fit the model's declared input shape.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {str(path)!r}")
    suffix = path.suffix.lower()

    if suffix == ".onnx":
        from wnplan.models.onnx_backend import OnnxModel

        try:
            return OnnxModel(path, sample)
        except UnicodeDecodeError:
            # protobuf raises this when a name or attribute string holds bytes that are not UTF-8.
            raise ModelError(
                f"{path}: not a valid ONNX file (a name or string is not valid UTF-8); re-export the model"
            ) from None
    if suffix == ".pt2":
        return _load_exported(path, trust)
    if suffix in TORCH_SUFFIXES or factory is not None:
        return _load_torch_file(path, factory, trust, sample)
    raise ModelError(
        f"unsupported model file {str(path)!r}: expected .onnx, .pt2 (torch.export), or a state "
        + "dict (.pt/.pth) with --factory module:function"
    )


def model_sha256(path: str | Path) -> str:
    """Return the hash that `load_model(path).sha256` gives, without loading the model.

    It is the sha256 of the file, followed for ONNX models by their external data files.

    Raises:
        ModelError: the file is missing or unreadable, or its external data is.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {str(path)!r}")
    if path.suffix.lower() != ".onnx":
        return file_sha256(path)
    from wnplan.models.onnx_files import content_sha256, external_data_files

    return content_sha256(path, external_data_files(path))


def read_declaration(path: str | Path) -> DataDeclaration | None:
    """Return the data a model file declares, without loading the whole model."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".json")
    if sidecar.is_file():
        try:
            record = json.loads(sidecar.read_text())
        except (OSError, ValueError) as error:
            raise ModelError(f"{sidecar}: invalid JSON sidecar ({error})") from None
        if isinstance(record, dict) and isinstance(record.get("data"), str):
            normalize = record.get("normalize")
            return DataDeclaration(record["data"], str(normalize) if normalize else None, sidecar.name)
    if path.suffix.lower() == ".onnx" and path.is_file():
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception:  # an unreadable model is reported by load_model with details
            return None
        props = {prop.key: prop.value for prop in proto.metadata_props}
        if "wnplan.data" in props:
            return DataDeclaration(props["wnplan.data"], props.get("wnplan.normalize"), f"{path.name} metadata")
    return None


def _load_exported(path: Path, trust: bool) -> Model:
    from wnplan.models.pt2_check import load_program
    from wnplan.models.torch_backend import TorchModel

    program = load_program(path, trust)
    model = TorchModel(path, program, "pt2")
    model.declaration = read_declaration(path)
    return model


def _load_torch_file(path: Path, factory: str | None, trust: bool, sample: np.ndarray | None) -> Model:
    import torch

    from wnplan.models.torch_backend import TorchModel

    if _is_torchscript(path):
        # NOTE: TorchScript graphs are not converted to fx yet, so they cannot be profiled.
        raise ModelError(
            f"{path}: TorchScript archives are not supported; export the model with "
            + "torch.export.export and torch.export.save to a .pt2 file"
        )

    if factory is not None:
        module = _build_from_factory(factory)
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except TORCH_LOAD_ERRORS as error:
            raise ModelError(f"{path}: cannot read the state dict safely ({_first_line(error)})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelError(f"{path}: expected a state dict (a mapping of tensor names), got {type(state).__name__}")
        try:
            module.load_state_dict(state)
        except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as error:
            raise ModelError(f"{path}: the state dict does not fit {factory}: {_first_line(error)}") from None
        format_name = "state-dict"
    elif trust:
        try:
            module = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as error:  # unpickling can raise anything
            raise ModelError(f"{path}: cannot unpickle the module ({_first_line(error)})") from None
        if not isinstance(module, torch.nn.Module):
            raise ModelError(
                f"{path}: contains a {type(module).__name__}, not a torch.nn.Module; for a state "
                + "dict pass --factory module:function"
            )
        format_name = "pickle"
    else:
        raise ModelError(
            f"{path}: a PyTorch file needs --factory module:function to build the architecture "
            + "for its state dict, or --trust to unpickle a full module (unpickling runs code "
            + "from the file)"
        )

    if sample is None:
        raise ModelError(f"{path}: the input shape is unknown; pass --data so wnplan can trace the model")
    program = _export(module, sample, path)
    model = TorchModel(path, program, format_name)
    model.declaration = read_declaration(path)
    return model


def _export(module, sample: np.ndarray, path: Path):
    """Export the module in eval mode: with a dynamic batch, or else with a batch of 2 or 1.

    A module that only runs with one sample (a batch of 1 baked into a reshape) is exported
    with a fixed batch of 1, which the model then runs in chunks.
    """
    import torch

    example = torch.from_numpy(np.ascontiguousarray(sample[:2], dtype=np.float32))
    attempts = [
        (example, ({0: torch.export.Dim("batch", min=1)},)),
        (example, None),
        (example[:1], None),
    ]
    first_error: Exception | None = None
    with _in_eval_mode(module) as frozen:
        for inputs, shapes in attempts:
            try:
                return torch.export.export(frozen, (inputs,), dynamic_shapes=shapes)
            except Exception as error:  # torch.export reports unsupported Python in many error types
                first_error = first_error or error
    raise ModelError(f"{path}: torch.export cannot trace the module ({_first_line(first_error)})")


@contextlib.contextmanager
def _in_eval_mode(module) -> Iterator:
    """Yield the module in eval mode, without changing the caller's module.

    A deep copy is put in eval mode, so the user's module keeps its mode and BatchNorm
    statistics. A module that cannot be copied is switched to eval mode in place and switched
    back afterwards. Exporting in eval mode does not write to its buffers.
    """
    try:
        frozen = copy.deepcopy(module)
    except (TypeError, RuntimeError, AttributeError, pickle.PicklingError, copy.Error) as error:
        logger.info("cannot copy the module (%s); exporting it in place in eval mode", _first_line(error))
        modes = {child: child.training for child in module.modules()}
        module.eval()
        try:
            yield module
        finally:
            for child, training in modes.items():
                child.train(training)
        return
    yield frozen.eval()


def _build_from_factory(factory: str):
    import torch

    module_name, _, function_name = factory.partition(":")
    if not module_name or not function_name:
        raise ModelError(f"invalid --factory {factory!r}: expected package.module:function")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, ".")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ModelError(f"cannot import --factory {factory!r}: {error}") from None
    except Exception as error:  # importing runs the user's module code, which can raise anything
        problem = f"{type(error).__name__}: {_first_line(error)}"
        raise ModelError(f"importing --factory {factory!r} raised {problem}") from None
    try:
        module = function()
    except Exception as error:  # the factory is the user's code
        raise ModelError(f"--factory {factory!r} raised {type(error).__name__}: {_first_line(error)}") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"--factory {factory!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def _is_torchscript(path: Path) -> bool:
    """Return whether the file is a TorchScript archive (a zip with a `code/` folder)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError):
        return False


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
