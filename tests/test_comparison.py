"""The paired comparison of champion and challenger: McNemar's exact test, its interval, the rules."""
from __future__ import annotations

import math

import pytest

from headpose.artifacts.comparison import PairingError, describe, paired_comparison


def pair(both: int, neither: int, champion_only: int, challenger_only: int) -> tuple[str, str]:
    """Per-image correctness strings of (challenger, champion) with these counts."""
    challenger = "1" * both + "0" * neither + "0" * champion_only + "1" * challenger_only
    champion = "1" * both + "0" * neither + "1" * champion_only + "0" * challenger_only
    return challenger, champion


def exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value, written out: twice the smaller binomial tail at 1/2."""
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def test_one_or_two_images_more_is_noise_not_a_better_model():
    # 300 images, the new model gets 2 more right than the published one: +0.67 points.
    challenger, champion = pair(both=230, neither=40, champion_only=14, challenger_only=16)
    result = paired_comparison(challenger, champion)
    assert result["difference"] == pytest.approx(2 / 300)
    assert result["p_value"] == pytest.approx(exact_mcnemar(14, 16))
    low, high = result["interval"]
    assert low < 0 < high and result["verdict"] == "no significant difference"
    assert result["promote"] is True  # not worse: the default rule lets it through
    stricter = paired_comparison(challenger, champion, rule="significantly_better")
    assert stricter["promote"] is False and "not significantly better" in stricter["reason"]


def test_only_the_images_where_they_disagree_carry_evidence():
    challenger, champion = pair(both=250, neither=20, champion_only=2, challenger_only=28)
    better = paired_comparison(challenger, champion, rule="significantly_better")
    assert better["verdict"] == "better" and better["promote"] is True
    assert better["interval"][0] > 0 and better["p_value"] < 0.05
    assert better["p_value"] == pytest.approx(exact_mcnemar(2, 28))
    worse = paired_comparison(champion, challenger)  # the same images, roles swapped
    assert worse["verdict"] == "worse" and worse["promote"] is False and worse["interval"][1] < 0
    assert worse["difference"] == pytest.approx(-better["difference"])


@pytest.mark.parametrize("b, c", [(3, 12), (12, 3), (5, 15), (9, 1), (0, 6), (6, 0), (40, 60)])
def test_the_interval_and_the_test_never_disagree(b, c):
    challenger, champion = pair(both=100, neither=10, champion_only=b, challenger_only=c)
    result = paired_comparison(challenger, champion)
    excludes_zero = result["interval"][0] > 0 or result["interval"][1] < 0
    assert excludes_zero == (result["p_value"] < 0.05), result


def test_the_margin_holds_back_a_loss_that_is_not_significant():
    challenger, champion = pair(both=250, neither=30, champion_only=12, challenger_only=8)  # -4 images
    assert paired_comparison(challenger, champion, margin=0.02)["promote"] is True
    held = paired_comparison(challenger, champion, margin=0.01)
    assert held["promote"] is False and "below the margin" in held["reason"]


def test_identical_answers_are_no_difference_and_images_must_pair():
    same = paired_comparison("1101", "1101")
    assert same["interval"] == [0.0, 0.0] and same["p_value"] == 1.0 and same["promote"] is True
    assert "difference +0.0000" in describe(same)
    with pytest.raises(PairingError):
        paired_comparison("110", "1101")
    with pytest.raises(ValueError):
        paired_comparison("1", "1", rule="bigger")
