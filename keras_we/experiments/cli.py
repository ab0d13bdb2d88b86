"""The `keras-we` command (also `python -m keras_we`), over `keras_we.experiments.runner`.

    keras-we compare --preset cpu --out DIR      # the default preset; 2 CPU cores
    keras-we compare --preset smoke --out DIR    # a check of a few minutes
    keras-we train   --preset paper --model resnet56 --method we-paper --epochs 200 --seed 0 --out DIR
    keras-we compare --model resnet20 --methods baseline,we-paper,we-reference \
                     --seeds 0,1,2 --epochs 6 --train-size 10000 --test-size 2000 --out DIR
    keras-we export  RUN_DIR --base-dir DIR      # TF-Serving layout DIR/<version>/

`train` and `compare` start from a preset (`--preset`, default `cpu`), which
explicit options override, and print the effective setting before training.
"""

import argparse
import os
import sys
import textwrap

import keras

from keras_we.experiments import runner


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


ALL = "all"


def _size(text):
    return ALL if text == ALL else _positive(text)


def _presets_epilog():
    lines = [f"presets (--preset; default {runner.DEFAULT_PRESET}; explicit options override them):"]
    for name in runner.PRESETS:
        lines.append(textwrap.fill(runner.PRESET_HELP[name], width=79, initial_indent=f"  {name:<7}",
                                   subsequent_indent=" " * 9))
    return "\n".join(lines)


