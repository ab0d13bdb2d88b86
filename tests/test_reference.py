"""`crossover="reference"` reproduces the public code, step by step.

Each case in `tests/data/reference/` (fixtures of this repository; its
README.md gives their origin and format) was produced by the authors'
PyTorch script; the callback is driven through Keras's own callback
protocol.
"""

import glob
import json
import os

import keras
import numpy as np
import pytest

import keras_we
from tests.utils import LayerStack, evolve_after

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "reference")
CASES = sorted(glob.glob(os.path.join(REFERENCE_DIR, "*.npz")))
CASE_NAMES = (
    "depth_multiplier_and_groups",
    "high_ratios",
    "mobilenet_like",
    "resnet_like",
    "uniform_layers_force_path",
)


def build_case(data, description):
    layers = []
    for i, spec in enumerate(description["layers"]):
        if spec["kind"] == "bn":
            layer = keras.layers.BatchNormalization()
            layer.build((None, 4, 4, data[f"in/{i}/gamma"].shape[0]))
            layer.gamma.assign(data[f"in/{i}/gamma"])
            layer.beta.assign(data[f"in/{i}/beta"])
        else:
            kernel = data[f"in/{i}/kernel"]
            kh, kw, cin, cout = kernel.shape
            if spec["kind"] == "depthwise":
                layer = keras.layers.DepthwiseConv2D((kh, kw), depth_multiplier=cout, use_bias=False)
            else:
                cin *= spec["groups"]
                layer = keras.layers.Conv2D(cout, (kh, kw), groups=spec["groups"], use_bias=False)
            layer.build((None, 8, 8, cin))
            layer.kernel.assign(kernel)
        layers.append(layer)
    model = LayerStack(layers)
    model.build((None, 8, 8, 3))
    return model, layers


def layer_tensors(layer):
    if isinstance(layer, keras.layers.BatchNormalization):
        return {"gamma": layer.gamma, "beta": layer.beta}
    return {"kernel": layer.kernel}


def test_cases_are_present():
    """The cases ship with the repository: missing ones fail, never skip."""
    found = {os.path.basename(path)[: -len(".npz")] for path in CASES}
    missing = sorted(set(CASE_NAMES) - found)
    assert not missing, f"Reference cases missing from {REFERENCE_DIR}: {missing}"


@pytest.mark.parametrize("path", CASES, ids=lambda p: os.path.basename(p)[:-4])
def test_reference_case(path):
    data = np.load(path)
    description = json.loads(str(data["description"]))
    hp = description["hyperparameters"]
    model, layers = build_case(data, description)
    callback = keras_we.WeightEvolution(
        conv_ratio=hp["radio_conv"],
        gamma_ratio=hp["radio_bn"],
        beta_ratio=hp["radio_bias"],
        local_ratio=hp["lab"],
        force_divisor=hp["ln_c"],
        crossover="reference",
    )
    callback.set_model(model)
    callback.set_params({"epochs": max(description["epochs"]) + 10, "verbose": 0})
    # Driven as `fit` drives it: the evolution after `epoch` runs as the
    # next epoch begins.
    callback.on_train_begin()
    for step, epoch in enumerate(description["epochs"]):
        before = [
            {name: keras.ops.convert_to_numpy(v) for name, v in layer_tensors(layer).items()}
            for layer in layers
        ]
        logs = evolve_after(callback, epoch)
        changed = 0
        for i, layer in enumerate(layers):
            for name, variable in layer_tensors(layer).items():
                got = keras.ops.convert_to_numpy(variable)
                want = data[f"out/{step}/{i}/{name}"]
                np.testing.assert_allclose(
                    got, want, rtol=1e-5, atol=1e-6, err_msg=f"step {step} layer {i} {name}"
                )
                changed += int(np.sum(got != before[i][name]))
        counters = description["counters_after_each_step"][step]
        assert callback.get_state() == {
            "conv_counter": counters["low_cut_count"],
            "gamma_counter": counters["low_cut_count_bn"],
            "beta_counter": counters["low_cut_count_bias"],
        }
        assert changed == description["changed_elements_each_step"][step]
        assert logs["we_changed_elements"] == changed
