"""Trainable PyTorch twins of loaded models, with noise sites that can be trained through.

A twin is a torch.fx GraphModule with its own copy of the model's parameters and buffers:

- from a `.pt2` (TorchModel), the exported graph is copied. Its BatchNorm nodes, which the
  export fixes in inference mode, are replaced by `BatchNormSwitch` modules that follow the
  twin's train/eval mode;
- from an ONNX model, the graph is converted by `wnplan.train.onnx_to_torch`.

Each wnplan site index maps to the graph node after which noise goes. The user's model
object and file are never modified, because the twin clones every tensor it uses.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from wnplan.errors import ModelError
from wnplan.models import Model
from wnplan.train.layers import LINEAR_TARGETS, BatchNormSwitch, conv, linear
from wnplan.train.stacked import build_stacked_graph, elementwise_call

logger = logging.getLogger(__name__)

# Parameter kinds: "weight" (conv/linear weights, the only clamped kind), "bias",
# "norm_scale" and "norm_shift" (BatchNorm affine), "parameter" (any other trainable tensor).
# Buffer kinds: "running_mean", "running_var" (trained state, kept per configuration).
TRAINABLE_KINDS = ("weight", "bias", "norm_scale", "norm_shift", "parameter")
RUNNING_KINDS = ("running_mean", "running_var")
BATCH_NORM_KINDS = ("norm_scale", "norm_shift", "running_mean", "running_var")

_CONVOLUTION_TARGETS = frozenset(
    {
        torch.ops.aten.conv1d.default,
        torch.ops.aten.conv2d.default,
        torch.ops.aten.conv3d.default,
        torch.ops.aten.conv1d.padding,
        torch.ops.aten.conv2d.padding,
        torch.ops.aten.conv3d.padding,
    }
)
_BATCH_NORM_TARGETS = {
    torch.ops.aten.batch_norm.default: "batch_norm",
    torch.ops.aten._native_batch_norm_legit_no_training.default: "legit_no_training",
}


@dataclass(frozen=True)
class TensorRole:
    """The role of one parameter or buffer of a twin.

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
        site_shapes: per-sample shape of each site's value, by site index.
        sample_numel: per-sample element count of every node output, summed (for memory
            estimates).
        site_errors: error message by site index, for each site whose value is not laid
            out as (samples, *site shape), so noise cannot go there.
    """

    module: fx.GraphModule
    input_node: fx.Node
    logits_node: fx.Node
    site_nodes: tuple[fx.Node, ...]
    roles: dict[str, TensorRole]
    source_format: str
    site_shapes: tuple[tuple[int, ...], ...] = ()
    sample_numel: int = 0
    site_errors: dict[int, str] = field(default_factory=dict)

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

    def stacked_names(self) -> list[str]:
        """Return the names of the tensors kept per configuration, in the stacked modules' input order."""
        return self.trainable_names() + self.running_names()

    def site_module(
        self,
        sites: Sequence[int],
        transform: Callable[..., torch.Tensor],
        arity: int,
        return_sites: bool = False,
    ) -> fx.GraphModule:
        """Build a GraphModule that applies `transform` after each site in `sites`.

        The module takes the samples, then `arity` extra inputs per site in the order of
        `sites`, and calls `transform(value, *extra)` on each site's value. It returns the
        logits, followed, with `return_sites`, by each site's value before and after the
        transform. It shares every tensor with `module`.

        Raises:
            ModelError: a site in `sites` has an entry in `site_errors`.
        """
        self.check_sites(sites)
        graph = fx.Graph()
        samples = graph.placeholder("samples")
        extra = self._site_placeholders(graph, sites, arity)
        before: dict[fx.Node, fx.Node] = {}
        env: dict[fx.Node, fx.Node] = {}
        for node in self._needed_nodes():
            copied = samples if node is self.input_node else graph.node_copy(node, lambda arg: env[arg])
            env[node] = self._transformed(graph, node, copied, extra, before, transform)
        self._finish(graph, env, before, sites, return_sites)
        return fx.GraphModule(self.module, graph)

    def stacked_site_module(
        self,
        sites: Sequence[int],
        transform: Callable[..., torch.Tensor],
        arity: int,
        return_sites: bool = False,
    ) -> fx.GraphModule:
        """Build the module of `site_module` for K configurations at once.

        Every input has a leading configuration dimension K: the samples (K, N, ...), the
        extra site inputs, then the tensors named by `stacked_names()`, each (K, ...). So do
        the outputs. Its BatchNorm layers follow the module's own train/eval mode.

        Raises:
            ModelError: a site in `sites` has an entry in `site_errors`.
        """
        self.check_sites(sites)
        graph = fx.Graph()
        samples = graph.placeholder("samples")
        extra = self._site_placeholders(graph, sites, arity)
        tensors = {name: graph.placeholder(f"stacked_{index}") for index, name in enumerate(self.stacked_names())}
        before: dict[fx.Node, fx.Node] = {}
        stacked_transform = elementwise_call(transform, [True] * (arity + 1))

        def after(node: fx.Node, copied: fx.Node) -> fx.Node:
            return self._transformed(graph, node, copied, extra, before, stacked_transform)

        modules: dict[str, nn.Module] = {}
        env = build_stacked_graph(
            self.module, self._needed_nodes(), {self.input_node: samples}, graph, tensors, modules, after
        )
        self._finish(graph, env, before, sites, return_sites)
        root: dict[str, object] = dict(modules)
        for node in graph.nodes:
            if node.op == "get_attr":
                root[str(node.target)] = _attr(self.module, node)
        return fx.GraphModule(root, graph)

    def check_sites(self, sites: Sequence[int]) -> None:
        """Raise ModelError for the first of `sites` that trained mode cannot put noise on."""
        for index in sites:
            if index in self.site_errors:
                raise ModelError(self.site_errors[index])

    def _needed_nodes(self) -> list[fx.Node]:
        needed = _ancestors(self.logits_node)
        return [node for node in self.module.graph.nodes if node in needed]

    def _site_placeholders(self, graph: fx.Graph, sites: Sequence[int], arity: int) -> dict[fx.Node, list[fx.Node]]:
        return {
            self.site_nodes[index]: [graph.placeholder(f"site{position}_arg{slot}") for slot in range(arity)]
            for position, index in enumerate(sites)
        }

    @staticmethod
    def _transformed(graph, node, copied, extra, before, transform) -> fx.Node:
        if node not in extra:
            return copied
        before[node] = copied
        return graph.call_function(transform, (copied, *extra[node]))

    def _finish(self, graph, env, before, sites, return_sites) -> None:
        outputs = [env[self.logits_node]]
        if return_sites:
            for index in sites:
                node = self.site_nodes[index]
                outputs.extend([before[node], env[node]])
        graph.output(tuple(outputs))
        graph.lint()


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
        expected = "a .pt2 program, a state dict with --factory, or an ONNX model"
        raise ModelError(f"{model.path}: trained mode needs {expected}; got format {model.format!r}")
    if not twin.trainable_names():
        raise ModelError(
            f"{model.path}: trained mode found nothing to train: the model has no trainable parameters; " +
            "profile it with --mode inference"
        )
    twin.site_shapes = tuple(site.shape for site in model.sites)
    twin.sample_numel = _probe(twin, model)
    logger.info(
        "built a %s twin with %d sites and %d trainable parameters",
        twin.source_format, len(twin.site_nodes), twin.parameter_count(),
    )
    return twin


