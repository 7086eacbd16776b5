"""Trained mode: noise-aware training of a model's twin, one model per (site, σ, seed).

    from wnplan.train import TrainedEvaluator, TrainingSettings
    evaluator = TrainedEvaluator(model, train_data, eval_data, noise, scales, seed_of, TrainingSettings())
    results = list(evaluator.run_group(trials))

- `twin`: trainable PyTorch copies of `.pt2` and ONNX models (`onnx_to_torch` converts ONNX);
- `stacked`: runs a twin for K configurations at once;
- `trainer`: the training loop and its settings;
- `measure`: accuracy with evaluation noise, or with a quantized site;
- `records`: weight sizes, activation histograms, self-binarization, preserved accuracy;
- `evaluator`: `TrainedEvaluator`, which the sweep calls per group of trials.
"""

from wnplan.train.evaluator import TrainedEvaluator
from wnplan.train.onnx_to_torch import SUPPORTED_OPS, convert_onnx
from wnplan.train.records import preserved_relative_accuracy
from wnplan.train.trainer import TrainedModels, TrainingConfig, TrainingSettings, train
from wnplan.train.twin import Twin, build_twin

__all__ = [
    "SUPPORTED_OPS",
    "TrainedEvaluator",
    "TrainedModels",
    "TrainingConfig",
    "TrainingSettings",
    "Twin",
    "build_twin",
    "convert_onnx",
    "preserved_relative_accuracy",
    "train",
]
