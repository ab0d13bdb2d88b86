"""Does Weight Evolution improve my network? Paired runs and their summary.

`train_run` trains one model with one method and one seed under the paper's
recipe and writes everything to a run folder; `compare` runs every method
for every seed (resuming where an interrupted call stopped) and writes
`summary.json`, a table and plots. The `keras-we` command
(`keras_we.experiments.cli`) is a thin layer over these functions.

Runs with the same seed share the initial weights, the data subset, the
data order and the augmentations, so the difference between two methods at
one seed is a paired difference, free of most seed-to-seed noise.
"""

import contextlib
import csv
import dataclasses
import importlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback

import keras

from keras_we import crossovers, peers
from keras_we.experiments import data as data_lib
from keras_we.experiments import models
from keras_we.experiments.recipe import Recipe
from keras_we.validation import check_choice, check_int
from keras_we.weight_evolution import WeightEvolution

BASELINE = "baseline"
# The peers (`keras_we.peers`) that are callbacks of one network: what makes
# each one's callbacks for a run, from its recipe, seed and state folder.
PEER_METHODS = {
    "graft-noise": lambda recipe, seed, state_dir: [peers.NoiseGrafting(seed=seed)],
    "graft-internal": lambda recipe, seed, state_dir: [peers.InternalGrafting()],
    "repr": lambda recipe, seed, state_dir: [peers.RePr.scaled(recipe.epochs, backup_dir=state_dir)],
    "dsd": lambda recipe, seed, state_dir: [peers.DSD(backup_dir=state_dir)],
}
# External filter grafting trains K networks side by side (`peers.fit_grafted`):
# network 1 is the paired one; network i > 1 takes seed + (i - 1) * 1000.
GRAFTING = "grafting"
GRAFTED_NETWORKS = 2
# Its control: grafting's network 1 trained alone (the baseline at the
# learning rate grafting gives network 1, 0.05 for K = 2), so that the
# grafting's effect can be told from the lower learning rate's.
GRAFTING_ALONE = "grafting-alone"
PEER_SEED_OFFSET = 1000
DATASETS = {"cifar10": 10, "cifar100": 100}
RUN_FILE = "run.json"
EVOLVED_KEYS = ("we_conv_evolved", "we_gamma_evolved", "we_beta_evolved")
# What each method's callbacks log as the items they touched after an epoch.
TOUCHED_KEYS = EVOLVED_KEYS + (
    "graft_noise_filters", "graft_internal_filters", "repr_pruned_filters",
    "repr_reinitialized_filters", "dsd_pruned_values",
)

# How a run trains, beyond the recipe (`RunConfig` fields; `keras-we` flags).
# The defaults are what every preset trains with.
JIT_COMPILE = {"auto": "auto", "on": True, "off": False}  # to `model.compile(jit_compile=...)`
DTYPE_POLICIES = ("float32", "mixed_bfloat16")
AUGMENT = ("host", "device")
# The options that change a run's numbers: a run and its seed's baseline
# must agree on them (`mismatched_pairs`), and a finished run is not
# reused for a call that asks for other values (`train_run`).
# `steps_per_execution` is not one: it changes how often Python is
# entered, not what is computed (tested to give the same weights).
NUMERIC_OPTIONS = {"dtype_policy": "float32", "augment": "host", "jit_compile": "auto"}
# Methods whose callbacks act after every batch (`on_train_batch_end`):
# with `steps_per_execution=N` Keras calls that hook once every N batches.
BATCH_HOOK_METHODS = ("repr", "dsd")
RUN_LOG = "train.log"
ATTEMPT_MARK = "=== keras-we:"  # starts the lines that separate a log's attempts

