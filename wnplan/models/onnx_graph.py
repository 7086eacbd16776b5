"""Graph edits on ONNX models: site discovery, noise insertion and suffix extraction.

All edits work on copies. Every rewritten model is topologically sorted and passes
`onnx.checker` before a session is built from it. Inserted operators use the model's own
default-domain opset; a model that imports none (an ai.onnx.ml-only model) gets an import
that its IR version can carry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from wnplan.errors import ModelError
from wnplan.models.onnx_files import default_opset, opset_for_ir_version
from wnplan.quantize import Quantizer

logger = logging.getLogger(__name__)

# Operators that only move or reinterpret data; their outputs are not sites.
DATA_MOVEMENT_OPS = frozenset(
    {
        "Flatten",
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Identity",
        "Shape",
        "Size",
        "Constant",
        "ConstantOfShape",
        "Cast",
        "CastLike",
        "Gather",
        "Slice",
        "Expand",
        "Dropout",
        "Split",
        "Tile",
        "DepthToSpace",
        "SpaceToDepth",
    }
)

FLOAT_TYPES = frozenset(
    {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
)

NOISE_INPUT_PREFIX = "wnplan_noise"

# Operator domains whose outputs can be sites: standard ONNX and the standard ONNX-ML
# operators of classical models. Outputs of custom-domain operators are not sites.
SITE_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Return the tensors a node reads, including outer-scope names used by its sub-graphs."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        for graph in _subgraphs(attribute):
            names.extend(sorted(_outer_names(graph)))
    return names


def _subgraphs(attribute: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attribute.type == onnx.AttributeProto.GRAPH:
        return [attribute.g]
    if attribute.type == onnx.AttributeProto.GRAPHS:
        return list(attribute.graphs)
    return []


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    defined = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(name for name in node_inputs(node) if name not in defined)
        defined.update(node.output)
    return used


def sort_topologically(graph: onnx.GraphProto, source: str = "the ONNX graph") -> list[onnx.NodeProto]:
    """Return the graph's nodes in a topological order, keeping the given order where valid.

    Raises:
        ModelError: the graph has a cycle or reads a tensor that nothing defines; the
            message starts with `source`.
    """
    available = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    available.add("")
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        remaining = []
        for node in pending:
            if all(name in available for name in node_inputs(node)):
                ordered.append(node)
                available.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            missing = sorted(
                {name for node in remaining for name in node_inputs(node)} - available
            )
            raise ModelError(
                f"{source} has a cycle or reads undefined tensors {missing[:5]}; re-export the model"
            )
        pending = remaining
    return ordered


def tensor_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Return the inferred type of every named tensor of the main graph."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as error:  # inference is best effort; onnx raises several error types
        logger.debug("shape inference failed: %s", error)
        inferred = model
    graph = inferred.graph
    types = {value.name: value.type for value in graph.value_info}
    types.update({value.name: value.type for value in graph.input})
    types.update({value.name: value.type for value in graph.output})
    for init in graph.initializer:
        types.setdefault(init.name, helper.make_tensor_type_proto(init.data_type, list(init.dims)))
    return types


def elem_type(types: dict[str, onnx.TypeProto], name: str) -> int | None:
    kind = types.get(name)
    if kind is None or not kind.HasField("tensor_type"):
        return None
    return kind.tensor_type.elem_type


def depends_on_inputs(graph: onnx.GraphProto, nodes: Sequence[onnx.NodeProto]) -> set[str]:
    """Return the tensors whose values depend on a graph input (not only on constants)."""
    initializers = {init.name for init in graph.initializer}
    live = {value.name for value in graph.input if value.name not in initializers}
    for node in nodes:
        if any(name in live for name in node_inputs(node)):
            live.update(name for name in node.output if name)
    return live


def reaches(nodes: Sequence[onnx.NodeProto], start: str, targets: set[str]) -> bool:
    """Return whether any of `targets` depends on tensor `start`."""
    reached = {start}
    for node in nodes:
        if any(name in reached for name in node_inputs(node)):
            reached.update(node.output)
    return bool(reached & targets)


def with_outputs(model: onnx.ModelProto, names: Iterable[str], types: dict) -> onnx.ModelProto:
    """Return a copy of the model whose outputs are the given tensors."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    for name in names:
        copy.graph.output.append(_value_info(name, types))
    check_model(copy)
    return copy


