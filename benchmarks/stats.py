"""Latency statistics over samples in milliseconds."""
from __future__ import annotations

import numpy as np


def latency_stats(samples_ms: list[float]) -> dict:
    values = np.asarray(samples_ms, dtype=np.float64)
    return {
        "p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)), "mean": float(values.mean()), "std": float(values.std()),
        "n": int(values.size), "samples": [round(float(v), 4) for v in values],
    }
