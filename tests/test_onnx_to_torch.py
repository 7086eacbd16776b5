"""Tests of the ONNX → torch.fx converter that trained mode uses, and of ONNX twins.

Each operator is checked on a tiny graph built with onnx.helper, against onnxruntime's
output for the same random input (seed 0), within 1e-5 absolute and relative tolerance
(float32 kernels of the two runtimes differ in summation order). The stacked form of each
converted graph (two identical configurations) must give the same output.

Further tests check which initializers become trainable, and that ONNX models trained mode
cannot use fail with one ModelError line on the command line (digits data, tiny limits).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import assert_usage_error, run_cli
from onnx import TensorProto, helper, numpy_helper

from wnplan.errors import ModelError
from wnplan.models import load_model
from wnplan.train.layers import inject_noise
from wnplan.train.onnx_to_torch import SUPPORTED_OPS, convert_onnx
from wnplan.train.twin import TensorRole, Twin, build_twin

TOLERANCE = 1e-5
SEED = 0


def _model(nodes, input_shape, output_shape, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        [numpy_helper.from_array(value, name) for name, value in initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _random(*shape: int) -> np.ndarray:
    return np.random.default_rng(SEED).standard_normal(shape).astype(np.float32)


def _onnxruntime(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _stacked_output(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Run the converted graph stacked for two identical configurations; return the first."""
    converted = convert_onnx(model)
    twin = Twin(converted.module, converted.input_node, converted.output_node, (converted.input_node,),
                converted.roles, "onnx")
    tensors = twin.tensors()
    stacked = [torch.stack([tensors[name].detach()] * 2) for name in twin.stacked_names()]
    module = twin.stacked_site_module([0], inject_noise, 2).eval()
    samples = torch.from_numpy(x).unsqueeze(0).expand(2, *x.shape)
    with torch.no_grad():
        output = module(samples, None, None, *stacked)[0]
    return output[0].numpy()


W_CONV = _random(4, 2, 3, 3) * 0.5
B_CONV = _random(4)
W_GEMM = _random(5, 6)
B_GEMM = _random(5)

