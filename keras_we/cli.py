"""The `keras-we` command (also `python -m keras_we`).

    keras-we train   --model resnet56 --method we-paper --epochs 200 --seed 0 --out DIR
    keras-we compare --model resnet20 --methods baseline,we-paper,we-reference \
                     --seeds 0,1,2 --epochs 6 --train-size 10000 --test-size 2000 --out DIR
    keras-we compare --preset cpu --out DIR
    keras-we export  RUN_DIR --base-dir DIR      # TF-Serving layout DIR/<version>/
"""

import argparse
import os
import sys

from keras_we import experiments


def _int_list(text):
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}") from None


def _choices_list(choices):
    def parse(text):
        values = tuple(v for v in text.split(",") if v)
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(
                f"unknown {unknown or text!r}; choose from {', '.join(choices)}"
            )
        return values

    return parse


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def build_parser():
    from keras_we import models

    parser = argparse.ArgumentParser(prog="keras-we", description="Weight Evolution experiments.")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub):
        sub.add_argument("--model", help=f"one of {', '.join(models.names())}, or a keras.applications name")
        sub.add_argument("--dataset", choices=tuple(experiments.DATASETS))
        sub.add_argument("--epochs", type=_positive)
        sub.add_argument("--train-size", type=_positive, help="stratified training subset")
        sub.add_argument("--test-size", type=_positive, help="stratified test subset")
        sub.add_argument("--batch-size", type=_positive)
        sub.add_argument("--data-dir", help="a .npz or a folder with cifar10.npz / cifar100.npz "
                         "(default: $KERAS_WE_DATA_DIR, else keras.datasets)")
        sub.add_argument("--out", required=True, help="output folder")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")

    train = commands.add_parser("train", help="train one run")
    common(train)
    train.add_argument("--method", choices=tuple(experiments.METHODS), default="we-paper")
    train.add_argument("--seed", type=int, default=0)

    compare = commands.add_parser("compare", help="paired runs of several methods and seeds")
    common(compare)
    compare.add_argument("--preset", choices=tuple(experiments.PRESETS),
                         help="a named setting; explicit options override it")
    compare.add_argument("--methods", type=_choices_list(tuple(experiments.METHODS)))
    compare.add_argument("--seeds", type=_int_list)

    export = commands.add_parser("export", help="export a run's model.keras for TF-Serving")
    export.add_argument("run_dir", help="a finished run folder (holds model.keras)")
    export.add_argument("--base-dir", required=True,
                        help="TF-Serving model base folder; the export goes to BASE_DIR/VERSION")
    export.add_argument("--version", type=_positive,
                        help="version number (default: one more than the highest in BASE_DIR)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "export":
        return _export(args)
    preset = dict(experiments.PRESETS[getattr(args, "preset", None) or "paper"])
    models = (args.model,) if args.model else preset.pop("models")
    preset.pop("models", None)
    for key in ("dataset", "methods", "seeds", "epochs", "train_size", "test_size", "batch_size"):
        value = getattr(args, key, None)
        if value is not None:
            preset[key] = value
    if args.command == "train":
        preset.update(methods=(args.method,), seeds=(args.seed,))
    verbose = 0 if args.quiet else 1
    try:
        plans = {model: experiments.plan(model=model, data_dir=args.data_dir, **preset) for model in models}
        experiments.check_data(next(iter(plans.values()))[0])
    except (ValueError, TypeError, OSError) as error:
        print(f"keras-we: error: {error}", file=sys.stderr)
        return 2
    if args.command == "train":
        record = experiments.train_run(plans[models[0]][0], args.out, verbose=verbose)
        print(f"final test top-1 {100 * record['final_test_accuracy']:.2f}%, "
              f"best {100 * record['best_test_accuracy']:.2f}% -> {args.out}")
        return 0
    for model, configs in plans.items():
        out = args.out if len(plans) == 1 else os.path.join(args.out, model)
        summary = experiments.compare(configs, out, verbose=verbose)
        print(f"\n{model} on {preset['dataset']}, {preset['epochs']} epochs:")
        print(experiments.format_table(summary["table"]))
    return 0


def _export(args):
    from keras_we import export

    try:
        export.export_run(args.run_dir, args.base_dir, version=args.version)
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        # RuntimeError: the export differs from the model, or the backend
        # (PyTorch) cannot write a SavedModel.
        print(f"keras-we: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
