"""Run a twin graph for K configurations at once, on tensors with a leading configuration dimension.

This is the vectorized form of a twin: every value that depends on the samples or on a
trained tensor carries K first, and every node is rewritten to compute all K
configurations in one call. It does what `torch.vmap` over `functional_call` does, but it
picks faster CPU kernels for the three layers that dominate training time:

- linear layers run as `W @ xᵀ` per configuration (a batched matmul). Under vmap,
  the weight gradient comes out transposed and is copied, which costs about a third more;
- convolutions run once per configuration. vmap turns them into one grouped convolution,
  which oneDNN runs at about half the speed of K plain ones for the small kernels of these
  models;
- BatchNorm runs once, with the configurations merged into the channels. Per-configuration
  calls cost more in overhead than in arithmetic for small layers.

Element-wise operators broadcast the stacked tensors directly, pooling merges K into the
batch, and operators with dimension arguments get them shifted by one. Any other operator
runs through `torch.vmap` of that node alone, so every graph works, only some more slowly.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Callable, Sequence

import torch
from torch import fx, nn

from wnplan.train.layers import LINEAR_TARGETS, BatchNormSwitch, convolution_function

logger = logging.getLogger(__name__)

ALL_DIMS = object()  # a reduction over every per-configuration dimension

# ATen operators (by name, without overload) that act element by element.
ELEMENTWISE_OPS = frozenset(
    {
        "abs", "add", "clamp", "clamp_max", "clamp_min", "div", "dropout", "elu", "erf", "exp",
        "gelu", "hardsigmoid", "hardswish", "hardtanh", "leaky_relu", "log", "maximum", "minimum",
        "mul", "neg", "pow", "reciprocal", "relu", "relu6", "rsqrt", "sigmoid", "sign", "silu",
        "softplus", "sqrt", "square", "sub", "tanh", "where", "clone", "contiguous", "alias",
        "detach", "_to_copy", "to", "type_as", "lift_fresh_copy", "feature_dropout",
    }
)
# ATen operators whose first dimension is the batch: K is merged into it.
BATCH_OPS = frozenset(
    {
        "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
        "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
        "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    }
)
# ATen operators with dimension arguments: (kind, position, keyword, default) per argument.
# Kinds: "dim" (one dimension), "dims" (one or several), "order" (every dimension, as for
# permute), "shape" (a size list).
DIMENSION_OPS: dict[str, list[tuple[str, int, str, object]]] = {
    "flatten": [("dim", 1, "start_dim", 0), ("dim", 2, "end_dim", -1)],
    "mean": [("dims", 1, "dim", ALL_DIMS)],
    "sum": [("dims", 1, "dim", ALL_DIMS)],
    "amax": [("dims", 1, "dim", ALL_DIMS)],
    "amin": [("dims", 1, "dim", ALL_DIMS)],
    "softmax": [("dim", 1, "dim", None)],
    "_softmax": [("dim", 1, "dim", None)],
    "log_softmax": [("dim", 1, "dim", None)],
    "_log_softmax": [("dim", 1, "dim", None)],
    "cat": [("dim", 1, "dim", 0)],
    "concat": [("dim", 1, "dim", 0)],
    "permute": [("order", 1, "dims", None)],
    "transpose": [("dim", 1, "dim0", None), ("dim", 2, "dim1", None)],
    "view": [("shape", 1, "size", None)],
    "reshape": [("shape", 1, "shape", None)],
    "_unsafe_view": [("shape", 1, "size", None)],
    "expand": [("shape", 1, "size", None)],
    "squeeze": [("dims", 1, "dim", ALL_DIMS)],
    "unsqueeze": [("dim", 1, "dim", None)],
    "select": [("dim", 1, "dim", None)],
    "slice": [("dim", 1, "dim", 0)],
    "narrow": [("dim", 1, "dim", None)],
    "sym_size": [("dim", 1, "dim", None)],
}
# Operators in DIMENSION_OPS that need a compatible memory layout. They run as reshape instead.
VIEW_OPS = frozenset({"view", "_unsafe_view"})
# Operators in DIMENSION_OPS whose result does not depend on the configuration.
UNSTACKED_RESULTS = frozenset({"sym_size"})

# Python callables that act element by element (or only on trailing dimensions), and
# callables whose first dimension is the batch.
ELEMENTWISE_FUNCTIONS: set[Callable] = set()
BATCH_FUNCTIONS: set[Callable] = set()

# Python callables (the ONNX converter's operators) with their own stacked implementation.
# Each takes the same arguments as the callable, with K first on every stacked tensor, plus
# `stacked`, the flags of which positional arguments are stacked.
STACKED_IMPLEMENTATIONS: dict[Callable, Callable] = {}


def register_stacked(target: Callable) -> Callable[[Callable], Callable]:
    """Register the stacked implementation of a Python callable used in twin graphs."""

    def decorator(implementation: Callable) -> Callable:
        STACKED_IMPLEMENTATIONS[target] = implementation
        return implementation

    return decorator


def register_elementwise(target: Callable) -> Callable:
    """Mark a callable as element-wise: broadcasting it over stacked arguments is correct."""
    ELEMENTWISE_FUNCTIONS.add(target)
    return target


def register_batch(target: Callable) -> Callable:
    """Mark a callable whose first input dimension is the batch: K merges into it."""
    BATCH_FUNCTIONS.add(target)
    return target


def op_name(target) -> str:
    """Return an operator's name without namespace and overload (`aten.relu.default` → relu)."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    return getattr(target, "__name__", "")