# (case id, nodes, input shape, output shape, initializers, opset)
CASES = [
    ("Add", [helper.make_node("Add", ["x", "c"], ["y"])], [3, 4], [3, 4], [("c", _random(4))], 17),
    ("Sub", [helper.make_node("Sub", ["x", "c"], ["y"])], [3, 4], [3, 4], [("c", _random(3, 1))], 17),
    ("Mul", [helper.make_node("Mul", ["x", "x"], ["y"])], [3, 4], [3, 4], [], 17),
    ("Div", [helper.make_node("Div", ["x", "c"], ["y"])], [3, 4], [3, 4], [("c", np.full(4, 2.5, np.float32))], 17),
    ("Relu", [helper.make_node("Relu", ["x"], ["y"])], [3, 4], [3, 4], [], 17),
    ("LeakyRelu", [helper.make_node("LeakyRelu", ["x"], ["y"], alpha=0.2)], [3, 4], [3, 4], [], 17),
    ("Sigmoid", [helper.make_node("Sigmoid", ["x"], ["y"])], [3, 4], [3, 4], [], 17),
    ("Tanh", [helper.make_node("Tanh", ["x"], ["y"])], [3, 4], [3, 4], [], 17),
    ("Softmax", [helper.make_node("Softmax", ["x"], ["y"], axis=1)], [3, 4], [3, 4], [], 17),
    ("Softmax-opset11", [helper.make_node("Softmax", ["x"], ["y"], axis=1)], [2, 3, 4], [2, 3, 4], [], 11),
    ("Gelu", [helper.make_node("Gelu", ["x"], ["y"])], [3, 4], [3, 4], [], 20),
    ("Gelu-tanh", [helper.make_node("Gelu", ["x"], ["y"], approximate="tanh")], [3, 4], [3, 4], [], 20),
    ("Clip", [helper.make_node("Clip", ["x", "low", "high"], ["y"])], [3, 4], [3, 4],
     [("low", np.array(-0.5, np.float32)), ("high", np.array(0.7, np.float32))], 17),
    ("Clip-opset6", [helper.make_node("Clip", ["x"], ["y"], min=-0.2, max=0.3)], [3, 4], [3, 4], [], 6),
    ("Conv", [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], strides=[2, 1])],
     [2, 2, 7, 6], [2, 4, 4, 6], [("w", W_CONV), ("b", B_CONV)], 17),
    ("Conv-asymmetric-pads", [helper.make_node("Conv", ["x", "w"], ["y"], pads=[0, 1, 2, 0])],
     [2, 2, 6, 6], [2, 4, 6, 5], [("w", W_CONV)], 17),
    ("Conv-same-upper", [helper.make_node("Conv", ["x", "w", "b"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])],
     [2, 2, 7, 6], [2, 4, 4, 3], [("w", W_CONV), ("b", B_CONV)], 17),
    ("Conv-groups-dilation", [helper.make_node("Conv", ["x", "w"], ["y"], group=2, dilations=[2, 2])],
     [2, 2, 8, 8], [2, 4, 4, 4], [("w", _random(4, 1, 3, 3))], 17),
    ("Gemm", [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], [3, 6], [3, 5],
     [("w", W_GEMM), ("b", B_GEMM)], 17),
    ("Gemm-alpha-beta-transA", [helper.make_node("Gemm", ["x", "w", "b"], ["y"], alpha=0.5, beta=2.0, transA=1)],
     [6, 3], [3, 5], [("w", W_GEMM.T.copy()), ("b", B_GEMM)], 17),
    ("MatMul-Add", [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
     [3, 6], [3, 5], [("w", W_GEMM.T.copy()), ("b", B_GEMM)], 17),
    ("MatMul-3d", [helper.make_node("MatMul", ["x", "w"], ["y"])], [2, 3, 6], [2, 3, 5], [("w", W_GEMM.T.copy())], 17),
    ("MatMul-left-weight", [helper.make_node("MatMul", ["w", "x"], ["y"])], [6, 3], [5, 3], [("w", W_GEMM)], 17),
    ("Gemm-left-weight", [helper.make_node("Gemm", ["w", "x", "b"], ["y"], transA=1)], [6, 3], [5, 3],
     [("w", W_GEMM.T.copy()), ("b", B_GEMM.reshape(5, 1))], 17),
    ("MatMul-transposed-weight", [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
                                  helper.make_node("MatMul", ["x", "wt"], ["y"])],
     [3, 6], [3, 5], [("w", W_GEMM)], 17),
    ("BatchNormalization", [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)],
     [2, 3, 4, 4], [2, 3, 4, 4],
     [("s", _random(3)), ("b", _random(3)), ("m", _random(3)), ("v", np.abs(_random(3)) + 0.5)], 17),
    ("MaxPool", [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])],
     [2, 3, 6, 6], [2, 3, 3, 3], [], 17),
    ("MaxPool-pads-ceil", [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                           pads=[1, 1, 1, 1], ceil_mode=1)],
     [2, 3, 6, 6], [2, 3, 4, 4], [], 17),
    ("MaxPool-asymmetric-pads", [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], pads=[0, 0, 1, 1])],
     [2, 3, 5, 5], [2, 3, 5, 5], [], 17),
    ("AveragePool", [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
     [2, 3, 5, 5], [2, 3, 5, 5], [], 17),
    ("AveragePool-include-pad", [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2],
                                                  pads=[1, 1, 1, 1], count_include_pad=1)],
     [2, 3, 5, 5], [2, 3, 4, 4], [], 17),
    ("GlobalAveragePool", [helper.make_node("GlobalAveragePool", ["x"], ["y"])], [2, 3, 4, 5], [2, 3, 1, 1], [], 17),
    ("Flatten", [helper.make_node("Flatten", ["x"], ["y"], axis=2)], [2, 3, 4, 5], [6, 20], [], 17),
    ("Reshape", [helper.make_node("Reshape", ["x", "shape"], ["y"])], [2, 3, 4], [2, 12],
     [("shape", np.array([0, -1], np.int64))], 17),
    ("Transpose", [helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 1])], [2, 3, 4], [2, 4, 3], [], 17),
    ("Transpose-default", [helper.make_node("Transpose", ["x"], ["y"])], [2, 3, 4], [4, 3, 2], [], 17),
    ("Concat", [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Concat", ["x", "r", "c"], ["y"], axis=1)],
     [2, 3], [2, 10], [("c", _random(2, 4))], 17),
    ("Constant", [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(_random(4), "c")),
                  helper.make_node("Mul", ["x", "c"], ["y"])], [3, 4], [3, 4], [], 17),
    ("Constant-shape", [helper.make_node("Constant", [], ["s"], value_ints=[-1, 6]),
                        helper.make_node("Reshape", ["x", "s"], ["y"])], [2, 3, 2], [2, 6], [], 17),
    ("Identity", [helper.make_node("Identity", ["x"], ["y"])], [3, 4], [3, 4], [], 17),
    ("ReduceMean", [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)],
     [2, 3, 4, 5], [2, 3], [], 17),
    ("ReduceMean-opset18", [helper.make_node("ReduceMean", ["x", "axes"], ["y"])],
     [2, 3, 4], [2, 3, 1], [("axes", np.array([-1], np.int64))], 18),
    ("Squeeze", [helper.make_node("Squeeze", ["x", "axes"], ["y"])], [2, 1, 4, 1], [2, 4],
     [("axes", np.array([1, 3], np.int64))], 17),
    ("Squeeze-all", [helper.make_node("Squeeze", ["x"], ["y"])], [2, 1, 4, 1], [2, 4], [], 17),
    ("Unsqueeze", [helper.make_node("Unsqueeze", ["x", "axes"], ["y"])], [2, 4], [2, 1, 4, 1],
     [("axes", np.array([1, -1], np.int64))], 17),
]


