"""Where JAX's CPU training time goes: one convolution's forward pass, input
gradient and kernel gradient, per backend.

    python benchmarks/conv_gradients.py                      # all backends
    python benchmarks/conv_gradients.py --backends jax,tensorflow --batch-size 64
    XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/conv_gradients.py --backends jax

Each row is a 3x3 convolution of a CIFAR ResNet-20 (batch 128, same
padding), timed as the backend's training step runs it: JAX under
`jax.jit`, TensorFlow in a `tf.function` without XLA (Keras compiles no XLA
for TensorFlow on a CPU-only machine), PyTorch eagerly with autograd.
A gradient call also runs the forward pass. Times are the median of
`--repeats` calls after two warm-up calls, in ms; the last column adds a
row's three times and weighs them by how many layers of that shape
ResNet-20 has (its 19 3x3 convolutions). Each backend runs in its own
process.
"""

import argparse
import json
import statistics
import time

# (height/width, input channels, filters, stride, layers of ResNet-20 of this shape)
SHAPES = ((32, 3, 16, 1, 1), (32, 16, 16, 1, 6), (32, 16, 32, 2, 1), (16, 32, 32, 1, 5),
          (16, 32, 64, 2, 1), (8, 64, 64, 1, 5))


def timed(function, repeats):
    function()
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def functions(backend, x, kernel, stride):
    """`(forward, input_gradient, kernel_gradient)`: calls that run and wait."""
    import keras

    def conv(x, kernel):
        return keras.ops.conv(x, kernel, strides=stride, padding="same")

    if backend == "jax":
        import jax

        def grad(argnum):
            return jax.jit(jax.grad(lambda x, k: conv(x, k).sum(), argnums=argnum))

        made = [jax.jit(conv), grad(0), grad(1)]
        return [lambda f=f: f(x, kernel).block_until_ready() for f in made]
    if backend == "tensorflow":
        import tensorflow as tf

        def grad(wrt):
            def run(x, kernel):
                with tf.GradientTape() as tape:
                    tape.watch(x if wrt == 0 else kernel)
                    total = tf.reduce_sum(conv(x, kernel))
                return tape.gradient(total, x if wrt == 0 else kernel)
            return tf.function(run, jit_compile=False)

        made = [tf.function(conv, jit_compile=False), grad(0), grad(1)]
        return [lambda f=f: f(x, kernel).numpy() for f in made]
    import torch

    def grad(wrt):
        def run():
            inputs = [x.detach().requires_grad_(wrt == 0), kernel.detach().requires_grad_(wrt == 1)]
            conv(*inputs).sum().backward()
            return inputs[wrt].grad
        return run

    def forward():
        with torch.no_grad():
            return conv(x, kernel)

    return [forward, grad(0), grad(1)]


def worker(args):
    import keras
    import numpy as np

    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    for size, channels, filters, stride, layers in SHAPES:
        x = keras.ops.convert_to_tensor(rng.normal(size=(args.batch_size, size, size, channels)).astype("float32"))
        kernel = keras.ops.convert_to_tensor(rng.normal(size=(3, 3, channels, filters)).astype("float32"))
        forward, input_grad, kernel_grad = (timed(f, args.repeats) for f in functions(backend, x, kernel, stride))
        print(json.dumps(dict(backend=backend, shape=f"{size}x{size}x{channels} -> {filters}, stride {stride}",
                              layers=layers, forward=forward, input_grad=input_grad, kernel_grad=kernel_grad)),
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from evolution_speed import rows_per_backend

    rows = rows_per_backend(__file__, args.backends.split(","), [
        "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)])

    print(f"| backend | convolution (batch {args.batch_size}) | layers | forward | forward + input gradient "
          "| forward + kernel gradient | the three, x layers |")
    print("|---|---|---|---|---|---|---|")
    totals = {}
    for r in rows:
        total = r["layers"] * (r["forward"] + r["input_grad"] + r["kernel_grad"])
        totals[r["backend"]] = totals.get(r["backend"], 0) + total
        print(f"| {r['backend']} | {r['shape']} | {r['layers']} | {r['forward']:.1f} ms "
              f"| {r['input_grad']:.1f} ms | {r['kernel_grad']:.1f} ms | {total:.0f} ms |")
    for backend, total in totals.items():
        print(f"| {backend} | ResNet-20's 19 convolutions | | | | | **{total:.0f} ms** |")


if __name__ == "__main__":
    main()
