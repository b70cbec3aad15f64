"""Unbiased pass@k (Chen et al. 2021; docs/design.md §4).

With n samples of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the chance that a random subset
of k samples contains a passing one. The binomials overflow for n in the hundreds, so the ratio is
computed as the product  prod_{i=n-c+1..n} (1 - k/i),  which is exact in real arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k of one problem with n samples, c of them correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset contains a passing sample
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(counts: Sequence[tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """Mean pass@k over problems given (n, c) per problem; a k above some problem's n is skipped."""
    if not counts:
        return {}
    smallest_n = min(n for n, _ in counts)
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
            for k in ks if k <= smallest_n}


def parse_ks(text: str) -> list[int]:
    """'1,10,100' -> [1, 10, 100] (ValueError naming the bad item)."""
    ks = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"--k: {item!r} is not a positive integer (expected e.g. 1,10,100)")
        ks.append(int(item))
    return ks
