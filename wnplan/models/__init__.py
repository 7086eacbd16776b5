"""Model backends behind one interface, and the loader that picks one from the file.

Formats:

- `.onnx`: run by onnxruntime.
- `.pt2`: a `torch.export` program (no code runs on load).
- a state dict (`.pt`, `.pth`) with `factory="package.module:function"`, which builds the
  architecture; the weights are read with `weights_only=True`.
- a pickled full module, only with `trust=True`, because unpickling runs arbitrary code.

Models declare their data either in ONNX `metadata_props` (`wnplan.data`, `wnplan.normalize`)
or in a JSON sidecar next to the file (`MODEL.json`, for example `lenet5.pt2.json`).
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import sys
import zipfile
from pathlib import Path

import numpy as np

from wnplan.errors import ModelError
from wnplan.models.base import DataDeclaration, Model, Site, Suffix

logger = logging.getLogger(__name__)

__all__ = ["DataDeclaration", "Model", "Site", "Suffix", "load_model", "read_declaration"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin")


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
            pickled modules, whose input shape the file does not record.

    Raises:
        ModelError: the file is missing, unreadable, or of an unsupported kind.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {str(path)!r}")
    suffix = path.suffix.lower()

    if suffix == ".onnx":
        from wnplan.models.onnx_backend import OnnxModel

        return OnnxModel(path)
    if suffix == ".pt2":
        return _load_exported(path)
    if suffix in TORCH_SUFFIXES or factory is not None:
        return _load_torch_file(path, factory, trust, sample)
    raise ModelError(
        f"unsupported model file {str(path)!r}: expected .onnx, .pt2 (torch.export), or a state "
        "dict (.pt/.pth) with --factory module:function"
    )


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


def _load_exported(path: Path) -> Model:
    import torch

    from wnplan.models.torch_backend import TorchModel

    try:
        program = torch.export.load(str(path))
    except (RuntimeError, ValueError, KeyError, EOFError, zipfile.BadZipFile, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"{path}: not a readable torch.export program ({first})") from None
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
            "torch.export.export and torch.export.save to a .pt2 file"
        )

    if factory is not None:
        module = _build_from_factory(factory)
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises pickle, zip and runtime errors
            raise ModelError(f"{path}: cannot read the state dict safely ({_first_line(error)})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelError(f"{path}: expected a state dict (a mapping of tensor names), got {type(state).__name__}")
        try:
            module.load_state_dict(state)
        except RuntimeError as error:
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
                "dict pass --factory module:function"
            )
        format_name = "pickle"
    else:
        raise ModelError(
            f"{path}: a PyTorch file needs --factory module:function to build the architecture "
            "for its state dict, or --trust to unpickle a full module (unpickling runs code "
            "from the file)"
        )

    if sample is None:
        raise ModelError(f"{path}: the input shape is unknown; pass --data so wnplan can trace the model")
    program = _export(module, sample, path)
    model = TorchModel(path, program, format_name)
    model.declaration = read_declaration(path)
    return model


def _export(module, sample: np.ndarray, path: Path):
    import torch

    # Export a copy in eval mode so that the user's module (and its BatchNorm statistics)
    # stays untouched even when it was left in train mode.
    module = copy.deepcopy(module).eval()
    example = torch.from_numpy(np.ascontiguousarray(sample[:2], dtype=np.float32))
    batch = torch.export.Dim("batch", min=1)
    try:
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    except Exception as error:  # export reports unsupported Python in many ways
        try:
            return torch.export.export(module, (example,))
        except Exception:
            raise ModelError(f"{path}: torch.export cannot trace the module ({_first_line(error)})") from None


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
    module = function()
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"--factory {factory!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
