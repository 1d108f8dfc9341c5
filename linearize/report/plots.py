"""matplotlib for the PNG plots of evaluations, recoveries, plans and benchmarks: headless, and optional."""
from __future__ import annotations

import sys


def pyplot(what: str = "plot"):
    """`matplotlib.pyplot` on the Agg backend, or None (saying which file is skipped) when matplotlib is missing:
    numbers are the result, plots an extra, so a missing plotting library never fails a run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed: {what} not written (pip install matplotlib)", file=sys.stderr)
        return None
    return plt