def build_parser():
    from keras_we.experiments import models

    parser = argparse.ArgumentParser(prog="keras-we", description="Weight Evolution experiments.")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub):
        sub.add_argument("--preset", choices=tuple(runner.PRESETS), default=runner.DEFAULT_PRESET,
                         help=f"the setting to start from (default: {runner.DEFAULT_PRESET}, "
                              "for a CPU; see the presets below); explicit options override it")
        sub.add_argument("--model", help=f"one of {', '.join(models.names())}, or a keras.applications name "
                         "(default: the preset's)")
        sub.add_argument("--dataset", choices=tuple(runner.DATASETS))
        sub.add_argument("--epochs", type=_positive)
        sub.add_argument("--train-size", type=_size, help="stratified training subset, or 'all'")
        sub.add_argument("--test-size", type=_size, help="stratified test subset, or 'all'")
        sub.add_argument("--batch-size", type=_positive)
        sub.add_argument("--data-dir", help="a .npz or a folder with cifar10.npz / cifar100.npz "
                         "(default: $KERAS_WE_DATA_DIR, else keras.datasets)")
        sub.add_argument("--out", required=True, help="output folder")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
        options = sub.add_argument_group("how the runs train (the defaults are every preset's)")
        options.add_argument("--steps-per-execution", type=_positive,
                             help="training steps per call into the compiled step (default: 1; "
                                  "not with the torch backend, nor with repr or dsd)")
        options.add_argument("--jit-compile", choices=tuple(runner.JIT_COMPILE),
                             help="compile the step with XLA (torch: torch.compile); "
                                  "default: auto, Keras's choice")
        options.add_argument("--dtype-policy", choices=runner.DTYPE_POLICIES,
                             help="the network's dtype policy (default: float32)")
        options.add_argument("--augment", choices=runner.AUGMENT,
                             help="where the training images are augmented: host (NumPy, the "
                                  "default) or device (uint8 batches, augmented in the training "
                                  "step; other crops than host)")

    def described(text):
        # The epilog's list of presets keeps its lines; so the description is wrapped here.
        return dict(description=textwrap.fill(text, width=79), epilog=_presets_epilog(),
                    formatter_class=argparse.RawDescriptionHelpFormatter)

    train = commands.add_parser(
        "train", help=f"train one run (default preset: {runner.DEFAULT_PRESET})",
        **described("Train one model with one method and one seed: the preset's first model, "
                    "dataset, subset sizes, epochs and batch size unless given."))
    common(train)
    train.add_argument("--method", choices=runner.methods(), default="we-paper")
    train.add_argument("--seed", type=int, default=0)

    compare = commands.add_parser(
        "compare", help=f"paired runs of several methods and seeds (default preset: {runner.DEFAULT_PRESET})",
        **described("Train every method for every seed (paired: one seed, one initialization and "
                    "data order), then write summary.json, table.md, table.csv and plots."))
    common(compare)
    compare.add_argument("--methods", type=_choices_list(runner.methods()),
                         help="comma-separated (default: the preset's)")
    compare.add_argument("--seeds", type=_int_list, help="comma-separated (default: the preset's)")
    compare.add_argument("--parallel", type=_positive, default=1,
                         help="runs trained at once, each in its own process, printing one line "
                              "per epoch; its whole output in OUT/runs/<run>/train.log (default: 1)")

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
    settings = dict(runner.PRESETS[args.preset])
    models = settings.pop("models")
    if args.model:
        models = (args.model,)
    for key in ("dataset", "methods", "seeds", "epochs", "train_size", "test_size", "batch_size"):
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = None if value == ALL else value
    if args.command == "train":
        models = models[:1]
        settings.update(methods=(args.method,), seeds=(args.seed,))
    options = {key: getattr(args, key) for key in runner.OPTION_NAMES if getattr(args, key) is not None}
    verbose = 0 if args.quiet else 1
    try:
        plans = {model: runner.plan(model=model, data_dir=args.data_dir, **settings, **options)
                 for model in models}
        print(describe(args.command, args.preset, models, settings, args.out,
                       next(iter(plans.values()))[0], getattr(args, "parallel", 1)), flush=True)
        # Everything that could fail later fails now, before any training.
        runner.check_requirements(plots=args.command == "compare")
        runner.check_data(next(iter(plans.values()))[0])
    except (ImportError, ValueError, TypeError, OSError) as error:
        print(f"keras-we: error: {error}", file=sys.stderr)
        return 2
    if args.command == "train":
        record = runner.train_run(plans[models[0]][0], args.out, verbose=verbose)
        print(f"final test top-1 {100 * record['final_test_accuracy']:.2f}%, "
              f"best {100 * record['best_test_accuracy']:.2f}% -> {args.out}")
        return 0
    status, failed = 0, []
    for model, configs in plans.items():
        out = args.out if len(plans) == 1 else os.path.join(args.out, model)
        # The table is printed before plotting, so a failing plot loses nothing.
        summary = runner.compare(configs, out, verbose=verbose, plots=False, parallel=args.parallel)
        failed += summary["failed"]
        print(f"\n{model} on {settings['dataset']}, {settings['epochs']} epochs "
              f"({len(summary['runs'])} of {len(configs)} runs finished; tables in {out}):")
        if not summary["runs"]:
            continue
        print(runner.format_table(summary["table"]), flush=True)
        try:
            runner.plot_runs(summary["runs"], out)
        except Exception as error:
            print(f"keras-we: error: plotting into {out} failed: {type(error).__name__}: {error}",
                  file=sys.stderr)
            status = 1
    if failed:
        print(f"keras-we: error: {len(failed)} run(s) failed (see 'failed' in summary.json):",
              file=sys.stderr)
        for failure in failed:
            print(f"  {failure['run']}: {failure['error']}", file=sys.stderr)
        status = 1
    return status


def describe(command, preset, models, settings, out, config=None, parallel=1):
    """The effective setting of a `train` or `compare` call, in one line;
    with `config` (one of its runs), also how the runs train."""

    def size(value):
        return ALL if value is None else str(value)

    methods = "method" if command == "train" else "methods"
    seeds = "seed" if command == "train" else "seeds"
    return (
        f"keras-we {command}: preset {preset}; model{'s' if len(models) > 1 else ''} {', '.join(models)}; "
        f"{settings['dataset']}, train {size(settings['train_size'])} / test {size(settings['test_size'])} "
        f"images; {settings['epochs']} epochs, batch {settings['batch_size']}; "
        f"{methods} {','.join(settings['methods'])}; {seeds} {','.join(map(str, settings['seeds']))}; "
        f"backend {keras.backend.backend()}"
        + ("" if config is None else
           f"; steps/execution {config.steps_per_execution}, jit_compile {config.jit_compile}, "
           f"dtype {config.dtype_policy}, augment {config.augment}")
        + (f"; {parallel} runs at once" if parallel > 1 else "")
        + f"; out {out}"
    )


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