PRESETS = {
    # 3 methods x 3 seeds in about 20 minutes on 2 CPU cores (TensorFlow);
    # README gives the measurements behind the choice. The CLI's default.
    "cpu": dict(
        models=("resnet20",),
        dataset="cifar10",
        methods=("baseline", "we-paper", "we-reference"),
        seeds=(0, 1, 2),
        epochs=8,
        train_size=10000,
        test_size=5000,
        batch_size=128,
    ),
    # The paper's protocol, for a GPU: 200 epochs on all of CIFAR-10.
    "paper": dict(
        models=("resnet56", "mobilenet_v2"),
        dataset="cifar10",
        methods=("baseline", "we-paper", "we-reference"),
        seeds=(0, 1, 2),
        epochs=200,
        train_size=None,
        test_size=None,
        batch_size=128,
    ),
    # A check that the whole job runs (CI): under 3 minutes of CPU time in
    # all, much of it tracing each run's model; a few minutes on 2 busy CPU cores.
    # Three epochs, so WE evolves after the first two (never after the last).
    "smoke": dict(
        models=("resnet20",),
        dataset="cifar10",
        methods=("baseline", "we-paper", "we-reference"),
        seeds=(0,),
        epochs=3,
        train_size=512,
        test_size=500,
        batch_size=128,
    ),
}
DEFAULT_PRESET = "cpu"
PRESET_HELP = {
    "cpu": "ResNet-20 on CIFAR-10, 10k training / 5k test images, 8 epochs, "
           "3 methods x 3 seeds; about 20 min on 2 CPU cores with TensorFlow",
    "paper": "the paper's 200-epoch protocol, for a GPU: ResNet-56 and MobileNetV2 "
             "on all of CIFAR-10, 3 methods x 3 seeds",
    "smoke": "a check that everything runs (CI): ResNet-20, 512 training / 500 test "
             "images, 3 epochs, 3 methods x 1 seed; a few minutes on 2 CPU cores",
}
TABLE_FIELDS = (
    "method", "seeds",
    "final_test_accuracy_mean", "final_test_accuracy_std",
    "final_test_accuracy_diff_mean", "final_test_accuracy_diff_std",
    "best_test_accuracy_mean", "best_test_accuracy_std",
    "best_test_accuracy_diff_mean", "best_test_accuracy_diff_std",
    "relative_compute", "relative_time",
)
# What `compare` needs beyond the core: (module, what to pip install, for what).
PLOT_REQUIREMENTS = (("matplotlib", "matplotlib>=3.7", "the plots of `keras-we compare`"),)


class MissingDependencyError(ImportError):
    """A package the runner needs is not installed; the message says what
    to `pip install`."""


def check_requirements(plots=True):
    """Fails at once, before any training, if a package the runner needs
    later is missing (matplotlib for the plots, when `plots`).

    Raises:
        MissingDependencyError: naming what to `pip install`.
    """
    missing = []
    for module, requirement, purpose in PLOT_REQUIREMENTS if plots else ():
        try:
            importlib.import_module(module)
        except ImportError as error:
            missing.append(f"{purpose} need {module}, which cannot be imported ({error}); "
                           f'install it with: pip install "{requirement}"')
    if missing:
        raise MissingDependencyError(
            "; ".join(missing) + " (it is a dependency of keras_we: reinstalling "
            "keras_we, e.g. pip install -e ., installs it too)"
        )


