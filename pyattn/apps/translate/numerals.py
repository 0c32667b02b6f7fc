"""The numerals task: digits -> Sino-Korean numerals (345 -> 삼백사십오), generated in code."""

from __future__ import annotations

import random

from .vocab import Task, Vocab

DIGITS = "영일이삼사오육칠팔구"
SMALL_UNITS = ("", "십", "백", "천")  # within a group of four digits
BIG_UNITS = ("", "만", "억", "조")  # groups of four digits (Korean counts in 10^4)


def _group(n: int, omit_leading_one: bool) -> str:
    """0 < n < 10000 in Sino-Korean. 일 is never read before 십/백/천 (천백십일 = 1110+1)."""
    out = []
    for power in (3, 2, 1, 0):
        d = n // 10**power % 10
        if d == 0:
            continue
        if power == 0:
            out.append("" if (d == 1 and omit_leading_one and n == 1) else DIGITS[d])
        else:
            out.append(("" if d == 1 else DIGITS[d]) + SMALL_UNITS[power])
    return "".join(out)


def sino_korean(n: int) -> str:
    """The Sino-Korean reading of ``n`` in Hangul, without spaces.

    Rules: digits 일..구, units 십/백/천 inside each group of four digits and 만/억/조 between
    groups; 일 is dropped before 십, 백 and 천 (십 = 10, 백십 = 110) and before 만 when the
    ten-thousands group is exactly one (만 = 10,000, 만 이천 = 12,000) but kept before 억 and 조
    (일억); zero groups are silent (10,005 = 만오); 0 = 영.

    Arguments:
        n: 0 <= n < 10**16.
    Returns:
        The numeral, e.g. 345 -> 삼백사십오.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if not 0 <= n < 10**16:
        raise ValueError(f"n must be in [0, 10**16), got {n}")
    if n == 0:
        return DIGITS[0]
    parts = []
    for g in range(3, -1, -1):
        group = n // 10 ** (4 * g) % 10**4
        if group == 0:
            continue
        parts.append(_group(group, omit_leading_one=(g == 1)) + BIG_UNITS[g])
    return "".join(parts)


def numeral_pairs(
    count: int, max_value: int, rng: random.Random, exclude: set[int] = frozenset()
) -> list[int]:
    """``count`` distinct numbers in [1, max_value], none in ``exclude``."""
    if count > max_value - len(exclude):
        raise ValueError(
            f"count={count} distinct numbers do not fit in [1, {max_value}] minus {len(exclude)}"
        )
    out: set[int] = set()
    while len(out) < count:
        n = rng.randint(1, max_value)
        if n not in exclude:
            out.add(n)
    return sorted(out)


def numerals_task(n_train: int = 6000, n_test: int = 500, max_value: int = 99_999, seed: int = 0) -> Task:
    """Digits -> Sino-Korean numerals, train and test numbers disjoint."""
    rng = random.Random(seed)
    test_n = numeral_pairs(n_test, max_value, rng)
    train_n = numeral_pairs(n_train, max_value, rng, exclude=set(test_n))
    train = [(list(str(n)), list(sino_korean(n))) for n in train_n]
    test = [(list(str(n)), list(sino_korean(n))) for n in test_n]
    return Task("numerals", Vocab("0123456789"), Vocab([c for _, t in train for c in t]), train, test, "")
