"""Reading ONNX files safely: external data, size limits and opset versions.

A model may keep its weights in external data files next to the `.onnx` file. They are
resolved relative to the model's folder (never the working directory) and loaded into the
in-memory proto, because every session is built from serialized bytes. A proto that still
points at external data must never reach onnxruntime: it would resolve the locations
against the working directory and either fail or read the wrong file.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, helper

from wnplan.errors import ModelError

logger = logging.getLogger(__name__)

# Protobuf cannot serialize a message of 2 GiB or more, and sessions are built from bytes.
MAX_MODEL_BYTES = (1 << 31) - 1
# onnxruntime only guarantees the default domain from opset 7 on; older operators are partly gone.
MIN_DEFAULT_OPSET = 7
DEFAULT_DOMAINS = ("", "ai.onnx")
ML_DOMAIN = "ai.onnx.ml"

CONVERT_HINT = (
    "convert it with onnx.version_converter, for example: python -c \"import onnx, " +
    "onnx.version_converter as v; onnx.save(v.convert_version(onnx.load('MODEL.onnx'), 17), " +
    "'MODEL-17.onnx')\""
)


def load_onnx(path: Path) -> tuple[onnx.ModelProto, list[Path]]:
    """Read an ONNX file with its external data, which is resolved next to the file.

    Returns the model and the external data files it read, in the order first named.

    Raises:
        ModelError: the file is not ONNX, its external data is missing, outside the model's
            folder or truncated, or the model is too large to serialize.
    """
    proto = _read_graph(path)

    external = _external_tensors(proto)
    total = proto.ByteSize()
    folder = path.parent
    for tensor in external:
        total += _external_length(tensor, folder, path)
    if total > MAX_MODEL_BYTES:
        raise ModelError(
            f"{path}: the model with its external data is {total / 1e9:.2f} GB; wnplan rewrites ONNX " +
            "graphs in memory and protobuf cannot serialize 2 GB or more, so profile the PyTorch " +
            "model (a .pt2 file from torch.export) instead"
        )
    data_files = _data_files(external, folder)
    if external:
        try:
            external_data_helper.load_external_data_for_model(proto, str(folder))
        except (onnx.checker.ValidationError, OSError, ValueError) as error:
            raise ModelError(f"{path}: cannot read the external data ({_first_line(error)})") from None
        logger.info("%s: loaded %d tensors from external data in %s", path, len(external), folder)
    return proto, data_files


def external_data_files(path: Path) -> list[Path]:
    """Return the external data files that the ONNX model at `path` names, in order, without reading them.

    Raises:
        ModelError: the file is not ONNX, or a data entry is missing or outside the folder.
    """
    proto = _read_graph(path)
    external = _external_tensors(proto)
    for tensor in external:
        _external_length(tensor, path.parent, path)
    return _data_files(external, path.parent)


def _read_graph(path: Path) -> onnx.ModelProto:
    """Read an ONNX file without its external data; raise ModelError if it is not ONNX."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except DecodeError:
        raise ModelError(f"{path}: not a valid ONNX file (protobuf decoding failed)") from None
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelError(f"{path}: cannot read the ONNX model ({_first_line(error)})") from None


def _external_tensors(proto: onnx.ModelProto) -> list:
    """Return the tensors whose values are stored in external data files."""
    return [tensor for tensor in all_tensors(proto) if external_data_helper.uses_external_data(tensor)]


def _data_files(external: list, folder: Path) -> list[Path]:
    """Return the external data files that the tensors name, each once, in the order first named."""
    return list(dict.fromkeys(folder / _location(tensor) for tensor in external))


