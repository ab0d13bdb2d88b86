"""The `keras-we` command: presets and their defaults, the setting it prints
before training, missing dependencies found before any training, and a
comparison whose runs or plots fail at the end.

Training is replaced by `fake_train_run` (a record of the same form, with no
model), so these tests check the command itself; `test_experiments.py`
trains for real.
"""

import dataclasses
import json
import os
import sys

import pytest

from keras_we.experiments import cli, runner


class FakeTraining:
    """Stands in for `runner.train_run`: records each config and
    returns a run record of the real form; `fail` maps a run name to the
    exception that run raises."""

    def __init__(self, fail=None):
        self.configs = []
        self.fail = fail or {}

    def __call__(self, config, out_dir, verbose=1):
        self.configs.append(config)
        print(f"TRAINING {config.name}")
        if config.name in self.fail:
            raise self.fail[config.name]
        os.makedirs(out_dir, exist_ok=True)
        offset = {"baseline": 0.0, "we-paper": 0.01, "we-reference": 0.02}[config.method]
        accuracy = [0.1 + 0.05 * epoch + offset + 0.001 * config.seed for epoch in range(config.epochs)]
        evolved = [0] * config.epochs if config.method == "baseline" else [0] + [3] * (config.epochs - 1)
        return {
            **dataclasses.asdict(config),
            "final_test_accuracy": accuracy[-1],
            "best_test_accuracy": max(accuracy),
            "train_seconds": 0.0,
            "backend": "fake",
            "history": {"epoch": list(range(config.epochs)), "test_accuracy": accuracy,
                        "items_evolved": evolved},
        }


@pytest.fixture
def training(monkeypatch):
    fake = FakeTraining()
    monkeypatch.setattr(runner, "train_run", fake)
    # The data check loads CIFAR-10; these tests do not need it.
    monkeypatch.setattr(runner, "check_data", lambda config: None)
    return fake


def run_cli(argv):
    try:
        return cli.main(argv)
    except SystemExit as exit:  # argparse: --help, bad arguments
        return exit.code


def setting_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("keras-we ")]
    assert len(lines) == 1, stdout
    return lines[0]