@pytest.mark.parametrize(
    ("nodes", "input_shape", "output_shape", "initializers", "opset"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_converter_matches_onnxruntime(nodes, input_shape, output_shape, initializers, opset):
    model = _model(nodes, input_shape, output_shape, initializers, opset)
    x = _random(*input_shape)
    expected = _onnxruntime(model, x)

    converted = convert_onnx(model).module.eval()
    with torch.no_grad():
        output = converted(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(output, expected, rtol=TOLERANCE, atol=TOLERANCE)

    stacked = _stacked_output(model, x)
    np.testing.assert_allclose(stacked, expected, rtol=TOLERANCE, atol=TOLERANCE)


def test_converter_covers_supported_ops():
    tested = {node.op_type for case in CASES for node in case[1]}
    assert tested == set(SUPPORTED_OPS)


def test_converter_rejects_unsupported_op():
    model = _model([helper.make_node("Erf", ["x"], ["y"])], [3, 4], [3, 4])
    with pytest.raises(ModelError, match="Erf") as error:
        convert_onnx(model)
    assert "Conv" in str(error.value)
    assert "Gemm" in str(error.value)


def test_converter_rejects_computed_shape():
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])]
    model = _model(nodes, [2, 3], [2, 3])
    with pytest.raises(ModelError, match="Shape"):
        convert_onnx(model)


def test_converter_rejects_runtime_reshape_target():
    nodes = [
        helper.make_node("Concat", ["a", "b"], ["s"], axis=0),
        helper.make_node("Reshape", ["x", "s"], ["y"]),
    ]
    initializers = [("a", np.array([2], np.int64)), ("b", np.array([3], np.int64))]
    model = _model(nodes, [6], [2, 3], initializers)
    with pytest.raises(ModelError, match="target shape at run time"):
        convert_onnx(model)


def test_converter_rejects_second_input():
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "z"], ["y"])],
        "two_inputs",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2]) for name in ("x", "z")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match="one input"):
        convert_onnx(model)