class StackedBatchNorm(nn.Module):
    """A BatchNormSwitch applied to K configurations at once; train/eval follows this module."""

    def __init__(self, switch: BatchNormSwitch) -> None:
        super().__init__()
        self.switch = switch

    def forward(self, x, weight, bias, running_mean, running_var):
        statistics = [None if value is None else _merged(value) for value in (running_mean, running_var)]
        affine = [None if value is None else value.reshape(-1) for value in (weight, bias)]
        merged, unmerge = _channels_merged(x)
        output = nn.functional.batch_norm(
            merged, statistics[0], statistics[1], affine[0], affine[1],
            self.training, self.switch.momentum, self.switch.eps,
        )
        return self.switch.wrap(unmerge(output))


def _merged(statistic: torch.Tensor) -> torch.Tensor:
    """Return a stacked (K, C) running statistic as a (K·C,) view, so in-place updates land in it."""
    merged = statistic.reshape(-1)
    if merged.data_ptr() != statistic.data_ptr() or not statistic.is_contiguous():
        raise RuntimeError("stacked BatchNorm running statistics must be contiguous (K, C) tensors")
    return merged


def _channels_merged(x: torch.Tensor):
    """Return x (K, N, C, ...) as a BatchNorm input with K·C channels, and the way back.

    Features (K, N, C) become (1, K·C, N): one sample whose K·C channels each hold N values,
    which BatchNorm normalises like a batch. Stacked linear layers store their outputs
    feature-first, so this is a view, and so is the way back. The alternative, (N, K·C) with
    a copy each way, made the BatchNorm MLP train 1.5 times slower (measured).
    Larger inputs become (N, K·C, ...), contiguous both ways: the CPU kernels of BatchNorm
    and of the operators after it are much slower on other strides, and the copies cost less.
    """
    size, batch, channels = x.shape[0], x.shape[1], x.shape[2]
    if x.dim() == 3:
        merged = x.mT.reshape(1, size * channels, batch)
        return merged, lambda output: output.view(size, channels, batch).mT
    merged = x.movedim(0, 1).reshape(batch, size * channels, *x.shape[3:]).contiguous()
    return merged, lambda output: output.reshape(batch, size, channels, *x.shape[3:]).movedim(1, 0).contiguous()


