"""Intervals over seed blocks, paired differences and verdicts (distillkac.stats) against closed forms."""

from __future__ import annotations

import math

import pytest

from distillkac.stats import (
    FAILS,
    HOLDS,
    NOT_RESOLVED,
    Interval,
    combine,
    mean_interval,
    paired_difference,
    t_quantile,
    verdict,
)


def test_t_quantiles_match_their_closed_forms():
    p = 0.975  # two-sided 95%
    assert t_quantile(0.95, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)  # 12.7062
    assert t_quantile(0.95, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-12)  # 4.3027
    assert t_quantile(0.95, 4) == pytest.approx(2.776445105, rel=1e-9)  # tables: 2.776
    assert t_quantile(0.90, 2) == pytest.approx(0.9 / math.sqrt(2 * 0.95 * 0.05), rel=1e-12)  # 2.9200


def test_mean_interval_of_three_blocks():
    interval = mean_interval([1.0, 2.0, 3.0])  # mean 2, s = 1
    half = (0.95 / math.sqrt(2 * 0.975 * 0.025)) / math.sqrt(3)
    assert (interval.mean, interval.count, interval.level) == (2.0, 3, 0.95)
    assert interval.low == pytest.approx(2.0 - half, rel=1e-12)
    assert interval.high == pytest.approx(2.0 + half, rel=1e-12)
    assert interval.half_width == pytest.approx(half, rel=1e-12)
    assert interval.describe(2) == f"2.00 ± {half:.2f}" and interval.describe(1, signed=True).startswith("+2.0")
    assert interval.excludes(-1.0) and interval.excludes(5.0) and not interval.excludes(0.0)


def test_identical_blocks_give_a_zero_width_interval_and_one_block_an_unbounded_one():
    flat = mean_interval([4.0, 4.0, 4.0])
    assert (flat.low, flat.high, flat.half_width) == (4.0, 4.0, 0.0)
    single = mean_interval([7.5])
    assert single.mean == 7.5 and single.low == -math.inf and single.high == math.inf
    assert single.to_dict() == {"mean": 7.5, "low": None, "high": None, "half_width": None, "count": 1,
                                "level": 0.95}
    assert single.describe() == "7.500 ± n/a" and verdict(single) == NOT_RESOLVED
    with pytest.raises(ValueError, match="non-empty"):
        mean_interval([])
    with pytest.raises(ValueError, match="level"):
        mean_interval([1.0, 2.0], level=1.0)


def test_pairing_removes_what_the_blocks_share():
    """Two rows that differ by 1 on every block, with blocks far apart: the separate intervals overlap,
    the paired difference is exactly 1 with zero width."""
    a, b = [10.0, 20.0, 30.0], [9.0, 19.0, 29.0]
    assert mean_interval(a).low < mean_interval(b).high
    difference = paired_difference(a, b)
    assert (difference.mean, difference.low, difference.high) == (1.0, 1.0, 1.0)
    assert verdict(difference, "above") == HOLDS and verdict(difference, "below") == FAILS


def test_paired_difference_with_a_factor():
    """a within 5% of b: a - 1.05 b below 0."""
    a, b = [10.4, 20.6, 30.9], [10.0, 20.0, 30.0]
    difference = paired_difference(a, b, factor=1.05)
    expected = [x - 1.05 * y for x, y in zip(a, b)]
    reference = mean_interval(expected)
    assert (difference.mean, difference.low, difference.high) == pytest.approx(
        (reference.mean, reference.low, reference.high), rel=1e-12)
    assert difference.mean == pytest.approx(sum(expected) / 3, rel=1e-12)
    with pytest.raises(ValueError, match="same blocks"):
        paired_difference([1.0, 2.0], [1.0])


@pytest.mark.parametrize("low, high, claim, bound, expected", [
    (-3.0, -1.0, "below", 0.0, HOLDS), (1.0, 3.0, "below", 0.0, FAILS), (-1.0, 1.0, "below", 0.0, NOT_RESOLVED),
    (1.0, 3.0, "above", 0.0, HOLDS), (-3.0, -1.0, "above", 0.0, FAILS), (-0.05, 0.0, "above", -0.1, HOLDS),
    (-0.2, 0.0, "above", -0.1, NOT_RESOLVED), (-1.0, 0.0, "below", 0.0, NOT_RESOLVED),
])
def test_verdict_needs_the_interval_to_exclude_the_bound(low, high, claim, bound, expected):
    assert verdict(Interval((low + high) / 2, low, high, 3), claim, bound) == expected


def test_verdicts_combine_and_nan_is_never_resolved():
    assert combine([HOLDS, HOLDS]) == HOLDS
    assert combine([HOLDS, NOT_RESOLVED]) == NOT_RESOLVED
    assert combine([HOLDS, NOT_RESOLVED, FAILS]) == FAILS
    assert combine([]) == NOT_RESOLVED
    assert verdict(mean_interval([1.0, math.nan, 2.0])) == NOT_RESOLVED
    with pytest.raises(ValueError, match="below"):
        verdict(mean_interval([1.0, 2.0]), "less")
