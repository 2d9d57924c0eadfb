"""How sure a comparison is: mean ± a t-interval over disjoint seed blocks, paired differences, verdicts.

An evaluation row is computed on K disjoint blocks of seeds; every row uses the same blocks (the same
seeds and labels), so the K block values of a row are independent draws of its metric and two rows can
be compared block by block. A row is reported as the mean of its block values with a two-sided t-interval
``mean ± t_{(1+level)/2, K-1} · s / √K`` (``s``: the sample standard deviation, divisor K - 1). A
comparison of rows ``a`` and ``b`` is the **paired** difference: the interval of the per-block
differences ``a_k - f·b_k`` (``f = 1`` for a plain difference; ``f = 1.05`` asks "is ``a`` within 5 % of
``b``"). Pairing removes what the blocks share (which seeds are easy), so it resolves far smaller gaps
than two separate intervals would.

A claim about a difference holds or fails only when the interval excludes the bound; otherwise it is
not resolved at this sample size. With one block there is no interval (it spans everything).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95
HOLDS, FAILS, NOT_RESOLVED = "holds", "fails", "not resolved at this sample size"
VERDICTS = (HOLDS, FAILS, NOT_RESOLVED)


@dataclass(frozen=True)
class Interval:
    """A mean over ``count`` blocks and its two-sided ``level`` interval ``[low, high]`` (infinite for
    one block)."""

    mean: float
    low: float
    high: float
    count: int
    level: float = LEVEL

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes(self, value: float = 0.0) -> bool:
        """True when ``value`` lies outside the interval."""
        return self.high < value or self.low > value

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the bounds and half-width are ``None`` when the interval is unbounded."""
        finite = math.isfinite(self.half_width)
        return {"mean": self.mean, "low": self.low if finite else None, "high": self.high if finite else None,
                "half_width": self.half_width if finite else None, "count": self.count, "level": self.level}

    def describe(self, digits: int = 3, signed: bool = False) -> str:
        """``mean ± half-width`` with ``digits`` decimals (``± n/a`` for a single block)."""
        half = f"{self.half_width:.{digits}f}" if math.isfinite(self.half_width) else "n/a"
        return f"{self.mean:{'+' if signed else ''}.{digits}f} ± {half}"


def t_quantile(level: float, dof: int) -> float:
    """The ``(1 + level) / 2`` quantile of Student's t with ``dof`` degrees of freedom."""
    return float(scipy_stats.t.ppf((1.0 + level) / 2.0, dof))


def mean_interval(values: Iterable[float], level: float = LEVEL) -> Interval:
    """The mean of the block values and its t-interval (unbounded for a single value)."""
    array = np.asarray(list(values), dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"mean_interval: need a non-empty list of numbers, got shape {list(array.shape)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"mean_interval: level must lie in (0, 1), got {level}")
    mean, count = float(array.mean()), int(array.size)
    if count == 1:
        return Interval(mean, -math.inf, math.inf, 1, level)
    half = t_quantile(level, count - 1) * float(array.std(ddof=1)) / math.sqrt(count)
    return Interval(mean, mean - half, mean + half, count, level)


def paired_difference(a: Sequence[float], b: Sequence[float], factor: float = 1.0,
                      level: float = LEVEL) -> Interval:
    """The interval of the per-block differences ``a_k - factor · b_k`` (block k of both on the same
    seeds)."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: the rows have {len(a)} and {len(b)} blocks; pairing needs the "
                         f"same blocks")
    return mean_interval(np.asarray(a, dtype=np.float64) - factor * np.asarray(b, dtype=np.float64), level)


def verdict(interval: Interval, claim: str = "below", bound: float = 0.0) -> str:
    """Whether "the quantity is ``claim`` (below / above) ``bound``" holds, fails, or is not resolved: it
    holds or fails only when the interval lies wholly on one side of the bound."""
    if claim not in ("below", "above"):
        raise ValueError(f"verdict: claim must be 'below' or 'above', got {claim!r}")
    if interval.high < bound:
        return HOLDS if claim == "below" else FAILS
    if interval.low > bound:
        return FAILS if claim == "below" else HOLDS
    return NOT_RESOLVED


def combine(verdicts: Iterable[str]) -> str:
    """A claim made of several parts: it fails if any part fails, holds if every part holds, and is not
    resolved otherwise (also when there are no parts)."""
    verdicts = list(verdicts)
    if FAILS in verdicts:
        return FAILS
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    return NOT_RESOLVED
