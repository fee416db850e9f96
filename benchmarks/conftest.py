"""Benchmarks import flashdino from the source tree when it is not installed."""

import sys
from pathlib import Path

try:
    import flashdino  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_util.py
