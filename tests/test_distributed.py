"""Weight Evolution under data-parallel training.

- TensorFlow: `tf.distribute.MirroredStrategy` over two logical CPU devices
  and a single-worker `MultiWorkerMirroredStrategy` (TF_CONFIG unset).
- JAX: `keras.distribution.DataParallel` over two host CPU devices.

Logical devices must be configured before the backend starts, so each
scenario runs in a fresh Python process (`SCRIPT` below) that prints its
findings as JSON. The checks:

- with SGD learning rate 0 the weights move only through evolution, so the
  kernels, gammas and betas after `fit` must be exactly those that
  `keras_we.evolve`, applied by hand epoch by epoch (state carried) to an
  identical model on one device, gives, with the same items evolved;
- every replica holds the same kernels, gammas and betas after `fit`;
- with a nonzero learning rate, items are evolved and replicas still agree;
- JAX: the variables keep their (replicated) sharding through the write-back.

The features are backend-specific, so the tests of the other backends skip.
"""

import functools
import json
import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = ("conv", "gamma", "beta")
EPOCHS = 3

SCRIPT = r'''
import json
import sys
import time

start = time.time()
kind = sys.argv[1]
if kind.startswith("tf-"):
    import tensorflow as tf

    # Two logical CPUs; must happen before TensorFlow initializes devices.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    if kind == "tf-mirrored":
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    distributed_scope = strategy.scope
    replica_count = strategy.num_replicas_in_sync

import keras
import numpy as np

import keras_we
from keras_we.layers import find_targets
from tests.utils import tiny_cnn

if kind == "jax-data-parallel":
    import jax

    distribution = keras.distribution.DataParallel(devices=jax.devices())
    distributed_scope = distribution.scope
    replica_count = len(jax.devices())

OPTIONS = {"gamma_ratio": 0.3, "beta_ratio": 0.3}
EPOCHS = 3


def build(lr):
    """`tests.utils.tiny_cnn` with weak filters and BN entries, compiled."""
    model = tiny_cnn(0)
    for index in (0, 3, 6):  # three inferior filters in every conv
        kernel = model.layers[index].kernel
        weak = keras.ops.convert_to_numpy(kernel).copy()
        weak[..., :3] *= 1e-3
        kernel.assign(weak)
    for index in (1, 4):  # BN vectors with a few weak entries
        bn = model.layers[index]
        n = bn.gamma.shape[0]
        gamma = np.linspace(0.5, 1.5, n)
        gamma[:2] = [1e-3, 2e-3]
        beta = np.linspace(-0.5, 0.5, n)
        beta[:2] = [1e-4, -2e-4]
        bn.gamma.assign(gamma.astype("float32"))
        bn.beta.assign(beta.astype("float32"))
    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def replica_values(variable):
    """The copy of `variable` on every replica, as numpy arrays."""
    value = variable.value
    if kind.startswith("tf-"):
        parts = getattr(value, "values", (value,))  # a MirroredVariable's copies
        return [np.asarray(p.numpy()) for p in parts], [p.device for p in parts]
    shards = value.addressable_shards
    return [np.asarray(s.data) for s in shards], [str(s.device) for s in shards]


def sharding_facts(variable, before):
    sharding = variable.value.sharding
    return {
        "spec": str(sharding.spec),
        "before": str(before.spec),
        "equal": bool(sharding == before),
        "equivalent": bool(sharding.is_equivalent_to(before, len(variable.shape))),
        "replicated": bool(sharding.is_fully_replicated),
        "devices": len(sharding.device_set),
    }


rng = np.random.default_rng(0)
x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
y = rng.integers(0, 3, 32)
results = {"replicas": int(replica_count)}
for lr in (0.0, 0.05):
    with distributed_scope():
        model = build(lr)
        initial = model.get_weights()
        targets = find_targets(model)
        if kind == "jax-data-parallel":
            shardings = [t.variable.value.sharding for t in targets]
        history = model.fit(
            x, y, epochs=EPOCHS, batch_size=16, shuffle=False, verbose=0,
            callbacks=[keras_we.WeightEvolution(evolve_last_epoch=True, **OPTIONS)],
        )
    run = {
        "history": {
            key: [float(v) for v in values]
            for key, values in history.history.items() if key.startswith("we_")
        },
        "variable_types": sorted({type(t.variable.value).__name__ for t in targets}),
        "finite": bool(all(np.isfinite(w).all() for w in model.get_weights())),
        "replicas": {},
    }
    for target in targets:
        parts, devices = replica_values(target.variable)
        run["replicas"][target.path] = {
            "devices": devices,
            "identical": bool(all(np.array_equal(parts[0], p) for p in parts[1:])),
        }
    if kind == "jax-data-parallel":
        run["sharding"] = {
            t.path: sharding_facts(t.variable, s) for t, s in zip(targets, shardings)
        }
    if lr == 0.0:
        # The same steps by hand, on one device, without any distribution.
        reference = build(lr)
        reference.set_weights(initial)
        state, by_hand = None, []
        for epoch in range(EPOCHS):
            report, state = keras_we.evolve(reference, epoch, state, **OPTIONS)
            by_hand.append({
                "we_conv_evolved": report.conv_evolved,
                "we_gamma_evolved": report.gamma_evolved,
                "we_beta_evolved": report.beta_evolved,
                "we_changed_elements": report.changed_elements,
            })
        run["by_hand"] = by_hand
        run["mismatch"] = {}
        for ta, tb in zip(targets, find_targets(reference)):
            got = keras.ops.convert_to_numpy(ta.variable)
            want = keras.ops.convert_to_numpy(tb.variable)
            if not np.array_equal(got, want):
                run["mismatch"][ta.path] = float(np.abs(got - want).max())
        # Trainable weights that changed: with lr 0, only evolved ones.
        run["moved"] = [
            v.path for v, w0 in zip(model.weights, initial)
            if v.trainable and not np.array_equal(w0, keras.ops.convert_to_numpy(v))
        ]
        run["targets"] = [t.path for t in targets]
    results[str(lr)] = run
results["seconds"] = round(time.time() - start, 1)
print("RESULT " + json.dumps(results))
'''