def _twin_from_torch(model: Model) -> Twin:
    # TorchModel keeps its exported GraphModule and site nodes private. The twin reads them
    # and clones every tensor the graph uses, so the model stays untouched.
    source: fx.GraphModule = model._module
    outputs = [node for node in source.graph.nodes if node.op == "output"]
    logits = _first_node(outputs[0].args[0])
    inputs = [node for node in source.graph.nodes if node.op == "placeholder"]
    needed = _ancestors(logits)
    if any(node.op == "placeholder" and node is not inputs[0] for node in needed):
        raise ModelError(f"{model.path}: trained mode supports models with one input, found {len(inputs)}")

    root = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in source.graph.nodes:
        if node not in needed:
            continue
        if node.op == "get_attr":
            _copy_attribute(root, str(node.target), _attr(source, node))
        kind = _BATCH_NORM_TARGETS.get(node.target) if node.op == "call_function" else None
        if kind is not None:
            env[node] = _switch_node(graph, root, node, kind, env)
            continue
        env[node] = graph.node_copy(node, lambda arg: env[arg])
        _use_stacked_layer(env[node])
    graph.output((env[logits],))
    graph.lint()
    module = fx.GraphModule(root, graph)

    # GraphModule keeps the graph it is given, so the copied nodes are the module's nodes.
    return Twin(
        module=module,
        input_node=env[inputs[0]],
        logits_node=env[logits],
        site_nodes=tuple(env[node] for node in model._site_nodes),
        roles=classify_tensors(module),
        source_format=model.format,
    )


def _switch_node(graph: fx.Graph, root: nn.Module, node: fx.Node, kind: str, env: dict) -> fx.Node:
    """Add a BatchNormSwitch in place of an exported inference-mode BatchNorm node."""
    name = f"wnplan_batch_norm_{sum(isinstance(child, BatchNormSwitch) for child in root.children())}"
    x, weight, bias, mean, var = node.args[:5]
    momentum, eps = (node.args[6], node.args[7]) if kind == "batch_norm" else (node.args[5], node.args[6])
    root.add_module(name, BatchNormSwitch(float(momentum), float(eps), as_tuple=kind == "legit_no_training"))
    arguments = tuple(env[arg] if isinstance(arg, fx.Node) else arg for arg in (x, weight, bias, mean, var))
    return graph.call_module(name, arguments)


def _use_stacked_layer(node: fx.Node) -> None:
    """Retarget an ATen linear or (non-transposed) convolution node to the twin's layers."""
    if node.op != "call_function":
        return
    if node.target is torch.ops.aten.linear.default:
        node.target = linear
    elif node.target in _CONVOLUTION_TARGETS:
        node.target = conv
    elif node.target is torch.ops.aten.convolution.default and not node.args[6]:
        x, weight, bias, stride, padding, dilation, _, _, groups = node.args[:9]
        node.target = conv
        node.args = (x, weight, bias, stride, padding, dilation, groups)


