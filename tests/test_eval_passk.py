"""pass@k against a brute-force reference: the fraction of k-subsets that contain a passing sample."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from codegen2.eval.passk import mean_pass_at_k, parse_ks, pass_at_k


def brute_force(n: int, c: int, k: int) -> Fraction:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in subset) for subset in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 11))
def test_matches_enumeration_of_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force(n, c, k)), abs=1e-12), (n, c, k)


def test_large_n_is_stable_and_matches_exact_binomials():
    for n, c, k in [(200, 3, 100), (200, 0, 100), (200, 199, 1), (1000, 17, 10), (1000, 500, 100)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_edge_cases_and_errors():
    assert pass_at_k(5, 5, 3) == 1.0 and pass_at_k(5, 0, 3) == 0.0 and pass_at_k(10, 8, 3) == 1.0
    for bad in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_mean_skips_k_above_the_smallest_n():
    counts = [(3, 1), (5, 0), (4, 4)]
    result = mean_pass_at_k(counts, [1, 2, 3, 5])
    assert set(result) == {"pass@1", "pass@2", "pass@3"}
    expected = sum(float(brute_force(n, c, 2)) for n, c in counts) / 3
    assert result["pass@2"] == pytest.approx(expected)
    assert mean_pass_at_k([], [1]) == {}


def test_parse_ks():
    assert parse_ks("1,10, 100") == [1, 10, 100]
    with pytest.raises(ValueError, match="'x'"):
        parse_ks("1,x")
    with pytest.raises(ValueError, match="'0'"):
        parse_ks("0")
