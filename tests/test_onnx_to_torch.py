"""Tests of the ONNX → torch.fx converter that trained mode uses.

Each operator is checked on a tiny graph built with onnx.helper, against onnxruntime's
output for the same random input (seed 0), within 1e-5 absolute and relative tolerance
(float32 kernels of the two runtimes differ in summation order). The stacked form of each
converted graph (two identical configurations) must give the same output.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from wnplan.errors import ModelError
from wnplan.train.layers import inject_noise
from wnplan.train.onnx_to_torch import SUPPORTED_OPS, convert_onnx
from wnplan.train.twin import Twin

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
