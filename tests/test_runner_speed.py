"""The runner's options for accelerators: `steps_per_execution`, XLA
(`jit_compile`), the mixed bfloat16 policy, augmentation on the device
(`data.DeviceAugmentation`) and `compare(parallel=N)`.

Most runs here train the runner's whole path (recipe, callbacks, WE,
BackupAndRestore, run records) on the real CIFAR-10, with `tiny_network`
standing in for the zoo's model so that a run takes seconds; the `slow`
ones train the real ResNet-20.
"""

import dataclasses
import json
import os
import shutil
import sys

import keras
import numpy as np
import pytest
from keras import ops

from keras_we.experiments import cli, data, models, runner
from keras_we.experiments.recipe import Recipe
from tests.utils import EndIn, Interrupt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 100 training images in batches of 30: 4 batches, the last of 10, so
# steps_per_execution=3 does not divide an epoch.
TINY = dict(model="resnet20", dataset="cifar10", epochs=2, train_size=100, test_size=50, batch_size=30)
BATCHES = 4
TORCH = keras.backend.backend() == "torch"


@keras.saving.register_keras_serializable(package="tests")
class Fingerprint(keras.layers.Layer):
    """Passes its input on; in training, adds to `total` a fingerprint of
    each batch (its pixels weighted by a fixed pattern and their place in
    the batch), times the step number: runs whose `total` agree saw the
    same batches in the same order."""

    def build(self, input_shape):
        self.total = self.add_weight(shape=(), initializer="zeros", trainable=False, name="total")
        self.steps = self.add_weight(shape=(), initializer="zeros", trainable=False, name="steps")
        pattern = np.random.default_rng(0).normal(size=tuple(input_shape[1:]))
        self.pattern = pattern.astype("float32")

    def call(self, x, training=False):
        if training:
            x32 = ops.cast(x, "float32")
            place = ops.cast(ops.arange(ops.shape(x32)[0]) + 1, "float32")[:, None, None, None]
            self.steps.assign_add(1.0)
            self.total.assign_add(self.steps * ops.mean(x32 * self.pattern * place))
        return x


def tiny_network(name=None, classes=10, input_shape=(32, 32, 3)):
    """A real convnet with WE's targets (two convs with BatchNorm), fast to
    trace, behind a `Fingerprint` of its inputs."""
    inputs = keras.Input(input_shape)
    x = Fingerprint(name="fingerprint")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    outputs = keras.layers.Dense(classes)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs, name="tiny")


@pytest.fixture
def tiny(monkeypatch, real_cifar10):
    """Runs train `tiny_network` on the real CIFAR-10 (named resnet20)."""
    monkeypatch.setattr(models, "get", tiny_network)


def config(**options):
    return runner.RunConfig(**{**TINY, "method": "we-paper", **options})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, real_cifar10):
    """`trained(**options)`: the record and folder of the tiny run of
    `config(**options)`, trained once for the module."""
    root, done = tmp_path_factory.mktemp("runs"), {}

    def train(**options):
        key = tuple(sorted(options.items()))
        if key not in done:
            run_dir = str(root / "_".join(f"{k}-{v}" for k, v in key) or "default")
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(models, "get", tiny_network)
                done[key] = runner.train_run(config(**options), run_dir, verbose=0), run_dir
        return done[key]

    return train


def saved(run_dir):
    """The saved network's weights, by layer and name (in the model's order)."""
    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
    return {f"{i}/{w.name}": keras.ops.convert_to_numpy(w) for i, w in enumerate(model.weights)}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def fingerprint(run_dir):
    """The `Fingerprint` of the saved network: `(total, steps)`."""
    layer = keras.saving.load_model(os.path.join(run_dir, "model.keras")).get_layer("fingerprint")
    return float(ops.convert_to_numpy(layer.total)), float(ops.convert_to_numpy(layer.steps))


# ------------------------------------------------------------- the options