def _copy_attribute(root: nn.Module, path: str, value) -> None:
    """Store a clone of `value` in `root` at a dotted path, creating empty modules on the way."""
    *parents, leaf = path.split(".")
    owner = root
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, nn.Parameter):
        owner.register_parameter(leaf, nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad))
    elif isinstance(value, torch.Tensor):
        owner.register_buffer(leaf, value.detach().clone())
    else:
        setattr(owner, leaf, copy.deepcopy(value))


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
            for kind, arg in zip(BATCH_NORM_KINDS, node.args[1:5], strict=False):
                if isinstance(arg, fx.Node) and arg.op == "get_attr":
                    roles[str(arg.target)] = TensorRole(kind, 0, str(arg.target))
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
        ModelError: the twin fails on a batch of two (for example a graph with a fixed
            batch), or on any batch.
    """
    module = twin.module.eval()
    recorder = _SizeRecorder(module, twin.site_nodes, twin.logits_node)
    failure = recorder.try_run(_zeros(model, 2))
    if failure is None:
        twin.site_errors = _site_errors(model, twin.site_nodes, recorder.shapes)
        return recorder.total // 2
    if _SizeRecorder(module).try_run(_zeros(model, 1)) is not None:
        raise ModelError(f"{model.path}: the trainable copy of the model fails to run ({failure}); " +
                         "profile it with --mode inference, or train from a .pt2 export")
    declared = model.input_shape[0] if model.input_shape else None
    if declared is not None:
        cause = f"the model declares a fixed batch size of {declared}"
    else:
        cause = "a node fixes the batch size (for example a Reshape to [1, -1])"
    problem = f"the trainable copy runs on 1 sample but fails on a batch of 2 ({failure}): {cause}"
    advice = "export the model with a dynamic batch dimension, with -1 or 0 as the batch entry of every Reshape"
    raise ModelError(f"{model.path}: {problem}; {advice}")


def _site_errors(model: Model, nodes: Sequence[fx.Node], shapes: dict[fx.Node, tuple[int, ...]]) -> dict[int, str]:
    """Return a message for each site whose tensor value on 2 samples is not (2, *site shape).

    With dynamic dimensions after the batch, the probe's sizes differ from the model's
    site shapes, so only the batch size and the rank are compared.
    """
    static = all(dim is not None for dim in model.input_shape[1:])
    errors: dict[int, str] = {}
    for site, node in zip(model.sites, nodes, strict=True):
        shape = shapes.get(node)
        if shape is None:
            continue
        expected = (2, *site.shape)
        matches = shape == expected if static else len(shape) == len(expected) and shape[0] == 2
        if not matches:
            problem = (
                f"site {site.index} ({site.name}) has shape {shape} for a batch of 2 samples, " +
                f"not (2, {', '.join(str(dim) for dim in site.shape)})"
            )
            advice = "trained mode needs the samples in the first dimension; choose other sites with --sites"
            errors[site.index] = f"{model.path}: {problem}; {advice}"
    return errors


def _zeros(model: Model, batch: int) -> torch.Tensor:
    return torch.zeros([batch] + [dim or 1 for dim in model.input_shape[1:]])


class _SizeRecorder(fx.Interpreter):
    """Interpreter that sums the element counts of tensor node outputs and records the site shapes."""

    def __init__(
        self, module: fx.GraphModule, site_nodes: Sequence[fx.Node] = (), logits_node: fx.Node | None = None
    ) -> None:
        super().__init__(module)
        self.logits_node = logits_node
        self.total = 0
        self.failed_node: fx.Node | None = None
        self.site_nodes = set(site_nodes)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, node: fx.Node):
        try:
            result = super().run_node(node)
        except Exception:
            self.failed_node = self.failed_node or node
            raise
        if node.op in ("call_function", "call_module", "placeholder") and isinstance(result, torch.Tensor):
            self.total += int(result.numel())
        if (node in self.site_nodes or node is self.logits_node) and isinstance(result, torch.Tensor):
            self.shapes[node] = tuple(result.shape)
        return result

    def try_run(self, samples: torch.Tensor) -> str | None:
        """Run on `samples`; return None, or the failing node and the first line of its error."""
        try:
            with torch.no_grad():
                self.run(samples)
        except Exception as error:  # any operator can fail on an unexpected shape or type
            text = str(error).strip()
            first = text.splitlines()[0][:300] if text else type(error).__name__
            node = self.failed_node.name if self.failed_node is not None else "?"
            return f"node {node}: {first}"
        rows = self.shapes.get(self.logits_node, (samples.shape[0],))[:1]
        if rows != (samples.shape[0],):
            # For example a Reshape to [1, -1] after the last layer runs, but mixes the samples.
            return f"the output has {rows[0] if rows else 0} rows for {samples.shape[0]} samples"
        return None


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
