"""ONNX models, run by onnxruntime, with noise inserted by rewriting a copy of the graph.

Sessions run on the CPUExecutionProvider, or with `wnplan.runtime.set_device("cuda")` on the
CUDAExecutionProvider, which hands the operators it does not implement to the CPU provider.
Inputs, noise and outputs are numpy arrays on the CPU for both devices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from wnplan import runtime
from wnplan.errors import ModelError, SettingsError
from wnplan.models import onnx_graph
from wnplan.models.base import BatchLimits, DataDeclaration, Model, NoiseArrays, Quantizers, Site, Suffix
from wnplan.models.onnx_files import check_versions, content_sha256, load_onnx, require_in_memory

logger = logging.getLogger(__name__)

ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
}

# The exception types onnxruntime's Python binding raises for invalid models and failed runs.
ORT_ERRORS: tuple[type[Exception], ...] = (
    *(
        value
        for value in vars(ort_state).values()
        if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == ort_state.__name__
    ),
    RuntimeError,
)

CPU_PROVIDERS = ("CPUExecutionProvider",)
CUDA_PROVIDERS = (runtime.CUDA_PROVIDER, "CPUExecutionProvider")

# Without data, dynamic dimensions are probed as 1 and fixed ones as declared. A declared
# input larger than this many values is not probed with zeros.
# NOTE: the limit (256 MiB of float32) is a guess at the largest plausible single sample.
MAX_PROBE_VALUES = 1 << 26


class OnnxModel(Model):
    """An ONNX classifier: its one graph input is the samples, its scores a float output.

    Graph inputs that are also initializers are defaults, not inputs, so they are allowed.

    The class scores are the first output, or the first floating-point output when the first
    one is not (for example a classifier whose first output is the predicted label). With
    external data, `sha256` covers the model file and its data files.

    Args:
        path: the .onnx file; external data files are read from its folder.
        sample: input samples, shape (N, ...), used to probe shapes when the model declares
            dynamic dimensions; None probes with zeros.

    The model runs on the device that `wnplan.runtime.device()` names when it is built.

    Raises:
        ModelError: the file is not a valid ONNX classifier, or onnxruntime rejects it.
        SettingsError: the configured device is "cuda" and onnxruntime has no usable
            CUDAExecutionProvider.
    """

    format = "onnx"

    def __init__(self, path: Path, sample: np.ndarray | None = None) -> None:
        super().__init__(path)
        runtime.check_device(runtime.device(), "onnx")
        self.device = runtime.device()
        self.proto, data_files = load_onnx(path)
        if data_files:
            self.sha256 = content_sha256(path, data_files)
        check_versions(self.proto, path)
        graph = self.proto.graph
        if not graph.node:
            raise ModelError(f"{path}: the ONNX graph has no nodes; is this a valid model file?")
        # Some converters write nodes out of topological order. onnxruntime runs such graphs,
        # but onnx.checker rejects them, so the graph is sorted before it is checked or rewritten.
        self._nodes = onnx_graph.sort_topologically(graph, f"{path}: the ONNX graph")
        del graph.node[:]
        graph.node.extend(self._nodes)
        onnx_graph.check_model(self.proto, f"{path}: the ONNX model is invalid")
        self._types = onnx_graph.tensor_types(self.proto)

        initializers = {init.name for init in graph.initializer}
        inputs = [value for value in graph.input if value.name not in initializers]
        if not inputs or not graph.output:
            raise ModelError(f"{path}: the ONNX graph needs at least one input and one output")
        if len(inputs) > 1:
            names = [value.name for value in inputs]
            raise ModelError(
                f"{path}: the model has {len(inputs)} inputs {names}, but wnplan needs a model with exactly " +
                "one input (the samples); export it with the other inputs as initializers or constants"
            )
        self._input = inputs[0]
        self._input_dtype = self._float_type(self._input, "input")
        self._choose_scores_output()
        self._sessions: dict[tuple, ort.InferenceSession] = {}
        self._sample = sample
        if sample is not None:
            self.check_input(sample)
        self.batch_limits = self._find_batch_limits()
        self.declaration = _declaration(self.proto, path)
        self._sites = self._find_sites()
        self._site_dtypes = [
            ONNX_TO_NUMPY.get(onnx_graph.elem_type(self._types, site.name), np.float32) for site in self._sites
        ]
        self._sample = None

    @property
    def sites(self) -> tuple[Site, ...]:
        return self._sites

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        dims = self._input.type.tensor_type.shape.dim
        return tuple(dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None for dim in dims)

    def _float_type(self, value: onnx.ValueInfoProto, role: str) -> type:
        kind = value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else None
        if kind not in ONNX_TO_NUMPY:
            type_name = onnx.TensorProto.DataType.Name(kind) if kind in onnx.TensorProto.DataType.values() else kind
            raise ModelError(
                f"{self.path}: the model's {role} {value.name!r} has type {type_name}; wnplan feeds " +
                "floating-point samples (float, double or float16), so export the model with a float input"
            )
        return ONNX_TO_NUMPY[kind]

    def _choose_scores_output(self) -> None:
        outputs = self.proto.graph.output
        floating = [
            position
            for position, value in enumerate(outputs)
            if onnx_graph.elem_type(self._types, value.name) in ONNX_TO_NUMPY
        ]
        if not floating:
            raise ModelError(
                f"{self.path}: no output of the model is a floating-point tensor; wnplan needs class " +
                f"scores, but the outputs are {[value.name for value in outputs]}"
            )
        if floating[0] != 0:
            chosen = onnx.ValueInfoProto()
            chosen.CopyFrom(outputs[floating[0]])
            logger.info(
                "%s: the first output %r is not a float tensor; using output %r as class scores",
                self.path, outputs[0].name, chosen.name,
            )
            del outputs[floating[0]]
            outputs.insert(0, chosen)

    def _declared_batch(self) -> int | None:
        dims = self._input.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
        return None

    def _find_batch_limits(self) -> BatchLimits:
        """Return the batch sizes the model runs with, probing a dynamic batch dimension.

        Some exporters declare a dynamic batch but bake a batch of 1 into a Reshape. Such a
        model fails, or returns one row, for two samples; it is then run one sample at a time.
        """
        declared = self._declared_batch()
        if declared is not None:
            return BatchLimits(declared, declared)
        # Build the clean session first, so that an invalid model fails here with one message.
        self._session(("noise",), lambda: onnx_graph.insert_noise(self.proto, [], [], self._types))
        try:
            scores = self._run(self._probe_input(2), {}, {})
            if scores.ndim >= 1 and scores.shape[0] == 2:
                return BatchLimits()
            problem = f"it returns shape {scores.shape} for 2 samples"
        except ModelError as error:
            problem = str(error)
        try:
            self._run(self._probe_input(1), {}, {})
        except ModelError as error:
            raise ModelError(f"{error} (it also fails on 2 samples: {problem})") from None
        logger.warning(
            "%s declares a dynamic batch size but runs only with batch 1 (%s); evaluating one sample at a time",
            self.path, _short_runtime_error(problem),
        )
        return BatchLimits(1, 1)

    def _probe_input(self, batch: int) -> np.ndarray:
        """Return `batch` samples to probe the model with: the given sample, or zeros."""
        if self._sample is not None and self._sample.shape[0] > 0:
            rows = np.resize(np.arange(self._sample.shape[0]), batch)
            return np.ascontiguousarray(self._sample[rows], dtype=self._input_dtype)
        if not self._input.type.tensor_type.HasField("shape"):
            raise ModelError(f"{self.path}: the model's input declares no shape; pass --data so wnplan can probe it")
        dims = [batch] + [dim or 1 for dim in self.input_shape[1:]]
        if int(np.prod(dims, dtype=np.float64)) > MAX_PROBE_VALUES:
            raise ModelError(
                f"{self.path}: the model's input shape {tuple(dims)} is too large to probe with zeros; " +
                "pass --data so wnplan probes it with real samples"
            )
        return np.zeros(dims, dtype=self._input_dtype)

    def _find_sites(self) -> tuple[Site, ...]:
        graph = self.proto.graph
        live = onnx_graph.depends_on_inputs(graph, self._nodes)
        logits = graph.output[0].name
        sizes = {init.name: int(np.prod(init.dims)) for init in graph.initializer}

        candidates: list[tuple[str, str, int]] = []
        if onnx_graph.elem_type(self._types, self._input.name) in onnx_graph.FLOAT_TYPES:
            candidates.append((self._input.name, "input", 0))
        for node in self._nodes:
            if node.op_type in onnx_graph.DATA_MOVEMENT_OPS or node.domain not in onnx_graph.SITE_DOMAINS:
                continue
            parameters = sum(sizes.get(name, 0) for name in node.input)
            # The site is the node's first floating-point output; classifiers such as
            # ONNX-ML's LinearClassifier return an integer label first and the scores second.
            floating = [
                name for name in node.output if onnx_graph.elem_type(self._types, name) in onnx_graph.FLOAT_TYPES
            ]
            if floating and floating[0] in live:
                candidates.append((floating[0], node.op_type, parameters))

        reachable = [
            candidate
            for candidate in candidates
            if candidate[0] == logits or onnx_graph.reaches(self._nodes, candidate[0], {logits})
        ]
        shapes = self._probe_shapes([name for name, _, _ in reachable])
        return tuple(
            Site(index, name, op, shape, parameters)
            for index, ((name, op, parameters), shape) in enumerate(zip(reachable, shapes, strict=True))
        )

    def _probe_shapes(self, names: list[str]) -> list[tuple[int, ...]]:
        probe = self._probe_input(self.fixed_batch or 1)
        values = self._outputs_session(names)(probe)
        return [tuple(int(dim) for dim in value.shape[1:]) for value in values]

    def _session(self, key: tuple, build: Callable[[], onnx.ModelProto]) -> ort.InferenceSession:
        session = self._sessions.get(key)
        if session is None:
            session = make_session(build(), self.path, self.device)
            self._sessions[key] = session
        return session

    def _outputs_session(self, names: Sequence[str]) -> Callable[[np.ndarray], list[np.ndarray]]:
        """Return a function of samples that computes the clean values of the named tensors."""
        session = self._session(
            ("outputs", *names), lambda: onnx_graph.with_outputs(self.proto, names, self._types)
        )
        return lambda x: run_session(
            session, {self._input.name: x.astype(self._input_dtype, copy=False)}, self.path
        )

    def _run(self, x: np.ndarray, noise: NoiseArrays, quantize: Quantizers) -> np.ndarray:
        order = sorted(set(noise) | set(quantize))
        parts = tuple(
            (noise[index][0] is not None, noise[index][1] is not None) if index in noise else (False, False)
            for index in order
        )
        quantizers = tuple(quantize.get(index) for index in order)
        key = ("noise", *order, *parts, *quantizers)
        names = [self._sites[index].name for index in order]
        session = self._session(
            key, lambda: onnx_graph.insert_noise(self.proto, names, parts, self._types, quantizers)
        )

        feed = {self._input.name: x.astype(self._input_dtype, copy=False)}
        for position, index in enumerate(order):
            mul, add = noise.get(index, (None, None))
            dtype = self._site_dtypes[index]
            if mul is not None:
                feed[f"{onnx_graph.NOISE_INPUT_PREFIX}_mul_{position}"] = mul.astype(dtype, copy=False)
            if add is not None:
                feed[f"{onnx_graph.NOISE_INPUT_PREFIX}_add_{position}"] = add.astype(dtype, copy=False)
        return run_session(session, feed, self.path)[0]

    def _activations(self, x: np.ndarray, indices: Sequence[int]) -> list[np.ndarray]:
        names = [self._sites[index].name for index in indices]
        if all(name == self._input.name for name in names):
            return [x for _ in names]
        return self._outputs_session(names)(x)

    def suffix(self, index: int) -> Suffix:
        site = self._sites[index]
        suffix_proto, boundary = onnx_graph.extract_suffix(self.proto, self._nodes, site.name, self._types)
        suffix_session = make_session(suffix_proto, self.path, self.device)
        return _OnnxSuffix(site, self, boundary, suffix_session, limits=self.batch_limits)


class _OnnxSuffix(Suffix):
    def __init__(self, site: Site, model: OnnxModel, boundary: list[str], session, limits: BatchLimits):
        super().__init__(site, limits=limits)
        self._model = model
        self._boundary = boundary
        self._session = session

    def _prepare(self, x: np.ndarray) -> list[np.ndarray]:
        model = self._model
        x = x.astype(model._input_dtype, copy=False)
        computed = [name for name in self._boundary if name != model._input.name]
        values: dict[str, np.ndarray] = {}
        if computed:
            values = dict(zip(computed, model._outputs_session(computed)(x), strict=True))
        values[model._input.name] = x
        return [values[name] for name in self._boundary]

    def _run(self, values: Sequence[np.ndarray]) -> np.ndarray:
        return run_session(self._session, dict(zip(self._boundary, values, strict=True)), self._model.path)[0]


def run_session(session: ort.InferenceSession, feed: Mapping[str, np.ndarray], path: Path) -> list[np.ndarray]:
    """Run an onnxruntime session; raise ModelError with onnxruntime's message if it fails."""
    try:
        return session.run(None, dict(feed))
    except ORT_ERRORS as error:
        shapes = ", ".join(f"{name} {value.shape}" for name, value in feed.items())
        message = f"{path}: onnxruntime failed to run the model on inputs {shapes}: {_ort_message(error)}"
        raise ModelError(message) from None