@dataclasses.dataclass
class RunConfig:
    """One training run: a model, a method and a seed."""

    model: str = "resnet20"
    dataset: str = "cifar10"
    method: str = "baseline"
    seed: int = 0
    epochs: int = 200
    train_size: int = None
    test_size: int = None
    batch_size: int = 128
    data_dir: str = None
    # How it trains (see `JIT_COMPILE`, `DTYPE_POLICIES`, `AUGMENT`).
    steps_per_execution: int = 1
    jit_compile: str = "auto"
    dtype_policy: str = "float32"
    augment: str = "host"

    def __post_init__(self):
        if self.model not in models.names() + models.application_names():
            raise ValueError(
                f"`model` must be one of {', '.join(models.names())} or a "
                f"keras.applications name; got {self.model!r}."
            )
        check_choice("dataset", self.dataset, tuple(DATASETS))
        check_choice("method", self.method, methods())
        check_int("seed", self.seed, minimum=0)
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        for name in ("train_size", "test_size"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        check_int("steps_per_execution", self.steps_per_execution, minimum=1)
        check_choice("jit_compile", self.jit_compile, tuple(JIT_COMPILE))
        check_choice("dtype_policy", self.dtype_policy, DTYPE_POLICIES)
        check_choice("augment", self.augment, AUGMENT)
        if self.steps_per_execution > 1 and self.method in BATCH_HOOK_METHODS:
            raise ValueError(
                f"`steps_per_execution` must be 1 with method {self.method!r}, which acts after "
                f"every batch (Keras would call it once every {self.steps_per_execution} "
                f"batches); got {self.steps_per_execution}."
            )
        if self.steps_per_execution > 1 and keras.backend.backend() == "torch":
            raise ValueError(
                "`steps_per_execution` must be 1 with the PyTorch backend (Keras runs "
                f"one step per call there); got {self.steps_per_execution}."
            )

    @property
    def name(self):
        return f"{self.model}_{self.method}_seed{self.seed}"

    def recipe(self):
        """The paper's recipe for this run; `grafting-alone` takes the
        learning rate `grafting` gives its network 1."""
        recipe = Recipe(epochs=self.epochs, batch_size=self.batch_size)
        if self.method == GRAFTING_ALONE:
            rate = peers.grafting.learning_rates(recipe.learning_rate, GRAFTED_NETWORKS)[0]
            recipe = dataclasses.replace(recipe, learning_rate=rate)
        return recipe


def load_data(config):
    """The run's data, as uint8 arrays: `(x_train, y_train), (x_test, y_test)`."""
    return data_lib.load_cifar(
        config.dataset,
        data_dir=config.data_dir,
        train_size=config.train_size,
        test_size=config.test_size,
    )


def methods():
    """The methods a run can use: `baseline`, `we-<mode>` for every
    registered crossover mode (`keras_we.crossovers`), and the peers
    (`keras_we.peers`): `graft-noise`, `graft-internal`, `repr`, `dsd` and
    `grafting` (external, K networks), with its control `grafting-alone`
    (network 1 of `grafting`, at its learning rate, not grafted)."""
    return (BASELINE, *(f"we-{name}" for name in crossovers.names()), *PEER_METHODS, GRAFTING,
            GRAFTING_ALONE)


def relative_compute(method):
    """The training compute of `method` relative to the baseline's, in
    networks trained: `grafting` trains `GRAFTED_NETWORKS`, the others one
    (their between-epoch steps cost a small fraction of an epoch; the
    measured time is in each run's `train_seconds`)."""
    check_choice("method", method, methods())
    return GRAFTED_NETWORKS if method == GRAFTING else 1


def method_callbacks(method, recipe=None, state_dir=None, seed=0):
    """The callbacks that make `method` what it is for one network, under
    `recipe` (default `Recipe()`: it scales the WE and RePr schedules),
    keeping their state in `state_dir` (see `WeightEvolution`'s
    `backup_dir`); `seed` seeds the noise of `graft-noise`. `baseline` and
    `grafting` have none (grafting is `peers.fit_grafted`, see `train_run`)."""
    check_choice("method", method, methods())
    recipe = Recipe() if recipe is None else recipe
    if method in PEER_METHODS:
        return PEER_METHODS[method](recipe, seed, state_dir)
    if method.startswith("we-"):
        return [WeightEvolution(crossover=method.removeprefix("we-"),
                                schedule=recipe.we_schedule(), backup_dir=state_dir)]
    return []


def check_data(config):
    """Fails early, with the data module's message, if the data is missing
    or the subset sizes are out of range."""
    load_data(config)


def train_run(config, out_dir, verbose=1, epoch_lines=False):
    """Trains one run under the paper's recipe, resuming if interrupted.

    Writes to `out_dir`: `history.csv` (one row per epoch), `model.keras`
    and `run.json` (config, final and best test accuracy, history, wall
    time and compute relative to the baseline). A folder that already holds
    `run.json` is finished and is returned as it is (see `finished_record`).
    With `epoch_lines`, prints one line per finished epoch, prefixed by the
    run's name (`EpochLines`; with `verbose=0`, the only output).

    With `config.augment == "device"` the network is trained behind a
    `DeviceAugmentation` layer (see `network`); `model.keras` holds the
    network alone, which takes normalized images as every run's does.

    `grafting` trains `GRAFTED_NETWORKS` networks with `peers.fit_grafted`,
    at the learning rates `peers.grafting.learning_rates` splits the
    recipe's into; network 1 (seed `config.seed`) is the paired one and
    gives the run's accuracy and `model.keras`; network i > 1 has its own
    initial weights and data order (seed + (i - 1) * 1000), its history in
    `history_network<i>.csv` and its accuracy under `"networks"`.

    Returns:
        The run record (the content of `run.json`).
    """
    record = finished_record(config, out_dir)
    if record is not None:
        return record
    finished = os.path.join(out_dir, RUN_FILE)
    os.makedirs(out_dir, exist_ok=True)
    _check_started_options(config, out_dir)
    recipe = config.recipe()
    data = load_data(config)
    train = _train_grafted if config.method == GRAFTING else _train_one
    extra = [EpochLines(config.name, recipe.epochs)] if epoch_lines else []
    start = time.perf_counter()
    model = train(config, recipe, data, out_dir, verbose, extra)
    seconds = time.perf_counter() - start
    trained_network(model).save(os.path.join(out_dir, "model.keras"))
    record = _run_record(config, out_dir, seconds)
    with open(finished + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(finished + ".tmp", finished)
    shutil.rmtree(os.path.join(out_dir, "we_state"), ignore_errors=True)
    os.remove(os.path.join(out_dir, OPTIONS_FILE))
    return record


class EpochLines(keras.callbacks.Callback):
    """Prints one line per finished epoch, prefixed by the run's name: the
    progress of runs trained side by side (`compare(parallel=N)`)."""

    def __init__(self, name, epochs):
        super().__init__()
        self.name, self.epochs, self._start = name, epochs, time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        values = ", ".join(f"{label} {logs[key]:.4f}" for key, label in (
            ("loss", "loss"), ("accuracy", "accuracy"), ("val_accuracy", "test accuracy")) if key in logs)
        print(f"{self.name}: epoch {epoch + 1}/{self.epochs}: {values} "
              f"({time.perf_counter() - self._start:.1f} s)", flush=True)


@contextlib.contextmanager
def dtype_policy(name):
    """Keras's global dtype policy set to `name` in the block (layers take
    it when they are made), the previous one after."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def on_device(model, seed):
    """`model` behind a `data.DeviceAugmentation(seed)`: a model of uint8
    images that augments (in training) and normalizes them in its step."""
    inputs = keras.Input(model.input_shape[1:], dtype="uint8", name="pixels")
    augmented = data_lib.DeviceAugmentation(seed=seed, name="device_augmentation")(inputs)
    return keras.Model(inputs, model(augmented), name=f"{model.name}_augmented")


def trained_network(model):
    """The network of a model `network` made: `model`, or the model behind
    its `DeviceAugmentation`."""
    if any(isinstance(layer, data_lib.DeviceAugmentation) for layer in model.layers):
        return model.layers[-1]
    return model


def finished_record(config, out_dir):
    """The record (`run.json`) of the run finished in `out_dir`, or None
    if there is none.

    Raises:
        ValueError: the finished run was trained with other values of
            `NUMERIC_OPTIONS` than `config`'s (a record without one was
            trained with its default): reusing it would pair numbers
            computed differently.
    """
    path = os.path.join(out_dir, RUN_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    _check_options("finished", record, config, out_dir)
    return record


def _check_options(state, recorded, config, out_dir):
    """Raises ValueError if the `NUMERIC_OPTIONS` in `recorded` (a run
    `state`, finished or started) are not `config`'s."""
    for key, default in NUMERIC_OPTIONS.items():
        value, asked = recorded.get(key, default), getattr(config, key)
        if value != asked:
            raise ValueError(
                f"{out_dir} holds a run {state} with {key}={value!r}, not the {asked!r} "
                f"asked for; give another output folder (--out), or remove that run folder "
                f"to train it again."
            )


OPTIONS_FILE = "options.json"


def _check_started_options(config, out_dir):
    """Keeps the `NUMERIC_OPTIONS` of a run as it starts in
    `out_dir/options.json`; a run resumed from its backup must ask for
    the same ones."""
    path = os.path.join(out_dir, OPTIONS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            _check_options("started", json.load(f), config, out_dir)
        return
    with open(path, "w") as f:
        json.dump({key: getattr(config, key) for key in NUMERIC_OPTIONS}, f)


def network(config, recipe, data, seed, history_path):
    """One network of a run, by seed: a compiled model, its training data
    (a `CifarSequence`) and its callbacks (the recipe's, `SyncEpoch`, a CSV
    log to `history_path`), without the method's. `fit` it, through
    `data.fit_input`, with `shuffle=False` and
    `validation_data=data.fit_input(evaluation_sequence(data, config))`.

    The model is compiled with the config's `steps_per_execution` and
    `jit_compile`, and built under its `dtype_policy`. With
    `augment="device"`, the sequence serves uint8 images (shuffled by
    `(seed, epoch)` as on the host) and the model is `on_device(network,
    seed)`, which augments them in its training step."""
    (x_train, y_train), _ = data
    device = config.augment == "device"
    # The sequence shuffles and augments by (seed, epoch); fit is given
    # `shuffle=False`, so it does not reorder the batches with the global
    # random state.
    train = data_lib.CifarSequence(
        x_train, y_train, batch_size=recipe.batch_size, augment=not device, shuffle=True, seed=seed,
        normalize=not device)
    keras.utils.set_random_seed(seed)
    with dtype_policy(config.dtype_policy):
        model = models.get(config.model, classes=DATASETS[config.dataset], input_shape=x_train.shape[1:])
    if device:
        model = on_device(model, seed)
    model.compile(
        optimizer=recipe.optimizer(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=config.steps_per_execution,
        jit_compile=JIT_COMPILE[config.jit_compile],
    )
    callbacks = recipe.callbacks() + [
        # The batches of epoch e are those of (seed, e), e being fit's
        # epoch index, which BackupAndRestore sets when it resumes a
        # run: the resumed run stays paired with the others.
        data_lib.SyncEpoch(train),
        keras.callbacks.CSVLogger(history_path, append=True),
    ]
    return model, train, callbacks


def evaluation_sequence(data, config=None):
    """The test images of `data` as the runner evaluates them (batches of
    500): normalized, or uint8 for a `config` with `augment="device"`."""
    _, (x_test, y_test) = data
    normalize = config is None or config.augment != "device"
    return data_lib.CifarSequence(x_test, y_test, batch_size=500, augment=False, shuffle=False,
                                  normalize=normalize)


def _train_one(config, recipe, data, out_dir, verbose, extra=()):
    """Trains a one-network run (every method but `grafting`); returns the model."""
    model, train, callbacks = network(
        config, recipe, data, config.seed, os.path.join(out_dir, "history.csv"))
    callbacks = method_callbacks(config.method, recipe, os.path.join(out_dir, "we_state"),
                                 seed=config.seed) + callbacks
    # After the method's callbacks, so the backup holds the weights they
    # changed.
    callbacks.insert(len(callbacks) - 1, keras.callbacks.BackupAndRestore(os.path.join(out_dir, "backup")))
    model.fit(data_lib.fit_input(train),
              validation_data=data_lib.fit_input(evaluation_sequence(data, config)),
              epochs=recipe.epochs, callbacks=callbacks + list(extra), shuffle=False, verbose=verbose)
    return model


def _history_files(config):
    """The CSV logs of a run's networks, network 1's first."""
    return ["history.csv"] + [f"history_network{i + 1}.csv"
                              for i in range(1, relative_compute(config.method))]


def _train_grafted(config, recipe, data, out_dir, verbose, extra=()):
    """Trains a `grafting` run's networks with `peers.fit_grafted`; returns
    network 1."""
    rates = peers.grafting.learning_rates(recipe.learning_rate, GRAFTED_NETWORKS)
    networks = [
        network(config, dataclasses.replace(recipe, learning_rate=rate), data,
                 config.seed + i * PEER_SEED_OFFSET, os.path.join(out_dir, history))
        for i, (rate, history) in enumerate(zip(rates, _history_files(config)))
    ]
    grafted = [model for model, _, _ in networks]
    callbacks = [callbacks for _, _, callbacks in networks]
    callbacks[0] = callbacks[0] + list(extra)
    peers.fit_grafted(
        grafted, [data_lib.fit_input(train) for _, train, _ in networks], epochs=recipe.epochs,
        validation_data=data_lib.fit_input(evaluation_sequence(data, config)), callbacks=callbacks,
        backup_dir=os.path.join(out_dir, "backup"), shuffle=False, verbose=verbose,
    )
    return grafted[0]


def _run_record(config, out_dir, seconds):
    """The content of a finished run's `run.json`."""
    histories = [read_history(os.path.join(out_dir, name)) for name in _history_files(config)]
    history = histories[0]
    record = {
        **dataclasses.asdict(config),
        "final_test_accuracy": history["test_accuracy"][-1],
        "best_test_accuracy": max(history["test_accuracy"]),
        "train_seconds": seconds,
        "relative_compute": relative_compute(config.method),
        "backend": keras.backend.backend(),
        "versions": versions(),
        "machine": machine(),
        "history": history,
    }
    if config.method == GRAFTING:
        record["networks"] = [
            {"final_test_accuracy": h["test_accuracy"][-1], "best_test_accuracy": max(h["test_accuracy"]),
             "test_accuracy": h["test_accuracy"]}
            for h in histories
        ]
    return record


def versions():
    """The versions a run was trained with: keras_we, Keras, the backend and
    NumPy (runs from different versions can differ at the same seed, so they
    must not be paired)."""
    names = ("keras_we", "keras", keras.backend.backend(), "numpy")
    return {name: importlib.import_module(name).__version__ for name in names}


# Instruction-set extensions that change which CPU kernels oneDNN and XLA
# pick, and so a run's numbers at the same seed.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def machine():
    """What a run was trained on: the CPU's model and its instruction-set
    extensions among `ISA_FLAGS`, the core count, and the devices Keras
    sees. The same seed, code and versions give different numbers on CPUs
    whose extensions differ (measured: a CPU-preset baseline ended at
    38.54% on one machine of this project and 35.58% on another), so such
    runs must not be paired either."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: the model alone
        pass
    return {"cpu": cpu, "isa": [flag for flag in ISA_FLAGS if flag in flags],
            "cores": os.cpu_count(), "devices": _devices()}


def _devices():
    """The devices the backend computes on, e.g. `["cpu:0"]` or `["cuda:0"]`
    (Keras's `list_devices` has no PyTorch version)."""
    if keras.backend.backend() != "torch":
        return keras.distribution.list_devices()
    import torch

    gpus = [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    return gpus or ["cpu:0"]


def mismatched_pairs(runs):
    """The runs whose seed's baseline was trained with other versions or on
    another machine (see `machine`), or with other `NUMERIC_OPTIONS` (dtype
    policy, augmentation, XLA): their paired differences compare more than
    the method. Runs recorded before `machine` existed count as unknown and
    are not listed; runs recorded before an option existed were trained
    with its default."""
    baselines = {r["seed"]: r for r in runs if r["method"] == "baseline"}
    mismatched = []
    for run in runs:
        baseline = baselines.get(run["seed"])
        if run["method"] == "baseline" or baseline is None:
            continue
        for key, differ in (("versions", "versions differ"), ("machine", "machine differs")):
            if key in run and key in baseline and run[key] != baseline[key]:
                mismatched.append(f"{run['method']} seed {run['seed']}: {differ} from the baseline's")
                break
        options = [f"{key} {run.get(key, default)!r} (baseline {baseline.get(key, default)!r})"
                   for key, default in NUMERIC_OPTIONS.items()
                   if run.get(key, default) != baseline.get(key, default)]
        if options:
            mismatched.append(f"{run['method']} seed {run['seed']}: options differ from the "
                              f"baseline's: {', '.join(options)}")
    return mismatched


def read_history(path):
    """Per-epoch history from a run's CSV log, one value per epoch."""
    rows = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            rows[int(row["epoch"])] = row  # a resumed epoch keeps its last row
    epochs = sorted(rows)
    columns = {
        "train_loss": "loss",
        "train_accuracy": "accuracy",
        "test_loss": "val_loss",
        "test_accuracy": "val_accuracy",
        "learning_rate": "learning_rate",
    }
    history = {"epoch": epochs}
    for name, key in columns.items():
        history[name] = [float(rows[e][key]) for e in epochs]
    evolved = [sum(float(rows[e].get(k) or 0) for k in EVOLVED_KEYS) for e in epochs]
    history["items_evolved"] = [int(v) for v in evolved]
    touched = [sum(float(rows[e].get(k) or 0) for k in TOUCHED_KEYS) for e in epochs]
    history["items_touched"] = [int(v) for v in touched]
    for key in EVOLVED_KEYS:
        history[key[3:]] = [int(float(rows[e].get(key) or 0)) for e in epochs]
    return history


def plan(model, dataset, methods, seeds, epochs, train_size=None, test_size=None,
         batch_size=128, data_dir=None, **options):
    """The validated runs of a comparison: every method for every seed.

    `options` are the other `RunConfig` fields (`steps_per_execution`,
    `jit_compile`, `dtype_policy`, `augment`), the same for every run."""
    if not methods or not seeds:
        raise ValueError("`methods` and `seeds` must each name at least one.")
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"plan() got unknown options {unknown}; it takes {', '.join(OPTION_NAMES)}.")
    return [
        RunConfig(model=model, dataset=dataset, method=method, seed=seed, epochs=epochs,
                  train_size=train_size, test_size=test_size, batch_size=batch_size,
                  data_dir=data_dir, **options)
        for seed in seeds
        for method in methods
    ]


OPTION_NAMES = ("steps_per_execution", "jit_compile", "dtype_policy", "augment")


def compare(configs, out_dir, verbose=1, plots=True, parallel=1):
    """Runs `configs` (see `plan`) and summarizes them in `out_dir`.

    Finished runs (their `run.json` exists) are kept as they are; an
    interrupted run resumes from its last finished epoch. A run that raises
    an `Exception` does not stop the others: it is reported on stderr and
    recorded under `"failed"` in the summary, and the finished runs are
    summarized (`KeyboardInterrupt` still stops everything).

    Args:
        plots: also write the plots (see `summarize`). The CLI passes False
            and plots after printing the table.
        parallel: how many runs train at once, each in its own process
            (`run_in_process`), which prints one line per finished epoch
            prefixed by the run's name and keeps its whole output in
            `runs/<name>/train.log`. The summary is the same as with 1
            (the runs in the order of `configs`). Defaults to 1: the runs
            train one after the other in this process.

    Returns:
        The summary dict also written to `out_dir/summary.json`.
    """
    check_int("parallel", parallel, minimum=1)
    if parallel > 1:
        runs, failed = _compare_in_processes(configs, out_dir, verbose, parallel)
        return summarize(runs, out_dir, failed=failed, plots=plots)
    runs, failed = [], []
    for i, config in enumerate(configs, 1):
        if verbose:
            print(f"[{i}/{len(configs)}] {config.name}", flush=True)
        try:
            runs.append(train_run(config, os.path.join(out_dir, "runs", config.name), verbose=verbose))
        except Exception as error:
            failed.append({
                "run": config.name,
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(),
            })
            sys.stdout.flush()
            print(f"[{i}/{len(configs)}] {config.name} failed, going on with the other runs:\n"
                  f"{failed[-1]['traceback']}", file=sys.stderr, flush=True)
    return summarize(runs, out_dir, failed=failed, plots=plots)


def _compare_in_processes(configs, out_dir, verbose, parallel):
    """The runs and failures of `compare(configs, parallel=N)`, each in the
    order of `configs`; finished runs are read here, the others train in up
    to `parallel` processes at once."""
    outcomes, lock = [None] * len(configs), threading.Lock()
    processes = {}

    def say(text, stream=sys.stdout):
        if verbose or stream is sys.stderr:
            with lock:
                print(text, file=stream, flush=True)

    def one(i, config):
        run_dir = os.path.join(out_dir, "runs", config.name)
        prefix = f"[{i + 1}/{len(configs)}] {config.name}"
        try:
            record = finished_record(config, run_dir)
            if record is None:
                say(f"{prefix}: training (log: {os.path.join(run_dir, RUN_LOG)})")
                record = run_in_process(config, run_dir, verbose=verbose, lines=say, processes=processes)
            else:
                say(f"{prefix}: finished before, kept")
            outcomes[i] = ("run", record)
        except Exception as error:
            failure = getattr(error, "failure", None) or {
                "run": config.name, "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc()}
            outcomes[i] = ("failed", failure)
            say(f"{prefix} failed, going on with the other runs (log: "
                f"{os.path.join(run_dir, RUN_LOG)}):\n{failure['traceback']}", stream=sys.stderr)

    threads = []
    semaphore = threading.Semaphore(parallel)

    def limited(i, config):
        with semaphore:
            one(i, config)

    try:
        for i, config in enumerate(configs):
            thread = threading.Thread(target=limited, args=(i, config), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    except BaseException:
        for process in list(processes.values()):
            if process.poll() is None:
                process.terminate()
        raise
    runs = [value for kind, value in outcomes if kind == "run"]
    failed = [value for kind, value in outcomes if kind == "failed"]
    return runs, failed


class RunFailed(RuntimeError):
    """A run trained in its own process failed; `failure` is its
    `{"run", "error", "traceback"}` record."""

    def __init__(self, failure):
        super().__init__(failure["error"])
        self.failure = failure


FAILURE_MARK = "keras-we-run-failed: "


def worker_command(config, run_dir):
    """The command that trains `config` into `run_dir` in a new process
    (`worker_main`)."""
    return [sys.executable, "-c", "import sys; from keras_we.experiments import runner; "
            "sys.exit(runner.worker_main(sys.argv[1:]))",
            json.dumps(dataclasses.asdict(config)), run_dir]


def worker_environment():
    """The environment of a run's process: this one's, the same Keras
    backend, unbuffered output, and (unless set) TensorFlow and JAX told to
    take GPU memory as they need it rather than most of it at once, so
    that several processes share a GPU."""
    environment = dict(os.environ, KERAS_BACKEND=keras.backend.backend(), PYTHONUNBUFFERED="1")
    environment.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    environment.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return environment


def run_in_process(config, run_dir, verbose=1, lines=print, processes=None):
    """Trains `config` into `run_dir` in a new Python process and returns
    its record.

    The process's whole output goes to `run_dir/train.log`, after a line
    that marks the attempt (`ATTEMPT_MARK`, with the time; a resumed or
    repeated run appends to its log); its lines
    `"<run name>: epoch ..."` (`EpochLines`) also go to `lines` when
    `verbose`. `processes`, a dict, holds the running process (by run
    name) so that a caller can end it.

    Raises:
        RunFailed: the run raised (its error and traceback, from the
            process) or the process ended without a record.
    """
    os.makedirs(run_dir, exist_ok=True)
    failure = None
    with open(os.path.join(run_dir, RUN_LOG), "a") as log:
        log.write(f"{ATTEMPT_MARK} {config.name}: process started "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        log.flush()
        process = subprocess.Popen(worker_command(config, run_dir), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=worker_environment())
        if processes is not None:
            processes[config.name] = process
        try:
            for line in process.stdout:
                log.write(line)
                log.flush()
                if line.startswith(FAILURE_MARK):
                    failure = json.loads(line[len(FAILURE_MARK):])
                elif verbose and line.startswith(f"{config.name}: epoch "):
                    lines(line.rstrip("\n"))
            code = process.wait()
        finally:
            if processes is not None:
                processes.pop(config.name, None)
    if failure is None and code == 0:
        record = finished_record(config, run_dir)
        if record is not None:
            return record
    if failure is None:
        with open(os.path.join(run_dir, RUN_LOG)) as f:
            tail = "".join(f.readlines()[-20:])
        failure = {"run": config.name, "error": f"the run's process ended with exit code {code}",
                   "traceback": tail}
    raise RunFailed(failure)


def worker_main(argv):
    """A run's process (`worker_command`): `argv` is the config as JSON and
    the run folder. Trains with one line per epoch; on an `Exception`
    prints the traceback and a `FAILURE_MARK` line, and returns 1."""
    fields, run_dir = argv
    fields = json.loads(fields)
    try:
        train_run(RunConfig(**fields), run_dir, verbose=0, epoch_lines=True)
    except Exception as error:
        text = traceback.format_exc()
        print(text, file=sys.stderr, flush=True)
        name = f"{fields.get('model')}_{fields.get('method')}_seed{fields.get('seed')}"  # as `RunConfig.name`
        failure = {"run": name, "error": f"{type(error).__name__}: {error}", "traceback": text}
        print(FAILURE_MARK + json.dumps(failure), flush=True)
        return 1
    return 0


def summarize(runs, out_dir, failed=(), plots=True):
    """Writes `summary.json`, `table.md` and `table.csv`, then (if `plots`
    and any run finished) the PNG plots, so that the tables are there even
    if plotting fails.

    Args:
        failed: the runs that raised, as `{"run", "error", "traceback"}`
            dicts; recorded under `"failed"` in `summary.json`.
    """
    table = summary_table(runs)
    mismatched = mismatched_pairs(runs)
    summary = {"runs": runs, "table": table, "failed": list(failed), "mismatched_pairs": mismatched}
    if mismatched:
        print("Warning: some paired differences compare runs from different versions, "
              "machines or options (see summary.json's `mismatched_pairs`):\n  " + "\n  ".join(mismatched),
              file=sys.stderr, flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(format_table(table))
    with open(os.path.join(out_dir, "table.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
        writer.writeheader()
        writer.writerows(table)
    if plots and runs:
        plot_runs(runs, out_dir)
    return summary


def summary_table(runs):
    """Final and best top-1 per method, mean and std over seeds, with the
    paired difference to the baseline (same seed)."""
    by_method = {}
    for run in runs:
        by_method.setdefault(run["method"], {})[run["seed"]] = run
    baseline = by_method.get("baseline", {})
    rows = []
    for method, seeded in by_method.items():
        row = {"method": method, "seeds": len(seeded),
               "relative_compute": max(r.get("relative_compute", 1) for r in seeded.values())}
        times = [r["train_seconds"] / baseline[s]["train_seconds"] for s, r in seeded.items()
                 if s in baseline and baseline[s].get("train_seconds")]
        row["relative_time"] = statistics.mean(times) if times else math.nan
        for metric in ("final_test_accuracy", "best_test_accuracy"):
            values = [100 * r[metric] for r in seeded.values()]
            row[f"{metric}_mean"] = statistics.mean(values)
            row[f"{metric}_std"] = _std(values)
            paired = [
                100 * (r[metric] - baseline[s][metric]) for s, r in seeded.items() if s in baseline
            ]
            row[f"{metric}_diff_mean"] = statistics.mean(paired) if paired else math.nan
            row[f"{metric}_diff_std"] = _std(paired) if paired else math.nan
        rows.append(row)
    return rows


def _std(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


def format_table(table):
    """The summary table as markdown (top-1 in %, mean ± std over seeds).

    `compute` is the training compute relative to the baseline in networks
    trained (grafting: K); `time` the measured wall time relative to the
    baseline's at the same seed, mean over seeds."""
    lines = [
        "| method | seeds | compute | time | final top-1 | paired diff (final) | best top-1 "
        "| paired diff (best) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        time_ratio = r.get("relative_time", math.nan)
        cells = [r["method"], str(r["seeds"]), f"{r.get('relative_compute', 1)}×",
                 "—" if math.isnan(time_ratio) else f"{time_ratio:.2f}×"]
        for metric in ("final_test_accuracy", "best_test_accuracy"):
            cells.append(f"{r[f'{metric}_mean']:.2f} ± {r[f'{metric}_std']:.2f}")
            diff = r[f"{metric}_diff_mean"]
            cells.append(
                "—" if r["method"] == "baseline" or math.isnan(diff)
                else f"{diff:+.2f} ± {r[f'{metric}_diff_std']:.2f}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_runs(runs, out_dir):
    """`test_accuracy.png` and `items_evolved.png`: one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, label, name in (
        ("test_accuracy", "test top-1", "test_accuracy.png"),
        ("items_evolved", "items evolved (filters + BN entries)", "items_evolved.png"),
    ):
        figure, axis = plt.subplots(figsize=(6, 4))
        colors = {}
        for run in runs:
            color = colors.setdefault(run["method"], f"C{len(colors)}")
            history = run["history"]
            axis.plot([e + 1 for e in history["epoch"]], history[key], color=color,
                      label=run["method"] if run["method"] not in axis.get_legend_handles_labels()[1] else None)
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.set_title(f"{runs[0]['model']} on {runs[0]['dataset']}")
        axis.legend()
        figure.tight_layout()
        figure.savefig(os.path.join(out_dir, name), dpi=100)
        plt.close(figure)
