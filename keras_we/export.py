"""Export a trained model as a TensorFlow SavedModel for TF-Serving.

Weight Evolution lives entirely in a callback (or in `keras_we.evolve`
calls): it rewrites the values of the model's own conv kernels and
BatchNorm vectors and adds no layer, variable or op to the model. A model
trained with it therefore exports like any other Keras model; the
functions here add what serving needs on top of `model.export`:

- a numbered version folder under a base folder (`base_dir/1`,
  `base_dir/2`, ...), the layout TF-Serving watches, never overwritten;
- a check that the reloaded SavedModel's `serving_default` signature gives
  the same outputs as `model.predict`;
- the version folder appears only once that check has passed, so a
  TF-Serving instance watching `base_dir` never loads a half-written or
  wrong export.

Backends: TensorFlow exports natively; JAX exports through `jax2tf`
(TensorFlow must be installed; the graph then holds the model as one
`XlaCallModule` op). The PyTorch backend cannot write a SavedModel here:
Keras routes it through `torch_xla`, which is not a dependency of this
package. Save the model as `.keras` and export it from a process running
the TensorFlow backend (`KERAS_BACKEND=tensorflow keras-we export ...`).
"""

import contextlib
import logging
import os
import re
import shutil
import tempfile

import keras
import numpy as np

from keras_we.validation import check_int

SIGNATURE = "serving_default"
TOLERANCE = 1e-4
EXPORT_BACKENDS = ("tensorflow", "jax")
SAMPLE_BATCH = 4
SAMPLE_SEED = 0
_OUTPUT_KEY = re.compile(r"output_(\d+)")


class ExportMismatchError(RuntimeError):
    """Raised when the reloaded SavedModel disagrees with the Keras model."""


