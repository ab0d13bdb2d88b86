"""The peer callbacks where Weight Evolution runs: under mixed precision,
and under data-parallel training (TensorFlow `MirroredStrategy` over two
logical CPUs, JAX `keras.distribution.DataParallel` over two host devices).

Under data parallelism, with learning rate 0 the weights move only through
the method, so the result must equal the same callback driven by hand on
one device (`drive`), and every replica must hold the same values.
"""

import functools
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_we import peers
from tests.utils import toy_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3

# Each peer, set to act within three epochs on `weak_cnn`, and the log key
# that counts what it touched in the epoch after its action.
PEERS = {
    "noise": (lambda: peers.NoiseGrafting(threshold=0.1, seed=1), "graft_noise_filters"),
    "internal": (lambda: peers.InternalGrafting(threshold=0.1), "graft_internal_filters"),
    "repr": (lambda: peers.RePr(train_epochs=1, prune_epochs=1, last_epoch=EPOCHS), "repr_pruned_filters"),
    "dsd": (lambda: peers.DSD(), "dsd_pruned_values"),
}

SETUP = r'''
import keras
import numpy as np

from tests.test_mixed_precision import cnn


def weak_cnn(seed=0, dtype=None):
    """`tests.test_mixed_precision.cnn` with three nearly dead filters in
    every conv kernel."""
    model = cnn(dtype, seed)
    for index in (0, 3, 6):
        kernel = model.layers[index].kernel
        weak = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(kernel, "float32"))).copy()
        weak[..., :3] *= 1e-3
        kernel.assign(weak)
    return model


def drive(callback, model, epochs, batches=2):
    """Runs `callback` through `epochs` epochs of `batches` batches as `fit`
    does, without training: with learning rate 0, what `fit` gives."""
    callback.set_model(model)
    callback.set_params({"epochs": epochs, "steps": batches, "verbose": 0})
    callback.on_train_begin()
    for epoch in range(epochs):
        callback.on_epoch_begin(epoch)
        for batch in range(batches):
            callback.on_train_batch_begin(batch)
            callback.on_train_batch_end(batch, {})
        callback.on_epoch_end(epoch, {})
    callback.on_train_end()
'''
exec(SETUP)


@pytest.fixture
def dtype_policy():
    old = keras.config.dtype_policy()
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy(old)


@pytest.mark.parametrize("name", sorted(PEERS))
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_fit(dtype_policy, policy, name):
    dtype_policy(policy)
    make, key = PEERS[name]
    model = weak_cnn()  # noqa: F821 (defined by SETUP)
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = toy_data()
    history = model.fit(x, y, epochs=EPOCHS, batch_size=16, verbose=0, callbacks=[make()])
    assert history.history[key][1] > 0, history.history  # it acted after epoch 0
    for weight in model.weights:
        if weight.trainable:
            assert keras.backend.standardize_dtype(weight.dtype) == "float32", weight.path
        assert np.isfinite(keras.ops.convert_to_numpy(keras.ops.cast(weight, "float32"))).all(), weight.path
    out = model.predict(x[:4], verbose=0)
    assert np.isfinite(np.asarray(out, dtype="float32")).all()


SCRIPT = r'''
import json
import sys

kind = sys.argv[1]
if kind == "tf-mirrored":
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    scope = strategy.scope
import keras
import numpy as np

from tests.test_peers_environments import EPOCHS, PEERS, SETUP

exec(SETUP)
if kind == "jax-data-parallel":
    import jax

    scope = keras.distribution.DataParallel(devices=jax.devices()).scope


def replicas(variable):
    value = variable.value
    if kind == "tf-mirrored":
        return [np.asarray(p.numpy()) for p in getattr(value, "values", (value,))]
    return [np.asarray(s.data) for s in value.addressable_shards]


rng = np.random.default_rng(0)
x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
y = rng.integers(0, 3, 32)
results = {}
for name, (make, key) in PEERS.items():
    with scope():
        model = weak_cnn()
        model.compile(optimizer=keras.optimizers.SGD(0.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, epochs=EPOCHS, batch_size=16, shuffle=False, verbose=0,
                            callbacks=[make()])
    reference = weak_cnn()
    drive(make(), reference, EPOCHS)
    mismatch = {}
    for a, b in zip(model.trainable_variables, reference.trainable_variables):
        got, want = keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        if not np.allclose(got, want, rtol=0, atol=1e-6):
            mismatch[a.path] = float(np.abs(got - want).max())
    results[name] = {
        "acted": float(history.history[key][1]),
        "mismatch": mismatch,
        "identical": all(
            all(np.array_equal(parts[0], p) for p in parts[1:])
            for parts in (replicas(v) for v in model.trainable_variables)),
        "replicas": len(replicas(model.trainable_variables[0])),
        "finite": bool(all(np.isfinite(w).all() for w in model.get_weights())),
    }
print("RESULT " + json.dumps(results))
'''


@functools.cache
def run_scenario(kind):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if kind == "tf-mirrored":
        env["KERAS_BACKEND"] = "tensorflow"
    else:
        env.update(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, kind], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"{kind} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("kind", [
    pytest.param("tf-mirrored", marks=pytest.mark.skipif(
        keras.backend.backend() != "tensorflow", reason="tf.distribute is TensorFlow's")),
    pytest.param("jax-data-parallel", marks=pytest.mark.skipif(
        keras.backend.backend() != "jax", reason="DataParallel is checked on JAX")),
])
@pytest.mark.parametrize("name", sorted(PEERS))
def test_data_parallel_equals_one_device(kind, name):
    result = run_scenario(kind)[name]
    assert result["replicas"] == 2
    assert result["acted"] > 0
    assert result["identical"] and result["finite"]
    assert result["mismatch"] == {}
