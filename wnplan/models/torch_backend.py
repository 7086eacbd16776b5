"""PyTorch models, run as torch.fx graphs taken from `torch.export` programs.

Every form (a `.pt2` program, a state dict with a `module:factory`, or a trusted pickled
module) becomes one exported graph. Sites are its compute nodes, so a module called at
two places gives two sites. Noise and suffixes are built as new GraphModules that share
the original's parameters; the user's module and file are never modified.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import fx

from wnplan.errors import ModelError
from wnplan.models.base import Model, NoiseArrays, Quantizers, Site, Suffix
from wnplan.quantize import Quantizer

logger = logging.getLogger(__name__)

# ATen operators that only move or reinterpret data; their outputs are not sites.
DATA_MOVEMENT_OPS = frozenset(
    {
        "view",
        "reshape",
        "_unsafe_view",
        "flatten",
        "unflatten",
        "permute",
        "transpose",
        "t",
        "squeeze",
        "unsqueeze",
        "expand",
        "clone",
        "contiguous",
        "alias",
        "detach",
        "_to_copy",
        "to",
        "type_as",
        "dropout",
        "feature_dropout",
        "select",
        "slice",
        "split",
        "split_with_sizes",
        "chunk",
        "unbind",
        "index_select",
        "identity",
        "lift_fresh_copy",
        "sym_size",
        "sym_numel",
    }
)


def apply_site_noise(x: torch.Tensor, mul: torch.Tensor | None, add: torch.Tensor | None) -> torch.Tensor:
    """Return `x * mul + add`, skipping absent parts (the node inserted after a noisy site)."""
    if mul is not None:
        x = x * mul
    if add is not None:
        x = x + add
    return x


def fake_quantize(x: torch.Tensor, low: float, step: float, top: float) -> torch.Tensor:
    """Return low + clip(round((x − low)/step), 0, top) · step (the node after a quantized site)."""
    return torch.clamp(torch.round((x - low) / step), 0.0, top) * step + low


class TorchModel(Model):
    """A classifier held as an exported torch.fx graph."""

    def __init__(self, path: Path, program: torch.export.ExportedProgram, format_name: str) -> None:
        super().__init__(path)
        self.format = format_name
        try:
            self._module = program.module()
        except Exception as error:  # torch raises many error types while unlifting
            raise ModelError(f"{path}: cannot build a module from the exported program ({error})") from None
        self._nodes = list(self._module.graph.nodes)
        placeholders = [node for node in self._nodes if node.op == "placeholder"]
        if not placeholders:
            raise ModelError(f"{path}: the exported program takes no input")
        self._input = placeholders[0]
        outputs = [node for node in self._nodes if node.op == "output"]
        flat_outputs = _flatten_output(outputs[0].args[0])
        if not flat_outputs:
            raise ModelError(f"{path}: the exported program returns no tensor")
        self._logits = flat_outputs[0]
        self.fixed_batch = self._static_batch()
        self._site_nodes = self._find_site_nodes()
        self._sites = self._describe_sites()
        self._modules: dict[tuple, fx.GraphModule] = {}

    @property
    def sites(self) -> tuple[Site, ...]:
        return self._sites

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        value = self._input.meta.get("val")
        if value is None:
            return ()
        return tuple(dim if isinstance(dim, int) else None for dim in value.shape)

    def _static_batch(self) -> int | None:
        shape = self.input_shape
        return shape[0] if shape and shape[0] is not None else None

    def _find_site_nodes(self) -> list[fx.Node]:
        live = {self._input}
        sites = [self._input] if _is_float(self._input) else []
        for node in self._nodes:
            if node.op != "call_function" or not any(arg in live for arg in node.all_input_nodes):
                continue
            live.add(node)
            if _is_site(node):
                sites.append(node)
        return [node for node in sites if node is self._logits or _reaches(node, self._logits)]

    def _describe_sites(self) -> tuple[Site, ...]:
        paths = [_module_path(node) for node in self._site_nodes]
        sites = []
        for index, (node, path) in enumerate(zip(self._site_nodes, paths, strict=True)):
            if node is self._input:
                name, op = "input", "input"
            else:
                op = _op_name(node)
                name = path if path and paths.count(path) == 1 else "/".join(filter(None, [path, node.name]))
            parameters = sum(
                int(_attr_value(self._module, arg).numel())
                for arg in node.all_input_nodes
                if arg.op == "get_attr" and isinstance(_attr_value(self._module, arg), torch.nn.Parameter)
            )
            shape = tuple(int(dim) for dim in node.meta["val"].shape[1:])
            sites.append(Site(index, name, op, shape, parameters, path))
        return tuple(sites)

    def _build(self, key: tuple, inputs: Sequence[fx.Node], outputs: Sequence[fx.Node], noisy: Sequence[fx.Node] = ()):
        module = self._modules.get(key)
        if module is None:
            module = build_graph_module(self._module, inputs, outputs, noisy)
            self._modules[key] = module
        return module

    def _run(self, x: np.ndarray, noise: NoiseArrays, quantize: Quantizers) -> np.ndarray:
        order = sorted(noise)
        noisy = [self._site_nodes[index] for index in order]
        quantized = {self._site_nodes[index]: quantizer for index, quantizer in quantize.items()}
        key = ("run", *order, *sorted(quantize.items()))
        module = self._modules.get(key)
        if module is None:
            module = build_graph_module(self._module, [self._input], [self._logits], noisy, quantized)
            self._modules[key] = module
        arguments = [torch.from_numpy(x)]
        for index in order:
            arguments.extend(_to_tensor(part) for part in noise[index])
        with torch.inference_mode():
            return module(*arguments)[0].numpy()

    def _activations(self, x: np.ndarray, indices: Sequence[int]) -> list[np.ndarray]:
        nodes = [self._site_nodes[index] for index in indices]
        module = self._build(("outputs", *indices), [self._input], nodes)
        with torch.inference_mode():
            return [value.numpy() for value in module(torch.from_numpy(x))]

    def suffix(self, index: int) -> Suffix:
        site_node = self._site_nodes[index]
        boundary = suffix_boundary(site_node)
        prefix = build_graph_module(self._module, [self._input], boundary)
        rest = build_graph_module(self._module, boundary, [self._logits])
        return _TorchSuffix(self._sites[index], prefix, rest, fixed_batch=self.fixed_batch)


class _TorchSuffix(Suffix):
    def __init__(self, site: Site, prefix: fx.GraphModule, rest: fx.GraphModule, fixed_batch):
        super().__init__(site, fixed_batch=fixed_batch)
        self._prefix = prefix
        self._rest = rest

    def _prepare(self, x: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            return [value.numpy() for value in self._prefix(torch.from_numpy(x))]

    def _run(self, values: Sequence[np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return self._rest(*(torch.from_numpy(value) for value in values))[0].numpy()


def suffix_boundary(site: fx.Node) -> list[fx.Node]:
    """Return the site node and every other value that nodes downstream of it read."""
    downstream = {site}
    for node in _following(site):
        if any(arg in downstream for arg in node.all_input_nodes):
            downstream.add(node)
    boundary = [site]
    for node in _following(site):
        if node not in downstream or node.op == "output":
            continue
        for arg in node.all_input_nodes:
            if arg not in downstream and arg.op != "get_attr" and arg not in boundary:
                boundary.append(arg)
    return boundary


def build_graph_module(
    source: fx.GraphModule,
    inputs: Sequence[fx.Node],
    outputs: Sequence[fx.Node],
    noisy: Sequence[fx.Node] = (),
    quantized: Mapping[fx.Node, Quantizer] | None = None,
) -> fx.GraphModule:
    """Return a GraphModule computing `outputs` from `inputs`, with noise after `noisy` nodes.

    The new module takes the inputs, then a (mul, add) pair per noisy node, and returns a
    tuple of the outputs. Nodes in `quantized` are fake-quantized after their noise. The
    module shares parameters with `source`.
    """
    quantized = quantized or {}
    needed = _ancestors(outputs, stop=set(inputs))
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for position, node in enumerate(inputs):
        env[node] = graph.placeholder(f"value_{position}")
    noise_inputs = {
        node: (graph.placeholder(f"noise_mul_{position}"), graph.placeholder(f"noise_add_{position}"))
        for position, node in enumerate(noisy)
    }
    def transform(node: fx.Node) -> None:
        if node in noise_inputs:
            env[node] = graph.call_function(apply_site_noise, (env[node], *noise_inputs[node]))
        if node in quantized:
            quantizer = quantized[node]
            arguments = (env[node], quantizer.low, quantizer.step, quantizer.levels - 1)
            env[node] = graph.call_function(fake_quantize, arguments)

    for node in inputs:
        transform(node)

    for node in source.graph.nodes:
        if node in env or node not in needed:
            continue
        if node.op == "placeholder":
            raise ModelError(f"internal error: graph input {node.name} is needed but not provided")
        env[node] = graph.node_copy(node, lambda arg: env[arg])
        transform(node)

    graph.output(tuple(env[node] for node in outputs))
    graph.lint()
    return fx.GraphModule(source, graph)


def _ancestors(outputs: Sequence[fx.Node], stop: set[fx.Node]) -> set[fx.Node]:
    needed: set[fx.Node] = set()
    pending = list(outputs)
    while pending:
        node = pending.pop()
        if node in needed:
            continue
        needed.add(node)
        if node not in stop:
            pending.extend(node.all_input_nodes)
    return needed


def _following(node: fx.Node):
    current = node.next
    while current.op != "root":
        yield current
        current = current.next


def _reaches(node: fx.Node, target: fx.Node) -> bool:
    pending, seen = [node], set()
    while pending:
        current = pending.pop()
        if current is target:
            return True
        if current not in seen:
            seen.add(current)
            pending.extend(current.users)
    return False


def _is_float(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dtype.is_floating_point and value.dim() >= 1


def _op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def _is_site(node: fx.Node) -> bool:
    if not _is_float(node):
        return False
    if node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, fx.Node) and node.args[1] == 0 and _op_name(source) not in DATA_MOVEMENT_OPS
    return _op_name(node) not in DATA_MOVEMENT_OPS and not _op_name(node).startswith("_assert")


def _module_path(node: fx.Node) -> str:
    if node.op == "call_function" and node.target is operator.getitem:
        node = node.args[0]
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return str(path)


def _attr_value(module: fx.GraphModule, node: fx.Node):
    value = module
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


def _flatten_output(value) -> list[fx.Node]:
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, (tuple, list)):
        return [node for item in value for node in _flatten_output(item)]
    if isinstance(value, dict):
        return [node for item in value.values() for node in _flatten_output(item)]
    return []


def _to_tensor(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(array)
