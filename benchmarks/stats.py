"""Latency statistics in milliseconds: from per-call samples, or from a tool's own aggregates."""
from __future__ import annotations

import numpy as np


def latency_stats(samples_ms: list[float]) -> dict:
    values = np.asarray(samples_ms, dtype=np.float64)
    return {
        "p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)), "mean": float(values.mean()), "std": float(values.std()),
        "min": float(values.min()), "max": float(values.max()),
        "n": int(values.size), "samples": [round(float(v), 4) for v in values],
    }


def aggregate_stats(n: int, mean: float, std: float | None = None, low: float | None = None,
                    high: float | None = None, **extra) -> dict:
    """What a tool reports when it keeps no per-call samples (benchmark_model, the minibench app):
    the percentiles are unknown and stay None rather than being guessed from the mean."""
    return {"p50": None, "p90": None, "p99": None, "mean": mean, "std": std, "min": low, "max": high,
            "n": n, "samples": [], **extra}


def pooled_stats(parts: list[dict]) -> dict:
    """Several runs of one variant (device rounds) as one: their samples pooled when every run kept
    samples, else the count-weighted mean of the aggregates."""
    if len(parts) == 1:
        return dict(parts[0])
    if parts and all(p["samples"] for p in parts):
        return latency_stats([s for p in parts for s in p["samples"]])
    n = sum(p["n"] for p in parts)
    mean = sum(p["mean"] * p["n"] for p in parts) / n
    lows = [p["min"] for p in parts if p.get("min") is not None]
    highs = [p["max"] for p in parts if p.get("max") is not None]
    stds = [p["std"] for p in parts if p.get("std") is not None]
    # Pooled std over runs: within-run variances plus the spread of the run means.
    std = (float(np.sqrt(sum(p["n"] * (p["std"] ** 2 + (p["mean"] - mean) ** 2) for p in parts) / n))
           if len(stds) == len(parts) else None)
    return aggregate_stats(n, mean, std, min(lows) if lows else None, max(highs) if highs else None,
                           run_means=[p["mean"] for p in parts])
