"""ONNX models, run by onnxruntime, with noise inserted by rewriting a copy of the graph."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

from wnplan import runtime
from wnplan.errors import ModelError
from wnplan.models import onnx_graph
from wnplan.models.base import DataDeclaration, Model, NoiseArrays, Quantizers, Site, Suffix

logger = logging.getLogger(__name__)

ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
}


class OnnxModel(Model):
    """An ONNX classifier: first graph input is the samples, first output the class scores."""

    format = "onnx"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.proto = _load(path)
        graph = self.proto.graph
        self._nodes = onnx_graph.sort_topologically(graph)
        del graph.node[:]
        graph.node.extend(self._nodes)
        self._types = onnx_graph.tensor_types(self.proto)

        initializers = {init.name for init in graph.initializer}
        inputs = [value for value in graph.input if value.name not in initializers]
        if not inputs or not graph.output:
            raise ModelError(f"{path}: the ONNX graph needs at least one input and one output")
        self._input = inputs[0]
        self._input_dtype = ONNX_TO_NUMPY.get(self._input.type.tensor_type.elem_type, np.float32)
        self._sessions: dict[tuple, ort.InferenceSession] = {}
        self.fixed_batch = self._declared_batch()
        self.declaration = _declaration(self.proto, path)
        self._sites = self._find_sites()

    @property
    def sites(self) -> tuple[Site, ...]:
        return self._sites

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        dims = self._input.type.tensor_type.shape.dim
        return tuple(dim.dim_value if dim.HasField("dim_value") else None for dim in dims)

    def _declared_batch(self) -> int | None:
        dims = self._input.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
        return None

    def _find_sites(self) -> tuple[Site, ...]:
        graph = self.proto.graph
        live = onnx_graph.depends_on_inputs(graph, self._nodes)
        logits = graph.output[0].name
        sizes = {init.name: int(np.prod(init.dims)) for init in graph.initializer}

        candidates: list[tuple[str, str, int]] = []
        if onnx_graph.elem_type(self._types, self._input.name) in onnx_graph.FLOAT_TYPES:
            candidates.append((self._input.name, "input", 0))
        for node in self._nodes:
            if node.op_type in onnx_graph.DATA_MOVEMENT_OPS or node.domain not in ("", "ai.onnx"):
                continue
            parameters = sum(sizes.get(name, 0) for name in node.input)
            for output in node.output[:1]:
                if output in live and onnx_graph.elem_type(self._types, output) in onnx_graph.FLOAT_TYPES:
                    candidates.append((output, node.op_type, parameters))

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
        batch = self.fixed_batch or 1
        dims = [batch] + [dim or 1 for dim in self.input_shape[1:]]
        probe = np.zeros(dims, dtype=self._input_dtype)
        values = self._session(("outputs", *names), lambda: onnx_graph.with_outputs(self.proto, names, self._types)).run(
            None, {self._input.name: probe}
        )
        return [tuple(int(dim) for dim in value.shape[1:]) for value in values]

    def _session(self, key: tuple, build) -> ort.InferenceSession:
        session = self._sessions.get(key)
        if session is None:
            session = make_session(build(), self.path)
            self._sessions[key] = session
        return session

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
            if mul is not None:
                feed[f"{onnx_graph.NOISE_INPUT_PREFIX}_mul_{position}"] = mul
            if add is not None:
                feed[f"{onnx_graph.NOISE_INPUT_PREFIX}_add_{position}"] = add
        return session.run(None, feed)[0]

    def _activations(self, x: np.ndarray, indices: Sequence[int]) -> list[np.ndarray]:
        names = [self._sites[index].name for index in indices]
        if all(name == self._input.name for name in names):
            return [x for _ in names]
        session = self._session(
            ("outputs", *names), lambda: onnx_graph.with_outputs(self.proto, names, self._types)
        )
        return session.run(None, {self._input.name: x.astype(self._input_dtype, copy=False)})

    def suffix(self, index: int) -> Suffix:
        site = self._sites[index]
        suffix_proto, boundary = onnx_graph.extract_suffix(self.proto, self._nodes, site.name, self._types)
        suffix_session = make_session(suffix_proto, self.path)
        return _OnnxSuffix(site, self, boundary, suffix_session, fixed_batch=self.fixed_batch)


class _OnnxSuffix(Suffix):
    def __init__(self, site: Site, model: OnnxModel, boundary: list[str], session, fixed_batch):
        super().__init__(site, fixed_batch=fixed_batch)
        self._model = model
        self._boundary = boundary
        self._session = session

    def _prepare(self, x: np.ndarray) -> list[np.ndarray]:
        model = self._model
        computed = [name for name in self._boundary if name != model._input.name]
        values = {}
        if computed:
            session = model._session(
                ("outputs", *computed),
                lambda: onnx_graph.with_outputs(model.proto, computed, model._types),
            )
            values = dict(zip(computed, session.run(None, {model._input.name: x}), strict=True))
        values[model._input.name] = x
        return [values[name] for name in self._boundary]

    def _run(self, values: Sequence[np.ndarray]) -> np.ndarray:
        return self._session.run(None, dict(zip(self._boundary, values, strict=True)))[0]


def make_session(proto: onnx.ModelProto, path: Path) -> ort.InferenceSession:
    """Build an onnxruntime session on the CPU with the configured thread count."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Full optimization fuses operators differently around inserted noise nodes, which makes
    # noisy and suffix runs differ from the clean graph in the last bits; extended keeps them equal.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    threads = runtime.threads()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(
            proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # onnxruntime raises its own unexported exception types
        message = str(error).strip().splitlines()[0]
        raise ModelError(f"{path}: onnxruntime cannot run this model: {message}") from None


def _load(path: Path) -> onnx.ModelProto:
    try:
        # External data is resolved relative to the model file, not the working directory.
        proto = onnx.load(str(path), load_external_data=True)
    except DecodeError:
        raise ModelError(f"{path}: not a valid ONNX file (protobuf decoding failed)") from None
    except FileNotFoundError as error:
        raise ModelError(
            f"{path}: external data file {Path(error.filename or '').name!r} not found next to "
            "the model; keep the .onnx file and its data files together"
        ) from None
    except (OSError, ValueError) as error:
        raise ModelError(f"{path}: cannot read the ONNX model ({error})") from None
    if not proto.graph.node:
        raise ModelError(f"{path}: the ONNX graph has no nodes; is this a valid model file?")
    return proto


def _declaration(proto: onnx.ModelProto, path: Path) -> DataDeclaration | None:
    props = {prop.key: prop.value for prop in proto.metadata_props}
    if "wnplan.data" not in props:
        return None
    return DataDeclaration(props["wnplan.data"], props.get("wnplan.normalize"), f"{path.name} metadata")
