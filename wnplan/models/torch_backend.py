"""PyTorch models, run as torch.fx graphs taken from `torch.export` programs.

Every form (a `.pt2` program, a state dict with a `module:factory`, or a trusted pickled
module) becomes one exported graph. Sites are its compute nodes, so a module called at
two places gives two sites. Noise and suffixes are built as new GraphModules that share
the original's parameters; the user's module and file are never modified.

A program exported in train mode computes BatchNorm from batch statistics, updates the
running statistics in place, and applies Dropout. Its graph is rewritten to eval semantics
on load (running statistics, no update, no Dropout), so evaluation never changes a buffer.

On a CUDA device (`wnplan.runtime.set_device("cuda")`), the built GraphModules take their
parameters from one copy of the model on the GPU, and every input and noise tensor is moved
there. Scores and activations come back as CPU numpy arrays, as on the CPU.
"""

from __future__ import annotations

import copy
import logging
import operator
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import sympy
import torch
from torch import fx

from wnplan import runtime
from wnplan.errors import ModelError
from wnplan.models.base import BatchLimits, Model, NoiseArrays, Quantizers, Site, Suffix
from wnplan.quantize import Quantizer

aten = torch.ops.aten

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
        "native_dropout",
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
    """A classifier held as an exported torch.fx graph.

    Args:
        path: the model file.
        program: the exported program.
        format_name: "pt2", "state-dict" or "pickle", recorded in profiles.
        sample: input samples, shape (N, ...); needed only when the program has dynamic
            dimensions other than the batch, to measure the shape of each site.

    The model runs on the device that `wnplan.runtime.device()` names when it is built.

    Raises:
        ModelError: the program cannot be run as a classifier.
        SettingsError: the configured device is "cuda" and torch finds no CUDA GPU.
    """

    def __init__(
        self,
        path: Path,
        program: torch.export.ExportedProgram,
        format_name: str,
        sample: np.ndarray | None = None,
    ) -> None:
        super().__init__(path)
        self.format = format_name
        runtime.check_device(runtime.device(), "torch")
        self.device = torch.device(runtime.device())
        try:
            self._module = program.module()
        except Exception as error:  # torch raises many error types while unlifting
            raise ModelError(f"{path}: cannot build a module from the exported program ({error})") from None
        self._nodes = list(self._module.graph.nodes)
        placeholders = [node for node in self._nodes if node.op == "placeholder"]
        if not placeholders:
            raise ModelError(f"{path}: the exported program takes no input")
        self._input = placeholders[0]
        self._input_dtype = _input_dtype(self._input, path)
        outputs = [node for node in self._nodes if node.op == "output"]
        flat_outputs = _flatten_output(outputs[0].args[0]) if outputs else []
        if not flat_outputs:
            raise ModelError(f"{path}: the exported program returns no tensor")
        self._logits = flat_outputs[0]
        changed = use_eval_semantics(self._module.graph)
        if changed:
            logger.warning(TRAIN_MODE_WARNING, path, ", ".join(changed))
        _reject_buffer_updates(self._module, self._logits, path)
        self.batch_limits = _batch_limits(self._input, program)
        # The CPU module stays as loaded, because trained mode builds its twin from it.
        self._root = self._module if self.device.type == "cpu" else copy_to_device(self._module, self.device)
        self._modules: dict[tuple, fx.GraphModule] = {}
        self._site_nodes = self._find_site_nodes()
        self._sites = self._describe_sites(sample)

    @property
    def sites(self) -> tuple[Site, ...]:
        return self._sites

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        value = self._input.meta.get("val")
        if value is None:
            return ()
        return tuple(dim if isinstance(dim, int) else None for dim in value.shape)

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

    def _describe_sites(self, sample: np.ndarray | None) -> tuple[Site, ...]:
        paths = [_module_path(node) for node in self._site_nodes]
        shapes = self._site_shapes(sample)
        sites = []
        for index, (node, path) in enumerate(zip(self._site_nodes, paths, strict=True)):
            if node is self._input:
                name, op = "input", "input"
            else:
                # A getitem site is the first output of a multi-output operator such as a
                # decomposed BatchNorm; the site takes that operator's name.
                op = _op_name(node.args[0] if node.target is operator.getitem else node)
                name = path if path and paths.count(path) == 1 else "/".join(filter(None, [path, node.name]))
            parameters = sum(
                int(_attr_value(self._module, arg).numel())
                for arg in node.all_input_nodes
                if arg.op == "get_attr" and isinstance(_attr_value(self._module, arg), torch.nn.Parameter)
            )
            sites.append(Site(index, name, op, shapes[index], parameters, path))
        return tuple(sites)

    def _site_shapes(self, sample: np.ndarray | None) -> list[tuple[int, ...]]:
        """Return each site's per-sample shape: recorded in the program, or measured on `sample`."""
        recorded = [node.meta["val"].shape[1:] for node in self._site_nodes]
        if all(isinstance(dim, int) for shape in recorded for dim in shape):
            return [tuple(shape) for shape in recorded]
        if sample is None:
            raise ModelError(
                f"{self.path}: the program has dynamic dimensions besides the batch; pass --data so " +
                "wnplan can measure the shape of each site"
            )
        values = self.activations(np.ascontiguousarray(sample[:1]), range(len(self._site_nodes)))
        return [tuple(int(dim) for dim in value.shape[1:]) for value in values]

    def _build(self, key: tuple, inputs: Sequence[fx.Node], outputs: Sequence[fx.Node], noisy: Sequence[fx.Node] = ()):
        module = self._modules.get(key)
        if module is None:
            module = self._graph_module(inputs, outputs, noisy)
            self._modules[key] = module
        return module

    def _graph_module(
        self,
        inputs: Sequence[fx.Node],
        outputs: Sequence[fx.Node],
        noisy: Sequence[fx.Node] = (),
        quantized: Mapping[fx.Node, Quantizer] | None = None,
    ) -> fx.GraphModule:
        """Build a GraphModule of this model's graph that runs on the model's device."""
        return build_graph_module(self._module, inputs, outputs, noisy, quantized, root=self._root, device=self.device)

    def _run(self, x: np.ndarray, noise: NoiseArrays, quantize: Quantizers) -> np.ndarray:
        order = sorted(noise)
        noisy = [self._site_nodes[index] for index in order]
        quantized = {self._site_nodes[index]: quantizer for index, quantizer in quantize.items()}
        key = ("run", *order, *sorted(quantize.items()))
        module = self._modules.get(key)
        if module is None:
            module = self._graph_module([self._input], [self._logits], noisy, quantized)
            self._modules[key] = module
        arguments = [self._input_tensor(x)]
        for index in order:
            arguments.extend(_to_tensor(part, self.device) for part in noise[index])
        return forward(module, arguments, self.path)[0]

    def _activations(self, x: np.ndarray, indices: Sequence[int]) -> list[np.ndarray]:
        nodes = [self._site_nodes[index] for index in indices]
        module = self._build(("outputs", *indices), [self._input], nodes)
        return forward(module, [self._input_tensor(x)], self.path)

    def _input_tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(self._input_dtype).to(self.device)

    def suffix(self, index: int) -> Suffix:
        site_node = self._site_nodes[index]
        boundary = suffix_boundary(site_node, carries_samples(self._input, self._nodes))
        prefix = self._graph_module([self._input], boundary)
        rest = self._graph_module(boundary, [self._logits])
        return _TorchSuffix(self._sites[index], self, prefix, rest, limits=self.batch_limits)


