"""The few places where Keras backends differ for Weight Evolution: every
backend switch of the evolution step is in this module."""

import functools
import os

import keras
import numpy as np
from keras import ops


def stable_argsort(x):
    """`argsort` along the last axis that keeps tied items in index order.

    Forward matching pairs items by rank, so tied scores (dead filters are
    all zero) must rank the same way on every backend. JAX and PyTorch sort
    stably through `keras.ops.argsort`; TensorFlow and NumPy (whose default
    sort may be an unstable SIMD quicksort) need to be asked.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.argsort(x, axis=-1, stable=True)
    if keras.backend.backend() == "numpy":
        return np.argsort(x, axis=-1, kind="stable")
    return ops.argsort(x, axis=-1)


def reshape(x, shape):
    """`keras.ops.reshape`, without its check for symbolic tensors on
    PyTorch, which runs the step eagerly: flattening the arguments to look
    for one costs tens of microseconds a call, and a ResNet-56 step
    reshapes some 330 times (each tensor to its view and back)."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.reshape(ops.convert_to_tensor(x), shape)
    return ops.reshape(x, shape)


def concatenate(tensors, axis):
    """`keras.ops.concatenate` (one tensor stays as it is); on PyTorch
    `torch.cat`, since Keras converts and type-checks each tensor (a
    ResNet-56's 110 BatchNorm vectors: 150 us against 11 us)."""
    if len(tensors) == 1:
        return tensors[0]
    if keras.backend.backend() == "torch":
        import torch

        return torch.cat(tensors, axis)
    return ops.concatenate(tensors, axis=axis)


def first_extreme(values, largest):
    """Per position of axes 1.., the first element along axis 0 of largest
    (smallest) magnitude, e.g. per (channel, filter) of filters `(S, C, P)`.

    JAX and PyTorch promise that `argmax`/`argmin` (and PyTorch's
    `max`/`min` along an axis) return the first index of a tie; TensorFlow
    does not, so there it is spelled out (a compare with the extreme, then
    the least index that matches), which XLA on JAX would compute with two
    more full-size copies. A NaN may be picked; the index is always in
    range.
    """
    magnitudes = ops.abs(values)
    if keras.backend.backend() == "torch":
        import torch

        # `min`/`max` along a short strided axis are as fast as along a
        # contiguous one, where `argmin`/`argmax` are 10x slower: on a
        # (9, 11000) tensor, 0.12 ms against 1.9 ms (0.26 ms after a copy
        # to the last axis); `gather` is 3x faster than `take_along_dim`.
        first = (torch.max if largest else torch.min)(magnitudes, dim=0).indices
        return torch.gather(values, 0, first[None])[0]
    if keras.backend.backend() == "tensorflow" and values.shape[0] <= UNROLLED_ROWS:
        return _first_extreme_unrolled(values, magnitudes, largest)
    return ops.take_along_axis(values, _first_extreme_index(magnitudes, largest)[None], axis=0)[0]


# XLA on the CPU reduces along a short leading axis slowly: on a (9, 12288)
# tensor, `max` along axis 0 takes 0.2 ms where 8 elementwise `maximum`s take
# 0.01 ms. TensorFlow's first extreme of up to this many rows (a 7x7 kernel)
# is found row by row instead.
UNROLLED_ROWS = 49


def _first_extreme_unrolled(values, magnitudes, largest):
    """`first_extreme` as a walk over the rows: a later row replaces the
    best so far only if strictly better, so that the first one wins a tie
    (a NaN never replaces: it compares false)."""
    best, extreme = magnitudes[0], values[0]
    for row in range(1, values.shape[0]):
        better = magnitudes[row] > best if largest else magnitudes[row] < best
        best = ops.where(better, magnitudes[row], best)
        extreme = ops.where(better, values[row], extreme)
    return extreme


def _first_extreme_index(x, largest):
    """Index along axis 0 of the first largest (smallest) value of `x` (on
    TensorFlow and JAX; see `first_extreme`)."""
    if keras.backend.backend() == "jax":
        return ops.argmax(x, axis=0) if largest else ops.argmin(x, axis=0)
    target = ops.max(x, axis=0, keepdims=True) if largest else ops.min(x, axis=0, keepdims=True)
    size = x.shape[0]
    positions = ops.reshape(ops.arange(size, dtype="int32"), (size,) + (1,) * (len(x.shape) - 1))
    first = ops.min(ops.where(x == target, positions, size), axis=0)
    return ops.minimum(first, size - 1)  # a NaN matches nothing


_LIBC = []


def release_free_memory():
    """Gives the C heap's free pages back to the system (glibc's
    `malloc_trim(0)`); does nothing without glibc.

    Called between the buckets of a step: every backend allocates a
    bucket's temporaries from the C heap on the CPU, and glibc keeps much
    of what is freed for later, so that each bucket's temporaries add to the
    process's memory. Measured on a ResNet-50 step on the CPU (90 MB of
    evolvable weights): 65 to 84 MB above the level before the step on
    TensorFlow, 93 to 112 MB on JAX; 25 and 5 to 29 MB with it.
    """
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
            _LIBC.append(libc.malloc_trim)
        except (OSError, AttributeError, TypeError):
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)


