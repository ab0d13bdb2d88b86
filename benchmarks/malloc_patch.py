"""TensorFlow's malloc patch and `keras_we.experiments.data.undo_tf_malloc_patch`.

Trains the CIFAR ResNet-20 for two epochs of 1,280 random images (batch 128,
with validation on 256) after a first, tracing epoch, each case in a fresh
process:

- from a `CifarSequence` with the patch undone (what the package does);
- from a `CifarSequence` with TensorFlow's patch left in place;
- from NumPy arrays, which `fit` does not read through the generator
  dataset, so TensorFlow never patches malloc (the reference).

Prints images/s with user and system CPU seconds.

    KERAS_BACKEND=tensorflow python benchmarks/malloc_patch.py
"""

import os
import resource
import subprocess
import sys
import time

IMAGES, EPOCHS, BATCH = 1280, 2, 128
CASES = {
    "undone": "CifarSequence, patch undone (keras_we)",
    "patched": "CifarSequence, TensorFlow's patch",
    "arrays": "NumPy arrays (no generator dataset)",
}


def child(case):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import numpy as np

    from keras_we.experiments import data, models

    if case == "patched":
        data.undo_tf_malloc_patch = lambda: None
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (IMAGES, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, IMAGES)
    model = models.get("resnet20", classes=10, input_shape=(32, 32, 3))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    if case == "arrays":
        images = data.normalize(x)
        inputs = dict(x=images, y=y, batch_size=BATCH, validation_data=(images[:256], y[:256]))
    else:
        train = data.CifarSequence(x, y, batch_size=BATCH, augment=True, shuffle=True, seed=0)
        inputs = dict(x=train, shuffle=False, callbacks=[data.SyncEpoch(train)],
                      validation_data=data.CifarSequence(x[:256], y[:256], batch_size=BATCH))
    model.fit(epochs=1, verbose=0, **inputs)  # traces; TensorFlow patches malloc here
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    model.fit(epochs=EPOCHS, verbose=0, **inputs)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    print(f"{EPOCHS * IMAGES / seconds:.0f} {after.ru_utime - before.ru_utime:.1f} "
          f"{after.ru_stime - before.ru_stime:.1f}")


def main():
    print("| training data | images/s | user s | system s |")
    print("|---|---|---|---|")
    for case, name in CASES.items():
        out = subprocess.run([sys.executable, __file__, "child", case], check=True,
                             capture_output=True, text=True).stdout.split()
        print(f"| {name} | {out[0]} | {out[1]} | {out[2]} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child(sys.argv[2])
    else:
        main()
