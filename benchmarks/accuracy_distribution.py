"""The accuracy distribution of keras-we's baseline against the PyTorch reference.

Reads the runs of the CPU protocol (ResNet-20, 10k CIFAR-10 training
images, 5k test images, 15 epochs), trained with

    keras-we compare --preset cpu --epochs 15 --methods baseline --seeds 0,1,2,3,4 --out runs/dist_keras
    python benchmarks/torch_reference.py --seeds 0,1,2,3,4 --epochs 15 --out runs/dist_torch

and prints two markdown tables: final top-1 (mean, sample sd, min, max) per
trainer, and each run's start (first-epoch training loss and test accuracy)
next to its end, so that a "poor start" can be seen in either trainer:

    python benchmarks/accuracy_distribution.py runs/dist_keras runs/dist_torch

The two trainers' seeds are not paired (each draws its own initial weights
and batches); the spread is what is compared.
"""

import argparse
import glob
import json
import os
import statistics
import sys


def keras_runs(folder):
    runs = []
    for path in sorted(glob.glob(os.path.join(folder, "runs", "*", "run.json"))):
        with open(path) as f:
            record = json.load(f)
        if record["method"] != "baseline":
            continue
        history = record["history"]
        runs.append({"trainer": f"keras-we ({record.get('backend', '?')})", "seed": record["seed"],
                     "epochs": record["epochs"], "first_loss": history["train_loss"][0],
                     "first_accuracy": history["test_accuracy"][0],
                     "final": record["final_test_accuracy"], "best": record["best_test_accuracy"]})
    return runs


def torch_runs(folder):
    runs = []
    for path in sorted(glob.glob(os.path.join(folder, "seed*.json"))):
        with open(path) as f:
            record = json.load(f)
        runs.append({"trainer": "PyTorch reference", "seed": record["seed"], "epochs": record["epochs"],
                     "first_loss": record["loss"][0], "first_accuracy": record["test_accuracy"][0],
                     "final": record["final_test_accuracy"], "best": record["best_test_accuracy"]})
    return runs


def pearson(xs, ys):
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("keras_folder", help="a `keras-we compare --out` folder")
    parser.add_argument("torch_folder", help="a `torch_reference.py --out` folder")
    args = parser.parse_args(argv)
    groups = [keras_runs(args.keras_folder), torch_runs(args.torch_folder)]
    for folder, runs in zip((args.keras_folder, args.torch_folder), groups):
        if not runs:
            parser.error(f"no finished runs in {folder}")
    print("| trainer | runs | final top-1 mean | sd | min | max | first-epoch loss, mean |")
    print("|---|---|---|---|---|---|---|")
    for runs in groups:
        finals = [100 * r["final"] for r in runs]
        sd = statistics.stdev(finals) if len(finals) > 1 else float("nan")
        print(f"| {runs[0]['trainer']} | {len(runs)} | {statistics.fmean(finals):.2f} | {sd:.2f} | "
              f"{min(finals):.2f} | {max(finals):.2f} | "
              f"{statistics.fmean(r['first_loss'] for r in runs):.3f} |")
    print()
    print("| trainer | seed | epochs | first-epoch loss | test top-1 after epoch 1 | final top-1 | best top-1 |")
    print("|---|---|---|---|---|---|---|")
    for runs in groups:
        for r in runs:
            print(f"| {r['trainer']} | {r['seed']} | {r['epochs']} | {r['first_loss']:.3f} | "
                  f"{100 * r['first_accuracy']:.2f} | {100 * r['final']:.2f} | {100 * r['best']:.2f} |")
    everything = [r for runs in groups for r in runs]
    if len(everything) > 2:
        print()
        print(f"Pearson correlation of first-epoch loss and final top-1 over all {len(everything)} runs: "
              f"{pearson([r['first_loss'] for r in everything], [r['final'] for r in everything]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
