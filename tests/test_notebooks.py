"""The notebooks run end to end in smoke mode (`KERAS_WE_SMOKE=1`).

Each notebook runs on its own default backend (its `KERAS_BACKEND`
default) under nbmake, as a reader runs it, a step of CI of its own:

    KERAS_WE_SMOKE=1 KERAS_WE_DATA_DIR=../shared/data python -m pytest --nbmake notebooks/

`test_notebook_runs` runs each notebook on the other backends it supports,
in the test pass of that backend (marked `slow`: CI runs `-m slow` once per
backend), on real CIFAR-10 from `KERAS_WE_DATA_DIR`. Together, a full CI
run executes each notebook once per backend it supports.
"""

import os
import pathlib

import keras
import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
BACKEND = keras.backend.backend()

# Notebook -> the backends it runs on (the first is its default).
NOTEBOOKS = {
    "01_quickstart.ipynb": ("torch",),
    "02_inside_weight_evolution.ipynb": ("torch",),
    "03_custom_training_loop.ipynb": ("torch", "jax", "tensorflow"),
    "04_export_for_tf_serving.ipynb": ("tensorflow",),
    "05_reactivation_methods.ipynb": ("tensorflow",),
    "06_fine_tuning_with_we.ipynb": ("tensorflow",),
}


def _data_dir():
    """The absolute data folder, or None (then keras.datasets is tried)."""
    value = os.environ.get("KERAS_WE_DATA_DIR")
    return os.path.abspath(value) if value else None


def _data_available(data_dir):
    if data_dir is not None:
        return os.path.exists(os.path.join(data_dir, "cifar10.npz")) or data_dir.endswith(".npz")
    cache = pathlib.Path(os.environ.get("KERAS_HOME", pathlib.Path.home() / ".keras"))
    return (cache / "datasets" / "cifar-10-batches-py").exists()


def test_every_notebook_is_listed_with_its_default_backend_first():
    """nbmake runs each notebook on its default backend, so the first
    backend listed must be the one its code falls back to."""
    nbformat = pytest.importorskip("nbformat")
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)
    for name, backends in NOTEBOOKS.items():
        code = "\n".join(c.source for c in nbformat.read(NOTEBOOK_DIR / name, as_version=4).cells
                         if c.cell_type == "code")
        assert f'os.environ.setdefault("KERAS_BACKEND", "{backends[0]}")' in code, name


OTHER_BACKENDS = sorted((name, backend) for name, backends in NOTEBOOKS.items() for backend in backends[1:])


@pytest.mark.slow
@pytest.mark.parametrize("name, backend", OTHER_BACKENDS)
def test_notebook_runs(name, backend, monkeypatch):
    if BACKEND != backend:
        pytest.skip(f"runs in the {backend} pass of the test suite")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    data_dir = _data_dir()
    if not _data_available(data_dir):
        pytest.skip("CIFAR-10 is not available offline (set KERAS_WE_DATA_DIR)")

    # The kernel inherits this environment; it runs in notebooks/, so the
    # data folder is passed as an absolute path.
    monkeypatch.setenv("KERAS_WE_SMOKE", "1")
    monkeypatch.setenv("KERAS_BACKEND", BACKEND)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    if data_dir is not None:
        monkeypatch.setenv("KERAS_WE_DATA_DIR", data_dir)

    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    # Papermill style: the first cell holds the parameters, the second
    # reduces them in smoke mode.
    assert notebook.cells[0].metadata.get("tags") == ["parameters"]
    assert 'os.environ.get("KERAS_WE_SMOKE") == "1"' in notebook.cells[1].source
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()
    errors = [
        output for cell in notebook.cells if cell.cell_type == "code"
        for output in cell.get("outputs", []) if output.get("output_type") == "error"
    ]
    assert not errors


def test_each_notebook_says_which_settings_its_outputs_come_from():
    """`notebooks/execute.py` commits some notebooks executed with their smoke
    settings; each notebook's introduction says which settings it shows."""
    import importlib.util

    pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    spec = importlib.util.spec_from_file_location("execute", NOTEBOOK_DIR / "execute.py")
    execute = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(execute)
    assert execute.SMOKE <= set(NOTEBOOKS)
    for name in NOTEBOOKS:
        intro = nbformat.read(NOTEBOOK_DIR / name, as_version=4).cells[2].source
        smoke = "computed with the smoke settings" in intro
        real = "computed with the parameters in the first cell" in intro
        assert (smoke, real) == ((True, False) if name in execute.SMOKE else (False, True)), name