def insert_noise(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    parts: Sequence[tuple[bool, bool]],
    types: dict,
    quantizers: Sequence[Quantizer | None] | None = None,
) -> onnx.ModelProto:
    """Return a copy with `x · mul + add`, then optional fake-quantization, on each named tensor.

    For tensor k, `parts[k]` tells whether the Mul and the Add are present. Their operands are
    new graph inputs named `wnplan_noise_mul_k` and `wnplan_noise_add_k`, fed by the caller.
    `quantizers[k]`, if given, rounds the (noisy) value to its levels, as an ADC after an
    analog computation would. The inserted nodes follow the producer of each tensor, so the
    order stays topological.
    """
    quantizers = quantizers or [None] * len(tensors)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    opset = default_opset(copy)
    if opset is None and tensors:
        opset = opset_for_ir_version(copy.ir_version)
        copy.opset_import.append(helper.make_opsetid("", opset))
        logger.info("the model imports no default ONNX opset; the inserted nodes use opset %d", opset)
    producers = {output: position for position, node in enumerate(graph.node) for output in node.output}

    inserts: dict[int, list[onnx.NodeProto]] = {}
    renames: dict[str, str] = {}
    for position, (name, (has_mul, has_add)) in enumerate(zip(tensors, parts, strict=True)):
        nodes, noisy = _noise_nodes(graph, name, position, has_mul, has_add, types)
        if quantizers[position] is not None:
            quantize_nodes, noisy = _quantize_nodes(
                graph, noisy, position, quantizers[position], types, name, opset or MODERN_QUANTIZE_OPSET
            )
            nodes.extend(quantize_nodes)
        inserts.setdefault(producers.get(name, -1), []).extend(nodes)
        renames[name] = noisy

    inserted_names = {output for nodes in inserts.values() for node in nodes for output in node.output}
    originals = list(graph.node)
    del graph.node[:]
    graph.node.extend(inserts.get(-1, []))
    for position, node in enumerate(originals):
        _rename_inputs(node, renames)
        graph.node.append(node)
        graph.node.extend(inserts.get(position, []))
    for output in graph.output:
        if output.name in renames:
            output.name = renames[output.name]

    _declare_initializers_as_inputs(copy)
    check_model(copy)
    logger.debug("inserted noise at %d tensors (%d new tensors)", len(tensors), len(inserted_names))
    return copy


def _noise_nodes(
    graph: onnx.GraphProto, name: str, position: int, has_mul: bool, has_add: bool, types: dict
) -> tuple[list[onnx.NodeProto], str]:
    value_type = elem_type(types, name) or TensorProto.FLOAT
    current = name
    nodes = []
    for part, present in (("mul", has_mul), ("add", has_add)):
        if not present:
            continue
        operand = f"{NOISE_INPUT_PREFIX}_{part}_{position}"
        graph.input.append(helper.make_tensor_value_info(operand, value_type, _shape_of(types, name)))
        result = f"{name}__wnplan_{part}"
        nodes.append(
            helper.make_node(part.capitalize(), [current, operand], [result], name=f"wnplan_{part}_{position}")
        )
        current = result
    return nodes, current


# Round exists from opset 11, and Max and Min broadcast from opset 8.
MODERN_QUANTIZE_OPSET = 11


def _quantize_nodes(
    graph: onnx.GraphProto,
    current: str,
    position: int,
    quantizer: Quantizer,
    types: dict,
    site: str,
    opset: int,
) -> tuple[list[onnx.NodeProto], str]:
    """Return nodes computing low + clip(round((x − low)/step), 0, levels − 1) · step.

    From opset 11 on, Round rounds half to even, as torch.round does. Older opsets lack Round,
    so there the nodes compute floor(v + 0.5) and clip with Clip-6 attributes.
    """
    value_type = elem_type(types, site) or TensorProto.FLOAT
    dtype = helper.tensor_dtype_to_np_dtype(value_type)
    prefix = f"wnplan_quant_{position}"
    top = float(quantizer.levels - 1)
    if opset >= MODERN_QUANTIZE_OPSET:
        rounding = [("Round", [None], {}), ("Max", [None, "zero"], {}), ("Min", [None, "top"], {})]
    else:
        # NOTE: floor(v + 0.5) rounds exact halves up where Round rounds them to even.
        rounding = [("Add", [None, "half"], {}), ("Floor", [None], {}), ("Clip", [None], {"min": 0.0, "max": top})]
    steps = [
        ("Sub", [None, "low"], {}),
        ("Div", [None, "step"], {}),
        *rounding,
        ("Mul", [None, "step"], {}),
        ("Add", [None, "low"], {}),
    ]
    constants = {"low": quantizer.low, "step": quantizer.step, "zero": 0.0, "top": top, "half": 0.5}
    used = {name for _, inputs, _ in steps for name in inputs if name}
    for key in sorted(used):
        graph.initializer.append(numpy_helper.from_array(np.array(constants[key], dtype=dtype), f"{prefix}_{key}"))
    nodes = []
    for number, (op, inputs, attributes) in enumerate(steps):
        inputs = [current if name is None else f"{prefix}_{name}" for name in inputs]
        result = f"{site}__{prefix}_{number}"
        nodes.append(helper.make_node(op, inputs, [result], name=f"{prefix}_{number}", **attributes))
        current = result
    return nodes, current


def _rename_inputs(node: onnx.NodeProto, renames: dict[str, str]) -> None:
    for slot, name in enumerate(node.input):
        if name in renames:
            node.input[slot] = renames[name]
    for attribute in node.attribute:
        for subgraph in _subgraphs(attribute):
            local = {value.name for value in subgraph.input} | {
                output for inner in subgraph.node for output in inner.output
            }
            outer = {old: new for old, new in renames.items() if old not in local}
            for inner in subgraph.node:
                _rename_inputs(inner, outer)
            for output in subgraph.output:
                if output.name in outer:
                    output.name = outer[output.name]