def resident_bytes():
    """The process's resident memory in bytes (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _page_size()
    except OSError:
        return 0


@functools.lru_cache(maxsize=None)
def _page_size():
    return os.sysconf("SC_PAGE_SIZE")


# PyTorch's `magnitude_sums` works through a scratch buffer of at most this
# many bytes, a tensor larger than that a block of columns at a time.
SCRATCH_BYTES = 2**18


def magnitude_sums(tensors):
    """`sum(abs(x), axis=0)` of each 2-D tensor `x` in `tensors` (one dtype).

    PyTorch runs op by op and would allocate every tensor's magnitudes
    anew, and glibc keeps much of that memory from the system (a ResNet-50's
    norms held 52 MB above the 90 MB of weights); it writes them into one
    scratch buffer of at most `SCRATCH_BYTES` instead, a block of whole
    columns at a time (the sums are the same).
    """
    if keras.backend.backend() != "torch" or not tensors:
        return [ops.sum(ops.abs(x), axis=0) for x in tensors]
    import torch

    tensors = [ops.convert_to_tensor(x) for x in tensors]
    itemsize = tensors[0].element_size()
    size = min(max(x.numel() for x in tensors), max(SCRATCH_BYTES // itemsize, max(x.shape[0] for x in tensors)))
    scratch = torch.empty(size, dtype=tensors[0].dtype, device=tensors[0].device)
    sums = []
    for x in tensors:
        rows, columns = x.shape
        block = max(1, size // max(rows, 1))
        parts = []
        for start in range(0, columns, block):
            part = x[:, start:start + block]
            magnitudes = torch.abs(part, out=scratch[:part.numel()].view(part.shape))
            parts.append(torch.sum(magnitudes, dim=0))
        sums.append(parts[0] if len(parts) == 1 else torch.cat(parts))
    return sums


def index_tensor(array):
    """A NumPy array of indices as a tensor: int64 on PyTorch, whose
    indexing ops would convert any other at every use, else int32."""
    return ops.convert_to_tensor(array, "int64" if keras.backend.backend() == "torch" else "int32")


def take(x, indices):
    """`keras.ops.take(x, indices, axis=0)` for indices in range. On
    PyTorch `index_select`: Keras's `take` wraps negative indices first,
    with three temporaries the size of `indices` (1.2 MB for the 52,000
    items of a MobileNetV2) and a slow `where`."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.index_select(ops.convert_to_tensor(x), 0, ops.convert_to_tensor(indices).long())
    return ops.take(x, indices, axis=0)


def segment_sum(data, segment_ids, num_segments):
    """`keras.ops.segment_sum` over a 1-D `data`.

    On PyTorch, Keras reduces in float32 (float64 scores would lose
    precision) through a slow general path; `index_add` keeps the dtype.
    """
    if keras.backend.backend() == "torch":
        return _torch_segment(data, segment_ids, num_segments, "sum")
    return ops.segment_sum(data, segment_ids, num_segments=num_segments)


def segment_max(data, segment_ids, num_segments):
    """`keras.ops.segment_max` over a 1-D `data` (see `segment_sum`)."""
    if keras.backend.backend() == "torch":
        return _torch_segment(data, segment_ids, num_segments, "amax")
    return ops.segment_max(data, segment_ids, num_segments=num_segments)


def segment_min(data, segment_ids, num_segments):
    """`keras.ops.segment_min` over a 1-D `data` (see `segment_sum`)."""
    if keras.backend.backend() == "torch":
        return _torch_segment(data, segment_ids, num_segments, "amin")
    return ops.segment_min(data, segment_ids, num_segments=num_segments)


def _torch_segment(data, segment_ids, num_segments, reduction):
    import torch

    data = ops.convert_to_tensor(data)
    ids = ops.convert_to_tensor(segment_ids).long()
    out = torch.zeros(num_segments, dtype=data.dtype, device=data.device)
    if reduction == "sum":
        return out.index_add_(0, ids, data)
    # Every segment here has items (a layer has filters); an empty one
    # would read 0.
    return out.scatter_reduce_(0, ids, data, reduction, include_self=False)


def static_shapes():
    """Whether evolution steps compile with static shapes (JAX, and
    TensorFlow with XLA) rather than run op by op (PyTorch, eager).

    Compiled steps cross every column of a bucket over, keep the paired
    ones and store every member whole (`steps.crossover`). Eager steps read
    only the paired columns (known on the host by then) and write them back
    in place (`steps.crossover_in_place`, `gather_columns`,
    `scatter_columns`).
    """
    return keras.backend.backend() != "torch"


