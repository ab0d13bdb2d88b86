"""The package's shape, each check in a fresh Python process: `import keras_we`
imports the method, not the experiment tooling (`keras_we.experiments`), and
still registers what a saved zoo model needs to load."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Saved by keras_we 0.1.0, when the layers were defined in `keras_we.models`
# and PaperSGD in `keras_we.recipe`; see tests/data/saved/README.md.
OLD_FILE = os.path.join(ROOT, "tests", "data", "saved", "zoo_layers_v0.1.0")
HEAVY = [f"keras_we.experiments.{name}" for name in ("models", "data", "runner", "cli")]


def run_python(code):
    """Runs `code` in a new interpreter (same environment, same backend) and
    returns its last line of output, parsed as JSON."""
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fresh_import():
    """What a fresh `import keras_we` imports, then what the old attributes
    `keras_we.models` and `keras_we.data` give."""
    return run_python(
        f"""
        import json, sys
        import keras_we
        facts = {{"after_import": sorted(m for m in sys.modules if m.startswith("keras_we"))}}
        facts["attributes"] = [
            keras_we.models.get.__module__,
            "resnet20" in keras_we.models.names(),
            keras_we.data.load_cifar.__module__,
            keras_we.data.CifarSequence.__module__,
        ]
        from keras_we import data, models
        facts["from_import"] = [models.__name__, data.__name__]
        facts["after_access"] = [m for m in {HEAVY!r} if m in sys.modules]
        facts["dir"] = [n for n in ("data", "models") if n in dir(keras_we)]
        try:
            keras_we.nothing_of_the_sort
        except AttributeError as error:
            facts["missing"] = str(error)
        print(json.dumps(facts))
        """
    )


def test_import_keras_we_leaves_the_experiment_tooling_alone(fresh_import):
    imported = fresh_import["after_import"]
    assert "keras_we.weight_evolution" in imported
    assert not [m for m in HEAVY if m in imported], imported
    # Only the two light modules that register the custom objects.
    assert [m for m in imported if m.startswith("keras_we.experiments.")] == [
        "keras_we.experiments.layers",
        "keras_we.experiments.recipe",
    ]


def test_old_attributes_still_work(fresh_import):
    assert fresh_import["attributes"] == [
        "keras_we.experiments.models",
        True,
        "keras_we.experiments.data",
        "keras_we.experiments.data",
    ]
    assert fresh_import["from_import"] == ["keras_we.experiments.models", "keras_we.experiments.data"]
    assert fresh_import["after_access"] == ["keras_we.experiments.models", "keras_we.experiments.data"]
    assert fresh_import["dir"] == ["data", "models"]
    assert "nothing_of_the_sort" in fresh_import["missing"]


@pytest.mark.slow
def test_saved_zoo_models_load_after_a_plain_import_keras_we(tmp_path):
    """Models compiled with the recipe's optimizer, saved in one process,
    load in another that imported only `keras` and `keras_we`, and predict
    the same: ResNet-20 from the zoo (it holds `ZeroPadShortcut`) and a
    small model with `ChannelShuffle` (ShuffleNet's layer; the whole
    ShuffleNet takes half a minute to build on JAX). A file saved by
    keras_we 0.1.0, when the layers lived in `keras_we.models`, loads too.
    """
    out = str(tmp_path)
    saved = run_python(
        f"""
        import json
        import keras
        import numpy as np
        from keras_we.experiments import layers, models
        from keras_we.experiments.recipe import Recipe

        def shuffle_model():
            inputs = keras.Input((32, 32, 3))
            x = keras.layers.Conv2D(6, 3, name="conv")(inputs)
            x = layers.ChannelShuffle(3, name="shuffle")(x)
            x = keras.layers.GlobalAveragePooling2D()(x)
            return keras.Model(inputs, keras.layers.Dense(10)(x), name="shuffle")

        x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype("float32")
        np.save({out!r} + "/x.npy", x)
        names = {{}}
        for name in ("resnet20", "shuffle"):
            keras.utils.set_random_seed(0)
            model = models.get(name) if name == "resnet20" else shuffle_model()
            model.compile(
                optimizer=Recipe().optimizer(),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
            # Momentum buffers to save (without compiling a training step).
            model.optimizer.build(model.trainable_variables)
            model.save({out!r} + f"/{{name}}.keras")
            np.save({out!r} + f"/{{name}}.npy", model.predict(x, verbose=0))
            names[name] = sorted({{type(layer).__name__ for layer in model.layers}})
        print(json.dumps(names))
        """
    )
    assert "ZeroPadShortcut" in saved["resnet20"]
    assert "ChannelShuffle" in saved["shuffle"]

    loaded = run_python(
        f"""
        import json, sys, warnings
        import keras
        import keras_we
        import numpy as np

        # The optimizer's variables load too (Keras warns if they do not).
        warnings.filterwarnings("error", message="Skipping variable loading")
        facts = {{}}
        for name in ("resnet20", "shuffle", "old"):
            if name == "old":
                path, x = {OLD_FILE!r} + ".keras", np.load({OLD_FILE!r} + ".npz")["x"]
            else:
                path, x = {out!r} + f"/{{name}}.keras", np.load({out!r} + "/x.npy")
            model = keras.saving.load_model(path)
            np.save({out!r} + f"/{{name}}.loaded.npy", model.predict(x, verbose=0))
            facts[name] = type(model.optimizer).__name__
        facts["imported"] = [m for m in {HEAVY!r} if m in sys.modules]
        print(json.dumps(facts))
        """
    )
    assert loaded == {
        "resnet20": "PaperSGD",
        "shuffle": "PaperSGD",
        "old": "PaperSGD",
        "imported": [],
    }
    for name in ("resnet20", "shuffle"):
        np.testing.assert_allclose(
            np.load(f"{out}/{name}.loaded.npy"), np.load(f"{out}/{name}.npy"), rtol=1e-5, atol=1e-5
        )
    np.testing.assert_allclose(
        np.load(f"{out}/old.loaded.npy"), np.load(OLD_FILE + ".npz")["y"], rtol=1e-5, atol=1e-5
    )
