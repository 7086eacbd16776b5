"""Convert ONNX classifiers into trainable torch.fx graphs.

The converter covers the operators that image classifiers use (SUPPORTED_OPS) and rejects
any other operator by name. Initializers become tensors of the GraphModule:

- trainable nn.Parameters: Conv weights and biases, Gemm and MatMul weights (the constant
  operand, on either side), Gemm's C, the constant operand of an Add that follows a Gemm,
  MatMul or Conv (a bias), and BatchNormalization's scale and shift. An initializer that
  reaches these operands through layout operators (Transpose, Reshape, ...) is trained too;
  `wnplan.train.onnx_roles` states the rules;
- buffers: BatchNormalization running statistics (trained state), and every other
  initializer or Constant (kept fixed).

Tensors keep their ONNX layout, so the twin's weights read as the file's weights.
Floating-point initializers and Constants of type double or float16 become float32, because
the twin computes in float32. BatchNormalization becomes a `BatchNormSwitch`, which trains
with batch statistics.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import fx, nn

from wnplan.errors import ModelError
from wnplan.models import Model
from wnplan.train import onnx_ops
from wnplan.train.layers import BatchNormSwitch, conv
from wnplan.train.onnx_roles import constant_value, plan_roles
from wnplan.train.twin import TRAINABLE_KINDS, TensorRole, Twin

logger = logging.getLogger(__name__)

SUPPORTED_OPS = (
    "Add", "AveragePool", "BatchNormalization", "Clip", "Concat", "Constant", "Conv", "Div", "Flatten",
    "Gelu", "Gemm", "GlobalAveragePool", "Identity", "LeakyRelu", "MatMul", "MaxPool", "Mul", "ReduceMean",
    "Relu", "Reshape", "Sigmoid", "Softmax", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze",
)
ONNX_DOMAINS = ("", "ai.onnx")
DEFAULT_BATCH_NORM_MOMENTUM = 0.9  # ONNX's weight of the old running value
WIDENED_FLOAT_TYPES = (np.float64, np.float16)  # converted to float32


@dataclass
class ConvertedGraph:
    """A converted ONNX graph.

    Attributes:
        module: the GraphModule; takes the first graph input, returns (first output,).
        input_node: its placeholder.
        output_node: the node of the first graph output.
        tensor_nodes: the fx node of each ONNX tensor name.
        roles: role of each trained tensor, by attribute name in `module`.
        frozen: descriptions of layer weights that are computed from initializers by
            operators other than layout operators, so the twin keeps them fixed.
    """

    module: fx.GraphModule
    input_node: fx.Node
    output_node: fx.Node
    tensor_nodes: dict[str, fx.Node]
    roles: dict[str, TensorRole]
    frozen: tuple[str, ...] = ()


def twin_from_onnx(model: Model) -> Twin:
    """Build the twin of an OnnxModel; its sites map through their tensor names.

    Raises:
        ModelError: the graph cannot be converted, a site has no value in the converted
            graph, or the graph has no tensor to train.
    """
    converted = convert_onnx(model.proto, str(model.path))
    missing = [site.name for site in model.sites if site.name not in converted.tensor_nodes]
    if missing:
        raise ModelError(f"{model.path}: sites {missing[:3]} have no value in the converted graph")
    if not any(role.kind in TRAINABLE_KINDS for role in converted.roles.values()):
        frozen = "".join(f"; {description}" for description in converted.frozen)
        rules = (
            "the converter trains Conv, Gemm and MatMul weights and biases and BatchNormalization scales " +
            "and shifts that are initializers (directly or through layout operators such as Transpose)"
        )
        raise ModelError(
            f"{model.path}: trained mode found nothing to train: {rules}, and this graph has none{frozen}; " +
            "profile the model with --mode inference"
        )
    for description in converted.frozen:
        logger.warning("%s: %s; trained mode keeps it fixed", model.path, description)
    return Twin(
        module=converted.module,
        input_node=converted.input_node,
        logits_node=converted.output_node,
        site_nodes=tuple(converted.tensor_nodes[site.name] for site in model.sites),
        roles=converted.roles,
        source_format="onnx",
    )


def convert_onnx(proto: onnx.ModelProto, source: str = "the ONNX model") -> ConvertedGraph:
    """Convert an ONNX model to a torch.fx GraphModule with its own copies of the initializers.

    Args:
        proto: the model; it is read, never modified.
        source: the model's name for error messages.

    Raises:
        ModelError: the graph uses an unsupported operator or attribute, or a shape input
            that is not a constant.
    """
    graph = proto.graph
    _check_operators(graph, source)
    _log_input_type(graph, source)
    opset = next((entry.version for entry in proto.opset_import if entry.domain in ONNX_DOMAINS), 1)
    builder = _Builder(graph, opset, source)
    for node in graph.node:
        builder.convert(node)
    return builder.finish()


def _check_operators(graph: onnx.GraphProto, source: str) -> None:
    unsupported = sorted(
        {f"{node.domain}::{node.op_type}" if node.domain not in ONNX_DOMAINS else node.op_type
         for node in graph.node if node.domain not in ONNX_DOMAINS or node.op_type not in SUPPORTED_OPS}
    )
    if unsupported:
        found = ", ".join(unsupported)
        supported = ", ".join(SUPPORTED_OPS)
        problem = f"{source}: trained mode cannot convert the ONNX operators {found}"
        advice = "train from a .pt2 export of the model instead"
        raise ModelError(f"{problem}; the converter supports only {supported}; {advice}")


def _log_input_type(graph: onnx.GraphProto, source: str) -> None:
    initializers = {init.name for init in graph.initializer}
    for value in graph.input:
        kind = value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else None
        if value.name not in initializers and kind in (onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            logger.info(
                "%s: the input %r has type %s; the trainable copy converts the model's tensors to float32",
                source, value.name, onnx.TensorProto.DataType.Name(kind),
            )


def _as_float32(value: np.ndarray) -> np.ndarray:
    return value.astype(np.float32) if value.dtype in WIDENED_FLOAT_TYPES else value


@dataclass
class _Builder:
    onnx_graph: onnx.GraphProto
    opset: int
    source: str
    graph: fx.Graph = field(default_factory=fx.Graph)
    root: nn.Module = field(default_factory=nn.Module)
    env: dict[str, fx.Node] = field(default_factory=dict)
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    roles: dict[str, TensorRole] = field(default_factory=dict)
    attribute_names: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.constants = {
            init.name: _as_float32(numpy_helper.to_array(init).copy()) for init in self.onnx_graph.initializer
        }
        plan = plan_roles(self.onnx_graph, self.constants, self.source)
        self.planned, self.frozen = plan.roles, plan.frozen
        inputs = [value for value in self.onnx_graph.input if value.name not in self.constants]
        if not inputs or not self.onnx_graph.output:
            raise ModelError(f"{self.source}: the ONNX graph needs an input and an output")
        if len(inputs) > 1:
            names = [value.name for value in inputs]
            raise ModelError(f"{self.source}: trained mode supports models with one input, found {names}")
        self.input_node = self.graph.placeholder(_safe_name(inputs[0].name))
        self.env[inputs[0].name] = self.input_node

    def convert(self, node: onnx.NodeProto) -> None:
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        converter = _CONVERTERS[node.op_type]
        outputs = converter(self, node, attributes)
        for name, value in zip(node.output, outputs, strict=False):
            if name:
                self.env[name] = value

    def finish(self) -> ConvertedGraph:
        output_name = self.onnx_graph.output[0].name
        output = self.value(output_name)
        self.graph.output((output,))
        self.graph.lint()
        module = fx.GraphModule(self.root, self.graph)
        return ConvertedGraph(module, self.input_node, output, dict(self.env), self.roles, self.frozen)

    # -- values -------------------------------------------------------------------------

    def value(self, name: str) -> fx.Node | None:
        """Return the fx node of tensor `name`, creating get_attr nodes for constants."""
        if not name:
            return None
        if name not in self.env:
            if name not in self.constants:
                raise ModelError(f"{self.source}: tensor {name!r} is read before it is produced")
            self.env[name] = self.graph.get_attr(self._register(self.aliases.get(name, name)))
        return self.env[name]

    def static(self, name: str, node: onnx.NodeProto, description: str) -> np.ndarray:
        """Return the constant value of an input that must be known when converting."""
        if name not in self.constants:
            label = f"{node.op_type} node {node.name or node.output[0]!r}"
            problem = f"{label} computes its {description} at run time, but trained mode needs it as a constant"
            raise ModelError(f"{self.source}: {problem}; re-export the model with constant shapes")
        return self.constants[name]

    def _register(self, name: str) -> str:
        attribute = self.attribute_names.get(name)
        if attribute is not None:
            return attribute
        attribute = _safe_name(name)
        while hasattr(self.root, attribute):
            attribute += "_"
        self.attribute_names[name] = attribute
        tensor = torch.from_numpy(np.ascontiguousarray(self.constants[name]))
        role = self.planned.get(name)
        trainable = role is not None and role.kind in ("weight", "bias", "norm_scale", "norm_shift")
        if trainable and tensor.is_floating_point():
            self.root.register_parameter(attribute, nn.Parameter(tensor))
            self.roles[attribute] = TensorRole(role.kind, role.fan_in, name)
        else:
            self.root.register_buffer(attribute, tensor)
            if role is not None and role.kind in ("running_mean", "running_var"):
                self.roles[attribute] = TensorRole(role.kind, 0, name)
        return attribute

    def call(self, function: Callable, *args, **kwargs) -> fx.Node:
        return self.graph.call_function(function, args, kwargs)


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"\W", "_", name).strip("_") or "tensor"
    return cleaned if not cleaned[0].isdigit() else f"t_{cleaned}"


# -- operator converters ----------------------------------------------------------------------


def _binary(function: Callable) -> Callable:
    def convert(builder: _Builder, node, attributes) -> list[fx.Node]:
        return [builder.call(function, builder.value(node.input[0]), builder.value(node.input[1]))]

    return convert


def _unary(function: Callable, **fixed) -> Callable:
    def convert(builder: _Builder, node, attributes) -> list[fx.Node]:
        return [builder.call(function, builder.value(node.input[0]), **fixed)]

    return convert


def _leaky_relu(builder, node, attributes):
    alpha = float(attributes.get("alpha", 0.01))
    return [builder.call(torch.nn.functional.leaky_relu, builder.value(node.input[0]), alpha)]


def _gelu(builder, node, attributes):
    approximate = attributes.get("approximate", b"none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    return [builder.call(torch.nn.functional.gelu, builder.value(node.input[0]), approximate=approximate)]


def _clip(builder, node, attributes):
    x = builder.value(node.input[0])
    if builder.opset < 11:
        low, high = attributes.get("min"), attributes.get("max")
    else:
        low = builder.value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        high = builder.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if low is None and high is None:
        return [x]
    return [builder.call(torch.clamp, x, low, high)]


def _softmax(builder, node, attributes):
    x = builder.value(node.input[0])
    if builder.opset >= 13:
        return [builder.call(torch.softmax, x, int(attributes.get("axis", -1)))]
    return [builder.call(onnx_ops.softmax_coerced, x, int(attributes.get("axis", 1)))]


def _gemm(builder, node, attributes):
    inputs = [builder.value(name) for name in node.input] + [None] * (3 - len(node.input))
    return [builder.call(
        onnx_ops.gemm, inputs[0], inputs[1], inputs[2], float(attributes.get("alpha", 1.0)),
        float(attributes.get("beta", 1.0)), bool(attributes.get("transA", 0)), bool(attributes.get("transB", 0)),
    )]


def _matmul(builder, node, attributes):
    return [builder.call(onnx_ops.matmul, builder.value(node.input[0]), builder.value(node.input[1]))]


def _conv(builder, node, attributes):
    x = builder.value(node.input[0])
    weight_name = node.input[1]
    weight = builder.value(weight_name)
    bias = builder.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    kernel = _kernel_shape(builder, node, attributes, weight_name)
    strides = list(attributes.get("strides", [1] * len(kernel)))
    dilations = list(attributes.get("dilations", [1] * len(kernel)))
    x, padding = _padding(builder, node, attributes, x, kernel, strides, dilations, 0.0)
    return [builder.call(conv, x, weight, bias, strides, padding, dilations, int(attributes.get("group", 1)))]


def _kernel_shape(builder, node, attributes, weight_name: str) -> list[int]:
    if "kernel_shape" in attributes:
        return list(attributes["kernel_shape"])
    return list(builder.static(weight_name, node, "weight shape").shape[2:])


def _padding(builder, node, attributes, x, kernel, strides, dilations, value: float):
    """Return (input, symmetric padding), padding the input first when ONNX pads are not symmetric."""
    auto_pad = attributes.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        padded = builder.call(onnx_ops.pad_same, x, kernel, strides, dilations, auto_pad == "SAME_UPPER", value)
        return padded, [0] * len(kernel)
    if auto_pad == "VALID":
        return x, [0] * len(kernel)
    if auto_pad != "NOTSET":
        raise ModelError(f"{builder.source}: {node.op_type} auto_pad {auto_pad!r} is not supported")
    pads = list(attributes.get("pads", [0] * (2 * len(kernel))))
    begin, end = pads[: len(kernel)], pads[len(kernel):]
    if begin == end:
        return x, begin
    return builder.call(onnx_ops.pad_spatial, x, pads, value), [0] * len(kernel)


def _max_pool(builder, node, attributes):
    if len(node.output) > 1 and node.output[1]:
        raise ModelError(f"{builder.source}: MaxPool with an Indices output is not supported")
    kernel = list(attributes["kernel_shape"])
    strides = list(attributes.get("strides", [1] * len(kernel)))
    dilations = list(attributes.get("dilations", [1] * len(kernel)))
    x, padding = _padding(builder, node, attributes, builder.value(node.input[0]), kernel, strides, dilations,
                          float("-inf"))
    ceil_mode = bool(attributes.get("ceil_mode", 0))
    return [builder.call(onnx_ops.max_pool, x, kernel, strides, padding, dilations, ceil_mode)]


def _average_pool(builder, node, attributes):
    kernel = list(attributes["kernel_shape"])
    strides = list(attributes.get("strides", [1] * len(kernel)))
    include_pad = bool(attributes.get("count_include_pad", 0))
    pads = list(attributes.get("pads", [0] * (2 * len(kernel))))
    symmetric = pads[: len(kernel)] == pads[len(kernel):]
    auto_pad = attributes.get("auto_pad", b"NOTSET")
    if not include_pad and (not symmetric or auto_pad not in (b"NOTSET", "NOTSET", b"VALID", "VALID")):
        raise ModelError(
            f"{builder.source}: AveragePool with asymmetric or automatic padding needs count_include_pad=1"
        )
    x, padding = _padding(builder, node, attributes, builder.value(node.input[0]), kernel, strides,
                          [1] * len(kernel), 0.0)
    ceil_mode = bool(attributes.get("ceil_mode", 0))
    return [builder.call(onnx_ops.average_pool, x, kernel, strides, padding, ceil_mode, include_pad)]


def _global_average_pool(builder, node, attributes):
    return [builder.call(onnx_ops.global_average_pool, builder.value(node.input[0]))]


def _batch_normalization(builder, node, attributes):
    if attributes.get("training_mode", 0):
        raise ModelError(f"{builder.source}: BatchNormalization in training mode is not supported")
    onnx_momentum = float(attributes.get("momentum", DEFAULT_BATCH_NORM_MOMENTUM))
    name = f"batch_norm_{sum(isinstance(child, BatchNormSwitch) for child in builder.root.children())}"
    builder.root.add_module(name, BatchNormSwitch(1.0 - onnx_momentum, float(attributes.get("epsilon", 1e-5))))
    arguments = [builder.value(input_name) for input_name in node.input[:5]]
    return [builder.graph.call_module(name, tuple(arguments))]


def _flatten(builder, node, attributes):
    return [builder.call(onnx_ops.flatten, builder.value(node.input[0]), int(attributes.get("axis", 1)))]


def _reshape(builder, node, attributes):
    shape = [int(dim) for dim in builder.static(node.input[1], node, "target shape")]
    allow_zero = bool(attributes.get("allowzero", 0))
    return [builder.call(onnx_ops.reshape, builder.value(node.input[0]), shape, allow_zero)]


def _transpose(builder, node, attributes):
    perm = attributes.get("perm")
    return [builder.call(onnx_ops.transpose, builder.value(node.input[0]), list(perm) if perm is not None else None)]


def _concat(builder, node, attributes):
    parts = [builder.value(name) for name in node.input]
    return [builder.call(onnx_ops.concat, parts, int(attributes["axis"]))]


def _constant(builder, node, attributes):
    # The value becomes a buffer only when an operator reads it as a tensor (see _Builder.value).
    builder.constants[node.output[0]] = _as_float32(constant_value(node, attributes, builder.source))
    return []


def _identity(builder, node, attributes):
    if node.input[0] in builder.constants and node.input[0] not in builder.env:
        # The output stays a constant, so shape inputs remain static, and it reads the same
        # parameter or buffer as its input.
        builder.constants[node.output[0]] = builder.constants[node.input[0]]
        builder.aliases[node.output[0]] = builder.aliases.get(node.input[0], node.input[0])
        return []
    return [builder.value(node.input[0])]


def _axes(builder, node, attributes, position: int) -> list[int] | None:
    """Return the axes of Squeeze, Unsqueeze or ReduceMean, from the attribute or the input."""
    if "axes" in attributes:
        return [int(axis) for axis in attributes["axes"]]
    if len(node.input) > position and node.input[position]:
        return [int(axis) for axis in builder.static(node.input[position], node, "axes").ravel()]
    return None


def _reduce_mean(builder, node, attributes):
    axes = _axes(builder, node, attributes, 1)
    if axes is None and attributes.get("noop_with_empty_axes", 0):
        return [builder.value(node.input[0])]
    keepdims = bool(attributes.get("keepdims", 1))
    return [builder.call(onnx_ops.reduce_mean, builder.value(node.input[0]), axes, keepdims)]


def _squeeze(builder, node, attributes):
    return [builder.call(onnx_ops.squeeze, builder.value(node.input[0]), _axes(builder, node, attributes, 1))]


def _unsqueeze(builder, node, attributes):
    axes = _axes(builder, node, attributes, 1)
    if axes is None:
        raise ModelError(f"{builder.source}: Unsqueeze node {node.output[0]!r} has no axes")
    return [builder.call(onnx_ops.unsqueeze, builder.value(node.input[0]), axes)]


_CONVERTERS: dict[str, Callable] = {
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(onnx_ops.divide),
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "LeakyRelu": _leaky_relu,
    "Gelu": _gelu,
    "Clip": _clip,
    "Softmax": _softmax,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Conv": _conv,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool,
    "BatchNormalization": _batch_normalization,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Concat": _concat,
    "Constant": _constant,
    "Identity": _identity,
    "ReduceMean": _reduce_mean,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
}
