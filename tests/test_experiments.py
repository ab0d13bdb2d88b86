"""The runner (`keras_we.experiments.runner`) on the real CIFAR-10: paired runs,
summary, resume, bad input."""

import builtins
import contextlib
import json
import os
import sys

import keras
import numpy as np
import pytest

from keras_we.experiments import cli, runner
from keras_we.experiments.recipe import Recipe
from tests.utils import EndIn, Interrupt

# The runner trains on the real CIFAR-10: skipped, saying how to provide it, without it.
pytestmark = pytest.mark.usefixtures("real_cifar10")

TINY = dict(epochs=2, train_size=200, test_size=100, batch_size=50)


def tiny_plan(methods=("baseline", "we-paper"), seeds=(0,)):
    return runner.plan(model="resnet20", dataset="cifar10", methods=methods, seeds=seeds, **TINY)


def weights_of(run_dir):
    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


def plotted_lines(monkeypatch):
    """Records, for every figure the runner saves, its file name and the
    (label, x, y) of each line it drew."""
    from matplotlib.figure import Figure

    saved, real_savefig = {}, Figure.savefig

    def savefig(figure, path, *args, **kwargs):
        [axis] = figure.axes
        saved[os.path.basename(path)] = [
            (line.get_label(), [float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
            for line in axis.get_lines()
        ]
        return real_savefig(figure, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


@pytest.mark.slow
def test_compare_writes_summary_table_and_plots(tmp_path, monkeypatch):
    out = str(tmp_path / "cmp")
    plots = plotted_lines(monkeypatch)
    code = cli.main(
        ["compare", "--model", "resnet20", "--methods", "baseline,we-paper,we-reference", "--seeds", "0",
         "--epochs", "3", "--train-size", "200", "--test-size", "100", "--batch-size", "50",
         "--quiet", "--out", out]
    )
    assert code == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    runs = {r["method"]: r for r in summary["runs"]}
    assert set(runs) == {"baseline", "we-paper", "we-reference"}
    assert summary["mismatched_pairs"] == []
    for run in runs.values():
        assert run["seed"] == 0 and run["epochs"] == 3
        assert run["versions"]["keras"] == keras.__version__
        assert set(run["versions"]) == {"keras_we", "keras", keras.backend.backend(), "numpy"}
        assert run["machine"] == runner.machine() and run["machine"]["cores"] == os.cpu_count()
        history = run["history"]
        assert len(history["test_accuracy"]) == 3
        assert run["final_test_accuracy"] == history["test_accuracy"][-1]
        assert run["best_test_accuracy"] == max(history["test_accuracy"])
        assert 0.0 <= run["final_test_accuracy"] <= 1.0
    # The baseline never evolves; WE evolves after epochs 0 and 1, which
    # the next epochs' logs show (epoch e logs the evolution after e - 1).
    assert runs["baseline"]["history"]["items_evolved"] == [0, 0, 0]
    for method in ("we-paper", "we-reference"):
        evolved = runs[method]["history"]["items_evolved"]
        assert evolved[0] == 0 and evolved[1] > 0 and evolved[2] > 0, evolved
        # Same seed: the first epoch (before any evolution) is identical.
        assert runs["baseline"]["history"]["train_loss"][0] == pytest.approx(
            runs[method]["history"]["train_loss"][0], rel=1e-5
        )
    # What the runs did, not only what they logged. The modes differ only
    # in the element crossover of conv filters, which the starvation counter
    # forces by the second evolution (BN entries cross over alike in both):
    # the two WE runs select alike until then and end with weights that
    # differ from each other and from the baseline's.
    paper, reference = runs["we-paper"]["history"], runs["we-reference"]["history"]
    assert paper["conv_evolved"][:2] == reference["conv_evolved"][:2]
    assert sum(paper["conv_evolved"]) > 0 and sum(reference["conv_evolved"]) > 0
    final = {m: weights_of(os.path.join(out, "runs", f"resnet20_{m}_seed0")) for m in runs}
    for a, b in (("baseline", "we-paper"), ("baseline", "we-reference"), ("we-paper", "we-reference")):
        assert any(not np.array_equal(x, y) for x, y in zip(final[a], final[b])), (a, b)
    table = {row["method"]: row for row in summary["table"]}
    for method in ("we-paper", "we-reference"):
        diff = 100 * (runs[method]["final_test_accuracy"] - runs["baseline"]["final_test_accuracy"])
        assert table[method]["final_test_accuracy_diff_mean"] == pytest.approx(diff)
    assert "paired diff" in open(os.path.join(out, "table.md")).read()
    assert summary["failed"] == []
    # The plots hold the runs' data: one line per run, by method, at
    # epochs 1..3.
    for name, key in (("test_accuracy.png", "test_accuracy"), ("items_evolved.png", "items_evolved")):
        assert os.path.getsize(os.path.join(out, name)) > 0
        lines = plots[name]
        assert sorted(label for label, _, _ in lines) == sorted(runs)
        for label, x, y in lines:
            assert x == [1.0, 2.0, 3.0]
            assert y == pytest.approx(runs[label]["history"][key])


def test_pairs_across_versions_or_machines_are_flagged(tmp_path, capsys):
    """A paired difference between runs of different versions or machines
    compares more than the method; the summary lists such pairs and warns."""
    here = {"versions": runner.versions(), "machine": runner.machine()}
    elsewhere = dict(here, machine=dict(here["machine"], isa=["avx2"]))
    older = dict(here, versions=dict(here["versions"], keras="3.0.0"))

    def run(method, seed, accuracy, environment):
        history = {"epoch": [0], "test_accuracy": [accuracy], "train_loss": [1.0], "test_loss": [1.0],
                   "learning_rate": [0.1], "items_evolved": [0]}
        return {"method": method, "seed": seed, "final_test_accuracy": accuracy,
                "best_test_accuracy": accuracy, "train_seconds": 1.0, "history": history,
                **environment}

    runs = [run("baseline", 0, 0.5, here), run("we-reference", 0, 0.6, elsewhere),
            run("baseline", 1, 0.5, here), run("we-reference", 1, 0.4, older),
            run("baseline", 2, 0.5, here), run("we-paper", 2, 0.5, here),
            run("we-paper", 3, 0.5, {})]  # recorded before `machine`: unknown
    summary = runner.summarize(runs, str(tmp_path), plots=False)
    assert summary["mismatched_pairs"] == [
        "we-reference seed 0: machine differs from the baseline's",
        "we-reference seed 1: versions differ from the baseline's",
    ]
    assert "mismatched_pairs" in capsys.readouterr().err
    assert json.load(open(tmp_path / "summary.json"))["mismatched_pairs"] == summary["mismatched_pairs"]


@pytest.mark.slow
def test_a_run_that_raises_is_recorded_and_the_others_are_summarized(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "cmp")
    configs = tiny_plan(methods=("we-paper", "baseline"))
    real_train_run = runner.train_run

    def train_run(config, out_dir, verbose=1):
        if config.method == "we-paper":
            raise FloatingPointError("loss is NaN")
        return real_train_run(config, out_dir, verbose=verbose)

    monkeypatch.setattr(runner, "train_run", train_run)
    summary = runner.compare(configs, out, verbose=0)
    # The failure came first; the baseline still trained, for real.
    [run] = summary["runs"]
    assert run["method"] == "baseline" and len(run["history"]["test_accuracy"]) == 2
    assert os.path.exists(os.path.join(out, "runs", configs[1].name, "run.json"))
    [failure] = summary["failed"]
    assert failure["run"] == configs[0].name
    assert failure["error"] == "FloatingPointError: loss is NaN"
    assert f"{configs[0].name} failed" in capsys.readouterr().err
    written = json.load(open(os.path.join(out, "summary.json")))
    assert written["failed"] == summary["failed"]
    assert [row["method"] for row in written["table"]] == ["baseline"]
    for name in ("table.md", "table.csv", "test_accuracy.png", "items_evolved.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0


def test_a_failing_plot_leaves_the_tables_written(tmp_path, monkeypatch):
    out = str(tmp_path / "cmp")
    history = {"epoch": [0, 1], "test_accuracy": [0.2, 0.3], "items_evolved": [0, 0]}
    runs = [
        {"model": "resnet20", "dataset": "cifar10", "method": "baseline", "seed": seed,
         "final_test_accuracy": 0.3 + seed / 100, "best_test_accuracy": 0.3 + seed / 100, "history": history}
        for seed in (0, 1)
    ]

    def broken_plot(runs, out_dir):
        raise RuntimeError("cannot plot")

    monkeypatch.setattr(runner, "plot_runs", broken_plot)
    with pytest.raises(RuntimeError, match="cannot plot"):
        runner.summarize(runs, out)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["runs"] == runs and summary["failed"] == []
    [row] = summary["table"]
    assert row["final_test_accuracy_mean"] == pytest.approx(30.5)
    assert open(os.path.join(out, "table.md")).read() == runner.format_table(summary["table"])
    with open(os.path.join(out, "table.csv")) as f:
        assert f.readline().strip() == ",".join(runner.TABLE_FIELDS)
        assert f.readline().startswith("baseline,2,30.5")


@pytest.mark.slow
def test_finished_runs_are_never_overwritten(tmp_path):
    out = str(tmp_path / "cmp")
    configs = tiny_plan(methods=("baseline",))
    runner.compare(configs, out, verbose=0)
    run_file = os.path.join(out, "runs", configs[0].name, "run.json")
    before = os.stat(run_file).st_mtime_ns
    runner.compare(configs, out, verbose=0)
    assert os.stat(run_file).st_mtime_ns == before


@contextlib.contextmanager
def watching_opens_of(name):
    """Yields the list of the modules that `open()` a file called `name`
    while in the block (Keras opens local files with `open()`)."""
    readers, real_open = [], builtins.open

    def watching_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.basename(os.fspath(file)) == name:
            readers.append(sys._getframe(1).f_globals.get("__name__", "?"))
        return real_open(file, *args, **kwargs)

    builtins.open = watching_open
    try:
        yield readers
    finally:
        builtins.open = real_open


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    config = tiny_plan(methods=("we-paper",))[0]
    straight = runner.train_run(config, str(tmp_path / "straight"), verbose=0)

    # A crash in epoch 1, after two of its four batches: the backup holds
    # the end of epoch 0, and epoch 1 must start again on its own batches.
    original = Recipe.callbacks
    monkeypatch.setattr(Recipe, "callbacks", lambda self: original(self) + [EndIn(1, mid_epoch=True, batch=1)])
    resumed_dir = str(tmp_path / "resumed")
    with pytest.raises(Interrupt):
        runner.train_run(config, resumed_dir, verbose=0)
    assert not os.path.exists(os.path.join(resumed_dir, "run.json"))
    monkeypatch.setattr(Recipe, "callbacks", original)
    metadata = os.path.join(resumed_dir, "backup", "training_metadata.json")
    assert json.load(open(metadata))["epoch"] == 1  # BackupAndRestore's, private to Keras
    with watching_opens_of("training_metadata.json") as readers:
        resumed = runner.train_run(config, resumed_dir, verbose=0)
    # Keras's BackupAndRestore read its metadata; nothing of keras_we did:
    # the data resumed at epoch 1 from the epoch index fit gave SyncEpoch.
    assert readers and all(r.startswith("keras.") for r in readers), readers
    # It resumed at epoch 1: the log has epoch 0 from before the crash, then 1.
    with open(os.path.join(resumed_dir, "history.csv")) as f:
        assert [line.split(",")[0] for line in f.read().splitlines()] == ["epoch", "0", "1"]

    assert resumed["history"]["epoch"] == [0, 1]
    assert resumed["history"]["items_evolved"] == straight["history"]["items_evolved"]
    np.testing.assert_allclose(
        resumed["history"]["test_accuracy"], straight["history"]["test_accuracy"], atol=1e-6
    )
    for a, b in zip(weights_of(str(tmp_path / "straight")), weights_of(resumed_dir)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--model", "resnet21"], ["resnet21", "resnet20"]),
        (["--methods", "baseline,we-papers"], ["we-papers", "we-reference"]),
        (["--dataset", "mnist"], ["mnist", "cifar10"]),
        (["--train-size", "0"], ["positive"]),
        (["--train-size", "60000"], ["train_size", "60000"]),
        (["--seeds", "a,b"], ["integers"]),
    ],
)
def test_bad_arguments_fail_at_once_naming_the_choices(tmp_path, capsys, argv, words):
    base = ["compare", "--epochs", "1", "--out", str(tmp_path / "x")]
    try:
        code = cli.main(base + argv)
    except SystemExit as exit:  # argparse errors
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err
    assert not os.path.exists(str(tmp_path / "x" / "runs"))
