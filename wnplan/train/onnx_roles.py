"""Role planning for ONNX initializers: which ones the trainable twin trains, and as what.

An initializer is a layer's weight when a Conv, Gemm or MatMul reads it as its constant
operand, either directly or through a chain of layout operators (LAYOUT_OPS) whose shape
arguments are constants. The layout operators stay in the twin's graph, so the trained
tensor keeps the initializer's own layout and name. A weight operand that is computed from
initializers in any other way (for example `Mul(W, scale)`) stays fixed, and the plan names
the initializers behind it, so that the caller can warn about them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from wnplan.errors import ModelError
from wnplan.train import onnx_ops
from wnplan.train.twin import BATCH_NORM_KINDS, TensorRole

# Operators that only move or relabel the elements of their first input.
LAYOUT_OPS = ("Identity", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")
LAYER_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class RolePlan:
    """The trained initializers of an ONNX graph.

    Attributes:
        roles: the role of every trained initializer, keyed by initializer name.
        frozen: one description per Conv, Gemm or MatMul weight operand that is computed
            from constants by operators other than LAYOUT_OPS, and so stays fixed.
    """

    roles: dict[str, TensorRole]
    frozen: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class _Origin:
    """The initializer behind a tensor, and the tensor's shape as its consumers read it."""

    initializer: str
    shape: tuple[int, ...]


def constant_value(node: onnx.NodeProto, attributes: dict, source: str) -> np.ndarray:
    """Return the value of a Constant node as a numpy array.

    Raises:
        ModelError: the node has none of the value attributes the converter reads.
    """
    if "value" in attributes:
        return numpy_helper.to_array(attributes["value"]).copy()
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attributes:
            return np.array(attributes[key], dtype=dtype)
    raise ModelError(f"{source}: Constant node {node.output[0]!r} has no supported value attribute")


def plan_roles(graph: onnx.GraphProto, constants: dict[str, np.ndarray], source: str) -> RolePlan:
    """Decide the role of every initializer the twin trains.

    Args:
        graph: the ONNX graph, its nodes in topological order.
        constants: the initializers' values by name.
        source: the model's name for error messages.
    """
    origins = _trace_layout(graph, constants, source)
    live = _input_dependent(graph, constants)
    roles: dict[str, TensorRole] = {}
    frozen: list[str] = []
    producers = {output: node for node in graph.node for output in node.output}

    def assign(name: str, kind: str, fan_in: int = 0) -> None:
        origin = origins.get(name)
        if origin is not None and origin.initializer not in roles:
            roles[origin.initializer] = TensorRole(kind, fan_in, origin.initializer)

    for node in graph.node:
        inputs = list(node.input)
        if node.op_type in LAYER_OPS:
            if _assign_layer(node, origins, live, assign) is None:
                frozen.extend(_describe_frozen_weight(node, origins, live, producers, constants))
        elif node.op_type == "Add":
            _assign_bias(inputs, origins, producers, assign)
        elif node.op_type == "BatchNormalization":
            for name, kind in zip(inputs[1:5], BATCH_NORM_KINDS, strict=False):
                assign(name, kind)
    return RolePlan(roles, tuple(frozen))


def _assign_layer(
    node: onnx.NodeProto, origins: dict[str, _Origin], live: set[str], assign: Callable[..., None]
) -> str | None:
    """Mark the weight (and bias) of a Conv, Gemm or MatMul; return the weight's tensor name, or None."""
    inputs = list(node.input)
    bias = inputs[2] if len(inputs) > 2 and inputs[2] else None
    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
    weight, fan_in = None, 0
    if node.op_type == "Conv" and inputs[1] in origins:
        weight = inputs[1]
        fan_in = int(np.prod(origins[weight].shape[1:]))
    elif node.op_type == "Gemm" and inputs[1] in origins:
        # B' = B (or Bᵀ with transB) is (K, N), and K is the fan-in.
        weight = inputs[1]
        shape = origins[weight].shape
        fan_in = int(shape[1] if attributes.get("transB", 0) else shape[0])
    elif node.op_type == "Gemm" and inputs[0] in origins and inputs[1] in live:
        # A' = A (or Aᵀ with transA) is (M, K), so the left operand is the weight and K the fan-in.
        weight = inputs[0]
        shape = origins[weight].shape
        fan_in = int(shape[0] if attributes.get("transA", 0) else shape[1])
    elif node.op_type == "MatMul" and inputs[1] in origins:
        weight = inputs[1]
        shape = origins[weight].shape
        fan_in = int(shape[-2] if len(shape) >= 2 else shape[0])
    elif node.op_type == "MatMul" and inputs[0] in origins and inputs[1] in live:
        weight = inputs[0]
        fan_in = int(origins[weight].shape[-1])
    if weight is None:
        return None
    assign(weight, "weight", fan_in)
    if bias is not None:
        assign(bias, "bias", fan_in)
    return weight