def make_session(proto: onnx.ModelProto, path: Path, device: str | None = None) -> ort.InferenceSession:
    """Build an onnxruntime session on `device` with the configured thread count.

    `device` is "cpu" or "cuda"; None takes `wnplan.runtime.device()`.

    Raises:
        ModelError: a tensor still refers to external data, or onnxruntime rejects the model.
        SettingsError: the device is "cuda" and onnxruntime has no CUDAExecutionProvider,
            or could not start it.
    """
    require_in_memory(proto, path)
    options = ort.SessionOptions()
    # Only fatal messages: every failed run raises, and wnplan reports it in one line.
    options.log_severity_level = 4
    # Full optimization fuses operators differently around inserted noise nodes, which makes
    # noisy and suffix runs differ from the clean graph in the last bits; extended keeps them equal.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    threads = runtime.threads()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        serialized = proto.SerializeToString()
    except ValueError as error:  # protobuf refuses messages of 2 GB or more
        raise ModelError(f"{path}: the rewritten model cannot be serialized ({error})") from None
    device = device or runtime.device()
    runtime.check_device(device, "onnx")
    providers = CUDA_PROVIDERS if device == "cuda" else CPU_PROVIDERS
    try:
        session = ort.InferenceSession(serialized, options, providers=list(providers))
    except ORT_ERRORS as error:
        raise ModelError(f"{path}: onnxruntime cannot run this model: {_ort_message(error)}") from None
    if device == "cuda" and runtime.CUDA_PROVIDER not in session.get_providers():
        # onnxruntime-gpu logs an error and falls back to the CPU when the CUDA or cuDNN
        # libraries it was built for cannot be loaded.
        raise SettingsError(
            f"--device cuda: onnxruntime {ort.__version__} could not start its {runtime.CUDA_PROVIDER} "
            + f"for {path}; install the CUDA and cuDNN versions that this onnxruntime-gpu release "
            + "requires, or use --device cpu"
        )
    return session


def _ort_message(error: BaseException) -> str:
    """Return onnxruntime's message on one line, cut at 500 characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:500]


def _declaration(proto: onnx.ModelProto, path: Path) -> DataDeclaration | None:
    props = {prop.key: prop.value for prop in proto.metadata_props}
    if "wnplan.data" not in props:
        return None
    return DataDeclaration(props["wnplan.data"], props.get("wnplan.normalize"), f"{path.name} metadata")


def _short_runtime_error(message: str, limit: int = 160) -> str:
    """Return the readable end of an onnxruntime error: after its status prefix and failed check, shortened."""
    text = message.split("Status Message:")[-1].strip()
    text = text.split(" was false. ")[-1] if " was false. " in text else text
    return text if len(text) <= limit else text[: limit - 1] + "…"