def build_stacked_graph(
    source: fx.GraphModule,
    nodes: Sequence[fx.Node],
    inputs: dict[fx.Node, fx.Node],
    graph: fx.Graph,
    stacked_tensors: dict[str, fx.Node],
    modules: dict[str, nn.Module],
    after: Callable[[fx.Node, fx.Node], fx.Node],
) -> dict[fx.Node, fx.Node]:
    """Copy `nodes` of `source` into `graph` in stacked form; return the node mapping.

    Args:
        source: the twin's GraphModule.
        nodes: the nodes to copy, in graph order.
        inputs: placeholders of `graph` for source nodes given as stacked inputs.
        graph: the graph being built.
        stacked_tensors: placeholders of `graph` for the stacked trained tensors, by name;
            get_attr nodes of other tensors stay shared by all configurations.
        modules: filled with the submodules the new graph calls, by target name.
        after: called with (source node, new node) after each copied node. It returns the
            node that users of the source node read, for example one with noise inserted.
    """
    env: dict[fx.Node, fx.Node] = {}
    stacked: set[fx.Node] = set()

    for node in nodes:
        if node in inputs:
            env[node] = inputs[node]
            stacked.add(env[node])
        elif node.op == "get_attr" and str(node.target) in stacked_tensors:
            env[node] = stacked_tensors[str(node.target)]
            stacked.add(env[node])
        elif node.op == "get_attr":
            env[node] = graph.get_attr(str(node.target))
        elif node.op == "call_module":
            env[node] = _stacked_module_call(source, node, graph, env, modules)
            stacked.add(env[node])
        elif node.op == "call_function":
            env[node], is_stacked = _stacked_function_call(node, graph, env, stacked)
            if is_stacked:
                stacked.add(env[node])
        else:
            raise RuntimeError(f"cannot stack graph node {node.name} of kind {node.op}")
        result = after(node, env[node])
        if result is not env[node]:
            stacked.add(result)
            env[node] = result
    return env


def _stacked_module_call(source, node, graph, env, modules) -> fx.Node:
    module = source.get_submodule(str(node.target))
    if not isinstance(module, BatchNormSwitch):
        raise RuntimeError(f"cannot stack a call of module {type(module).__name__}")
    name = f"stacked_{str(node.target).replace('.', '_')}"
    modules[name] = StackedBatchNorm(module)
    return graph.call_module(name, tuple(_map(arg, env) for arg in node.args))


def _stacked_function_call(node, graph, env, stacked) -> tuple[fx.Node, bool]:
    args = tuple(_map(arg, env) for arg in node.args)
    kwargs = {key: _map(value, env) for key, value in node.kwargs.items()}
    flags = tuple(_flags(arg, stacked) for arg in args)
    kwarg_flags = tuple((key, _flags(value, stacked)) for key, value in kwargs.items())
    if not _any(flags) and not _any([flag for _, flag in kwarg_flags]):
        return graph.call_function(node.target, args, kwargs), False
    if _any([flag for _, flag in kwarg_flags]):
        rule = functools.partial(_vmapped, node.target, flags, kwarg_flags)
        return graph.call_function(_Call(rule, op_name(node.target)), args, kwargs), True

    target = node.target
    name = op_name(target)
    rule = _rule(target, name, flags)
    result = graph.call_function(_Call(rule, name), args, kwargs)
    return result, not (name in UNSTACKED_RESULTS and rule.func is _shifted)


def _rule(target, name: str, flags) -> functools.partial:
    """Return the stacked implementation of one operator, with its static arguments bound."""
    if target is operator.getitem:
        return functools.partial(_item, flags)
    if target in STACKED_IMPLEMENTATIONS:
        return functools.partial(STACKED_IMPLEMENTATIONS[target], stacked=flags)
    if target in LINEAR_TARGETS:
        return functools.partial(_linear_or_conv, target, flags)
    if target in ELEMENTWISE_FUNCTIONS or name in ELEMENTWISE_OPS:
        return functools.partial(_elementwise, target, flags)
    if (target in BATCH_FUNCTIONS or name in BATCH_OPS) and flags[0] is True and not _any(flags[1:]):
        return functools.partial(_batch_merged, target)
    if name in DIMENSION_OPS and not _any(flags[1:]):
        return functools.partial(_shifted, target, name, flags)
    logger.debug("operator %s runs through torch.vmap of its node", name)
    return functools.partial(_vmapped, target, flags, ())