class _TorchSuffix(Suffix):
    def __init__(self, site: Site, model: TorchModel, prefix: fx.GraphModule, rest: fx.GraphModule, limits):
        super().__init__(site, limits=limits)
        self._model = model
        self._prefix = prefix
        self._rest = rest

    def _prepare(self, x: np.ndarray) -> list[np.ndarray]:
        return forward(self._prefix, [self._model._input_tensor(x)], self._model.path)

    def _run(self, values: Sequence[np.ndarray]) -> np.ndarray:
        # NOTE: the clean boundary values are cached as numpy arrays, so on CUDA they are
        # copied to the GPU again for every trial.
        tensors = [torch.from_numpy(np.ascontiguousarray(value)).to(self._model.device) for value in values]
        return forward(self._rest, tensors, self._model.path)[0]


def forward(module: fx.GraphModule, arguments: Sequence[torch.Tensor | None], path: Path) -> list[np.ndarray]:
    """Run a built graph module without autograd; return its outputs as CPU numpy arrays.

    Shape guards of an exported program raise AssertionError, and operators raise
    RuntimeError (for example on mismatched shapes, or when CUDA runs out of memory).

    Raises:
        ModelError: the model failed on these arguments.
    """
    try:
        with torch.inference_mode():
            # Tensor.cpu() returns a CPU tensor itself, so CPU results are not copied.
            return [value.cpu().numpy() for value in module(*arguments)]
    except (RuntimeError, AssertionError, ValueError, TypeError, IndexError) as error:
        shapes = ", ".join(str(tuple(argument.shape)) for argument in arguments if argument is not None)
        text = " ".join(str(error).split())[:500] or type(error).__name__
        raise ModelError(f"{path}: the model failed on inputs of shape {shapes}: {text}") from None


