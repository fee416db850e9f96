"""``flashdino bench`` from a checkout: the end-to-end harness of :mod:`flashdino.bench`.

    python benchmarks/e2e.py --ci                       # CI-sized CPU table -> benchmarks/results/e2e_cpu.*
    python benchmarks/e2e.py                            # full GPU run -> benchmarks/results/e2e_<gpu>.*
    python benchmarks/e2e.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import flashdino  # noqa: F401
except ImportError:  # a bare checkout: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from flashdino.bench import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:], prog="python benchmarks/e2e.py")
