"""`keras_we.export`: a model trained with Weight Evolution, served by TF-Serving."""

import os

import keras
import numpy as np
import pytest

import keras_we
from keras_we import export
from tests.utils import small_cnn, toy_data

BACKEND = keras.backend.backend()


def _has_torch_xla():
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return False
    return True


CAN_EXPORT = BACKEND in ("tensorflow", "jax") or (BACKEND == "torch" and _has_torch_xla())
needs_export = pytest.mark.skipif(
    not CAN_EXPORT,
    reason=f"the {BACKEND} backend cannot write a TensorFlow SavedModel: Keras "
    "exports torch models only through torch_xla, which is not installed",
)


def _trained_model():
    """The small CNN after 2 epochs with WE, evolved after the last one too."""
    model = small_cnn()
    x, y = toy_data()
    history = model.fit(
        x, y, epochs=2, batch_size=16, verbose=0,
        callbacks=[keras_we.WeightEvolution(evolve_last_epoch=True)],
    )
    assert history.history["we_conv_evolved"][-1] >= 1  # weights were evolved
    return model, x


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    if not CAN_EXPORT:
        pytest.skip(f"the {BACKEND} backend cannot write a TensorFlow SavedModel")
    import tensorflow as tf

    model, x = _trained_model()
    base = tmp_path_factory.mktemp("serving")
    path = export.export_for_serving(model, base)
    return model, x, base, path, tf.saved_model.load(path)


@needs_export
def test_serving_default_equals_keras_model(exported):
    model, x, base, path, loaded = exported
    assert path == os.path.join(str(base), "1")
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    signature = loaded.signatures["serving_default"]
    (name,) = signature.structured_input_signature[1]
    served = signature(**{name: x})
    (output,) = served.values()
    np.testing.assert_allclose(output.numpy(), model.predict(x, verbose=0), atol=1e-5)
    # Only the version folder is left: the staging folder is gone.
    assert os.listdir(base) == ["1"]


@needs_export
def test_callback_leaves_nothing_in_exported_graph(exported):
    model, _, _, _, loaded = exported
    signature = loaded.signatures["serving_default"]
    args, inputs = signature.structured_input_signature
    assert args == ()
    assert [tuple(spec.shape) for spec in inputs.values()] == [(None, 8, 8, 3)]
    outputs = signature.structured_outputs
    assert [tuple(spec.shape) for spec in outputs.values()] == [(None, 3)]

    # Exactly the model's weights (evolved values), no optimizer or callback
    # variables.
    variables = [v.numpy() for v in loaded.variables]
    weights = [keras.ops.convert_to_numpy(w) for w in model.weights]
    assert len(variables) == len(weights)
    assert sorted(v.shape for v in variables) == sorted(w.shape for w in weights)
    unmatched = list(variables)
    for weight in weights:
        match = next(
            i for i, v in enumerate(unmatched)
            if v.shape == weight.shape and np.array_equal(v, weight)
        )
        unmatched.pop(match)
    names = [v.name.lower() for v in loaded.variables]
    nodes = _graph_node_names(signature)
    for text in names + nodes:
        assert "evolution" not in text and "we_" not in text, text


def _graph_node_names(function):
    graph = function.graph.as_graph_def()
    names = [node.name.lower() for node in graph.node]
    for library_function in graph.library.function:
        names += [node.name.lower() for node in library_function.node_def]
    return names


@needs_export
def test_next_free_version_and_refusal(exported, tmp_path):
    model, _, _, _, _ = exported
    assert export.next_version(tmp_path / "missing") == 1
    os.makedirs(tmp_path / "1")
    os.makedirs(tmp_path / "notes")  # non-numeric folders are not versions
    (tmp_path / "7").write_text("a file, not a version")
    assert export.next_version(tmp_path) == 2
    path = export.export_for_serving(model, tmp_path)
    assert path == os.path.join(str(tmp_path), "2")
    assert export.next_version(tmp_path) == 3

    stamp = os.path.getmtime(os.path.join(path, "saved_model.pb"))
    with pytest.raises(FileExistsError, match=str(tmp_path / "2")):
        export.export_for_serving(model, tmp_path, version=2)
    assert os.path.getmtime(os.path.join(path, "saved_model.pb")) == stamp
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "7", "notes"]


@needs_export
def test_mismatch_discards_the_export(exported, tmp_path, monkeypatch):
    model, x, _, _, _ = exported
    real_predict = model.predict
    monkeypatch.setattr(model, "predict", lambda *a, **k: real_predict(*a, **k) + 1.0)
    with pytest.raises(export.ExportMismatchError, match="differs from model.predict"):
        export.export_for_serving(model, tmp_path, sample=x[:2])
    assert os.listdir(tmp_path) == []