class _Call:
    """A named callable for graph nodes, so that generated code stays readable."""

    def __init__(self, function: Callable, name: str) -> None:
        self.function = function
        self.__name__ = f"stacked_{name}"

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)


def _map(value, env):
    return fx.node.map_arg(value, lambda node: env[node])


def _flags(value, stacked: set[fx.Node]):
    """Return True for a stacked node, a tuple of flags for a list or tuple, else False."""
    if isinstance(value, fx.Node):
        return value in stacked
    if isinstance(value, (list, tuple)):
        return tuple(_flags(item, stacked) for item in value)
    return False


def _any(flags) -> bool:
    if isinstance(flags, (list, tuple)):
        return any(_any(flag) for flag in flags)
    return bool(flags)


def _item(flags, container, index):
    if isinstance(container, torch.Tensor):
        return _vmapped(operator.getitem, flags, (), container, index)
    return container[index]


def elementwise_call(target: Callable, flags: Sequence) -> Callable:
    """Return a graph target applying an element-wise `target` to stacked and shared arguments."""
    return _Call(functools.partial(_elementwise, target, tuple(flags)), getattr(target, "__name__", "transform"))


def _elementwise(target, flags, *args, **kwargs):
    ranks = [_rank(arg, flag) for arg, flag in zip(args, flags, strict=True)]
    rank = max(ranks)
    aligned = [
        arg.reshape(arg.shape[0], *([1] * (rank - own)), *arg.shape[1:])
        if flag is True and isinstance(arg, torch.Tensor) and own < rank
        else arg
        for arg, flag, own in zip(args, flags, ranks, strict=True)
    ]
    return target(*aligned, **kwargs)


def _rank(value, flag) -> int:
    """Return the per-configuration rank of an argument (0 for non-tensors)."""
    if not isinstance(value, torch.Tensor):
        return 0
    return value.dim() - 1 if flag is True else value.dim()


def _batch_merged(target, x, *args, **kwargs):
    size = x.shape[0]
    result = target(x.reshape(-1, *x.shape[2:]), *args, **kwargs)
    if isinstance(result, (tuple, list)):
        return type(result)(part.reshape(size, -1, *part.shape[1:]) for part in result)
    return result.reshape(size, -1, *result.shape[1:])


def _shifted(target, name, flags, *args, **kwargs):
    args = list(args)
    if isinstance(flags[0], tuple):
        # A list of tensors (cat): shared tensors are expanded to K copies first.
        parts, part_flags = args[0], flags[0]
        size = next(part.shape[0] for part, flag in zip(parts, part_flags, strict=True) if flag)
        args[0] = [
            part if flag else part.expand(size, *part.shape) for part, flag in zip(parts, part_flags, strict=True)
        ]
        x = args[0][0]
    else:
        x = args[0]
    size = x.shape[0]
    rank = x.dim() - 1
    for kind, position, keyword, default in DIMENSION_OPS[name]:
        if position < len(args):
            args[position] = _shift(kind, args[position], size)
        elif keyword in kwargs:
            kwargs[keyword] = _shift(kind, kwargs[keyword], size)
        elif default is ALL_DIMS:
            kwargs[keyword] = _squeezable(x) if name == "squeeze" else list(range(1, rank + 1))
        elif default is not None:
            kwargs[keyword] = _shift(kind, default, size)
    if name in VIEW_OPS:
        # Stacked values may be transposed views (see _stacked_linear), which `view` refuses.
        # Graphs here do not write into views, so reshape, which copies only then, is the same.
        target = torch.ops.aten.reshape.default
        if "size" in kwargs:
            kwargs["shape"] = kwargs.pop("size")
    return target(*args, **kwargs)


def _squeezable(x: torch.Tensor) -> list[int]:
    return [dim for dim in range(1, x.dim()) if x.shape[dim] == 1]


def _shift(kind: str, value, size: int):
    if kind == "shape":
        return [size, *value]
    if kind == "order":
        return [0, *(_shift_one(dim) for dim in value)]
    if kind == "dims" and isinstance(value, (list, tuple)):
        return [_shift_one(dim) for dim in value]
    return _shift_one(value)


