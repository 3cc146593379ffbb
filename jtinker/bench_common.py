"""What the side-by-side benchmarks share: how a run is timed."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(run: Callable[[], object], repeats: int, *, warmup: int = 0, label: str = "step") -> tuple[dict, object]:
    """Time `run`: once on its own (`first_{label}_s`: compiles, caches), `warmup` more untimed runs, then
    `repeats` timed ones (`{label}_s_min/median/max`). Returns the figures and the first run's output."""
    t0 = time.perf_counter()
    output = run()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {f"first_{label}_s": first, f"{label}_s_min": min(times), f"{label}_s_median": statistics.median(times),
            f"{label}_s_max": max(times)}, output