# Operators whose behaviour depends on a `training` flag, with the flag's position.
_TRAINING_FLAGS = {
    aten.batch_norm.default: 5,
    aten.native_batch_norm.default: 5,
    aten._native_batch_norm_legit.default: 5,
    aten._native_batch_norm_legit_functional.default: 5,
    aten.dropout.default: 2,
    aten.feature_dropout.default: 2,
    aten.alpha_dropout.default: 2,
    aten.feature_alpha_dropout.default: 2,
    aten.native_dropout.default: 2,
}
# BatchNorm operators that always update the running statistics, and their eval forms.
TRAIN_MODE_WARNING = (
    "%s was exported in train mode; evaluating it in eval mode (BatchNorm running statistics, no Dropout) " +
    "without updating any buffer: %s"
)
_UPDATING_BATCH_NORMS = {
    aten._batch_norm_with_update.default: aten._batch_norm_no_update.default,
    aten._batch_norm_with_update_functional.default: aten._batch_norm_no_update.default,
}
_RUNNING_STATISTICS = (3, 4)  # positions of running_mean and running_var in BatchNorm arguments


def use_eval_semantics(graph: fx.Graph) -> list[str]:
    """Rewrite train-mode BatchNorm and Dropout nodes to eval mode; return the changed nodes.

    BatchNorm then normalizes with the running statistics and never updates them, and
    Dropout passes its input through. A BatchNorm without running statistics
    (`track_running_stats=False`) uses batch statistics in both modes and is left alone.
    """
    changed = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _UPDATING_BATCH_NORMS:
            functional = node.target is aten._batch_norm_with_update_functional.default
            node.target = _UPDATING_BATCH_NORMS[node.target]
            if functional:
                _redirect_running_statistic_outputs(node, first=4)
            changed.append(node.name)
            continue
        position = _TRAINING_FLAGS.get(node.target)
        if position is None or not _flag(node, position):
            continue
        is_batch_norm = "norm" in str(node.target)
        if is_batch_norm and any(_argument(node, slot) is None for slot in _RUNNING_STATISTICS):
            continue
        if node.target is aten._native_batch_norm_legit.default:
            # Its schema marks the running statistics as written; the no-training form reads them.
            arguments = [_argument(node, slot) for slot in range(len(node.target._schema.arguments))]
            node.target = aten._native_batch_norm_legit_no_training.default
            node.args, node.kwargs = (*arguments[:position], *arguments[position + 1 :]), {}
        else:
            _set_flag(node, position, False)
        if node.target is aten._native_batch_norm_legit_functional.default:
            _redirect_running_statistic_outputs(node, first=3)
        changed.append(node.name)
    if changed:
        graph.lint()
    return changed


def _argument(node: fx.Node, position: int):
    if position < len(node.args):
        return node.args[position]
    argument = node.target._schema.arguments[position]
    return node.kwargs.get(argument.name, argument.default_value if argument.has_default_value() else None)


def _flag(node: fx.Node, position: int) -> bool:
    return bool(_argument(node, position))


def _set_flag(node: fx.Node, position: int, value: bool) -> None:
    if position < len(node.args):
        node.args = (*node.args[:position], value, *node.args[position + 1 :])
    else:
        node.kwargs = {**node.kwargs, node.target._schema.arguments[position].name: value}


def _redirect_running_statistic_outputs(node: fx.Node, first: int) -> None:
    """Make readers of a functional BatchNorm's updated statistics read the unchanged ones."""
    for user in list(node.users):
        if user.target is operator.getitem and user.args[1] in (first, first + 1):
            statistic = _argument(node, _RUNNING_STATISTICS[user.args[1] - first])
            user.replace_all_uses_with(statistic)
            user.graph.erase_node(user)


def _reject_buffer_updates(module: fx.GraphModule, logits: fx.Node, path: Path) -> None:
    """Raise ModelError if computing the scores would write to a parameter or buffer."""
    needed = _ancestors([logits], stop=set())
    for node in needed:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        for argument, value in zip(target._schema.arguments, node.args, strict=False):
            written = argument.alias_info is not None and argument.alias_info.is_write
            if written and isinstance(value, fx.Node) and value.op == "get_attr":
                raise ModelError(
                    f"{path}: the model writes to its state {value.target!r} in place while computing its " +
                    f"output ({_op_name(node)}); export it in eval mode (call model.eval() before torch.export)"
                )


def _batch_limits(input_node: fx.Node, program: torch.export.ExportedProgram) -> BatchLimits:
    """Return the batch sizes the program accepts: its fixed batch, or its recorded range."""
    value = input_node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return BatchLimits()
    batch = value.shape[0]
    if isinstance(batch, int):
        return BatchLimits(batch, batch)
    bounds = program.range_constraints.get(batch.node.expr)
    if bounds is None:
        return BatchLimits()
    lower = int(bounds.lower) if isinstance(bounds.lower, (int, sympy.Integer)) else 1
    upper = int(bounds.upper) if isinstance(bounds.upper, (int, sympy.Integer)) else None
    return BatchLimits(max(lower, 1), upper)


