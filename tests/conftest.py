"""Shared test setup.

Without a GPU, Triton kernels run under the Triton interpreter; the variable must be set before
triton (and so flashdino's Triton backend) is imported.
"""

import os
import sys
from pathlib import Path

try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests check each backend's kernels and the fixed routing rules deterministically (a GPU test
# that asserts the Triton kernel ran must not depend on a timing); tests/test_tune.py turns
# on-device tuning on where it tests it.
os.environ.setdefault("FLASHDINO_TUNE", "0")

# Tests run against the installed package; a bare checkout falls back to the source tree.
try:
    import flashdino  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # a marker, not any keyword (a folder named gpu)
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _session_working_directory(tmp_path_factory):
    """Module- and session-scoped fixtures (set up before any test's own folder) start in a temp folder too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("session-cwd"))
        yield


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path_factory, monkeypatch):
    """Every test starts in an empty folder of its own.

    A command run with its default output (``flashdino features`` writes ``features.safetensors``)
    then lands there, never in the checkout, and no test sees a file that another test, or a user
    who ran the README's main command in the checkout, left in the working directory.
    """
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    yield