def gather_columns(values, rows, indices):
    """The columns `indices[m]` (NumPy ints) of each `values[m]` seen as
    `(rows, -1)`, side by side in one `(rows, sum(len(i) for i in indices))`
    tensor: nothing but those columns is copied."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.cat([torch.reshape(value, (rows, -1)).index_select(1, index)
                          for value, index in zip(values, _torch_indices(indices, values[0].device))], 1)
    return ops.concatenate([ops.take(reshape(value, (rows, -1)), index, axis=1)
                            for value, index in zip(values, indices)], axis=1)


def scatter_columns(variables, values, rows, indices, columns):
    """The inverse of `gather_columns`: stores `columns` as the columns
    `indices[m]` of each variable `m` (whose value is `values[m]`) seen as
    `(rows, -1)`.

    In place on PyTorch, so that no copy of a variable is made (a
    non-contiguous value is copied, updated and assigned); elsewhere each
    variable's whole new value is assigned.
    """
    ends = np.cumsum([len(index) for index in indices]).tolist()
    parts = [columns[:, start:end] for start, end in zip([0, *ends[:-1]], ends)]
    if keras.backend.backend() == "torch":
        import torch

        with torch.no_grad():
            for variable, value, index, part in zip(
                    variables, values, _torch_indices(indices, values[0].device), parts):
                if value.is_contiguous():
                    value.view(rows, -1).index_copy_(1, index, part.to(value.dtype))
                else:
                    view = value.reshape(rows, -1).index_copy(1, index, part.to(value.dtype))
                    variable.assign(view.reshape(value.shape))
        return
    for variable, value, index, part in zip(variables, values, indices, parts):
        view = ops.transpose(reshape(value, (rows, -1)))
        view = ops.scatter_update(view, ops.expand_dims(ops.convert_to_tensor(index, "int32"), 1),
                                  ops.transpose(part))
        variable.assign(reshape(ops.transpose(view), tuple(variable.shape)))


def _torch_indices(indices, device):
    """NumPy index arrays as PyTorch tensors, made in one conversion (a
    bucket has up to a hundred members)."""
    import torch

    flat = torch.from_numpy(np.concatenate(indices).astype("int64", copy=False)).to(device)
    return torch.split(flat, [len(index) for index in indices])


def variable_function(function, variables, writes=False, run_eagerly=False, jit_compile=True):
    """Runs `function(values, *args)` on the current values of `variables`.

    Returns `call(*args, write=None)`, compiled where the backend allows it
    (unless `run_eagerly`, which runs op by op on every backend, for
    debugging and for steps used once).
    `values` are the variables' values in order. With `writes=True`,
    `function` returns `(new_values, outputs)`: the new values are stored in
    the variables and `call` returns `outputs`.

    TensorFlow reads and writes the variables inside one `tf.function`
    compiled with XLA, but for `tf.distribute` variables (the variables are
    captured, so those stay what they are) or with `jit_compile=False`, and
    so writes every variable (an unchanged value is stored back as it
    was). XLA copies every variable it reads (on the CPU: a ResNet-50's 89
    MB of kernels read for their norms took 89 MB more), where a plain
    graph reads them in place. JAX (`jax.jit`) and PyTorch
    (eager, without autograd) compute the new values and then store those
    where `write[i]` is true, or all of them when `write` is None.
    """
    name = keras.backend.backend()
    if name == "tensorflow" and not run_eagerly:
        import tensorflow as tf

        # XLA fuses the step's many small ops; it cannot reach the replicas
        # of `tf.distribute` variables, which then run uncompiled.
        distributed = any(
            isinstance(v.value, tf.distribute.DistributedValues) for v in variables)

        # A `partial`, not a closure: TensorFlow counts traces per code
        # object, so that the one trace of each of a step's functions (one
        # per bucket) would add up to a warning about frequent retracing.
        run = tf.function(functools.partial(_read_write, function, variables, writes),
                          autograph=False, jit_compile=jit_compile and not distributed)
        return lambda *args, write=None: run(*args)

    if name == "jax" and not run_eagerly:
        import jax

        compiled = jax.jit(function)
    else:
        compiled = function

    def call(*args, write=None):
        with no_grad():
            result = compiled([variable.value for variable in variables], *args)
            if not writes:
                return result
            new_values, outputs = result
            for i, (variable, value) in enumerate(zip(variables, new_values)):
                if write is None or write[i]:
                    variable.assign(_placed_like(value, variable.value))
        return outputs

    return call


def _read_write(function, variables, writes, *args):
    """`function` on the values of `variables`, storing the new values it
    returns if it `writes` (TensorFlow's `variable_function`)."""
    result = function([variable.value for variable in variables], *args)
    if not writes:
        return result
    new_values, outputs = result
    for variable, value in zip(variables, new_values):
        variable.assign(value)
    return outputs


def _placed_like(value, current):
    """On JAX, `value` with the sharding of the variable's `current` value.

    A `jax.jit` output may spell an equivalent sharding differently (a
    replicated `P(None, None)` as `P()`); the variable keeps its own.
    """
    sharding = getattr(current, "sharding", None)
    if keras.backend.backend() != "jax" or sharding is None or value.sharding == sharding:
        return value
    import jax

    return jax.device_put(value, sharding)


def no_grad():
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    import contextlib

    return contextlib.nullcontext()