def _input_dtype(node: fx.Node, path: Path) -> torch.dtype:
    value = node.meta.get("val")
    dtype = value.dtype if isinstance(value, torch.Tensor) else torch.float32
    if not dtype.is_floating_point:
        raise ModelError(
            f"{path}: the program's input has dtype {dtype}; wnplan feeds floating-point samples, so export " +
            "the model with a float input"
        )
    return dtype


def suffix_boundary(site: fx.Node, carrying: set[fx.Node]) -> list[fx.Node]:
    """Return the site node and every other value that nodes downstream of it read.

    Every returned value carries the samples along its first axis (it is in `carrying`), so
    callers can split, pad and stack them by sample. A value that does not (a symbolic
    size, or a tensor computed from parameters alone such as a transposed weight) is
    recomputed inside the suffix, from the values it needs.
    """
    downstream = {site}
    for node in _following(site):
        if any(arg in downstream for arg in node.all_input_nodes):
            downstream.add(node)
    boundary = [site]
    pending = [node for node in _following(site) if node in downstream and node.op != "output"]
    recomputed: set[fx.Node] = set()
    while pending:
        node = pending.pop(0)
        for arg in node.all_input_nodes:
            if arg in downstream or arg in recomputed or arg in boundary or arg.op == "get_attr":
                continue
            if arg in carrying:
                boundary.append(arg)
            else:
                recomputed.add(arg)
                pending.append(arg)
    return boundary


def carries_samples(input_node: fx.Node, nodes: Sequence[fx.Node]) -> set[fx.Node]:
    """Return the tensor nodes whose values depend on the input samples.

    Symbolic sizes (SymInt values) and tensors computed from parameters alone do not.
    """
    carrying = {input_node}
    for node in nodes:
        value = node.meta.get("val")
        if node.op != "call_function" or not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        if any(arg in carrying for arg in node.all_input_nodes):
            carrying.add(node)
    return carrying


def build_graph_module(
    source: fx.GraphModule,
    inputs: Sequence[fx.Node],
    outputs: Sequence[fx.Node],
    noisy: Sequence[fx.Node] = (),
    quantized: Mapping[fx.Node, Quantizer] | None = None,
    *,
    root: fx.GraphModule | None = None,
    device: torch.device | None = None,
) -> fx.GraphModule:
    """Return a GraphModule computing `outputs` from `inputs`, with noise after `noisy` nodes.

    The new module takes the inputs, then a (mul, add) pair per noisy node, and returns a
    tuple of the outputs. Nodes in `quantized` are fake-quantized after their noise. The
    module shares parameters with `root`, which defaults to `source`. A root made by
    `copy_to_device` runs the module on that device, and `device` then makes operators
    that create tensors on the CPU (such as `torch.zeros(..., device="cpu")`) create them
    there instead.
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
    if device is not None and device.type != "cpu":
        retarget_created_tensors(graph, device)
    graph.lint()
    return fx.GraphModule(source if root is None else root, graph)


def copy_to_device(module: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """Return a copy of `module` whose parameters, buffers and tensor attributes are on `device`.

    `module` is not changed, nor is any module that shares its parameters (such as the
    user's module behind a state dict). The copy keeps the attribute names, so it can be
    the `root` of `build_graph_module` for graphs built from `module`.
    """
    with warnings.catch_warnings():
        # torch 2.13 warns about its own deprecated LeafSpec while copying the input spec.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        moved = copy.deepcopy(module).to(device)
    for node in moved.graph.nodes:
        if node.op != "get_attr":
            continue
        owner_path, _, name = str(node.target).rpartition(".")
        owner = moved.get_submodule(owner_path) if owner_path else moved
        value = getattr(owner, name)
        # Module.to moves parameters and registered buffers; a plain tensor attribute stays behind.
        if isinstance(value, torch.Tensor) and value.device.type != device.type:
            setattr(owner, name, value.to(device))
    return moved


def retarget_created_tensors(graph: fx.Graph, device: torch.device) -> list[str]:
    """Make operators that create tensors on the CPU create them on `device`; return their names.

    Exported graphs record the device of every tensor a model creates in its forward (for
    example `aten.zeros(..., device=cpu)` or `aten._to_copy(..., device=cpu)`), which would
    mix devices when the model's inputs and parameters are on the GPU.
    """
    changed = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        placed = node.kwargs.get("device")
        if isinstance(placed, torch.device) and placed.type == "cpu":
            node.kwargs = {**node.kwargs, "device": device}
            changed.append(node.name)
    return changed


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


def _to_tensor(array: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(array).to(device)
