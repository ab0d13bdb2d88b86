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
