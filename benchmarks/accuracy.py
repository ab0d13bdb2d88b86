"""Does Weight Evolution help? Runs a preset of paired runs, prints its tables.

    python benchmarks/accuracy.py --preset cpu --out runs/cpu      # about 1 h, 2 CPU cores
    python benchmarks/accuracy.py --preset paper --out runs/paper  # a GPU, 200 epochs

Any `keras-we compare` option narrows a preset, e.g. `--epochs 30` or
`--model resnet56`. Finished runs are kept, so an interrupted call resumes.
Each run's `run.json` records its wall time (`train_seconds`).
"""

import sys

from keras_we.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