@needs_export
def test_export_run(exported, tmp_path):
    import tensorflow as tf

    model, x, _, _, _ = exported
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model.save(run_dir / "model.keras")
    path = export.export_run(run_dir, tmp_path / "serving", version=3)
    assert path == os.path.join(str(tmp_path / "serving"), "3")
    signature = tf.saved_model.load(path).signatures["serving_default"]
    (name,) = signature.structured_input_signature[1]
    (output,) = signature(**{name: x}).values()
    np.testing.assert_allclose(output.numpy(), model.predict(x, verbose=0), atol=1e-5)


def test_export_run_without_model(tmp_path):
    # The arguments are checked before the backend, so on every backend.
    with pytest.raises(FileNotFoundError, match="`run_dir` must be a finished run folder"):
        export.export_run(tmp_path, tmp_path / "serving")
    assert os.listdir(tmp_path) == []


def test_run_dir_must_be_a_folder(tmp_path):
    a_file = tmp_path / "model.keras"
    a_file.write_text("not a run folder")
    with pytest.raises(NotADirectoryError, match="`run_dir` must be a finished run folder holding model.keras") as info:
        export.export_run(a_file, tmp_path / "serving")
    assert "is not a folder" in str(info.value) and str(a_file) in str(info.value)
    with pytest.raises(FileNotFoundError, match="`run_dir` must be .*does not exist"):
        export.export_run(tmp_path / "missing", tmp_path / "serving")
    with pytest.raises(TypeError, match="`run_dir` must be a path"):
        export.export_run(None, tmp_path / "serving")
    assert os.listdir(tmp_path) == ["model.keras"]


def _base_dir_cases(tmp_path):
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("keep me")
    return a_file, [
        (a_file, "exists and is not a folder"),
        (str(a_file), "exists and is not a folder"),
        (a_file / "serving", f"cannot be created: {str(a_file)!r} is not a folder"),
    ]


@pytest.mark.parametrize("call", ["export_for_serving", "export_run"])
def test_base_dir_must_be_a_folder(tmp_path, call):
    # Refused before any work, with the same error on every backend (the
    # backend check comes after): nothing is written or overwritten.
    if call == "export_for_serving":
        model = small_cnn()
        run = lambda base_dir: export.export_for_serving(model, base_dir)  # noqa: E731
    else:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        small_cnn().save(run_dir / "model.keras")
        run = lambda base_dir: export.export_run(run_dir, base_dir)  # noqa: E731
    a_file, cases = _base_dir_cases(tmp_path)
    before = sorted(os.listdir(tmp_path))
    for base_dir, reason in cases:
        with pytest.raises(NotADirectoryError, match=r"`base_dir` must be a folder \(created if missing\)") as info:
            run(base_dir)
        assert isinstance(info.value, OSError)
        assert reason in str(info.value), str(info.value)
    with pytest.raises(TypeError, match="`base_dir` must be a path"):
        run(None)
    with pytest.raises(ValueError, match="`base_dir` must be the path of a folder"):
        run("")
    assert a_file.read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == before


@needs_export
def test_base_dir_is_created_with_its_parents(exported, tmp_path):
    model, x, _, _, _ = exported
    path = export.export_for_serving(model, tmp_path / "a" / "b", sample=x[:2])
    assert path == os.path.join(str(tmp_path / "a" / "b"), "1")


@pytest.mark.parametrize(
    "version, error",
    [(0, ValueError), (-1, ValueError), ("1", TypeError), (1.0, TypeError), (True, TypeError)],
)
def test_bad_version(tmp_path, version, error):
    model = small_cnn()
    with pytest.raises(error, match="`version`"):
        export.export_for_serving(model, tmp_path, version=version)
    with pytest.raises(error, match="`version`"):
        export.export_run(tmp_path, tmp_path, version=version)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(CAN_EXPORT, reason=f"the {BACKEND} backend can export")
def test_unsupported_backend_says_what_to_do(tmp_path):
    model = small_cnn()
    with pytest.raises(NotImplementedError, match="KERAS_BACKEND=tensorflow") as info:
        export.export_for_serving(model, tmp_path)
    assert BACKEND in str(info.value).lower() or "pytorch" in str(info.value).lower()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model.save(run_dir / "model.keras")
    with pytest.raises(NotImplementedError, match="KERAS_BACKEND=tensorflow"):
        export.export_run(run_dir, tmp_path / "serving")
    assert sorted(os.listdir(tmp_path)) == ["run"]
