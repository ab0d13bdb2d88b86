"""Does Weight Evolution help? Runs a preset of paired runs, prints its tables.

    python benchmarks/accuracy.py --preset cpu --out runs/cpu      # about 20 min, 2 CPU cores
    python benchmarks/accuracy.py --preset cpu --out runs/peers \
        --methods baseline,we-reference,graft-noise,graft-internal,grafting,grafting-alone,repr,dsd  # WE and its peers
    python benchmarks/accuracy.py --preset paper --out runs/paper  # a GPU, 200 epochs
    python benchmarks/accuracy.py --preset smoke --out runs/smoke  # a check, a few minutes

The same as `keras-we compare` (without `--preset`, the `cpu` preset). Any
`keras-we compare` option narrows a preset, e.g. `--epochs 30` or
`--model resnet56`. The effective setting is printed before training.
Finished runs are kept, so an interrupted call resumes. Each run's
`run.json` records its wall time (`train_seconds`).
"""

import sys

from keras_we.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
