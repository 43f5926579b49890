"""95 % confidence intervals for accuracies on a finite test set, and for the difference of two
classifiers scored on the same texts (a paired design: both see every text).

On 279 test texts one point of accuracy is three texts; these intervals say which differences are
larger than that noise. Both are score intervals, which behave at 0 %, 100 % and small n where the
normal ("Wald") interval collapses to a point.
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95 % quantile of the standard normal


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion correct/n (Wilson 1927)."""
    if n <= 0:
        raise ValueError("an interval needs at least one text")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(first: list[bool], second: list[bool], z: float = Z95) -> tuple[float, float, float]:
    """(difference, low, high) of accuracy(first) - accuracy(second), both judged on the same texts.

    Newcombe's hybrid score interval for paired proportions (Newcombe 1998, Statistics in Medicine 17,
    method 10): the Wilson intervals of both accuracies, combined with the correlation of the two
    classifiers' per-text correctness, so that texts both get right or both get wrong narrow it."""
    if len(first) != len(second) or not first:
        raise ValueError("a paired interval needs the same, non-empty list of texts for both")
    n = len(first)
    both = sum(a and b for a, b in zip(first, second))
    only_first = sum(a and not b for a, b in zip(first, second))
    only_second = sum(b and not a for a, b in zip(first, second))
    neither = n - both - only_first - only_second
    p1, p2 = (both + only_first) / n, (both + only_second) / n
    l1, u1 = wilson(both + only_first, n, z)
    l2, u2 = wilson(both + only_second, n, z)
    margins = (both + only_first) * (only_second + neither) * (both + only_second) * (only_first + neither)
    phi = (both * neither - only_first * only_second) / math.sqrt(margins) if margins else 0.0
    low = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return p1 - p2, p1 - p2 - low, p1 - p2 + high