def content_sha256(path: Path, data_files: list[Path]) -> str:
    """Return the sha256 of the model file followed by its external data files.

    Result stores key trials by this hash, so new weights in a data file are never mistaken
    for the old ones. A model without external data gets the plain sha256 of its file.
    """
    digest = hashlib.sha256()
    for part in (path, *data_files):
        with open(part, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _location(tensor: onnx.TensorProto) -> str:
    return next(entry.value for entry in tensor.external_data if entry.key == "location")


def _external_length(tensor: onnx.TensorProto, folder: Path, path: Path) -> int:
    """Check one tensor's external data entry and return its length in bytes."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    if not location:
        raise ModelError(f"{path}: tensor {tensor.name!r} uses external data but names no file")
    if os.path.isabs(location) or ".." in Path(location).parts:
        raise ModelError(
            f"{path}: tensor {tensor.name!r} names external data {location!r} outside the model's " +
            "folder; keep the data files in the folder of the .onnx file"
        )
    data_file = folder / location
    if not data_file.is_file():
        raise ModelError(
            f"{path}: external data file {location!r} of tensor {tensor.name!r} not found in " +
            f"{str(folder)!r}; keep the .onnx file and its data files together"
        )
    try:
        offset = int(entries.get("offset", "0"))
        size = data_file.stat().st_size
        length = int(entries["length"]) if "length" in entries else size - offset
    except ValueError:
        raise ModelError(f"{path}: tensor {tensor.name!r} has an invalid external data offset or length") from None
    if offset < 0 or length < 0 or offset + length > size:
        raise ModelError(
            f"{path}: external data of tensor {tensor.name!r} needs bytes {offset} to {offset + length} of " +
            f"{location!r}, which has {size} bytes; the data file is truncated or belongs to another model"
        )
    return length


def all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Yield every tensor of the model: initializers and attribute tensors, in sub-graphs too."""
    yield from _graph_tensors(proto.graph)
    for function in proto.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("sparse_tensor"):
            yield attribute.sparse_tensor.values
            yield attribute.sparse_tensor.indices
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _graph_tensors(graph)


def require_in_memory(proto: onnx.ModelProto, path: Path) -> None:
    """Raise ModelError if any tensor still refers to external data.

    A session built from the bytes of such a proto would resolve the data against the
    working directory, so it would fail or, worse, read a same-named file from there.
    """
    for tensor in all_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            raise ModelError(
                f"{path}: tensor {tensor.name!r} still refers to external data that was not loaded; " +
                "keep the .onnx file and its data files together and load the model from its path"
            )


def check_versions(proto: onnx.ModelProto, path: Path) -> None:
    """Raise ModelError for an IR version or opset that onnx or onnxruntime cannot run.

    The message names the version and how to convert the model.
    """
    if proto.ir_version > onnx.IR_VERSION:
        raise ModelError(
            f"{path}: ONNX IR version {proto.ir_version} is newer than the installed onnx " +
            f"{onnx.__version__} supports (IR version {onnx.IR_VERSION}); update onnx and onnxruntime"
        )
    latest = onnx.defs.onnx_opset_version()
    latest_ml = _latest_ml_opset()
    for entry in proto.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            if entry.version < MIN_DEFAULT_OPSET:
                raise ModelError(
                    f"{path}: the model uses ONNX opset {entry.version}, which onnxruntime no longer " +
                    f"runs (it needs opset {MIN_DEFAULT_OPSET} or newer); {CONVERT_HINT}"
                )
            if entry.version > latest:
                raise ModelError(
                    f"{path}: the model uses ONNX opset {entry.version}, newer than the installed onnx " +
                    f"{onnx.__version__} supports (opset {latest}); update onnx and onnxruntime, or " +
                    f"{CONVERT_HINT.replace('convert it', 'convert the model down')}"
                )
        elif entry.domain == ML_DOMAIN and entry.version > latest_ml:
            raise ModelError(
                f"{path}: the model uses ONNX-ML opset {entry.version}, newer than the installed onnx " +
                f"{onnx.__version__} supports (opset {latest_ml}); update onnx and onnxruntime"
            )

    uses_default = any(node.domain in DEFAULT_DOMAINS for node in proto.graph.node)
    if uses_default and default_opset(proto) is None:
        raise ModelError(
            f"{path}: the graph uses standard ONNX operators but imports no default opset; " +
            "re-export the model or add an opset import for the default domain"
        )


def default_opset(proto: onnx.ModelProto) -> int | None:
    """Return the model's opset version of the default ONNX domain, or None if not imported."""
    for entry in proto.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return int(entry.version)
    return None


def opset_for_ir_version(ir_version: int) -> int:
    """Return the newest default-domain opset released with `ir_version` (at least opset 7).

    Used when a model (for example one that imports only ai.onnx.ml) needs standard operators
    added: the new import must be one that the model's IR version can carry.
    """
    released = [row[2] for row in helper.VERSION_TABLE if row[1] <= ir_version]
    return max([MIN_DEFAULT_OPSET, *released[-1:]])


def _latest_ml_opset() -> int:
    return max(row[3] for row in helper.VERSION_TABLE)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