@pytest.mark.parametrize("kwargs, words", [
    (dict(steps_per_execution=0), ["steps_per_execution", ">= 1", "0"]),
    (dict(jit_compile="yes"), ["jit_compile", "'auto', 'on', 'off'", "'yes'"]),
    (dict(dtype_policy="mixed_float16"), ["dtype_policy", "'float32', 'mixed_bfloat16'", "'mixed_float16'"]),
    (dict(augment="gpu"), ["augment", "'host', 'device'", "'gpu'"]),
    (dict(method="dsd", steps_per_execution=2), ["steps_per_execution", "must be 1", "'dsd'"]),
])
def test_bad_run_options_name_the_argument_and_the_choices(kwargs, words):
    with pytest.raises(ValueError) as error:
        config(**kwargs)
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_the_defaults_are_every_presets_and_are_recorded():
    default = config()
    assert (default.steps_per_execution, default.jit_compile, default.dtype_policy, default.augment) == (
        1, "auto", "float32", "host")
    assert runner.NUMERIC_OPTIONS == {"dtype_policy": "float32", "augment": "host", "jit_compile": "auto"}
    for preset in runner.PRESETS.values():
        assert not set(preset) & set(runner.OPTION_NAMES)
    [planned] = runner.plan(methods=("baseline",), seeds=(3,), dtype_policy="mixed_bfloat16",
                            **{k: v for k, v in TINY.items()})
    assert planned.dtype_policy == "mixed_bfloat16" and planned.seed == 3
    with pytest.raises(TypeError, match="steps_per_execution"):
        runner.plan(methods=("baseline",), seeds=(0,), xla=True, **TINY)