def _assign_bias(inputs: list[str], origins: dict[str, _Origin], producers: dict, assign: Callable[..., None]) -> None:
    """Mark the constant operand of an Add after a Gemm, MatMul or Conv as that layer's bias."""
    for constant, other in ((inputs[0], inputs[1]), (inputs[1], inputs[0])):
        producer = producers.get(other)
        if constant in origins and producer is not None and producer.op_type in LAYER_OPS:
            assign(constant, "bias", 0)
            return


def _describe_frozen_weight(
    node: onnx.NodeProto,
    origins: dict[str, _Origin],
    live: set[str],
    producers: dict[str, onnx.NodeProto],
    constants: dict[str, np.ndarray],
) -> list[str]:
    """Describe each constant operand of a layer that is computed, not read, from initializers."""
    positions = (1,) if node.op_type == "Conv" else (0, 1)
    label = f"{node.op_type} node {node.name or node.output[0]!r}"
    descriptions = []
    for position in positions:
        name = node.input[position]
        if name in live or name in origins or name in constants:  # constants here are not floating-point
            continue
        producer = producers.get(name)
        if producer is not None and producer.op_type == "Constant":
            descriptions.append(f"{label} reads {name!r}, the value of a Constant node rather than an initializer")
            continue
        behind = _initializers_behind(name, producers, constants)
        origin = f"the initializers {behind}" if behind else "Constant nodes"
        descriptions.append(f"{label} reads {name!r}, computed from {origin} by operators other than layout operators")
    return descriptions


def _initializers_behind(name: str, producers: dict[str, onnx.NodeProto], constants: dict) -> list[str]:
    found: list[str] = []
    pending, seen = [name], set()
    while pending:
        tensor = pending.pop()
        if tensor in seen or not tensor:
            continue
        seen.add(tensor)
        if tensor in constants:
            found.append(tensor)
        elif tensor in producers:
            pending.extend(producers[tensor].input)
    return sorted(found)


def _input_dependent(graph: onnx.GraphProto, constants: dict) -> set[str]:
    """Return the names of all tensors that depend on a graph input (not an initializer)."""
    live = {value.name for value in graph.input if value.name not in constants}
    for node in graph.node:
        if any(name in live for name in node.input):
            live.update(name for name in node.output if name)
    return live


def _trace_layout(graph: onnx.GraphProto, constants: dict[str, np.ndarray], source: str) -> dict[str, _Origin]:
    """Map each floating-point initializer, and each layout view of one, to its origin."""
    origins = {
        name: _Origin(name, tuple(value.shape))
        for name, value in constants.items()
        if np.issubdtype(value.dtype, np.floating)
    }
    static = dict(constants)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        if node.op_type == "Constant":
            static[node.output[0]] = constant_value(node, attributes, source)
        if node.op_type == "Identity" and node.input[0] in static:
            static[node.output[0]] = static[node.input[0]]
        if node.op_type in LAYOUT_OPS and node.input and node.input[0] in origins:
            origin = origins[node.input[0]]
            shape = _layout_shape(node, attributes, origin.shape, static)
            if shape is not None:
                origins[node.output[0]] = _Origin(origin.initializer, shape)
    return origins


def _layout_shape(node: onnx.NodeProto, attributes: dict, shape: tuple[int, ...], static: dict) -> tuple | None:
    """Return the output shape of a layout operator, or None when it depends on run-time values."""

    def constant_input(position: int) -> list[int] | None:
        if len(node.input) <= position or not node.input[position]:
            return None
        value = static.get(node.input[position])
        return None if value is None else [int(item) for item in np.asarray(value).ravel()]

    tensor = torch.empty(shape, device="meta")
    try:
        if node.op_type == "Identity":
            return shape
        if node.op_type == "Transpose":
            perm = attributes.get("perm")
            return tuple(onnx_ops.transpose(tensor, list(perm) if perm is not None else None).shape)
        if node.op_type == "Flatten":
            return tuple(onnx_ops.flatten(tensor, int(attributes.get("axis", 1))).shape)
        if node.op_type == "Reshape":
            target = constant_input(1)
            if target is None:
                return None
            return tuple(onnx_ops.reshape(tensor, target, bool(attributes.get("allowzero", 0))).shape)
        axes = [int(axis) for axis in attributes["axes"]] if "axes" in attributes else constant_input(1)
        if node.op_type == "Squeeze":
            if axes is None and len(node.input) > 1 and node.input[1]:
                return None
            return tuple(onnx_ops.squeeze(tensor, axes).shape)
        if axes is None:
            return None
        return tuple(onnx_ops.unsqueeze(tensor, axes).shape)
    except RuntimeError:  # the graph is invalid here; converting it reports the problem
        return None