@pytest.mark.parametrize("command", ["train", "compare"])
def test_help_names_each_preset_and_the_default(capsys, command):
    assert run_cli([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "--preset {cpu,paper,smoke}" in text
    assert "default: cpu" in text
    for words in [
        "cpu ResNet-20", "10k training / 5k test images", "8 epochs", "3 methods x 3 seeds",
        "about 20 min on 2 CPU cores with TensorFlow",
        "paper the paper's 200-epoch protocol, for a GPU", "ResNet-56 and MobileNetV2",
        "smoke", "3 epochs, 3 methods x 1 seed",
    ]:
        assert words in text, words


def test_compare_defaults_to_the_cpu_preset_and_prints_it_before_training(tmp_path, capsys, training):
    out = str(tmp_path / "cpu")
    assert cli.main(["compare", "--out", out, "--quiet"]) == 0
    configs = training.configs
    assert len(configs) == 9
    assert {c.model for c in configs} == {"resnet20"}
    assert {(c.epochs, c.train_size, c.test_size, c.batch_size, c.dataset) for c in configs} == {
        (8, 10000, 5000, 128, "cifar10")
    }
    assert {(c.method, c.seed) for c in configs} == {
        (m, s) for m in ("baseline", "we-paper", "we-reference") for s in (0, 1, 2)
    }
    stdout = capsys.readouterr().out
    line = setting_line(stdout)
    assert stdout.index(line) < stdout.index("TRAINING")
    for words in ["compare", "preset cpu", "model resnet20", "cifar10", "train 10000 / test 5000 images",
                  "8 epochs", "batch 128", "methods baseline,we-paper,we-reference", "seeds 0,1,2",
                  f"out {out}"]:
        assert words in line, words


def test_train_defaults_to_the_cpu_preset(tmp_path, capsys, training):
    assert cli.main(["train", "--out", str(tmp_path / "one"), "--quiet"]) == 0
    [config] = training.configs
    assert (config.model, config.method, config.seed, config.epochs, config.train_size, config.test_size) == (
        "resnet20", "we-paper", 0, 8, 10000, 5000
    )
    line = setting_line(capsys.readouterr().out)
    for words in ["train", "preset cpu", "model resnet20", "train 10000 / test 5000 images", "8 epochs",
                  "method we-paper", "seed 0"]:
        assert words in line, words


def test_the_full_paper_setting_needs_preset_paper(tmp_path, capsys, training):
    argv = ["train", "--model", "resnet56", "--method", "we-paper", "--epochs", "200", "--seed", "0", "--quiet"]
    assert cli.main(argv + ["--preset", "paper", "--out", str(tmp_path / "paper")]) == 0
    assert "preset paper" in setting_line(capsys.readouterr().out)
    # Without it, the default cpu preset's subsets apply, and the line says so.
    assert cli.main(argv + ["--out", str(tmp_path / "cpu")]) == 0
    line = setting_line(capsys.readouterr().out)
    paper, cpu = training.configs
    assert (paper.model, paper.epochs, paper.train_size, paper.test_size) == ("resnet56", 200, None, None)
    assert (cpu.model, cpu.epochs, cpu.train_size, cpu.test_size) == ("resnet56", 200, 10000, 5000)
    assert "preset cpu" in line and "train 10000 / test 5000 images" in line


def test_all_overrides_a_preset_subset(tmp_path, capsys, training):
    argv = ["compare", "--train-size", "all", "--test-size", "all", "--methods", "baseline", "--seeds", "0",
            "--epochs", "1", "--quiet", "--out", str(tmp_path / "all")]
    assert cli.main(argv) == 0
    [config] = training.configs
    assert (config.train_size, config.test_size) == (None, None)
    assert "train all / test all images" in setting_line(capsys.readouterr().out)


def test_smoke_preset_is_small_and_evolves_before_the_last_epoch(tmp_path, capsys, training):
    assert cli.main(["compare", "--preset", "smoke", "--out", str(tmp_path / "smoke"), "--quiet"]) == 0
    configs = training.configs
    assert [(c.model, c.dataset, c.method, c.seed) for c in configs] == [
        ("resnet20", "cifar10", m, 0) for m in ("baseline", "we-paper", "we-reference")
    ]
    assert {(c.epochs, c.train_size, c.test_size, c.batch_size) for c in configs} == {(3, 512, 500, 128)}
    # WE never evolves after the last epoch, so it must select something
    # after one of the epochs before it.
    schedule = configs[0].recipe().we_schedule()
    assert max(schedule.ratio(0.2, epoch) for epoch in range(configs[0].epochs - 1)) > 0
    assert "preset smoke" in setting_line(capsys.readouterr().out)


TINY_ARGS = ["--model", "resnet20", "--methods", "baseline,we-paper,we-reference", "--seeds", "0",
             "--epochs", "2", "--train-size", "200", "--test-size", "100", "--batch-size", "50", "--quiet"]


def test_missing_matplotlib_fails_before_any_training(tmp_path, capsys, monkeypatch, training):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    out = str(tmp_path / "cmp")
    assert cli.main(["compare", *TINY_ARGS, "--out", out]) == 2
    assert training.configs == []
    assert not os.path.exists(out)
    err = capsys.readouterr().err
    assert "matplotlib" in err and 'pip install "matplotlib' in err


def test_train_does_not_need_matplotlib(tmp_path, monkeypatch, training):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["train", "--method", "baseline", "--epochs", "1", "--quiet",
                     "--out", str(tmp_path / "one")]) == 0
    assert len(training.configs) == 1


def test_a_failing_run_lets_the_others_finish_and_exits_1(tmp_path, capsys, training):
    failing = "resnet20_we-paper_seed0"
    training.fail[failing] = RuntimeError("out of memory")
    out = str(tmp_path / "cmp")
    assert cli.main(["compare", *TINY_ARGS, "--out", out]) == 1
    # The run after the failing one ran too.
    assert [c.method for c in training.configs] == ["baseline", "we-paper", "we-reference"]
    stdout, err = capsys.readouterr()
    assert "| baseline |" in stdout and "| we-reference |" in stdout and "| we-paper |" not in stdout
    assert "2 of 3 runs finished" in stdout
    assert f"{failing}: RuntimeError: out of memory" in err
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert [r["method"] for r in summary["runs"]] == ["baseline", "we-reference"]
    [failure] = summary["failed"]
    assert failure["run"] == failing and failure["error"] == "RuntimeError: out of memory"
    assert "out of memory" in failure["traceback"]
    for name in ("table.md", "table.csv", "test_accuracy.png", "items_evolved.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0


def test_a_failing_plot_still_prints_and_writes_the_table(tmp_path, capsys, monkeypatch, training):
    def broken_plot(runs, out_dir):
        raise RuntimeError("no usable matplotlib backend")

    monkeypatch.setattr(runner, "plot_runs", broken_plot)
    out = str(tmp_path / "cmp")
    assert cli.main(["compare", *TINY_ARGS, "--out", out]) == 1
    stdout, err = capsys.readouterr()
    for method in ("baseline", "we-paper", "we-reference"):
        assert f"| {method} |" in stdout
    assert "plotting" in err and "RuntimeError: no usable matplotlib backend" in err
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert len(summary["runs"]) == 3 and summary["failed"] == []
    assert open(os.path.join(out, "table.md")).read() == runner.format_table(summary["table"])
    assert os.path.getsize(os.path.join(out, "table.csv")) > 0


def test_keyboard_interrupt_stops_the_comparison(tmp_path, training):
    training.fail["resnet20_we-paper_seed0"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        cli.main(["compare", *TINY_ARGS, "--out", str(tmp_path / "cmp")])
    assert [c.method for c in training.configs] == ["baseline", "we-paper"]


def test_run_options_reach_every_run_and_the_setting_line(tmp_path, capsys, monkeypatch, training):
    """The options for accelerators: every run gets them, the setting line
    says them, and `--parallel` reaches `runner.compare`."""
    asked, real_compare = [], runner.compare

    def compare(configs, out_dir, verbose=1, plots=True, parallel=1):
        asked.append(parallel)
        return real_compare(configs, out_dir, verbose=verbose, plots=plots)  # one at a time (fake training)

    monkeypatch.setattr(runner, "compare", compare)
    steps = "1" if runner.keras.backend.backend() == "torch" else "4"  # torch: 1 step per call
    out = str(tmp_path / "fast")
    assert cli.main(["compare", *TINY_ARGS, "--out", out, "--steps-per-execution", steps, "--jit-compile",
                     "off", "--dtype-policy", "mixed_bfloat16", "--augment", "device", "--parallel", "2"]) == 0
    assert asked == [2]
    assert {(c.steps_per_execution, c.jit_compile, c.dtype_policy, c.augment) for c in training.configs} == {
        (int(steps), "off", "mixed_bfloat16", "device")}
    line = setting_line(capsys.readouterr().out)
    assert (f"steps/execution {steps}, jit_compile off, dtype mixed_bfloat16, augment device; "
            f"2 runs at once; out {out}") in line
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert {r["dtype_policy"] for r in summary["runs"]} == {"mixed_bfloat16"}
    # The defaults: every preset's.
    assert cli.main(["train", "--out", str(tmp_path / "one"), "--quiet"]) == 0
    config = training.configs[-1]
    assert (config.steps_per_execution, config.jit_compile, config.dtype_policy, config.augment) == (
        1, "auto", "float32", "host")
    line = setting_line(capsys.readouterr().out)
    assert "steps/execution 1, jit_compile auto, dtype float32, augment host; out" in line


def test_steps_per_execution_with_dsd_fails_at_once_saying_why(tmp_path, capsys, training):
    code = cli.main(["compare", "--methods", "dsd,baseline", "--steps-per-execution", "2",
                     "--out", str(tmp_path / "x")])
    assert code == 2 and training.configs == []
    err = capsys.readouterr().err
    assert "`steps_per_execution` must be 1 with method 'dsd', which acts after every batch" in err
