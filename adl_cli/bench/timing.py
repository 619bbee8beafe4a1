"""Timing contenders side by side: every round runs each contender in turn, so the host's drift
hits them alike; the figure is each contender's median over rounds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternating_medians(contenders: dict[str, Callable[[], object]], *, rounds: int, repeats: int = 1, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each contender: ``warmup`` untimed calls each, then ``rounds``
    rounds in which each contender makes ``repeats`` timed calls in a row."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            times[name].append((time.perf_counter() - t0) / repeats)
    return {name: statistics.median(v) for name, v in times.items()}
