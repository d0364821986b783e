"""bench/stats.py: medians, spreads, ratio checks, the RSS slope of the soak (pure, no root)."""
from __future__ import annotations

import math

import pytest

from bench.stats import at_most_times, last_fraction, levelled_off, median, ratio, slope, spread, within

NAN = float("nan")


def test_median_and_spread_ignore_missing_runs():
    assert median([3.0, NAN, 1.0, 2.0]) == 2.0
    assert math.isnan(median([]))
    assert spread([90.0, 100.0, 110.0]) == "±10 %"
    assert spread([100.0]) == "-"


def test_ratio_within_and_at_most_times():
    assert ratio(80.0, 100.0) == 0.8
    assert math.isnan(ratio(80.0, 0.0)) and math.isnan(ratio(NAN, 1.0))
    # the agent at most 0.02 under bpftrace; above it is fine
    assert within(0.881, 0.90, 0.02) is True
    assert within(0.879, 0.90, 0.02) is False
    assert within(0.95, 0.90, 0.02) is True
    assert within(NAN, 0.90, 0.02) is None
    # BPF time: at most 1.5x
    assert at_most_times(1500.0, 1000.0, 1.5) is True
    assert at_most_times(1501.0, 1000.0, 1.5) is False
    assert at_most_times(1.0, 0.0, 1.5) is None


def test_slope_of_a_line_is_exact_with_no_error():
    xs = [0.0, 1.0, 2.0, 3.0, 4.0]
    b, se = slope(xs, [10.0 + 0.5 * x for x in xs])
    assert b == pytest.approx(0.5) and se == pytest.approx(0.0, abs=1e-12)
    assert all(math.isnan(v) for v in slope([1.0], [1.0]))
    assert all(math.isnan(v) for v in slope([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))


def test_slope_standard_error_matches_the_textbook_formula():
    xs = [0.0, 1.0, 2.0, 3.0]
    ys = [1.0, 3.0, 2.0, 4.0]
    b, se = slope(xs, ys)
    assert b == pytest.approx(0.8)
    # fit 1.3 + 0.8x: residuals -0.3, 0.9, -0.9, 0.3 -> SSE 1.8; sxx 5; se = sqrt(SSE / (n - 2) / sxx)
    assert se == pytest.approx(math.sqrt(1.8 / 2 / 5))


def test_last_fraction_takes_the_last_third_of_the_time_span():
    xs = [float(x) for x in range(10)]  # 0..9: the last third starts at 6
    tx, ty = last_fraction(xs, [x * 2 for x in xs])
    assert tx == [6.0, 7.0, 8.0, 9.0] and ty == [12.0, 14.0, 16.0, 18.0]
    assert last_fraction([], []) == ([], [])


def minutes(n: int, step: float = 5 / 60) -> list[float]:
    return [1.0 + i * step for i in range(n)]


def test_levelled_off_rss_that_grew_early_and_then_stayed():
    xs = minutes(109)  # 1 to 10 min every 5 s
    ys = [100.0 + min(x, 4.0) * 2 + (0.05 if i % 2 else -0.05) for i, x in enumerate(xs)]
    b, se, flat = levelled_off(xs, ys, threshold=0.1)
    assert abs(b) < 0.05 and flat is True


def test_levelled_off_says_growing_when_rss_keeps_climbing():
    xs = minutes(109)
    ys = [100.0 + 0.5 * x for x in xs]
    b, _se, flat = levelled_off(xs, ys, threshold=0.1)
    assert b == pytest.approx(0.5) and flat is False


def test_levelled_off_cannot_tell_from_noise_or_too_few_samples():
    xs = minutes(40)
    ys = [100.0 + (3.0 if i % 2 else -3.0) for i in range(40)]  # ±3 MiB jitter, no trend
    _b, se, flat = levelled_off(xs, ys, threshold=0.1)
    assert 2 * se > 0.1 and flat is None
    assert levelled_off([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], threshold=0.1)[2] is None
