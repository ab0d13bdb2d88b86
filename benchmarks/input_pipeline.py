"""Throughput of the CIFAR input pipeline (`keras_we.experiments.data`), in images/s.

Times, on one CPU thread and the real training images:

- `augment`: random crop with 4-pixel zero padding + random flip (uint8);
- `normalize`: uint8 -> normalized float32;
- `augment + normalize`: both, i.e. the per-batch work of training;
- `CifarSequence epoch`: a full epoch of shuffled, augmented, normalized
  batches through `CifarSequence.__getitem__` (adds the shuffled gather).

Usage:

    KERAS_WE_DATA_DIR=/path/to/data python benchmarks/input_pipeline.py
    python benchmarks/input_pipeline.py --data-dir cifar10.npz --batch-size 256
"""

import argparse
import time

import numpy as np

from keras_we.experiments import data


def images_per_second(fn, batches, repeats):
    """Best throughput of `repeats` passes of `fn` over `batches`."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        best = min(best, time.perf_counter() - start)
    return sum(len(b) for b in batches) / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="see load_cifar()")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--batches", type=int, default=100, help="batches per timed pass"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    (x_train, y_train), _ = data.load_cifar(data_dir=args.data_dir)
    n = min(args.batches * args.batch_size, len(x_train))
    batches = [
        x_train[i : i + args.batch_size] for i in range(0, n, args.batch_size)
    ]
    rng = np.random.default_rng(0)

    results = {
        "augment": images_per_second(
            lambda b: data.augment(b, rng), batches, args.repeats
        ),
        "normalize": images_per_second(data.normalize, batches, args.repeats),
        "augment + normalize": images_per_second(
            lambda b: data.normalize(data.augment(b, rng)),
            batches,
            args.repeats,
        ),
    }
    sequence = data.CifarSequence(
        x_train,
        y_train,
        batch_size=args.batch_size,
        augment=True,
        shuffle=True,
    )
    start = time.perf_counter()
    for index in range(len(sequence)):
        sequence[index]
    results["CifarSequence epoch"] = len(x_train) / (
        time.perf_counter() - start
    )

    print(f"batch size {args.batch_size}, {len(x_train)} training images")
    for name, value in results.items():
        print(f"{name:>22}: {value:>10,.0f} images/s")


if __name__ == "__main__":
    main()