@functools.cache
def run_scenario(kind):
    """Runs `SCRIPT` for `kind` in a fresh process; returns its JSON."""
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)  # single worker
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if kind.startswith("tf-"):
        env["KERAS_BACKEND"] = "tensorflow"
    else:
        env["KERAS_BACKEND"] = "jax"
        env["JAX_PLATFORMS"] = "cpu"
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=2".strip()
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, kind],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"scenario {kind} failed (rc {proc.returncode}):\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return json.loads(lines[-1][len("RESULT ") :])


on_tensorflow = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute strategies exist only on the TensorFlow backend",
)
on_jax = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution.DataParallel is checked on the JAX backend",
)

ALL_KINDS = pytest.mark.parametrize(
    "kind",
    [
        pytest.param("tf-mirrored", marks=on_tensorflow),
        pytest.param("tf-multiworker", marks=on_tensorflow),
        pytest.param("jax-data-parallel", marks=on_jax),
    ],
)
EXPECTED_REPLICAS = {"tf-mirrored": 2, "tf-multiworker": 1, "jax-data-parallel": 2}


@ALL_KINDS
def test_runs_distributed(kind):
    result = run_scenario(kind)
    # MultiWorkerMirroredStrategy with TF_CONFIG unset is one worker with
    # its one CPU device; the others span both CPU devices.
    assert result["replicas"] == EXPECTED_REPLICAS[kind]
    for lr in ("0.0", "0.05"):
        run = result[lr]
        if kind.startswith("tf-"):
            assert run["variable_types"] == ["MirroredVariable"]
        for path, replicas in run["replicas"].items():
            assert len(replicas["devices"]) == EXPECTED_REPLICAS[kind], path
            assert len(set(replicas["devices"])) == len(replicas["devices"]), path


@ALL_KINDS
def test_lr0_fit_equals_evolve_by_hand(kind):
    """Learning rate 0: `fit` moves weights only by evolution, so the result
    is `keras_we.evolve` run by hand on one device: the same counts, and
    the same weights up to the last bits (on TensorFlow the single-device
    step is compiled with XLA, which may round a blend differently, and the
    distributed one is not)."""
    run = run_scenario(kind)["0.0"]
    assert max(run["mismatch"].values(), default=0.0) <= 1e-6, run["mismatch"]
    assert run["moved"] and set(run["moved"]) <= set(run["targets"])
    # Epoch e + 1 logs the evolution after epoch e; the one after the last
    # epoch (`evolve_last_epoch`) is in no epoch's logs.
    for epoch, by_hand in enumerate(run["by_hand"][:-1]):
        for key, count in by_hand.items():
            assert run["history"][key][epoch + 1] == count, (key, epoch)
    assert all(run["history"][key][0] == 0 for key in run["by_hand"][0])
    # Something was evolved, in every group, and no variable was skipped.
    for group in GROUPS:
        assert sum(run["history"][f"we_{group}_evolved"]) > 0, group
    assert run["history"]["we_skipped_nonfinite"] == [0] * EPOCHS


@ALL_KINDS
@pytest.mark.parametrize("lr", ["0.0", "0.05"])
def test_replicas_identical(kind, lr):
    run = run_scenario(kind)[lr]
    assert len(run["replicas"]) == 7  # 3 kernels, 2 gammas, 2 betas
    for path, replicas in run["replicas"].items():
        assert replicas["identical"], path
    assert run["finite"]


@ALL_KINDS
def test_training_with_nonzero_lr_evolves(kind):
    run = run_scenario(kind)["0.05"]
    history = run["history"]
    assert len(history["we_conv_evolved"]) == EPOCHS
    assert history["we_conv_evolved"][1] > 0
    assert sum(history["we_changed_elements"]) > 0
    assert history["we_skipped_nonfinite"] == [0] * EPOCHS


@on_jax
@pytest.mark.parametrize("lr", ["0.0", "0.05"])
def test_jax_sharding_survives_write_back(lr):
    run = run_scenario("jax-data-parallel")[lr]
    assert len(run["sharding"]) == 7
    for path, facts in run["sharding"].items():
        assert facts["replicated"] and facts["devices"] == 2, (path, facts)
        assert facts["equivalent"], (path, facts)
        # The very same sharding, not just an equivalent one: a write-back of
        # a raw jit output would respell a vector's `P(None,)` as `P()`.
        assert facts["equal"], (path, facts)
