"""Trainable PyTorch twins of loaded models, with noise sites that can be trained through.

A twin is a torch.fx GraphModule with its own copy of the model's parameters and buffers:

- from a `.pt2` (TorchModel), the exported graph is copied. Its BatchNorm nodes, which the
  export fixes in inference mode, are replaced by `BatchNormSwitch` modules that follow the
  twin's train/eval mode;
- from an ONNX model, the graph is converted by `wnplan.train.onnx_to_torch`.

Each wnplan site index maps to the graph node after which noise goes. The user's model
object and file are never modified: the twin deep-copies every tensor it holds.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from wnplan.errors import ModelError
from wnplan.models import Model
from wnplan.train.layers import LINEAR_TARGETS, BatchNormSwitch

logger = logging.getLogger(__name__)

# Parameter kinds: "weight" (conv/linear weights, the only clamped kind), "bias",
# "norm" (BatchNorm scale and shift), "parameter" (any other trainable tensor).
# Buffer kinds: "running_mean", "running_var" (trained state, kept per configuration).
TRAINABLE_KINDS = ("weight", "bias", "norm", "parameter")
RUNNING_KINDS = ("running_mean", "running_var")

_BATCH_NORM_TARGETS = {
    torch.ops.aten.batch_norm.default: "batch_norm",
    torch.ops.aten._native_batch_norm_legit_no_training.default: "legit_no_training",
}


@dataclass(frozen=True)
class TensorRole:
    """What a parameter or buffer of a twin is.

    Attributes:
        kind: one of TRAINABLE_KINDS or RUNNING_KINDS.
        fan_in: inputs per output unit of the layer it belongs to (weights and biases of
            conv/linear layers), for the layers' default initialisation; 0 when unknown.
        label: name shown in records (the module path, or the ONNX initializer name).
    """

    kind: str
    fan_in: int = 0
    label: str = ""


@dataclass
class Twin:
    """A trainable copy of a model's graph, with its sites mapped to graph nodes.

    Attributes:
        module: the GraphModule; it owns copies of the model's parameters and buffers.
        input_node: the graph's sample input.
        logits_node: the node producing the class scores.
        site_nodes: the node after which noise goes, per wnplan site index (0 is the input).
        roles: the role of every trained tensor, keyed by its name in `module`.
        source_format: the model's format ("pt2", "onnx", ...).
        sample_numel: per-sample element count of every node output, summed (for memory
            estimates).
    """

    module: fx.GraphModule
    input_node: fx.Node
    logits_node: fx.Node
    site_nodes: tuple[fx.Node, ...]
    roles: dict[str, TensorRole]
    source_format: str
    sample_numel: int = 0

    def trainable_names(self) -> list[str]:
        return sorted(name for name, role in self.roles.items() if role.kind in TRAINABLE_KINDS)

    def running_names(self) -> list[str]:
        return sorted(name for name, role in self.roles.items() if role.kind in RUNNING_KINDS)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Return the twin's trained tensors (parameters and running statistics) by name."""
        named = dict(self.module.named_parameters())
        named.update(self.module.named_buffers())
        return {name: named[name] for name in self.roles}

    def parameter_count(self) -> int:
        tensors = self.tensors()
        return sum(int(tensors[name].numel()) for name in self.trainable_names())

    def site_module(
        self,
        sites: Sequence[int],
        transform: Callable[..., torch.Tensor],
        arity: int,
        return_sites: bool = False,
    ) -> fx.GraphModule:
        """Build a GraphModule that applies `transform` to the value of each site in `sites`.

        The module takes the samples, then `arity` extra inputs per site in the order of
        `sites`, and calls `transform(value, *extra)` after each site. It returns the logits,
        followed, with `return_sites`, by each site's value before and after the transform.
        The module shares every tensor with `module`.
        """
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        extra = {}
        sample = graph.placeholder("samples")
        for position, index in enumerate(sites):
            extra[self.site_nodes[index]] = [graph.placeholder(f"site{position}_arg{slot}") for slot in range(arity)]

        before: dict[fx.Node, fx.Node] = {}

        def transformed(node: fx.Node, copied: fx.Node) -> fx.Node:
            if node not in extra:
                return copied
            before[node] = copied
            return graph.call_function(transform, (copied, *extra[node]))

        needed = _ancestors(self.logits_node)
        for node in self.module.graph.nodes:
            if node not in needed:
                continue
            if node is self.input_node:
                env[node] = transformed(node, sample)
                continue
            env[node] = transformed(node, graph.node_copy(node, lambda arg: env[arg]))

        outputs = [env[self.logits_node]]
        if return_sites:
            for index in sites:
                node = self.site_nodes[index]
                outputs.extend([before[node], env[node]])
        graph.output(tuple(outputs))
        graph.lint()
        return fx.GraphModule(self.module, graph)


def build_twin(model: Model) -> Twin:
    """Build a trainable twin of a loaded model, on copies of its tensors.

    Raises:
        ModelError: the model's format has no twin, or its graph uses an operator that
            cannot be trained (for ONNX, one the converter does not support).
    """
    if model.format == "onnx":
        from wnplan.train.onnx_to_torch import twin_from_onnx

        twin = twin_from_onnx(model)
    elif hasattr(model, "_module") and hasattr(model, "_site_nodes"):
        twin = _twin_from_torch(model)
    else:
        raise ModelError(
            f"{model.path}: trained mode needs a .pt2 program, a state dict with --factory, or an "
            f"ONNX model; got format {model.format!r}"
        )
    twin.sample_numel = _probe(twin, model)
    logger.info(
        "built a %s twin with %d sites and %d trainable parameters",
        twin.source_format, len(twin.site_nodes), twin.parameter_count(),
    )
    return twin


