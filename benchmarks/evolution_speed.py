"""How long one Weight Evolution step takes, next to one training step.

Runs each backend in its own process and prints a markdown table: per model,
the median evolution step time (after the compiling first call) and its
ratio to one SGD training step at batch 128 of the same model.

Weights are made to look trained: every filter and BatchNorm entry is
scaled by 10**U(-3, 0), so scores spread over three decades, and 5% of them
are scaled by 1e-6 (nearly dead).

It also reports the step's peak extra memory, for the first call (which
compiles) and for later ones (the median of five calls, and their range:
the figure moves from call to call, on JAX by up to 0.3x the weights):
the resident set size sampled every
millisecond during the call, above its level just before, after glibc has
returned its free memory to the system (`malloc_trim(0)`), so that memory
the allocator kept from earlier calls is not reused unseen. It is given in
MB and as a multiple of the model's weight bytes (issue 12's bound: 0.5x),
next to the size of the largest kernel.

    python benchmarks/evolution_speed.py                   # all backends
    python benchmarks/evolution_speed.py --backends jax --models resnet56
    python benchmarks/evolution_speed.py --models ResNet50,EfficientNetB0 --batch-size 32
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

MODELS = ("resnet56", "mobilenet_v2")
LATER_CALLS = 5  # whose extra memory is reported: median and range


def trained_looking(model, seed=0):
    import keras
    import numpy as np

    from keras_we.layers import find_targets

    rng = np.random.default_rng(seed)
    for target in find_targets(model):
        value = keras.ops.convert_to_numpy(target.variable)
        scale = 10.0 ** rng.uniform(-3, 0, size=value.shape[-1])
        scale[rng.random(value.shape[-1]) < 0.05] = 1e-6
        if not target.layout.is_kernel:
            value = value + rng.normal(0.5, 0.2, size=value.shape)
        target.variable.assign((value * scale).astype(value.dtype))


def peak_extra_memory(function):
    """Peak resident memory above the level before `function` ran, in bytes
    (the heap trimmed first)."""
    from keras_we.backend_utils import release_free_memory, resident_bytes

    release_free_memory()
    baseline, peak, done = resident_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    function()
    done.set()
    sampler.join()
    return max(peak[0], resident_bytes()) - baseline


def timed(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name, input_shape, batch_size, repeats):
    import keras
    import numpy as np

    import keras_we
    from keras_we.evolution import EvolutionOptions, evolver_for

    model = keras_we.models.get(name, classes=10 if input_shape[0] == 32 else 1000, input_shape=input_shape)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    trained_looking(model)
    classes = model.output_shape[-1]
    x = np.random.default_rng(0).normal(size=(batch_size, *input_shape)).astype("float32")
    y = np.arange(batch_size) % classes
    model.train_on_batch(x, y)  # builds and compiles the training step
    train = timed(lambda: model.train_on_batch(x, y), repeats)

    evolver = evolver_for(model, EvolutionOptions())
    state = {"conv_counter": 0, "gamma_counter": 0, "beta_counter": 0}
    first_call = {}

    def first_step():
        start = time.perf_counter()
        first_call["report"], first_call["state"] = evolver(30, state)
        first_call["seconds"] = time.perf_counter() - start

    first_extra = peak_extra_memory(first_step)
    report, state, first = first_call["report"], first_call["state"], first_call["seconds"]
    step = timed(lambda: evolver(30, state), max(repeats, 5))
    extras = [peak_extra_memory(lambda: evolver(30, state)) for _ in range(LATER_CALLS)]
    largest = max(int(np.prod(t.variable.shape)) * 4 for t in evolver.targets)
    weights = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)
    return {
        "first_extra_memory_mb": first_extra / 2**20,
        "extra_memory_mb": statistics.median(extras) / 2**20,
        "extra_memory_range_mb": [min(extras) / 2**20, max(extras) / 2**20],
        "weights_mb": weights / 2**20,
        "largest_kernel_mb": largest / 2**20,
        "model": name,
        "input": "x".join(map(str, input_shape[:2])),
        "train_step_s": train,
        "evolution_step_s": step,
        "first_call_s": first,
        "ratio": step / train,
        "filters_evolved": report.conv_evolved,
    }


def worker(args):
    import keras

    rows = []
    for name in args.models:
        shape = (224, 224, 3) if name in BIG_INPUT else (32, 32, 3)
        row = measure(name, shape, args.batch_size, args.repeats)
        row["backend"] = keras.backend.backend()
        rows.append(row)
        print(json.dumps(row), flush=True)


BIG_INPUT = ("ResNet50", "EfficientNetB0")


def rows_per_backend(script, backends, arguments):
    """Runs `script --worker *arguments` once per backend, each in its own
    process; returns the JSON rows they print, in order."""
    rows = []
    for backend in backends:
        command = [sys.executable, script, "--worker", *arguments]
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        output = subprocess.run(command, env=env, capture_output=True, text=True)
        if output.returncode:
            print(output.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"backend {backend} failed")
        rows += [json.loads(line) for line in output.stdout.splitlines() if line.startswith("{")]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.models = args.models.split(",")
    if args.worker:
        return worker(args)

    rows = rows_per_backend(__file__, args.backends.split(","), [
        "--models", ",".join(args.models), "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)])

    print(
        f"| backend | model | input | train step (batch {args.batch_size}) | evolution step "
        "| ratio | first call (compiles) | filters evolved | extra memory, first call "
        f"| extra memory, later calls (median of {LATER_CALLS}; range) | weights | largest kernel |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["extra_memory_range_mb"]
        print(
            f"| {r['backend']} | {r['model']} | {r['input']} | {r['train_step_s'] * 1000:.0f} ms "
            f"| {r['evolution_step_s'] * 1000:.1f} ms | {r['ratio']:.4f} | {r['first_call_s']:.2f} s "
            f"| {r['filters_evolved']} "
            f"| {r['first_extra_memory_mb']:.1f} MB ({r['first_extra_memory_mb'] / r['weights_mb']:.2f}x) "
            f"| {r['extra_memory_mb']:.1f} MB ({r['extra_memory_mb'] / r['weights_mb']:.2f}x; "
            f"{low / r['weights_mb']:.2f}x to {high / r['weights_mb']:.2f}x) "
            f"| {r['weights_mb']:.1f} MB | {r['largest_kernel_mb']:.1f} MB |"
        )


if __name__ == "__main__":
    main()
