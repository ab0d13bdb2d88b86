"""Shared fixtures: the real CIFAR-10, for the tests that train or check on it.

The real data comes from where `keras_we.experiments.data.load_cifar()` finds it:
`KERAS_WE_DATA_DIR` when it is set (CI sets it), else `keras.datasets`,
which downloads CIFAR-10 once into `~/.keras/datasets`. When neither works
the tests that need it are skipped, with a reason that says how to provide
the data; they never fail for want of it, and nothing here looks for the
data anywhere else.
"""

import os
import socket
from typing import NamedTuple, Optional

import pytest

from keras_we.experiments import data

HOW_TO_PROVIDE = (
    f"set {data.DATA_DIR_ENV} to a folder holding cifar10.npz, "
    "or allow keras.datasets to download it"
)
# Keras downloads with `urllib.request.urlretrieve`, which has no timeout
# of its own: without one, a machine whose firewall drops packets would
# wait minutes on the connection, or forever on a stalled transfer. The
# socket timeout bounds each connect and each read, not the whole
# (progressing) download.
DOWNLOAD_TIMEOUT_S = 30


class CifarSource(NamedTuple):
    """Where `load_cifar()` finds the real CIFAR-10, or why it cannot."""

    path: Optional[str]  # the .npz file KERAS_WE_DATA_DIR leads to, None for keras.datasets
    skip_reason: Optional[str]  # None when the data loads


def find_real_cifar10(timeout=DOWNLOAD_TIMEOUT_S):
    """Loads the real CIFAR-10 the way the tests will, and says from where.

    Returns a `CifarSource` whose `skip_reason` is `None` if
    `keras_we.experiments.data.load_cifar("cifar10")` works with the current
    environment (and then goes on working: `keras.datasets` caches what it
    downloads), else the reason to skip, which says how to provide the
    data. A malformed file is not skipped: `load_cifar`'s `ValueError`
    propagates.
    """
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        data.load_cifar("cifar10")
    except OSError as error:  # DataUnavailableError, FileNotFoundError
        cause = error.__cause__ if isinstance(error, data.DataUnavailableError) else error
        cause = f"{type(cause).__name__}: {cause}" if cause is not None else str(error)
        return CifarSource(
            None,
            f"the real CIFAR-10 is not available: {HOW_TO_PROVIDE} "
            f"(tried: {cause})",
        )
    finally:
        socket.setdefaulttimeout(previous)
    return CifarSource(_env_npz_path(), None)


def _env_npz_path():
    env_dir = os.environ.get(data.DATA_DIR_ENV)
    if not env_dir:
        return None
    path = env_dir if not os.path.isdir(env_dir) else os.path.join(env_dir, "cifar10.npz")
    return os.path.abspath(path) if os.path.isfile(path) else None


@pytest.fixture(scope="session")
def real_cifar10():
    """The real CIFAR-10's `CifarSource`; skips the test when it is missing.

    Checked once per session (a skip is then repeated for every test that
    asks). Once it has passed, `keras_we.experiments.data.load_cifar()` (and so the
    runner and the CLI) loads the real data in the test. `.path` is the
    `.npz` file when the data comes from `KERAS_WE_DATA_DIR`, else `None`.
    """
    source = find_real_cifar10()
    if source.skip_reason is not None:
        pytest.skip(source.skip_reason)
    return source
