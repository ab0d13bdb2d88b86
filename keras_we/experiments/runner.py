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

import csv
import dataclasses
import importlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
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


def train_run(config, out_dir, verbose=1):
    """Trains one run under the paper's recipe, resuming if interrupted.

    Writes to `out_dir`: `history.csv` (one row per epoch), `model.keras`
    and `run.json` (config, final and best test accuracy, history, wall
    time and compute relative to the baseline). A folder that already holds
    `run.json` is finished and is returned as it is.

    `grafting` trains `GRAFTED_NETWORKS` networks with `peers.fit_grafted`,
    at the learning rates `peers.grafting.learning_rates` splits the
    recipe's into; network 1 (seed `config.seed`) is the paired one and
    gives the run's accuracy and `model.keras`; network i > 1 has its own
    initial weights and data order (seed + (i - 1) * 1000), its history in
    `history_network<i>.csv` and its accuracy under `"networks"`.

    Returns:
        The run record (the content of `run.json`).
    """
    finished = os.path.join(out_dir, RUN_FILE)
    if os.path.exists(finished):
        with open(finished) as f:
            return json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    recipe = config.recipe()
    data = load_data(config)
    train = _train_grafted if config.method == GRAFTING else _train_one
    start = time.perf_counter()
    model = train(config, recipe, data, out_dir, verbose)
    seconds = time.perf_counter() - start
    model.save(os.path.join(out_dir, "model.keras"))
    record = _run_record(config, out_dir, seconds)
    with open(finished + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(finished + ".tmp", finished)
    shutil.rmtree(os.path.join(out_dir, "we_state"), ignore_errors=True)
    return record


def network(config, recipe, data, seed, history_path):
    """One network of a run, by seed: a compiled model, its training data
    (a `CifarSequence`) and its callbacks (the recipe's, `SyncEpoch`, a CSV
    log to `history_path`), without the method's. `fit` it with
    `shuffle=False` and `validation_data=evaluation_sequence(data)`."""
    (x_train, y_train), _ = data
    # The sequence shuffles and augments by (seed, epoch); fit is given
    # `shuffle=False`, so it does not reorder the batches with the global
    # random state.
    train = data_lib.CifarSequence(
        x_train, y_train, batch_size=recipe.batch_size, augment=True, shuffle=True, seed=seed)
    keras.utils.set_random_seed(seed)
    model = models.get(config.model, classes=DATASETS[config.dataset], input_shape=x_train.shape[1:])
    model.compile(
        optimizer=recipe.optimizer(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    callbacks = recipe.callbacks() + [
        # The batches of epoch e are those of (seed, e), e being fit's
        # epoch index, which BackupAndRestore sets when it resumes a
        # run: the resumed run stays paired with the others.
        data_lib.SyncEpoch(train),
        keras.callbacks.CSVLogger(history_path, append=True),
    ]
    return model, train, callbacks


def evaluation_sequence(data):
    """The test images of `data` as the runner evaluates them (batches of 500)."""
    _, (x_test, y_test) = data
    return data_lib.CifarSequence(x_test, y_test, batch_size=500, augment=False, shuffle=False)


def _train_one(config, recipe, data, out_dir, verbose):
    """Trains a one-network run (every method but `grafting`); returns the model."""
    model, train, callbacks = network(
        config, recipe, data, config.seed, os.path.join(out_dir, "history.csv"))
    callbacks = method_callbacks(config.method, recipe, os.path.join(out_dir, "we_state"),
                                 seed=config.seed) + callbacks
    # After the method's callbacks, so the backup holds the weights they
    # changed.
    callbacks.insert(len(callbacks) - 1, keras.callbacks.BackupAndRestore(os.path.join(out_dir, "backup")))
    model.fit(train, validation_data=evaluation_sequence(data), epochs=recipe.epochs, callbacks=callbacks,
              shuffle=False, verbose=verbose)
    return model


def _history_files(config):
    """The CSV logs of a run's networks, network 1's first."""
    return ["history.csv"] + [f"history_network{i + 1}.csv"
                              for i in range(1, relative_compute(config.method))]


def _train_grafted(config, recipe, data, out_dir, verbose):
    """Trains a `grafting` run's networks with `peers.fit_grafted`; returns
    network 1."""
    rates = peers.grafting.learning_rates(recipe.learning_rate, GRAFTED_NETWORKS)
    networks = [
        network(config, dataclasses.replace(recipe, learning_rate=rate), data,
                 config.seed + i * PEER_SEED_OFFSET, os.path.join(out_dir, history))
        for i, (rate, history) in enumerate(zip(rates, _history_files(config)))
    ]
    grafted = [model for model, _, _ in networks]
    peers.fit_grafted(
        grafted, [train for _, train, _ in networks], epochs=recipe.epochs,
        validation_data=evaluation_sequence(data), callbacks=[callbacks for _, _, callbacks in networks],
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
    another machine (see `machine`): their paired differences compare more
    than the method. Runs recorded before `machine` existed count as
    unknown and are not listed."""
    baselines = {r["seed"]: r for r in runs if r["method"] == "baseline"}
    mismatched = []
    for run in runs:
        baseline = baselines.get(run["seed"])
        if run["method"] == "baseline" or baseline is None:
            continue
        for key in ("versions", "machine"):
            if key in run and key in baseline and run[key] != baseline[key]:
                mismatched.append(f"{run['method']} seed {run['seed']}: {key} differ from the baseline's")
                break
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
         batch_size=128, data_dir=None):
    """The validated runs of a comparison: every method for every seed."""
    if not methods or not seeds:
        raise ValueError("`methods` and `seeds` must each name at least one.")
    return [
        RunConfig(model, dataset, method, seed, epochs, train_size, test_size, batch_size, data_dir)
        for seed in seeds
        for method in methods
    ]


def compare(configs, out_dir, verbose=1, plots=True):
    """Runs `configs` (see `plan`) and summarizes them in `out_dir`.

    Finished runs (their `run.json` exists) are kept as they are; an
    interrupted run resumes from its last finished epoch. A run that raises
    an `Exception` does not stop the others: it is reported on stderr and
    recorded under `"failed"` in the summary, and the finished runs are
    summarized (`KeyboardInterrupt` still stops everything).

    Args:
        plots: also write the plots (see `summarize`). The CLI passes False
            and plots after printing the table.

    Returns:
        The summary dict also written to `out_dir/summary.json`.
    """
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
        print("Warning: some paired differences compare runs from different versions or "
              "machines (see summary.json's `mismatched_pairs`):\n  " + "\n  ".join(mismatched),
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
