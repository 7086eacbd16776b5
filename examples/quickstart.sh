#!/usr/bin/env bash
# Run the main job on an example model with real data: profile, allocate, check.
# Expects the wnplan command on PATH (the README's setup command activates .venv first).
# Writes wnplan-profile.json, wnplan-plan.json and wnplan-check.json in the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

models=examples/models
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  # The committed models were trained on Fashion-MNIST; without that data they cannot be
  # evaluated, so train the MLP on scikit-learn's bundled digits instead.
  echo "Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist);" \
    "training the example on scikit-learn's digits instead" >&2
  models=examples/models-digits
  python examples/train.py --data digits --models mlp_bn --out "$models" --skip-existing
else
  python examples/train.py --models mlp_bn --skip-existing
fi

wnplan profile "$models/mlp_bn.onnx" --noise additive
wnplan allocate --budget 22
wnplan check
