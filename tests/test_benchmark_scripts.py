"""The summaries of `benchmarks/`: the accuracy-distribution table read from
a runner folder and a reference folder, and throughput's runner options."""

import importlib.util
import json
import os
import pathlib

import pytest

BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path, record):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f)


def test_accuracy_distribution_tables(tmp_path, capsys):
    distribution = _load("accuracy_distribution")
    keras_finals, torch_finals = [0.50, 0.60, 0.64], [0.55, 0.57]
    for seed, final in enumerate(keras_finals):
        _write(tmp_path / "k" / "runs" / f"resnet20_baseline_seed{seed}" / "run.json", {
            "method": "baseline", "seed": seed, "epochs": 15, "backend": "jax",
            "final_test_accuracy": final, "best_test_accuracy": final + 0.01,
            "history": {"train_loss": [3.0 - 2 * final, 1.0], "test_accuracy": [final / 2, final]}})
    _write(tmp_path / "k" / "runs" / "resnet20_we-paper_seed0" / "run.json", {"method": "we-paper"})
    for seed, final in enumerate(torch_finals):
        _write(tmp_path / "t" / f"seed{seed}.json", {
            "seed": seed, "epochs": 15, "loss": [3.0 - 2 * final, 1.0], "test_accuracy": [0.2, final],
            "final_test_accuracy": final, "best_test_accuracy": final})
    assert distribution.main([str(tmp_path / "k"), str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    # Mean, sample sd, min, max in percent; mean first-epoch loss.
    assert "| keras-we (jax) | 3 | 58.00 | 7.21 | 50.00 | 64.00 | 1.840 |" in out
    assert "| PyTorch reference | 2 | 56.00 | 1.41 | 55.00 | 57.00 | 1.880 |" in out
    assert "| keras-we (jax) | 0 | 15 | 2.000 | 25.00 | 50.00 | 51.00 |" in out
    # The first-epoch loss falls exactly as the final accuracy rises here.
    assert "over all 5 runs: -1.00" in out
    with pytest.raises(SystemExit):
        distribution.main([str(tmp_path / "k"), str(tmp_path / "nothing")])


def test_throughput_variants_name_runner_options():
    throughput = _load("throughput")
    assert throughput.parse_variant("default") == {}
    assert throughput.parse_variant("augment=device,steps_per_execution=8") == {
        "augment": "device", "steps_per_execution": 8}
    with pytest.raises(ValueError, match="names among augment, steps_per_execution"):
        throughput.parse_variant("augment=device,batch=64")
    with pytest.raises(ValueError, match="'jit_compile'"):
        throughput.parse_variant("jit_compile")


def test_conv_gradients_times_the_gradients_it_names():
    # What each timed call computes, on this backend: the kernel gradient
    # of sum(conv(x, k)) is, per kernel position, the sum of the inputs it
    # meets (zero padding included), the same for every filter.
    import keras
    import numpy as np

    conv_gradients = _load("conv_gradients")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 5, 3)).astype("float32")
    kernel = rng.normal(size=(3, 3, 3, 4)).astype("float32")
    forward, input_grad, kernel_grad = conv_gradients.functions(
        keras.backend.backend(), keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(kernel), 1)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.stack([[padded[:, i:i + 5, j:j + 5].sum(axis=(0, 1, 2)) for j in range(3)] for i in range(3)])
    got = keras.ops.convert_to_numpy(kernel_grad())
    np.testing.assert_allclose(got, np.repeat(want[..., None], 4, axis=-1), rtol=1e-5, atol=1e-5)
    assert keras.ops.convert_to_numpy(forward()).shape == (2, 5, 5, 4)
    # The input gradient: each input meets every kernel element that
    # reaches it, once per filter.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(input_grad())[:, 2, 2], np.broadcast_to(
        kernel.sum(axis=(0, 1, 3)), (2, 3)), rtol=1e-5)
