"""Count the floating-point operations of a model's forward pass from its graph.

Counts are per sample (batch dimension 1) and follow these conventions:

- Conv: 2 · Cout · Hout · Wout · (Cin / groups) · kH · kW (one multiply and one add per
  weight use). Bias additions are not counted.
- Gemm, MatMul, linear: 2 · M · N · K, with M the rows of one sample (1 for a classifier's
  dense layers). Bias additions are not counted.
- BatchNormalization in inference form: 2 per output element (a scale and a shift).
- Relu and elementwise Add, Sub, Mul, Div: 1 per output element.
- MaxPool and AveragePool: kH · kW per output element (comparisons or additions).
- Data movement (Flatten, Reshape, Transpose, Identity, Constant and the like): 0.
- Any other operator: 1 per output element, and its type is listed in `estimated_ops`.

Adding noise at a site (`x + n` for additive noise) costs 1 per element of the site. Drawing
the noise is not counted: it is random number generation, not arithmetic on activations.

ONNX shapes come from `onnx.shape_inference` on a copy of the graph whose batch dimension is
set to 1. PyTorch (`.pt2`) shapes come from the `val` metadata that `torch.export` records on
every fx node.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx
from onnx import shape_inference

from wnplan.errors import ModelError
from wnplan.models import Model

ONNX_MOVEMENT_OPS = frozenset(
    {
        "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Shape", "Constant",
        "Cast", "Gather", "Concat", "Slice", "Dropout",
    }
)
ONNX_ELEMENTWISE_OPS = frozenset({"Relu", "Add", "Sub", "Mul", "Div"})
ONNX_POOL_OPS = frozenset({"MaxPool", "AveragePool"})

FX_MOVEMENT_OPS = frozenset(
    {
        "flatten", "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "squeeze", "unsqueeze",
        "clone", "contiguous", "getitem", "dropout", "alias", "expand", "cat", "detach", "_assert_tensor_metadata",
    }
)
FX_ELEMENTWISE_OPS = frozenset({"relu", "relu_", "add", "add_", "sub", "mul", "div"})
FX_BATCH_NORM_OPS = frozenset(
    {
        "batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training", "_batch_norm_no_update",
        "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
    }
)
FX_MATMUL_OPS = frozenset({"linear", "addmm", "mm", "matmul", "bmm"})
FX_CONV_OPS = frozenset({"conv2d", "conv1d", "convolution"})
FX_POOL_OPS = frozenset({"max_pool2d", "avg_pool2d", "max_pool2d_with_indices"})


@dataclass(frozen=True)
class GraphFlops:
    """Per-sample FLOPs of a model, in total and downstream of each site.

    Attributes:
        total: FLOPs of one full forward pass of one sample.
        downstream: per site index, FLOPs of the nodes that depend on the site's value, which
            is what a walking trial's suffix run computes. Site 0 (the input) has `total`.
        site_elements: per site index, the elements of the site's value for one sample.
        per_node: FLOPs of each counted node, keyed by the node's first output name.
        estimated_ops: operator types counted with the 1-per-element fallback.
    """

    total: int
    downstream: tuple[int, ...]
    site_elements: tuple[int, ...]
    per_node: Mapping[str, int]
    estimated_ops: tuple[str, ...]

    def upstream(self, site: int) -> int:
        """Return the FLOPs before a site, which a walking trial reuses from the clean pass."""
        return self.total - self.downstream[site]

    def to_dict(self) -> dict[str, object]:
        return {
            "total": self.total,
            "downstream": list(self.downstream),
            "site_elements": list(self.site_elements),
            "per_node": dict(sorted(self.per_node.items())),
            "estimated_ops": list(self.estimated_ops),
        }


def count_flops(model: Model) -> GraphFlops:
    """Count the per-sample FLOPs of a loaded wnplan model (ONNX or exported PyTorch).

    Raises:
        ModelError: the model's format has no FLOP counter, or a shape is unknown.
    """
    if model.format == "onnx":
        return _onnx_flops(model)
    if model.format == "pt2":
        return _fx_flops(model)
    raise ModelError(f"no FLOP counter for model format {model.format!r}; expected onnx or pt2")


def _onnx_flops(model: Model) -> GraphFlops:
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    graph = proto.graph
    dims = graph.input[0].type.tensor_type.shape.dim
    if dims:
        dims[0].ClearField("dim_param")
        dims[0].dim_value = 1
    del graph.value_info[:]
    inferred = shape_inference.infer_shapes(proto).graph
    shapes = {value.name: _onnx_shape(value) for value in (*inferred.input, *inferred.value_info, *inferred.output)}
    weights = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}

    per_node: dict[str, int] = {}
    estimated: set[str] = set()
    for node in graph.node:
        output = shapes.get(node.output[0])
        if output is None:
            raise ModelError(
                f"ONNX shape inference found no shape for {node.output[0]!r} ({node.op_type}); "
                + "export the model with static shapes apart from the batch"
            )
        flops, guessed = _onnx_node_flops(node, output, shapes, weights)
        per_node[node.output[0]] = flops
        if guessed:
            estimated.add(node.op_type)

    consumers = [(list(node.input), node.output[0]) for node in graph.node]
    downstream = tuple(
        sum(per_node[name] for name in _dependents(site.name, consumers)) for site in model.sites
    )
    total = sum(per_node.values())
    elements = tuple(math.prod(site.shape) for site in model.sites)
    return GraphFlops(total, downstream, elements, per_node, tuple(sorted(estimated)))


def _onnx_shape(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    shape = value.type.tensor_type.shape
    if not value.type.tensor_type.HasField("shape"):
        return None
    if any(not dim.HasField("dim_value") for dim in shape.dim):
        return None
    return tuple(int(dim.dim_value) for dim in shape.dim)


def _onnx_node_flops(
    node: onnx.NodeProto,
    output: tuple[int, ...],
    shapes: Mapping[str, tuple[int, ...] | None],
    weights: Mapping[str, tuple[int, ...]],
) -> tuple[int, bool]:
    """Return (FLOPs for one sample, whether the fallback convention was used)."""
    elements = math.prod(output)
    op = node.op_type
    if op in ONNX_MOVEMENT_OPS:
        return 0, False
    if op == "Conv":
        kernel = weights.get(node.input[1]) or shapes.get(node.input[1])
        # The weight is (Cout, Cin / groups, kH, kW), so its size after the first axis is the
        # multiply-adds behind one output element.
        return 2 * elements * math.prod(kernel[1:]), False
    if op in ("Gemm", "MatMul"):
        first = shapes.get(node.input[0])
        transposed = op == "Gemm" and any(attribute.name == "transA" and attribute.i for attribute in node.attribute)
        inner = first[0] if transposed else first[-1]
        return 2 * elements * inner, False
    if op == "BatchNormalization":
        return 2 * elements, False
    if op in ONNX_ELEMENTWISE_OPS:
        return elements, False
    if op in ONNX_POOL_OPS:
        kernel = next(attribute.ints for attribute in node.attribute if attribute.name == "kernel_shape")
        return elements * math.prod(kernel), False
    if op == "GlobalAveragePool":
        return math.prod(shapes.get(node.input[0]) or output), False
    return elements, True


def _dependents(source: str, consumers: Sequence[tuple[Sequence[str], str]]) -> list[str]:
    """Return the nodes (by first output) that depend on tensor `source`, in graph order."""
    reached = {source}
    found = []
    for inputs, output in consumers:
        if any(name in reached for name in inputs):
            reached.add(output)
            found.append(output)
    return found


def _fx_flops(model: Model) -> GraphFlops:
    # NOTE: this reads TorchModel's private fx graph and site nodes, because wnplan has no
    # public accessor for them. The count then covers exactly the graph that is run.
    nodes = list(model._module.graph.nodes)
    site_nodes = model._site_nodes

    per_node: dict[str, int] = {}
    estimated: set[str] = set()
    for node in nodes:
        if node.op != "call_function":
            continue
        flops, guessed = _fx_node_flops(node)
        per_node[node.name] = flops
        if guessed:
            estimated.add(_fx_op_name(node))

    downstream = tuple(sum(per_node[name] for name in _fx_dependents(site, nodes)) for site in site_nodes)
    total = sum(per_node.values())
    elements = tuple(math.prod(site.shape) for site in model.sites)
    return GraphFlops(total, downstream, elements, per_node, tuple(sorted(estimated)))


def _fx_op_name(node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _fx_sample_shape(value) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    return tuple(int(dim) for dim in shape[1:])


def _fx_node_flops(node) -> tuple[int, bool]:
    """Return (FLOPs for one sample, whether the fallback convention was used)."""
    op = _fx_op_name(node)
    value = node.meta.get("val")
    if op in FX_MOVEMENT_OPS or value is None:
        return 0, False
    if isinstance(value, (tuple, list)):
        value = value[0]
    shape = _fx_sample_shape(value)
    if shape is None:
        return 0, False
    elements = math.prod(shape)
    if op in FX_CONV_OPS:
        weight = node.args[1].meta["val"].shape
        return 2 * elements * math.prod(int(dim) for dim in weight[1:]), False
    if op in FX_MATMUL_OPS:
        first = node.args[1] if op == "addmm" else node.args[0]
        inner = int(first.meta["val"].shape[-1])
        return 2 * elements * inner, False
    if op in FX_BATCH_NORM_OPS:
        return 2 * elements, False
    if op in FX_ELEMENTWISE_OPS:
        return elements, False
    if op in FX_POOL_OPS:
        return elements * math.prod(_as_ints(node.args[1])), False
    return elements, True


def _as_ints(values: int | Iterable[int]) -> list[int]:
    if isinstance(values, int):
        return [values, values]
    return [int(value) for value in values]


def _fx_dependents(site, nodes) -> list[str]:
    """Return the names of the call_function nodes that depend on `site`, in graph order."""
    reached = {site}
    found = []
    for node in nodes:
        if node.op == "call_function" and any(argument in reached for argument in node.all_input_nodes):
            reached.add(node)
            found.append(node.name)
    return found
