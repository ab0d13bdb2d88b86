"""One Weight Evolution step of one model, in this process: median and
minimum of 25 steps after two warm-up calls.

Meant for A/B comparisons of two checkouts, alternating, on a noisy machine
(only the step is timed, no training step):

    for rep in 1 2; do for root in . ../old; do
      KERAS_BACKEND=tensorflow python benchmarks/evolution_step_ab.py $root resnet56
    done; done

A third argument times the step once per bucket floor
(`keras_we.plan.MIN_BUCKET_BYTES`, comma-separated bytes):

    KERAS_BACKEND=torch python benchmarks/evolution_step_ab.py . resnet56 0,262144,524288,1048576
"""

import os
import statistics
import sys
import time


def main():
    root, name = os.path.abspath(sys.argv[1]), sys.argv[2]
    sys.path[:0] = [root, os.path.join(root, "benchmarks")]
    import keras_we
    from keras_we import plan

    assert keras_we.__file__.startswith(root), keras_we.__file__
    floors = [int(f) for f in sys.argv[3].split(",")] if len(sys.argv) > 3 else [None]
    for floor in floors:
        where = root
        if floor is not None:
            plan.MIN_BUCKET_BYTES = floor
            where += f", floor {floor} B"
        time_step(name, where)


def time_step(name, where):
    import keras

    import keras_we
    from evolution_speed import trained_looking
    from keras_we.evolution import EvolutionOptions, evolver_for

    keras.utils.set_random_seed(0)
    model = keras_we.models.get(name)
    trained_looking(model)
    evolver = evolver_for(model, EvolutionOptions())
    state = {"conv_counter": 0, "gamma_counter": 0, "beta_counter": 0}
    evolver(30, state)
    evolver(30, state)
    times = []
    for _ in range(25):
        start = time.perf_counter()
        evolver(30, state)
        times.append(time.perf_counter() - start)
    print(f"{keras.backend.backend()} {name} {where}, {len(evolver.plan.buckets)} buckets: "
          f"median {statistics.median(times) * 1000:.1f} ms, min {min(times) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