def extract_suffix(
    model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto], site: str, types: dict
) -> tuple[onnx.ModelProto, list[str]]:
    """Return the sub-model downstream of tensor `site`, and its inputs (site first).

    The suffix holds every node that depends on `site`. Its other inputs are the tensors those
    nodes read from outside the suffix, such as the start of a skip connection. Every input
    carries the samples along its first axis, so callers can split, pad and stack inputs by
    sample: a value that does not (a constant, or a shape computed by Shape or Size) is
    computed inside the suffix instead, from the inputs it needs.
    """
    reached = {site}
    chosen: set[int] = set()
    for position, node in enumerate(nodes):
        if any(name in reached for name in node_inputs(node)):
            chosen.add(position)
            reached.update(node.output)

    carrying = carries_samples(model.graph, nodes)
    producers = {output: position for position, node in enumerate(nodes) for output in node.output}
    pending = sorted(chosen)
    while pending:
        for name in node_inputs(nodes[pending.pop()]):
            producer = producers.get(name)
            if producer is not None and producer not in chosen and name not in carrying:
                chosen.add(producer)
                pending.append(producer)
    suffix_nodes = [nodes[position] for position in sorted(chosen)]

    initializers = {init.name: init for init in model.graph.initializer}
    produced = {output for node in suffix_nodes for output in node.output}
    boundary = [site]
    for node in suffix_nodes:
        for name in node_inputs(node):
            if name not in produced and name not in initializers and name not in boundary:
                boundary.append(name)

    used = {name for node in suffix_nodes for name in node_inputs(node)}
    graph = helper.make_graph(
        suffix_nodes,
        f"{model.graph.name}_suffix",
        [_value_info(name, types) for name in boundary],
        [model.graph.output[0]],
        [init for name, init in initializers.items() if name in used],
    )
    suffix = helper.make_model(graph, opset_imports=list(model.opset_import))
    suffix.ir_version = model.ir_version
    # Model-local functions that suffix nodes call travel with them.
    suffix.functions.extend(model.functions)
    _declare_initializers_as_inputs(suffix)
    check_model(suffix)
    return suffix, boundary


def carries_samples(graph: onnx.GraphProto, nodes: Sequence[onnx.NodeProto]) -> set[str]:
    """Return the tensors whose values depend on the samples, not only on their shape.

    Shape and Size read only the shape of their input, so their outputs, and constants,
    do not carry samples.
    """
    initializers = {init.name for init in graph.initializer}
    carrying = {value.name for value in graph.input if value.name not in initializers}
    for node in nodes:
        if node.op_type in ("Shape", "Size"):
            continue
        if any(name in carrying for name in node_inputs(node)):
            carrying.update(name for name in node.output if name)
    return carrying


def _declare_initializers_as_inputs(model: onnx.ModelProto) -> None:
    """List every initializer as a graph input, as IR versions before 4 require."""
    if model.ir_version >= 4:
        return
    graph = model.graph
    declared = {value.name for value in graph.input}
    for init in graph.initializer:
        if init.name not in declared:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))


def _value_info(name: str, types: dict) -> onnx.ValueInfoProto:
    value_type = elem_type(types, name) or TensorProto.FLOAT
    return helper.make_tensor_value_info(name, value_type, _shape_of(types, name))


def _shape_of(types: dict, name: str) -> list | None:
    """Return the tensor's shape with the batch dimension left symbolic, or None if unknown."""
    kind = types.get(name)
    if kind is None or not kind.tensor_type.HasField("shape"):
        return None
    dims: list[int | str] = []
    for position, dim in enumerate(kind.tensor_type.shape.dim):
        if position == 0:
            dims.append("batch")
        elif dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        else:
            dims.append(dim.dim_param or f"d{position}")
    return dims


def check_model(model: onnx.ModelProto, problem: str = "the rewritten ONNX graph is invalid") -> None:
    """Raise ModelError, starting with `problem`, if the model fails `onnx.checker`.

    The checker requires a shape on every graph input and output, but shape inference leaves
    some tensors without one (for example after Reshape to a computed shape), and wnplan makes
    such tensors outputs. onnxruntime runs them, and the checker is given them with an empty shape.
    """
    try:
        onnx.checker.check_model(_with_shape_fields(model))
    except onnx.checker.ValidationError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "invalid graph"
        raise ModelError(f"{problem}: {first_line}") from None


def _with_shape_fields(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return the model, or a copy in which graph inputs and outputs without a shape have an empty one."""
    graph = model.graph
    if all(value.type.tensor_type.HasField("shape") for value in (*graph.input, *graph.output)
           if value.type.HasField("tensor_type")):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in (*copy.graph.input, *copy.graph.output):
        if value.type.HasField("tensor_type") and not value.type.tensor_type.HasField("shape"):
            value.type.tensor_type.shape.SetInParent()
    return copy