@pytest.mark.parametrize("argv, words", [
    (["--dtype-policy", "float16"], ["--dtype-policy", "float16", "float32", "mixed_bfloat16"]),
    (["--jit-compile", "true"], ["--jit-compile", "auto", "on", "off"]),
    (["--augment", "gpu"], ["--augment", "host", "device"]),
    (["--steps-per-execution", "0"], ["--steps-per-execution", "positive"]),
    (["--parallel", "0"], ["--parallel", "positive"]),
])
def test_bad_flags_fail_at_once_naming_the_flag_and_the_choices(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as exit:
        cli.main(["compare", "--epochs", "1", "--out", str(tmp_path / "x"), *argv])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.skipif(not TORCH, reason="the PyTorch backend's limit")
def test_steps_per_execution_is_refused_on_torch_saying_why():
    with pytest.raises(ValueError, match="`steps_per_execution` must be 1 with the PyTorch backend"):
        config(steps_per_execution=2)


@pytest.mark.skipif(TORCH, reason="Keras runs one step per call on PyTorch")
def test_steps_per_execution_trains_every_batch_to_the_same_weights(trained):
    """3 steps per execution on 4 batches an epoch: every batch trains
    (the last execution is one step), WE evolves at the epoch boundary
    alike, and the weights equal those of one step per execution."""
    one, one_dir = trained()
    three, three_dir = trained(steps_per_execution=3)
    assert three["steps_per_execution"] == 3
    assert three["history"]["items_evolved"] == one["history"]["items_evolved"]
    assert one["history"]["items_evolved"][1] > 0
    np.testing.assert_allclose(three["history"]["train_loss"], one["history"]["train_loss"], rtol=1e-6)
    np.testing.assert_allclose(three["history"]["test_accuracy"], one["history"]["test_accuracy"])
    assert fingerprint(three_dir) == pytest.approx(fingerprint(one_dir), rel=1e-6)
    assert fingerprint(three_dir)[1] == 2 * BATCHES
    a, b = saved(one_dir), saved(three_dir)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.skipif(TORCH, reason="Keras runs one step per call on PyTorch")
def test_steps_per_execution_resumes_to_the_same_result(tmp_path, tiny, trained, monkeypatch):
    resumed_dir = str(tmp_path / "resumed")
    run = config(steps_per_execution=3)
    straight, straight_dir = trained(steps_per_execution=3)
    original = Recipe.callbacks
    # The first execution of epoch 1 ends at batch 2; the crash comes then.
    monkeypatch.setattr(Recipe, "callbacks", lambda self: original(self) + [EndIn(1, mid_epoch=True, batch=2)])
    with pytest.raises(Interrupt):
        runner.train_run(run, resumed_dir, verbose=0)
    monkeypatch.setattr(Recipe, "callbacks", original)
    resumed = runner.train_run(run, resumed_dir, verbose=0)
    assert resumed["history"]["items_evolved"] == straight["history"]["items_evolved"]
    assert resumed["history"]["test_accuracy"] == straight["history"]["test_accuracy"]
    assert_same_weights(saved(straight_dir), saved(resumed_dir))


def compiled(run, tmp_path):
    """The compiled model the runner trains for `run`."""
    recipe = run.recipe()
    model, _, _ = runner.network(run, recipe, runner.load_data(run), run.seed, str(tmp_path / "h.csv"))
    return model


def test_jit_compile_and_steps_per_execution_reach_compile(tmp_path, tiny):
    for value, flag in (("on", True), ("off", False)):
        model = compiled(config(jit_compile=value), tmp_path)
        # What Keras makes of the flag: it turns XLA off where the model
        # cannot take it, e.g. once another test enabled TensorFlow's op
        # determinism in this process.
        reference = keras.Model(model.inputs, model.outputs)
        reference.compile(loss="mse", jit_compile=flag)
        assert model.jit_compile == reference.jit_compile
        if not flag:
            assert model.jit_compile is False
    # "auto" is Keras's own choice, as before the option existed.
    auto = compiled(config(), tmp_path)
    keras_choice = keras.Model(auto.inputs, auto.outputs)
    keras_choice.compile(loss="mse")
    assert auto.jit_compile == keras_choice.jit_compile
    if not TORCH:
        assert compiled(config(steps_per_execution=5), tmp_path).steps_per_execution == 5


@pytest.mark.skipif(TORCH, reason="jit_compile on PyTorch is torch.compile: minutes on a CPU")
def test_xla_on_and_off_train_to_nearly_the_same_numbers(trained):
    on, _ = trained(jit_compile="on")
    off, _ = trained(jit_compile="off")
    assert (on["jit_compile"], off["jit_compile"]) == ("on", "off")
    assert on["history"]["items_evolved"] == off["history"]["items_evolved"]
    np.testing.assert_allclose(on["history"]["train_loss"], off["history"]["train_loss"], rtol=1e-4)


def test_mixed_bfloat16_computes_in_bfloat16_and_is_recorded(trained):
    mixed, mixed_dir = trained(dtype_policy="mixed_bfloat16")
    plain, _ = trained()
    assert keras.config.dtype_policy().name == "float32"  # restored after the build
    assert json.load(open(os.path.join(mixed_dir, "run.json")))["dtype_policy"] == "mixed_bfloat16"
    assert plain["dtype_policy"] == "float32"
    network = keras.saving.load_model(os.path.join(mixed_dir, "model.keras"))
    convs = [layer for layer in network.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [(c.compute_dtype, c.kernel.dtype) for c in convs] == [("bfloat16", "float32")] * 2
    # WE evolved the float32 variables as in the float32 run; the losses
    # are bfloat16's rounding away from float32's, and not equal.
    assert mixed["history"]["items_evolved"][1] > 0
    np.testing.assert_allclose(mixed["history"]["train_loss"], plain["history"]["train_loss"], rtol=0.05)
    assert mixed["history"]["train_loss"] != plain["history"]["train_loss"]


def test_runs_with_other_numeric_options_are_not_paired(tmp_path, trained, capsys):
    out = str(tmp_path / "cmp")
    baseline, baseline_dir = trained(method="baseline")
    mixed = dict(baseline, method="we-paper", dtype_policy="mixed_bfloat16")
    old = {k: v for k, v in baseline.items() if k not in runner.NUMERIC_OPTIONS}  # recorded before them
    summary = runner.summarize([baseline, mixed, dict(old, method="we-reference")], out, plots=False)
    assert summary["mismatched_pairs"] == [
        "we-paper seed 0: options differ from the baseline's: dtype_policy 'mixed_bfloat16' "
        "(baseline 'float32')"]
    assert "mismatched_pairs" in capsys.readouterr().err
    # A finished run is not reused for a call that asks for other options.
    with pytest.raises(ValueError, match="augment='host', not the 'device' asked for"):
        runner.train_run(config(method="baseline", augment="device"), baseline_dir)


# ------------------------------------------------- augmentation on the device


def test_device_crop_equals_numpy_crop_and_normalize():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
    offsets, flips = data._draw_crops(rng, len(images), padding=4)
    # Every offset and both flips occur.
    assert len({tuple(o) for o in offsets}) > 40 and 0 < flips.sum() < len(flips)
    expected = data.normalize(np.ascontiguousarray(data._crop(images, offsets, flips, 4)))
    table = data._normalization_table(data.CIFAR_MEAN, data.CIFAR_STD, 3)
    crops = data.device_crop(ops.convert_to_tensor(images), ops.convert_to_tensor(offsets),
                             ops.convert_to_tensor(flips), 4)
    assert ops.convert_to_numpy(crops).dtype == np.uint8
    got = ops.convert_to_numpy(data.device_normalize(crops, table))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    # Without training, the layer only normalizes, exactly as the host.
    layer = data.DeviceAugmentation(seed=0)
    np.testing.assert_array_equal(ops.convert_to_numpy(layer(images)), data.normalize(images))


def test_device_draws_are_uniform_offsets_and_fair_flips():
    layer = data.DeviceAugmentation(seed=123)
    offsets, flips = layer.draw(4000)
    offsets, flips = ops.convert_to_numpy(offsets), ops.convert_to_numpy(flips)
    assert offsets.min() == 0 and offsets.max() == 8
    # Chi-square over the 81 (row, column) cells, 80 degrees of freedom:
    # 124.8 is its 0.999 quantile.
    counts = np.bincount(offsets[:, 0] * 9 + offsets[:, 1], minlength=81)
    expected = len(offsets) / 81
    assert ((counts - expected) ** 2 / expected).sum() < 124.8
    # Rows and columns are drawn independently: their correlation is small.
    assert abs(np.corrcoef(offsets[:, 0], offsets[:, 1])[0, 1]) < 0.06
    # 4000 fair flips: within 4 standard deviations (0.032) of 1/2.
    assert abs(flips.mean() - 0.5) < 0.032
    # The same seed gives the same draws, another seed others, and the
    # next draws differ.
    again, _ = data.DeviceAugmentation(seed=123).draw(4000)
    np.testing.assert_array_equal(ops.convert_to_numpy(again), offsets)
    other, _ = data.DeviceAugmentation(seed=124).draw(4000)
    assert np.mean(ops.convert_to_numpy(other) == offsets) < 0.2
    following, _ = layer.draw(4000)
    assert not np.array_equal(ops.convert_to_numpy(following), offsets)


def test_device_augmentation_keeps_its_draws_in_saved_weights(tmp_path):
    inputs = keras.Input((32, 32, 3), dtype="uint8")
    model = keras.Model(inputs, data.DeviceAugmentation(seed=7)(inputs))
    layer = model.layers[1]
    layer.draw(10)
    layer.draw(10)
    path = str(tmp_path / "w.weights.h5")
    model.save_weights(path)
    expected, _ = layer.draw(10)
    fresh = keras.Model.from_config(model.get_config())
    fresh.load_weights(path)
    got, _ = fresh.layers[1].draw(10)
    np.testing.assert_array_equal(ops.convert_to_numpy(got), ops.convert_to_numpy(expected))
    assert fresh.layers[1].get_config()["seed"] == 7


def test_device_runs_with_one_seed_see_the_same_batches_whatever_the_method(trained):
    """The baseline and WE (which evolves between the epochs) train on
    the same augmented batches (another seed's layer draws other crops:
    `test_device_draws_are_uniform_offsets_and_fair_flips`)."""
    runs = {}
    for method in ("baseline", "we-paper"):
        record, run_dir = trained(method=method, seed=0, augment="device")
        runs[method] = dict(record, fingerprint=fingerprint(run_dir))
    baseline, we = runs["baseline"], runs["we-paper"]
    assert we["history"]["items_evolved"][1] > 0 and we["augment"] == "device"
    assert baseline["fingerprint"] == we["fingerprint"]
    assert baseline["fingerprint"][1] == 2 * BATCHES
    assert baseline["history"]["items_evolved"] == [0, 0]
    # Epoch 0, before any evolution, is the same training.
    assert we["history"]["train_loss"][0] == pytest.approx(baseline["history"]["train_loss"][0], rel=1e-6)


def test_device_and_host_augmentation_differ_only_in_the_crops(trained):
    """The same images, order and initial weights; the crops and flips
    differ. The saved networks take normalized images alike, and
    evaluate to what the runs recorded."""
    host, host_dir = trained(method="baseline")
    device, device_dir = trained(method="baseline", augment="device")
    assert fingerprint(host_dir)[0] != fingerprint(device_dir)[0]
    assert fingerprint(host_dir)[1] == fingerprint(device_dir)[1] == 2 * BATCHES
    for run_dir, record in ((host_dir, host), (device_dir, device)):
        network = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
        test = runner.evaluation_sequence(runner.load_data(config()))
        network.compile(metrics=["accuracy"], loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        accuracy = network.evaluate(test, verbose=0, return_dict=True)["accuracy"]
        assert accuracy == pytest.approx(record["final_test_accuracy"], abs=1e-6)


def test_device_run_resumes_to_the_same_result(tmp_path, tiny, trained, monkeypatch):
    """A crash mid-epoch: BackupAndRestore restores the draws' state with
    the weights, so the resumed run sees the uninterrupted run's batches."""
    resumed_dir = str(tmp_path / "resumed")
    run = config(method="we-paper", seed=0, augment="device")
    straight, straight_dir = trained(method="we-paper", seed=0, augment="device")
    original = Recipe.callbacks
    monkeypatch.setattr(Recipe, "callbacks", lambda self: original(self) + [EndIn(1, mid_epoch=True, batch=1)])
    with pytest.raises(Interrupt):
        runner.train_run(run, resumed_dir, verbose=0)
    monkeypatch.setattr(Recipe, "callbacks", original)
    # Its backup is not resumed with host augmentation.
    with pytest.raises(ValueError, match="holds a run started with augment='device', not the 'host'"):
        runner.train_run(config(), resumed_dir, verbose=0)
    resumed = runner.train_run(run, resumed_dir, verbose=0)
    assert not os.path.exists(os.path.join(resumed_dir, runner.OPTIONS_FILE))
    assert resumed["history"]["test_accuracy"] == straight["history"]["test_accuracy"]
    assert_same_weights(saved(straight_dir), saved(resumed_dir))


# ------------------------------------------------------ runs side by side

# A run's process as `runner.worker_command` makes it, training `tiny_network`.
TINY_WORKER = (
    "import sys; sys.path.insert(0, {root!r}); import tests.test_runner_speed as t; "
    "from keras_we.experiments import models, runner; models.get = t.tiny_network; "
    "sys.exit(runner.worker_main(sys.argv[1:]))"
)


@pytest.fixture
def tiny_workers(monkeypatch, tiny):
    def command(config, run_dir):
        if config.method == "we-reference":  # fails in its process
            config = dataclasses.replace(config)
            config.batch_size = -1
        return [sys.executable, "-c", TINY_WORKER.format(root=ROOT),
                json.dumps(dataclasses.asdict(config)), run_dir]

    monkeypatch.setattr(runner, "worker_command", command)


def without_times(summary):
    runs = [{k: v for k, v in r.items() if k != "train_seconds"} for r in summary["runs"]]
    table = [{k: v for k, v in r.items() if k != "relative_time"} for r in summary["table"]]
    return runs, table


# A run's process that trains nothing (no Keras: it starts at once): it
# prints noise and its epoch lines and writes a record like the runner's;
# `we-reference` fails as `worker_main` reports a failure, `dsd` dies
# without a word, and the first run finishes last.
FAKE_WORKER = """
import json, os, sys, time
fields, run_dir = json.loads(sys.argv[1]), sys.argv[2]
name = "{model}_{method}_seed{seed}".format(**fields)
if fields["method"] == "baseline":
    time.sleep(1)
if fields["method"] == "dsd":
    print("Segmentation fault", file=sys.stderr)
    sys.exit(139)
for epoch in range(fields["epochs"]):
    print("1/4 [====>....] noise from Keras")
    print(f"{name}: epoch {epoch + 1}/{fields['epochs']}: loss 1.0000 ({epoch} s)", flush=True)
if fields["method"] == "we-reference":
    failure = {"run": name, "error": "RuntimeError: out of memory", "traceback": "Traceback ... memory"}
    print("keras-we-run-failed: " + json.dumps(failure))
    sys.exit(1)
accuracy = [0.1 + 0.01 * e + 0.001 * len(fields["method"]) for e in range(fields["epochs"])]
record = dict(fields, final_test_accuracy=accuracy[-1], best_test_accuracy=max(accuracy),
              train_seconds=1.0, history={"epoch": list(range(fields["epochs"])),
                                          "test_accuracy": accuracy, "items_evolved": [0] * fields["epochs"]})
with open(os.path.join(run_dir, "run.json"), "w") as f:
    json.dump(record, f)
"""


def test_parallel_runs_keep_the_order_lines_and_failures_of_sequential_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "worker_command", lambda config, run_dir: [
        sys.executable, "-c", FAKE_WORKER, json.dumps(dataclasses.asdict(config)), run_dir])
    configs = runner.plan(methods=("baseline", "we-paper", "we-reference", "dsd", "graft-noise"), seeds=(0,),
                          **TINY)
    out = str(tmp_path / "cmp")
    summary = runner.compare(configs, out, verbose=1, plots=False, parallel=3)
    stdout, err = capsys.readouterr()
    # The runs in the order of the configs (the baseline finished last),
    # summarized as one after the other would be.
    records = [json.load(open(os.path.join(out, "runs", c.name, "run.json"))) for c in configs
               if c.method not in ("we-reference", "dsd")]
    assert [r["method"] for r in summary["runs"]] == ["baseline", "we-paper", "graft-noise"]
    assert summary == runner.summarize(records, str(tmp_path / "again"), failed=summary["failed"], plots=False)
    reported, died = summary["failed"]
    assert reported == {"run": configs[2].name, "error": "RuntimeError: out of memory",
                        "traceback": "Traceback ... memory"}
    assert died["run"] == configs[3].name and died["error"] == "the run's process ended with exit code 139"
    assert "Segmentation fault" in died["traceback"]
    for failure in (reported, died):
        assert f"{failure['run']} failed, going on with the other runs (log: " in err
    # One line per epoch per run, prefixed by its name, no Keras noise;
    # where each log is; the log holds everything.
    assert "noise from Keras" not in stdout
    for config in configs:
        log = os.path.join(out, "runs", config.name, runner.RUN_LOG)
        assert f"{config.name}: training (log: {log})" in stdout
        lines = [line for line in stdout.splitlines() if line.startswith(f"{config.name}: epoch ")]
        if config.method != "dsd":
            assert lines == [f"{config.name}: epoch {e + 1}/2: loss 1.0000 ({e} s)" for e in range(2)]
            assert "noise from Keras" in open(log).read() and lines[-1] in open(log).read()
    # A second call keeps the finished runs and starts none of them again;
    # a failed run tried again appends its second attempt to its log.
    again = runner.compare(configs[:3], out, verbose=1, plots=False, parallel=2)
    assert again["runs"] == summary["runs"][:2]
    assert capsys.readouterr().out.count("finished before, kept") == 2
    for config, attempts in zip(configs[:3], (1, 1, 2)):
        log = open(os.path.join(out, "runs", config.name, runner.RUN_LOG)).read()
        assert log.startswith(f"{runner.ATTEMPT_MARK} {config.name}: process started ")
        assert log.count(runner.ATTEMPT_MARK) == attempts


@pytest.mark.slow
def test_parallel_runs_match_sequential_ones_and_print_epoch_lines(tmp_path, trained, tiny_workers, capsys):
    configs = runner.plan(methods=("baseline", "we-paper", "we-reference"), seeds=(0,), **TINY)
    # The runs trained one after the other in this process (`trained`),
    # summarized by a sequential call.
    for config in configs[:2]:
        shutil.copytree(trained(method=config.method)[1], tmp_path / "one" / "runs" / config.name)
    sequential = runner.compare(configs[:2], str(tmp_path / "one"), verbose=0, plots=False)
    capsys.readouterr()
    out = str(tmp_path / "two")
    parallel = runner.compare(configs, out, verbose=1, plots=False, parallel=2)
    stdout, err = capsys.readouterr()
    # The same runs and table (all but the times), in the same order; the
    # failing run is recorded with its error from its process.
    assert without_times(parallel) == without_times(sequential)
    [failure] = parallel["failed"]
    assert failure["run"] == configs[2].name
    assert failure["error"].startswith("TypeError") or failure["error"].startswith("ValueError")
    assert "batch_size" in failure["error"] and "Traceback" in failure["traceback"]
    assert f"{configs[2].name} failed" in err and configs[2].name + "/train.log" in err
    # One line per epoch per run, prefixed by its name; where its log is.
    for config in configs[:2]:
        log = os.path.join(out, "runs", config.name, runner.RUN_LOG)
        assert f"{config.name}: training (log: {log})" in stdout
        lines = [line for line in stdout.splitlines() if line.startswith(f"{config.name}: epoch ")]
        assert [line.split(":")[1] for line in lines] == [" epoch 1/2", " epoch 2/2"]
        assert "test accuracy" in lines[-1]
        assert lines[-1] in open(log).read()
    # A second call keeps the finished runs and trains none.
    again = runner.compare(configs[:2], out, verbose=1, plots=False, parallel=2)
    assert without_times(again)[0] == without_times(parallel)[0]
    assert "finished before, kept" in capsys.readouterr().out


@pytest.mark.slow
def test_parallel_resnet20_runs_equal_sequential_ones(tmp_path, real_cifar10):
    configs = runner.plan(methods=("baseline", "we-paper"), seeds=(0,), **TINY)
    sequential = runner.compare(configs, str(tmp_path / "one"), verbose=0, plots=False)
    parallel = runner.compare(configs, str(tmp_path / "two"), verbose=0, plots=False, parallel=2)
    assert without_times(parallel) == without_times(sequential)