def export_for_serving(model, base_dir, version=None, sample=None):
    """Exports `model` as a TF-Serving version folder and checks the export.

    Writes a TensorFlow SavedModel (`model.export(..., format=
    "tf_saved_model")`) to `base_dir/<version>/`, the layout that
    TF-Serving expects (`--model_base_path=base_dir`). The SavedModel is
    first written to a hidden temporary folder inside `base_dir`, reloaded
    with `tf.saved_model.load`, and its `serving_default` signature is run
    on a sample batch and compared with `model.predict`; the largest
    absolute difference is printed. Only if it is at most `1e-4` is the
    folder renamed to its version number, so TF-Serving (which ignores
    non-numeric folders) never sees a failed export.

    Weight Evolution leaves nothing in the exported graph: the SavedModel
    holds exactly the model's weights and its forward pass.

    Example:

    ```python
    model.fit(train, epochs=30, callbacks=[keras_we.WeightEvolution()])
    path = keras_we.export.export_for_serving(model, "serving/cifar_resnet")
    # serving/cifar_resnet/1; the next call writes serving/cifar_resnet/2.
    ```

    Args:
        model: a built `keras.Model`.
        base_dir: the model's base folder for TF-Serving (a `str` or
            path-like): an existing folder, or a path where one can be
            created (it is created if missing, with its parents).
        version: a positive integer, the name of the version folder, or
            `None` for one more than the highest version already in
            `base_dir` (1 in an empty folder), so that TF-Serving, which
            serves the highest version, picks up the new export. Defaults
            to `None`.
        sample: inputs to compare the export and the model on, in any form
            `model.predict` takes (an array, a list in the order of
            `model.inputs`, or a dict keyed by input name), or `None` for a
            deterministic random batch of `4` matching the model's inputs.
            Defaults to `None`.

    Returns:
        The path of the version folder, as a string.

    Raises:
        TypeError: `version` is not an integer, `model` is not a
            `keras.Model`, or `base_dir` is not a path.
        ValueError: `version` is below 1, the model is not built,
            `base_dir` is empty, or no sample batch can be made for an
            input with unknown dimensions.
        NotADirectoryError: (an `OSError`) `base_dir`, or a folder above
            it, exists and is not a folder (for example a file). Checked
            before anything is exported or written.
        FileExistsError: `base_dir/<version>` already exists; it is never
            overwritten.
        NotImplementedError: the Keras backend cannot write a SavedModel
            (PyTorch without `torch_xla`).
        ExportMismatchError: (a `RuntimeError`) the reloaded SavedModel's
            outputs differ from `model.predict` by more than `1e-4`.
    """
    if version is not None:
        version = check_int("version", version, minimum=1)
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model; got {type(model).__name__}.")
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built, so it cannot be exported. "
            "Call it on a batch or build it first."
        )
    base_dir = _check_base_dir(base_dir)
    _check_backend()

    os.makedirs(base_dir, exist_ok=True)
    if version is None:
        version = next_version(base_dir)
    path = os.path.join(base_dir, str(version))
    if os.path.lexists(path):
        raise FileExistsError(
            f"Version folder {path!r} already exists; export_for_serving never "
            "overwrites a version. Pass another `version`, or `version=None` "
            "for the next free one."
        )
    if sample is None:
        sample = sample_inputs(model)

    staging = tempfile.mkdtemp(prefix=f".export-{version}-", dir=base_dir)
    try:
        written = os.path.join(staging, "saved_model")
        with _quiet_tensorflow():
            model.export(written, format="tf_saved_model", verbose=False)
        difference = check_export(model, written, sample)
        if os.path.lexists(path):  # another export took the number meanwhile
            raise FileExistsError(
                f"Version folder {path!r} appeared during the export; it was "
                "not overwritten. Export again."
            )
        os.rename(written, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(
        f"Exported {model.name!r} to {path} ({keras.backend.backend()} backend); "
        f"{SIGNATURE} vs model.predict: max abs difference {difference:.3g}"
    )
    return path


def export_run(run_dir, base_dir, version=None):
    """Exports the `model.keras` of a finished run for TF-Serving.

    `keras_we.experiments.runner.train_run` (and `keras-we train` / `compare`)
    saves each run's final model as `run_dir/model.keras`. This loads it
    (without its optimizer) and passes it to `export_for_serving`.

    Example:

    ```python
    keras_we.export.export_run("runs/cpu/resnet20_we-paper_seed0", "serving/resnet20")
    ```

    Args:
        run_dir: a run folder holding `model.keras` (a `str` or
            path-like).
        base_dir: the model's base folder for TF-Serving: an existing
            folder, or a path where one can be created.
        version: a positive integer, or `None` for the next free one.
            Defaults to `None`.

    Returns:
        The path of the version folder, as a string.

    Raises:
        FileNotFoundError: `run_dir` or `run_dir/model.keras` does not
            exist.
        NotADirectoryError: (an `OSError`) `run_dir` is not a folder, or
            `base_dir` (or a folder above it) exists and is not a folder.
        TypeError: `run_dir` or `base_dir` is not a path.
        See `export_for_serving` for the others. The arguments are checked
        before the backend and before the model is loaded.
    """
    if version is not None:
        version = check_int("version", version, minimum=1)
    run_dir = _path_argument("run_dir", run_dir, "a finished run folder holding model.keras")
    if not os.path.isdir(run_dir):
        error = NotADirectoryError if os.path.lexists(run_dir) else FileNotFoundError
        what = "is not a folder" if os.path.lexists(run_dir) else "does not exist"
        raise error(
            f"`run_dir` must be a finished run folder holding model.keras "
            f"(keras-we train / compare write it at the end); run_dir={run_dir!r} {what}."
        )
    model_path = os.path.join(run_dir, "model.keras")
    if not os.path.isfile(model_path):
        raise FileNotFoundError(
            f"No model at {model_path!r}: `run_dir` must be a finished run "
            "folder (keras-we train / compare write model.keras at the end)."
        )
    _check_base_dir(base_dir)
    _check_backend()
    # The custom layers and optimizer of the bundled models are registered
    # by `import keras_we`, which importing this module implies.
    model = keras.saving.load_model(model_path, compile=False)
    return export_for_serving(model, base_dir, version=version)


def next_version(base_dir):
    """One more than the highest numeric folder in `base_dir` (1 if none)."""
    if not os.path.isdir(base_dir):
        return 1
    versions = [
        int(name)
        for name in os.listdir(base_dir)
        if name.isdigit() and os.path.isdir(os.path.join(base_dir, name))
    ]
    return max(versions, default=0) + 1


def sample_inputs(model, batch_size=SAMPLE_BATCH, seed=SAMPLE_SEED):
    """A deterministic random batch matching `model.inputs`.

    Floats are standard normal, integers 0 or 1, booleans random. Returns
    an array for a single-input model, else a list in `model.inputs` order.
    """
    rng = np.random.default_rng(seed)
    arrays = []
    for tensor in _model_inputs(model):
        shape = tuple(tensor.shape)[1:]
        if any(dim is None for dim in shape):
            raise ValueError(
                f"Input {tensor.name!r} of model {model.name!r} has unknown "
                f"dimensions {tuple(tensor.shape)}; pass a `sample` batch to "
                "compare the export on."
            )
        dtype = np.dtype(keras.backend.standardize_dtype(tensor.dtype))
        shape = (batch_size,) + shape
        if dtype == np.bool_:
            arrays.append(rng.random(shape) < 0.5)
        elif np.issubdtype(dtype, np.integer):
            arrays.append(rng.integers(0, 2, shape).astype(dtype))
        else:
            arrays.append(rng.standard_normal(shape).astype(dtype))
    return arrays[0] if len(arrays) == 1 else arrays


def check_export(model, path, sample, tolerance=TOLERANCE):
    """Compares a SavedModel's `serving_default` with `model.predict`.

    Returns the largest absolute difference over all outputs; raises
    `ExportMismatchError` above `tolerance`, or if the signature's outputs
    do not correspond to the model's.
    """
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    if SIGNATURE not in loaded.signatures:
        raise ExportMismatchError(
            f"The SavedModel at {path!r} has no {SIGNATURE!r} signature; "
            f"it has {sorted(loaded.signatures)}."
        )
    signature = loaded.signatures[SIGNATURE]
    feed = _signature_feed(model, signature, sample)
    served = {key: value.numpy() for key, value in signature(**feed).items()}
    expected = model.predict(sample, verbose=0)
    pairs = _match_outputs(expected, served)
    difference = 0.0
    for name, want, got in pairs:
        want = np.asarray(keras.ops.convert_to_numpy(want))
        if want.shape != got.shape:
            raise ExportMismatchError(
                f"Output {name!r} of the export has shape {got.shape}, "
                f"model.predict gives {want.shape}."
            )
        if want.size:
            delta = np.abs(want.astype("float64") - got.astype("float64"))
            difference = max(difference, float(np.nan_to_num(delta, nan=np.inf).max()))
    if difference > tolerance:
        raise ExportMismatchError(
            f"The exported {SIGNATURE!r} signature differs from model.predict by "
            f"up to {difference:.3g} (> {tolerance:g}) on the sample batch; "
            "the export was discarded."
        )
    return difference


@contextlib.contextmanager
def _quiet_tensorflow():
    # `model.export` logs "Assets written to <staging folder>" at INFO level,
    # a path that no longer exists once the export is renamed.
    logger = logging.getLogger("tensorflow")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _path_argument(name, value, expected):
    """`value` as a `str` path, or a `TypeError`/`ValueError` naming `name`."""
    try:
        path = os.fspath(value)
    except TypeError:
        raise TypeError(
            f"`{name}` must be a path (a str or os.PathLike) of {expected}; "
            f"got {value!r} of type {type(value).__name__}."
        ) from None
    path = os.fsdecode(path)
    if not path:
        raise ValueError(f"`{name}` must be the path of {expected}; got an empty path.")
    return path


def _check_base_dir(base_dir):
    """`base_dir` as a `str`, once it is known to be, or to be creatable as,
    a folder: the path and its nearest existing ancestor must be folders."""
    expected = "a folder (created if missing)"
    path = _path_argument("base_dir", base_dir, expected)
    probe = os.path.abspath(path)
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        if probe == os.path.abspath(path):
            reason = f"base_dir={path!r} exists and is not a folder"
        else:
            reason = f"base_dir={path!r} cannot be created: {probe!r} is not a folder"
        raise NotADirectoryError(
            f"`base_dir` must be {expected}, the TF-Serving base folder that "
            f"receives base_dir/<version>/; {reason}. Pass a folder path."
        )
    return path


def _check_backend():
    backend = keras.backend.backend()
    if backend in EXPORT_BACKENDS:
        return
    if backend == "torch":
        try:
            import torch_xla  # noqa: F401
        except ImportError:
            pass
        else:
            return  # Keras' experimental torch -> StableHLO -> SavedModel path.
        raise NotImplementedError(
            "The PyTorch backend cannot export a TensorFlow SavedModel here: "
            "Keras exports torch models through `torch_xla`, which is not "
            "installed. Save the model (`model.save('model.keras')`) and "
            "export it from a TensorFlow-backend process, e.g. "
            "`KERAS_BACKEND=tensorflow keras-we export RUN_DIR --base-dir DIR`, "
            "or `keras_we.export.export_run(...)` under KERAS_BACKEND=tensorflow."
        )
    raise NotImplementedError(
        f"The {backend!r} Keras backend cannot export a TensorFlow SavedModel; "
        "save the model as .keras and export it under KERAS_BACKEND=tensorflow."
    )


def _model_inputs(model):
    inputs = getattr(model, "inputs", None)
    if inputs:
        return list(inputs)
    # A subclassed or Sequential model built without `Input`: Keras builds
    # the signature from the input shape it was built with.
    shape = getattr(model, "_build_shapes_dict", None) or {}
    shapes = list(shape.values())
    if len(shapes) == 1 and isinstance(shapes[0], (tuple, list)):
        return [keras.KerasTensor(tuple(shapes[0]), dtype=model.input_dtype, name="input")]
    raise ValueError(
        f"Cannot tell the inputs of model {model.name!r}; pass a `sample` batch."
    )


def _signature_feed(model, signature, sample):
    """Maps `sample` to the keyword arguments of the serving signature."""
    import tensorflow as tf

    _, specs = signature.structured_input_signature
    names = list(specs)

    def tensor(name, value):
        return tf.constant(np.asarray(keras.ops.convert_to_numpy(value)), dtype=specs[name].dtype)

    if isinstance(sample, dict):
        if set(sample) != set(names):
            raise ValueError(
                f"`sample` has inputs {sorted(sample)}, the export expects {sorted(names)}."
            )
        return {name: tensor(name, value) for name, value in sample.items()}
    values = list(sample) if isinstance(sample, (list, tuple)) else [sample]
    if len(values) != len(names):
        raise ValueError(
            f"`sample` holds {len(values)} input(s); the export expects "
            f"{len(names)}: {sorted(names)}."
        )
    if len(names) == 1:
        return {names[0]: tensor(names[0], values[0])}
    input_names = [t.name for t in _model_inputs(model)]
    if sorted(input_names) != sorted(names):
        raise ValueError(
            f"Cannot match the model inputs {input_names} to the signature "
            f"inputs {sorted(names)}; pass `sample` as a dict keyed by the latter."
        )
    return {name: tensor(name, value) for name, value in zip(input_names, values)}


def _match_outputs(expected, served):
    """Pairs `model.predict` outputs with the signature's, as (name, want, got)."""
    if isinstance(expected, dict) and set(expected) == set(served):
        return [(key, expected[key], served[key]) for key in sorted(served)]
    flat = keras.tree.flatten(expected)
    numbered = {int(m.group(1)): k for k in served if (m := _OUTPUT_KEY.fullmatch(k))}
    if len(numbered) == len(served) == len(flat):
        return [(numbered[i], want, served[numbered[i]]) for i, want in enumerate(flat)]
    if len(flat) == len(served) == 1:
        key = next(iter(served))
        return [(key, flat[0], served[key])]
    raise ExportMismatchError(
        f"The export's outputs {sorted(served)} do not correspond to the "
        f"model's {len(flat)} output(s)."
    )
