"""The report's 95 % intervals against values computed by hand from the published formulas."""
from __future__ import annotations

import pytest

from edgekd.intervals import paired_difference, wilson


@pytest.mark.parametrize("correct,n,low,high", [
    (5, 10, 0.2366, 0.7634),    # the textbook Wilson example: 5 of 10
    (0, 10, 0.0, 0.2775),       # none right: Wald would give [0, 0]; Wilson's upper end is z^2 / (n + z^2)
    (10, 10, 0.7225, 1.0),
    (18, 20, 0.6990, 0.9721),
])
def test_wilson_matches_hand_computed_values(correct, n, low, high):
    got = wilson(correct, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_paired_difference_matches_newcombe_by_hand():
    # 20 texts: both right 14, only the first 4, only the second 1, neither 1. By hand (Newcombe 1998, method 10):
    # p1 = 0.90, Wilson (0.6990, 0.9721); p2 = 0.75, Wilson (0.5313, 0.8881);
    # phi = (14*1 - 4*1) / sqrt(18*2*15*5) = 0.19245;
    # low  = 0.15 - sqrt(0.2010^2 - 2 phi 0.2010 * 0.1381 + 0.1381^2) = 0.15 - 0.2209 = -0.0709
    # high = 0.15 + sqrt(0.0721^2 - 2 phi 0.0721 * 0.2187 + 0.2187^2) = 0.15 + 0.2167 =  0.3667
    first = [True] * 18 + [False] * 2
    second = [True] * 14 + [False] * 4 + [True] + [False]
    assert paired_difference(first, second) == pytest.approx((0.15, -0.0709, 0.3667), abs=2e-4)


def test_three_texts_of_two_hundred_is_within_noise():
    """The demo's failure: 3 texts of 200 changed by int8. The interval holds 0, so no budget can call it a loss."""
    delta, low, high = paired_difference([True] * 197 + [False] * 3, [True] * 200)
    assert delta == pytest.approx(-0.015) and low < -0.03 and high > 0


def test_identical_classifiers_have_a_narrow_interval_around_zero():
    # phi = 1: each side is the gap between the two halves of Wilson(30, 40) = (0.5980, 0.8580), |0.152 - 0.108|.
    same = [True] * 30 + [False] * 10
    delta, low, high = paired_difference(same, same)
    assert delta == 0 and low == pytest.approx(-0.0438, abs=1e-4) and high == pytest.approx(0.0438, abs=1e-4)


def test_mismatched_lists_are_refused():
    with pytest.raises(ValueError):
        paired_difference([True], [True, False])
