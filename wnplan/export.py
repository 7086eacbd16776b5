"""Writing a plan into an ONNX model, for toolchains that read only ONNX.

Each node that produces a planned site gets metadata properties:

- `wnplan.site`: the site index;
- `wnplan.executions`: how many times to execute the node and average;
- `wnplan.bits`: the hinted activation bit width (absent when no hint could be derived);
- `wnplan.shield`: "true" when the node should run on a precise (digital) unit.

The whole plan is also stored as compact JSON in the model's `metadata_props` under
`wnplan.plan`. A model input site has no producing node, so its entry exists only there.
Node metadata needs ONNX IR version 10 or newer, so an older model's IR version is raised
to 10. The graph itself is unchanged, so outputs are identical.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from wnplan.errors import ModelError, SettingsError
from wnplan.models import model_sha256
from wnplan.models.onnx_files import load_onnx
from wnplan.models.onnx_graph import check_model

logger = logging.getLogger(__name__)

NODE_METADATA_IR_VERSION = 10


def export_plan_to_onnx(plan: dict[str, Any], model_path: str | Path, out_path: str | Path) -> int:
    """Write a copy of the ONNX model with the plan as metadata; return the nodes annotated.

    Raises:
        ModelError: the model is not the ONNX file the plan was made for, or cannot be read.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ModelError(f"model file not found: {str(model_path)!r}")
    if model_path.suffix.lower() != ".onnx":
        raise ModelError(f"{str(model_path)!r} is not an ONNX file; export-onnx needs the .onnx model of the plan")
    if model_sha256(model_path) != plan["profile"]["model"]["sha256"]:
        raise ModelError(
            f"{model_path} is not the model the plan was made for (sha256 differs from the profile's "
            + f"{plan['profile']['model']['path']}); pass that model file"
        )
    model = load_onnx(model_path)[0]

    producers = {output: node for node in model.graph.node for output in node.output}
    annotated = 0
    for site in plan["sites"]:
        node = producers.get(site["name"])
        if node is None:
            continue
        _set_properties(node.metadata_props, _site_properties(site))
        annotated += 1

    _set_properties(
        model.metadata_props, {"wnplan.plan": json.dumps(_summary(plan), sort_keys=True, separators=(",", ":"))}
    )
    model.ir_version = max(model.ir_version, NODE_METADATA_IR_VERSION)
    check_model(model)
    _write_atomically(model.SerializeToString(), Path(out_path))
    logger.info("annotated %d nodes of %s", annotated, model_path)
    return annotated


def _write_atomically(content: bytes, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise SettingsError(f"cannot write {str(path)!r}: {error.strerror or error}; pass a writable -o path") from None
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(content)
        os.replace(temporary, path)
    except OSError as error:
        raise SettingsError(f"cannot write {str(path)!r}: {error.strerror or error}; pass a writable -o path") from None
    finally:
        Path(temporary).unlink(missing_ok=True)


def _site_properties(site: dict[str, Any]) -> dict[str, str]:
    properties = {
        "wnplan.site": str(site["index"]),
        "wnplan.executions": str(int(site["executions"])),
        "wnplan.shield": "true" if site["shield"] else "false",
    }
    bits = (site.get("bits") or {}).get("bits")
    if bits is not None:
        properties["wnplan.bits"] = str(int(bits))
    return properties


def _summary(plan: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": plan["method"],
        "budget": plan["budget"],
        "accelerator": (plan.get("accelerator") or {}).get("name"),
        "sites": [
            {
                "index": site["index"],
                "name": site["name"],
                "executions": site["executions"],
                "bits": (site.get("bits") or {}).get("bits"),
                "shield": site["shield"],
            }
            for site in plan["sites"]
        ],
    }


def _set_properties(container, values: dict[str, str]) -> None:
    existing = {entry.key: entry for entry in container}
    for key, value in values.items():
        if key in existing:
            existing[key].value = value
        else:
            entry = container.add()
            entry.key, entry.value = key, value
