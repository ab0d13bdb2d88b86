"""TensorFlow's malloc patch and `keras_we.experiments.data.undo_tf_malloc_patch`.

Trains the CIFAR ResNet-20 for two epochs of 1,280 random images (batch 128)
from a `CifarSequence`, with validation, once with the patch undone (what
the package does) and once with TensorFlow's patch left in place, each in a
fresh process, and prints images/s with user and system CPU seconds.

    KERAS_BACKEND=tensorflow python benchmarks/malloc_patch.py
"""

import os
import resource
import subprocess
import sys
import time

IMAGES, EPOCHS = 1280, 2


def child(undo):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import numpy as np

    from keras_we.experiments import data, models

    if not undo:
        data.undo_tf_malloc_patch = lambda: None
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (IMAGES, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, IMAGES)
    train = data.CifarSequence(x, y, batch_size=128, augment=True, shuffle=True, seed=0)
    test = data.CifarSequence(x[:256], y[:256], batch_size=128)
    model = models.get("resnet20", classes=10, input_shape=(32, 32, 3))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    fit = dict(validation_data=test, verbose=0, shuffle=False, callbacks=[data.SyncEpoch(train)])
    model.fit(train, epochs=1, **fit)  # traces; TensorFlow patches malloc here
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    model.fit(train, epochs=EPOCHS, **fit)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    print(f"{EPOCHS * IMAGES / seconds:.0f} {after.ru_utime - before.ru_utime:.1f} "
          f"{after.ru_stime - before.ru_stime:.1f}")


def main():
    print("| malloc | images/s | user s | system s |")
    print("|---|---|---|---|")
    for undo, name in ((True, "patch undone (keras_we)"), (False, "TensorFlow's patch")):
        out = subprocess.run([sys.executable, __file__, "child", str(int(undo))], check=True,
                             capture_output=True, text=True).stdout.split()
        print(f"| {name} | {out[0]} | {out[1]} | {out[2]} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child(bool(int(sys.argv[2])))
    else:
        main()