def _twin_from_torch(model: Model) -> Twin:
    # TorchModel keeps its exported GraphModule and site nodes private; the twin reads them
    # and copies every tensor, so the model stays untouched.
    source: fx.GraphModule = model._module
    root = copy.deepcopy(source)
    by_name = {node.name: node for node in root.graph.nodes}
    site_names = [node.name for node in model._site_nodes]
    outputs = [node for node in root.graph.nodes if node.op == "output"]
    logits = _first_node(outputs[0].args[0])
    inputs = [node for node in root.graph.nodes if node.op == "placeholder"]

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    switches = 0
    for node in root.graph.nodes:
        if node not in _ancestors(logits):
            continue
        if node.op == "placeholder":
            if node is not inputs[0]:
                raise ModelError(f"{model.path}: trained mode supports models with one input, found {len(inputs)}")
            env[node] = graph.placeholder(node.name)
            continue
        kind = _BATCH_NORM_TARGETS.get(node.target) if node.op == "call_function" else None
        if kind is None:
            env[node] = graph.node_copy(node, lambda arg: env[arg])
            continue
        name = f"wnplan_batch_norm_{switches}"
        switches += 1
        x, weight, bias, mean, var = node.args[:5]
        momentum, eps = (node.args[6], node.args[7]) if kind == "batch_norm" else (node.args[5], node.args[6])
        root.add_submodule(name, BatchNormSwitch(float(momentum), float(eps), as_tuple=kind == "legit_no_training"))
        arguments = tuple(env[arg] if isinstance(arg, fx.Node) else arg for arg in (x, weight, bias, mean, var))
        env[node] = graph.call_module(name, arguments)
        env[node].meta = dict(node.meta)
    graph.output((env[logits],))
    graph.lint()
    module = fx.GraphModule(root, graph)

    twin_nodes = {node.name: node for node in module.graph.nodes}
    copied = {original: env[node] for original, node in by_name.items() if node in env}
    site_nodes = tuple(twin_nodes[copied[name].name] for name in site_names)
    return Twin(
        module=module,
        input_node=twin_nodes[env[inputs[0]].name],
        logits_node=twin_nodes[env[logits].name],
        site_nodes=site_nodes,
        roles=classify_tensors(module),
        source_format=model.format,
    )


def classify_tensors(module: fx.GraphModule) -> dict[str, TensorRole]:
    """Return the role of every parameter and BatchNorm running statistic the graph reads.

    Roles come from the consuming operator: the weight and bias of a conv or linear
    operator, the scale and shift (and running statistics) of a BatchNormSwitch. Other
    parameters are of kind "parameter"; other buffers are constants and get no role.
    """
    parameters = dict(module.named_parameters())
    roles: dict[str, TensorRole] = {}
    for node in module.graph.nodes:
        if node.op == "call_module" and isinstance(module.get_submodule(str(node.target)), BatchNormSwitch):
            slots = dict(zip(("norm", "norm", "running_mean", "running_var"), node.args[1:5], strict=False))
            for kind, arg in zip(("norm", "norm", "running_mean", "running_var"), node.args[1:5], strict=False):
                if isinstance(arg, fx.Node) and arg.op == "get_attr":
                    roles[str(arg.target)] = TensorRole(kind, 0, str(arg.target))
            del slots
        elif node.op == "call_function" and node.target in LINEAR_TARGETS:
            weight = node.args[1] if len(node.args) > 1 else None
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
                continue
            fan_in = int(_attr(module, weight)[0].numel())
            roles[str(weight.target)] = TensorRole("weight", fan_in, str(weight.target))
            if isinstance(bias, fx.Node) and bias.op == "get_attr":
                roles[str(bias.target)] = TensorRole("bias", fan_in, str(bias.target))
    for name in parameters:
        roles.setdefault(name, TensorRole("parameter", 0, name))
    return roles


def _probe(twin: Twin, model: Model) -> int:
    """Run the twin on two zero samples; return the per-sample element count of all nodes.

    Raises:
        ModelError: the twin fails on a batch of two (for example a graph with a fixed batch).
    """
    shape = [2] + [dim or 1 for dim in model.input_shape[1:]]
    probe = torch.zeros(shape)
    module = twin.module.eval()
    try:
        with torch.no_grad():
            ShapeProp(module).propagate(probe)
    except Exception as error:  # any operator can fail on an unexpected shape
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(
            f"{model.path}: the trainable copy fails on a batch of 2 samples ({first}); export the model "
            "with a dynamic batch dimension"
        ) from None
    total = 0
    for node in module.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if node.op in ("call_function", "call_module", "placeholder") and hasattr(meta, "shape"):
            total += int(torch.Size(meta.shape).numel()) // 2
    return total


def _ancestors(output: fx.Node) -> set[fx.Node]:
    needed: set[fx.Node] = set()
    pending = [output]
    while pending:
        node = pending.pop()
        if node not in needed:
            needed.add(node)
            pending.extend(node.all_input_nodes)
    return needed


def _first_node(value) -> fx.Node:
    if isinstance(value, fx.Node):
        return value
    if isinstance(value, (tuple, list)):
        return _first_node(value[0])
    raise ModelError("the exported program returns no tensor")


def _attr(module: nn.Module, node: fx.Node) -> torch.Tensor:
    value = module
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def shared_tensors(twin: Twin) -> Mapping[str, torch.Tensor]:
    """Return the twin's tensors that every configuration shares (constants), by name."""
    named = dict(twin.module.named_parameters())
    named.update(twin.module.named_buffers())
    return {name: value for name, value in named.items() if name not in twin.roles}