def test_converter_makes_layers_trainable():
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1),
        helper.make_node("BatchNormalization", ["g", "s", "t", "m", "v"], ["n"]),
        helper.make_node("Reshape", ["n", "shape"], ["y"]),
    ]
    initializers = [
        ("w", W_GEMM), ("b", B_GEMM), ("s", np.ones(5, np.float32)), ("t", np.zeros(5, np.float32)),
        ("m", np.zeros(5, np.float32)), ("v", np.ones(5, np.float32)), ("shape", np.array([-1, 5], np.int64)),
    ]
    converted = convert_onnx(_model(nodes, [3, 6], [3, 5], initializers))
    kinds = {role.label: role.kind for role in converted.roles.values()}
    parameters = {name for name, _ in converted.module.named_parameters()}
    buffers = {name for name, _ in converted.module.named_buffers()}

    assert kinds == {"w": "weight", "b": "bias", "s": "norm_scale", "t": "norm_shift",
                     "m": "running_mean", "v": "running_var"}
    assert {"w", "b", "s", "t"} == parameters
    assert {"m", "v"} == buffers
    assert converted.roles["w"].fan_in == 6


def test_converter_leaves_proto_unchanged():
    model = _model(CASES[14][1], [2, 2, 7, 6], [2, 4, 4, 6], CASES[14][4])
    before = model.SerializeToString()
    converted = convert_onnx(model)
    with torch.no_grad():
        for parameter in converted.module.parameters():
            parameter.add_(1.0)
    assert model.SerializeToString() == before


# --- trained initializers ---


def _parameter_grads(converted, x: np.ndarray) -> dict[str, torch.Tensor | None]:
    """Backpropagate the sum of the converted graph's output; return each parameter's gradient."""
    module = converted.module.train()
    module(torch.from_numpy(x))[0].sum().backward()
    return {name: parameter.grad for name, parameter in module.named_parameters()}


@pytest.mark.parametrize("case", ["MatMul-left-weight", "Gemm-left-weight"])
def test_converter_trains_left_operand_weight(case):
    _, nodes, input_shape, output_shape, initializers, opset = next(entry for entry in CASES if entry[0] == case)
    converted = convert_onnx(_model(nodes, input_shape, output_shape, initializers, opset))
    grads = _parameter_grads(converted, _random(*input_shape))

    assert converted.roles["w"] == TensorRole("weight", 6, "w")
    assert set(grads) == {name for name, _ in initializers}
    assert all(grad is not None and float(grad.abs().sum()) > 0 for grad in grads.values())


