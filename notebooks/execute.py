"""Executes the tutorials in place, so that the committed notebooks show
their outputs on the repository page.

Each notebook runs on its own default backend, with its real parameters
where they fit a 2-core CPU in minutes and with its smoke settings
(`KERAS_WE_SMOKE=1`) otherwise; its introduction says which. From the
repository root:

    KERAS_WE_DATA_DIR=../shared/data python notebooks/execute.py [NAME ...]

CI executes them again from scratch (`tests/test_notebooks.py`, nbmake) and
leaves the files as they are.
"""

import os
import pathlib
import sys

import nbclient
import nbformat

FOLDER = pathlib.Path(__file__).resolve().parent
# The notebooks committed with the outputs of their smoke settings.
SMOKE = {
    "01_quickstart.ipynb",
    "03_custom_training_loop.ipynb",
    "04_export_for_tf_serving.ipynb",
    "06_fine_tuning_with_we.ipynb",
}


def execute(name):
    notebook = nbformat.read(FOLDER / name, as_version=4)
    os.environ.pop("KERAS_BACKEND", None)  # each notebook's own default
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if name in SMOKE:
        os.environ["KERAS_WE_SMOKE"] = "1"
    else:
        os.environ.pop("KERAS_WE_SMOKE", None)
    nbclient.NotebookClient(notebook, timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": str(FOLDER)}}).execute()
    nbformat.write(notebook, FOLDER / name)
    print(f"{name}: executed ({'smoke' if name in SMOKE else 'real'} settings)", flush=True)


def main(names):
    data_dir = os.environ.get("KERAS_WE_DATA_DIR")
    if data_dir:
        os.environ["KERAS_WE_DATA_DIR"] = os.path.abspath(data_dir)
    for name in names or sorted(p.name for p in FOLDER.glob("*.ipynb")):
        execute(name)


if __name__ == "__main__":
    main(sys.argv[1:])
