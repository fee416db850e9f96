"""Which backends of an op can run the tests on this machine, as pytest parameters.

"torch" always runs; "triton" runs on CUDA or under the Triton interpreter (conftest sets
TRITON_INTERPRET=1 without a GPU); "cuda" needs a GPU and is marked ``gpu``. A backend that did
not load here (no Triton, no flashdino._C) is left out.
"""

from __future__ import annotations

import os

import pytest
import torch

from flashdino import dispatch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def runnable(op: str) -> list[str]:
    out = []
    for backend in dispatch.backends(op):
        if backend == "torch" or (backend == "triton" and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")) \
                or (backend == "cuda" and CUDA):
            out.append(backend)
    return out


def backend_params(op: str) -> list:
    """``pytest.mark.parametrize("backend", backend_params(op))``: every backend, cuda marked gpu."""
    return [pytest.param(b, marks=pytest.mark.gpu) if b == "cuda" else b for b in runnable(op)]