def test_converter_trains_weights_through_layout_ops():
    # w1 reaches the first MatMul through Transpose; w2 (flat) through Identity and Reshape.
    nodes = [
        helper.make_node("Transpose", ["w1"], ["w1t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w1t"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["a"]),
        helper.make_node("Identity", ["w2"], ["w2i"]),
        helper.make_node("Reshape", ["w2i", "shape"], ["w2r"]),
        helper.make_node("MatMul", ["a", "w2r"], ["y"]),
    ]
    initializers = [("w1", W_GEMM), ("b1", B_GEMM), ("w2", _random(15)), ("shape", np.array([5, 3], np.int64))]
    model = _model(nodes, [4, 6], [4, 3], initializers)
    x = _random(4, 6)
    converted = convert_onnx(model)
    with torch.no_grad():
        output = converted.module.eval()(torch.from_numpy(x))[0].numpy()
    grads = _parameter_grads(converted, x)

    np.testing.assert_allclose(output, _onnxruntime(model, x), rtol=TOLERANCE, atol=TOLERANCE)
    assert converted.roles["w1"] == TensorRole("weight", 6, "w1")
    assert converted.roles["b1"].kind == "bias"
    assert converted.roles["w2"] == TensorRole("weight", 5, "w2")
    assert set(grads) == {"w1", "b1", "w2"}
    assert all(grad is not None and float(grad.abs().sum()) > 0 for grad in grads.values())
    assert converted.frozen == ()


def test_converter_reports_computed_weight_as_frozen():
    nodes = [helper.make_node("Mul", ["w", "scale"], ["ws"]), helper.make_node("MatMul", ["x", "ws"], ["y"])]
    initializers = [("w", W_GEMM.T.copy()), ("scale", np.array(0.5, np.float32))]
    converted = convert_onnx(_model(nodes, [3, 6], [3, 5], initializers))

    assert dict(converted.module.named_parameters()) == {}
    assert len(converted.frozen) == 1
    assert "'ws'" in converted.frozen[0]
    assert "['scale', 'w']" in converted.frozen[0]


def test_converter_makes_double_model_float32():
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "double",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [3, 6])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [3, 5])],
        [numpy_helper.from_array(W_GEMM.T.astype(np.float64), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = _random(3, 6)
    converted = convert_onnx(model)
    with torch.no_grad():
        output = converted.module.eval()(torch.from_numpy(x))[0]

    assert converted.module.w.dtype == torch.float32
    assert output.dtype == torch.float32
    np.testing.assert_allclose(output.numpy(), _onnxruntime(model, x.astype(np.float64)), rtol=1e-5, atol=1e-5)


# --- twins of loaded ONNX models, and the command line ---

FLAT = 28 * 28


def _digits_model(path: Path, nodes, initializers, batch: int | str = "N", inputs=("input",)) -> Path:
    """Save an ONNX model that reads digits images (batch, 1, 28, 28) and returns 10 scores."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "flat_shape"], ["flat"]), *nodes],
        "digits",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, 1, 28, 28]) for name in inputs],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        [numpy_helper.from_array(value, name) for name, value in initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _flat_shape(batch: int = -1) -> tuple[str, np.ndarray]:
    return ("flat_shape", np.array([batch, FLAT], np.int64))


W_DIGITS = np.random.default_rng(SEED).normal(0.0, 0.05, (10, FLAT)).astype(np.float32)
TRAINED_OPTIONS = [
    "--mode", "trained", "--data", "digits", "--scope", "walking", "--sigmas", "1", "--repeats", "1",
    "--train-limit", "20", "--limit", "20", "--batch-size", "10", "--threads", "1", "--store", "none",
]


def test_build_twin_rejects_graph_without_trainable_tensor(tmp_path):
    nodes = [helper.make_node("Mul", ["w", "scale"], ["ws"]), helper.make_node("Gemm", ["flat", "ws"], ["logits"],
                                                                              transB=1)]
    path = _digits_model(tmp_path / "frozen.onnx", nodes,
                         [_flat_shape(), ("w", W_DIGITS), ("scale", np.array(2.0, np.float32))])

    with pytest.raises(ModelError, match="nothing to train") as error:
        build_twin(load_model(path))
    assert "'ws'" in str(error.value)
    assert "--mode inference" in str(error.value)


def test_build_twin_warns_about_frozen_weight(tmp_path, caplog):
    nodes = [
        helper.make_node("MatMul", ["flat", "w1"], ["hidden"]),
        helper.make_node("Mul", ["w2", "scale"], ["w2s"]),
        helper.make_node("MatMul", ["hidden", "w2s"], ["logits"]),
    ]
    initializers = [_flat_shape(), ("w1", W_DIGITS.T[:, :8].copy()), ("w2", _random(8, 10)),
                    ("scale", np.array(2.0, np.float32))]
    path = _digits_model(tmp_path / "partly_frozen.onnx", nodes, initializers)

    with caplog.at_level(logging.WARNING, logger="wnplan.train.onnx_to_torch"):
        twin = build_twin(load_model(path))
    assert twin.trainable_names() == ["w1"]
    assert any("'w2s'" in record.getMessage() and "fixed" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(("batch", "cause"), [(1, "fixed batch size of 1"), ("N", "a node fixes the batch size")])
def test_build_twin_fixed_batch_raises_without_output(tmp_path, capfd, batch, cause):
    path = _digits_model(tmp_path / "fixed.onnx", [helper.make_node("Gemm", ["flat", "w"], ["logits"], transB=1)],
                         [_flat_shape(1), ("w", W_DIGITS)], batch=batch)
    model = load_model(path)
    capfd.readouterr()

    with pytest.raises(ModelError, match="fails on a batch of 2") as error:
        build_twin(model)
    assert cause in str(error.value)
    assert "dynamic batch dimension" in str(error.value)
    assert capfd.readouterr().err == ""


def test_twin_rejects_site_without_leading_batch(tmp_path):
    # The left-operand MatMul's output (10, N) has the samples in its second dimension.
    nodes = [
        helper.make_node("Transpose", ["flat"], ["flat_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["w", "flat_t"], ["scores_t"]),
        helper.make_node("Transpose", ["scores_t"], ["logits"], perm=[1, 0]),
    ]
    model = load_model(_digits_model(tmp_path / "left.onnx", nodes, [_flat_shape(), ("w", W_DIGITS)]))
    twin = build_twin(model)
    index = next(site.index for site in model.sites if site.name == "scores_t")

    assert twin.trainable_names() == ["w"]
    assert set(twin.site_errors) == {index}
    twin.site_module([0], inject_noise, 2)
    with pytest.raises(ModelError, match="samples in the first dimension"):
        twin.site_module([index], inject_noise, 2)
    with pytest.raises(ModelError, match="scores_t"):
        twin.stacked_site_module([index], inject_noise, 2)


def test_onnx_model_rejects_two_inputs(tmp_path):
    path = _digits_model(tmp_path / "two.onnx", [helper.make_node("Gemm", ["flat", "w"], ["logits"], transB=1)],
                         [_flat_shape(), ("w", W_DIGITS)], inputs=("input", "extra"))

    with pytest.raises(ModelError, match="exactly one input") as error:
        load_model(path)
    assert "['input', 'extra']" in str(error.value)


@pytest.mark.parametrize("command", ["sites", "profile"])
def test_cli_two_input_model_is_usage_error(tmp_path, capsys, command):
    path = _digits_model(tmp_path / "two.onnx", [helper.make_node("Gemm", ["flat", "w"], ["logits"], transB=1)],
                         [_flat_shape(), ("w", W_DIGITS)], inputs=("input", "extra"))
    out = tmp_path / "profile.json"
    arguments = ["profile", path, *TRAINED_OPTIONS, "--out", out] if command == "profile" else ["sites", path]

    assert_usage_error(run_cli(capsys, *arguments), "exactly one input", "'extra'")
    assert not out.exists()


def test_cli_trained_fixed_batch_is_one_line(tmp_path, capsys):
    path = _digits_model(tmp_path / "fixed.onnx", [helper.make_node("Gemm", ["flat", "w"], ["logits"], transB=1)],
                         [_flat_shape(1), ("w", W_DIGITS)], batch=1)
    out = tmp_path / "profile.json"

    assert_usage_error(run_cli(capsys, "profile", path, *TRAINED_OPTIONS, "--out", out), "fixed batch size of 1")
    assert not out.exists()


def test_cli_trained_transposed_weight_records_it(tmp_path, capsys):
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["flat", "wt"],
                                                                                         ["logits"])]
    path = _digits_model(tmp_path / "transposed.onnx", nodes, [_flat_shape(), ("w", W_DIGITS)])
    out = tmp_path / "profile.json"

    code, _, err = run_cli(capsys, "profile", path, *TRAINED_OPTIONS, "--sites", "1", "--out", out)
    assert code == 0, err
    site = json.loads(out.read_text())["sites"][1]
    assert list(site["walking"]["points"][1]["records"]["weights"]) == ["w"]


def test_cli_trained_dry_run_checks_twin(tmp_path, capsys):
    path = _digits_model(tmp_path / "fixed.onnx", [helper.make_node("Gemm", ["flat", "w"], ["logits"], transB=1)],
                         [_flat_shape(1), ("w", W_DIGITS)], batch=1)

    result = run_cli(capsys, "profile", path, *TRAINED_OPTIONS, "--dry-run")

    assert_usage_error(result, "fixed batch size of 1")


def test_build_twin_rejects_output_that_merges_samples(tmp_path):
    nodes = [helper.make_node("Gemm", ["flat", "w"], ["scores"], transB=1),
             helper.make_node("Reshape", ["scores", "one_row"], ["logits"])]
    path = _digits_model(tmp_path / "merged.onnx", nodes,
                         [_flat_shape(), ("w", W_DIGITS), ("one_row", np.array([1, -1], np.int64))])

    with pytest.raises(ModelError, match="output has 1 rows for 2 samples"):
        build_twin(load_model(path, sample=np.zeros((2, 1, 28, 28), np.float32)))