def _shift_one(dim: int) -> int:
    return dim + 1 if dim >= 0 else dim


def _linear_or_conv(target, flags, x, weight, bias=None, *rest, **kwargs):
    name = op_name(target)
    if name == "convolution" and rest[3]:
        # Transposed convolutions have no stacked form here; vmap batches them.
        return _vmapped(target, flags, (), x, weight, bias, *rest, **kwargs)
    weight_stacked = flags[1] is True
    bias_stacked = len(flags) > 2 and flags[2] is True
    if flags[0] is not True:
        size = (weight if weight_stacked else bias).shape[0]
        x = x.expand(size, *x.shape)
    if name == "linear":
        return _stacked_linear(x, weight, bias, weight_stacked, bias_stacked)
    if name == "convolution":
        rest = (rest[0], rest[1], rest[2], rest[5])
    return _stacked_conv(x, weight, bias, weight_stacked, bias_stacked, rest, kwargs)


def _stacked_linear(x, weight, bias, weight_stacked: bool, bias_stacked: bool) -> torch.Tensor:
    size = x.shape[0]
    flat = x.reshape(size, -1, x.shape[-1])
    if not weight_stacked:
        output = flat @ weight.mT
        if bias is not None:
            output = output + (bias.unsqueeze(1) if bias_stacked else bias)
        return output.reshape(*x.shape[:-1], weight.shape[0])
    # W @ xᵀ gives (K, out, M) with the features first, returned as its transpose, a view.
    # Autograd then produces the weight gradient (grad_outᵀ @ x) in the weight's own layout.
    # The input gradient (Wᵀ @ grad_out) comes out feature-first, as the previous stacked
    # linear layer stored its output. BatchNorm and the loss read this layout without copies
    # too (see StackedBatchNorm and `per_sample_loss`).
    rows = weight @ flat.mT if bias is None else torch.baddbmm(bias.unsqueeze(-1), weight, flat.mT)
    return rows.mT.reshape(*x.shape[:-1], weight.shape[1])


def _stacked_conv(x, weight, bias, weight_stacked, bias_stacked, rest, kwargs) -> torch.Tensor:
    if not weight_stacked and not bias_stacked:
        # Shared weights: the configurations are simply more samples.
        function = convolution_function(weight)
        output = function(x.reshape(-1, *x.shape[2:]), weight, bias, *rest, **kwargs)
        return output.reshape(x.shape[0], -1, *output.shape[1:])
    size = x.shape[0]
    weights = weight.unbind(0) if weight_stacked else [weight] * size
    biases = bias.unbind(0) if bias_stacked else [bias] * size
    function = convolution_function(weights[0])
    outputs = [
        function(part, kernel, shift, *rest, **kwargs)
        for part, kernel, shift in zip(x.unbind(0), weights, biases, strict=True)
    ]
    return torch.stack(outputs)


def _vmapped(target, flags, kwarg_flags, *args, **kwargs):
    """Run one operator through torch.vmap, batching the stacked arguments along dimension 0."""
    stacked_kwargs = {key for key, flag in kwarg_flags if _any(flag)}
    shared = {key: value for key, value in kwargs.items() if key not in stacked_kwargs}
    names = sorted(stacked_kwargs)

    def call(*values):
        positional = values[: len(args)]
        named = dict(zip(names, values[len(args):], strict=True))
        return target(*positional, **shared, **named)

    in_dims = tuple(_in_dims(arg, flag) for arg, flag in zip(args, flags, strict=True))
    flags_by_name = dict(kwarg_flags)
    in_dims += tuple(_in_dims(kwargs[name], flags_by_name[name]) for name in names)
    return torch.vmap(call, in_dims=in_dims)(*args, *(kwargs[name] for name in names))


def _in_dims(value, flag):
    if isinstance(value, (list, tuple)):
        return type(value)(_in_dims(item, item_flag) for item, item_flag in zip(value, flag, strict=True))
    return 0 if flag is True and isinstance(value, torch.Tensor) else None
