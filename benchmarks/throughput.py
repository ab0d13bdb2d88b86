"""Training throughput: keras-we's runner on each backend against the PyTorch reference.

    python benchmarks/throughput.py                       # ResNet-20, 5,120 images, 3 epochs
    python benchmarks/throughput.py --backends tensorflow --epochs 4 --depth 56
    python benchmarks/throughput.py --variants "default;augment=device,steps_per_execution=8"

Each row is one run in its own process, one after the other, on the same
model, batch, data and machine:

- keras-we: the runner's network (`keras_we.experiments.runner.network`:
  the CIFAR ResNet, `PaperSGD`, the seeded `CifarSequence` with its
  crops and flips, the learning-rate steps) fit with the test set as
  validation data, as `keras-we compare` trains a baseline run;
- PyTorch: `benchmarks/torch_reference.py`, the same recipe in plain
  PyTorch with the data and augmentation on the device.

An epoch is the training images plus an evaluation of the test images;
images/s is the training images over the median epoch time, epoch 0 (which
compiles) excluded. `--variants` adds keras-we rows trained with other
runner options (`keras_we.experiments.runner.RunConfig` fields, as
`keras-we compare` takes them: `augment`, `steps_per_execution`,
`jit_compile`, `dtype_policy`). The ratio is keras-we's images/s over PyTorch's, so
>= 1.0 means keras-we is at least as fast. Runs are single measurements:
repeat the command to see the machine's noise.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ("tensorflow", "jax", "torch")


TRAINING_OPTIONS = ("augment", "steps_per_execution", "jit_compile", "dtype_policy")


class Unavailable(Exception):
    """The runner does not take these options on this backend."""


def parse_variant(text):
    """`"default"` or `"name=value,..."` of RunConfig's training options: a dict."""
    options = {}
    for item in [] if text == "default" else text.split(","):
        name, _, value = item.partition("=")
        if name not in TRAINING_OPTIONS or not value:
            raise ValueError(f"a variant is 'default' or name=value pairs with names among "
                             f"{', '.join(TRAINING_OPTIONS)}; got {item!r} in {text!r}")
        options[name] = int(value) if name == "steps_per_execution" else value
    return options


def keras_config(depth, train_size, test_size, epochs, batch_size, seed, variant="default"):
    """The runner's config of a keras-we row (a baseline run)."""
    from keras_we.experiments import runner

    return runner.RunConfig(f"resnet{depth}", "cifar10", "baseline", seed, epochs, train_size,
                            test_size, batch_size, **parse_variant(variant))


def keras_run(config):
    """One keras-we run of `config` in this process; returns its epoch seconds."""
    import keras

    from keras_we.experiments import data as data_lib
    from keras_we.experiments import runner

    seed, epochs = config.seed, config.epochs
    recipe = config.recipe()
    data = runner.load_data(config)
    model, train, callbacks = runner.network(config, recipe, data, seed, os.devnull)
    seconds = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.start)

    model.fit(data_lib.fit_input(train),
              validation_data=data_lib.fit_input(runner.evaluation_sequence(data, config)),
              epochs=epochs, callbacks=callbacks + [EpochTimer()], shuffle=False, verbose=0)
    return seconds


def torch_run(depth, train_size, test_size, epochs, batch_size, seed):
    sys.path.insert(0, HERE)
    import torch_reference

    data = torch_reference.load_cifar("cifar10", train_size=train_size, test_size=test_size)
    return torch_reference.train(data, depth, epochs, seed, batch_size)["epoch_seconds"]


def child(args):
    """Runs one row (in a subprocess) and prints its JSON."""
    sizes = (args.depth, args.train_size, args.test_size, args.epochs, args.batch_size, args.seed)
    if args.child == "pytorch":
        seconds = torch_run(*sizes)
    else:
        try:
            config = keras_config(*sizes, variant=args.variants)
        except ValueError as error:  # e.g. steps_per_execution on PyTorch
            print("UNAVAILABLE " + str(error), flush=True)
            return
        seconds = keras_run(config)
    print("RESULT " + json.dumps({"epoch_seconds": seconds}), flush=True)


def measure(trainer, backend, args, variant="default"):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, os.path.abspath(__file__), "--child", trainer,
               "--depth", str(args.depth), "--train-size", str(args.train_size),
               "--test-size", str(args.test_size), "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--variants", variant]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    unavailable = [line for line in done.stdout.splitlines() if line.startswith("UNAVAILABLE ")]
    if unavailable and not done.returncode:
        raise Unavailable(unavailable[-1][len("UNAVAILABLE "):])
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise RuntimeError(f"{trainer} on {backend} failed (exit {done.returncode})")
    seconds = json.loads(lines[-1][len("RESULT "):])["epoch_seconds"]
    steady = seconds[1:] or seconds
    return {"trainer": trainer, "backend": backend, "variant": variant, "epoch_seconds": seconds,
            "images_per_second": args.train_size / statistics.median(steady)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"keras-we rows, comma-separated among {', '.join(BACKENDS)}")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--train-size", type=int, default=5120)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="default",
                        help="keras-we's runner options, ';'-separated sets: 'default' or "
                             "name=value,... among " + ", ".join(TRAINING_OPTIONS))
    parser.add_argument("--out", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    backends = args.backends.split(",")
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"--backends must name among {', '.join(BACKENDS)}; got {', '.join(unknown)}")
    variants = args.variants.split(";")
    for variant in variants:
        try:
            parse_variant(variant)
        except ValueError as error:
            parser.error(f"--variants: {error}")
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (epoch 0 compiles and is not timed)")
    print(f"ResNet-{args.depth}, {args.train_size} training + {args.test_size} test images an epoch, "
          f"batch {args.batch_size}, {args.epochs} epochs (the first not timed), {os.cpu_count()} CPUs",
          flush=True)
    print("| trainer | backend | runner options | images/s | ratio to PyTorch | epoch seconds |")
    print("|---|---|---|---|---|---|", flush=True)
    rows, failed = [], 0
    for trainer, backend, variant in [("pytorch", "torch", "default")] + [
            ("keras-we", backend, variant) for variant in variants for backend in backends]:
        try:
            row = measure(trainer, backend, args, variant)
        except Unavailable as reason:
            print(f"| {trainer} | {backend} | {variant} | not available: {reason} | | |", flush=True)
            continue
        except RuntimeError as error:  # one failed row does not lose the others
            print(f"| {trainer} | {backend} | {variant} | failed: {error} | | |", flush=True)
            failed += 1
            continue
        rows.append(row)
        reference = rows[0]["images_per_second"] if rows[0]["trainer"] == "pytorch" else float("nan")
        epochs = ", ".join(f"{s:.1f}" for s in row["epoch_seconds"])
        shown = ("(plain PyTorch)", "") if trainer == "pytorch" else (backend, variant)
        print(f"| {trainer} | {shown[0]} | {shown[1]} | {row['images_per_second']:.0f} | "
              f"{row['images_per_second'] / reference:.2f} | {epochs} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
