"""The little statistics the benchmarks need: medians, spreads, ratios, a slope."""
from __future__ import annotations

import math
import statistics

NAN = float("nan")


def isnan(x: float | None) -> bool:
    return x is None or x != x


def median(values: list[float]) -> float:
    values = [v for v in values if not isnan(v)]
    return statistics.median(values) if values else NAN


def spread(values: list[float]) -> str:
    """Half the range over the median, as a percentage: how noisy the repeats were."""
    values = [v for v in values if not isnan(v)]
    if len(values) < 2:
        return "-"
    m = median(values)
    return f"±{(max(values) - min(values)) / 2 / m * 100:.0f} %" if m else "-"


def ratio(a: float, b: float) -> float:
    """a / b, NaN when either is missing or b is 0."""
    return a / b if not isnan(a) and not isnan(b) and b else NAN


def within(a: float, b: float, margin: float) -> bool | None:
    """A throughput ratio `a` at most `margin` under `b` (above is fine); None when unknown."""
    return None if isnan(a) or isnan(b) else a >= b - margin


def at_most_times(a: float, b: float, factor: float) -> bool | None:
    """`a` at most `factor` × `b` (costs: lower is better); None when unknown."""
    return None if isnan(a) or isnan(b) or b <= 0 else a <= factor * b


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope of ys over xs and its standard error (NaN when undefined)."""
    n = len(xs)
    if n < 2 or n != len(ys):
        return NAN, NAN
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return NAN, NAN
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if n < 3:
        return b, NAN
    residual = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, ys))
    return b, math.sqrt(residual / (n - 2) / sxx)


def last_fraction(xs: list[float], ys: list[float], fraction: float = 1 / 3) -> tuple[list[float], list[float]]:
    """The samples in the last `fraction` of the time xs span."""
    if not xs:
        return [], []
    cut = xs[-1] - (xs[-1] - xs[0]) * fraction
    pairs = [(x, y) for x, y in zip(xs, ys) if x >= cut]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def levelled_off(xs: list[float], ys: list[float], threshold: float,
                 fraction: float = 1 / 3) -> tuple[float, float, bool | None]:
    """(slope, its standard error, verdict) over the last `fraction` of the samples:
    growing (False) when the slope is above `threshold` by more than twice its standard
    error; flat (True) when |slope| ≤ threshold and the samples resolve the threshold (twice
    the standard error within it); None when too few or too noisy to tell."""
    tx, ty = last_fraction(xs, ys, fraction)
    b, se = slope(tx, ty)
    if isnan(b) or len(tx) < 4:
        return b, se, None
    if isnan(se):
        return b, se, abs(b) <= threshold
    if b - 2 * se > threshold:
        return b, se, False
    if 2 * se > threshold:
        return b, se, None
    return b, se, abs(b) <= threshold
