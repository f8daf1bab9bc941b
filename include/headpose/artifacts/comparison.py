"""Champion and challenger, compared on the same images: a paired test, not two raw accuracies.

Both models are scored on the same evaluation images in the same order, so each image
says which of them got it right. Only the images where they disagree carry evidence: ``b``
that the champion alone got right, ``c`` that the challenger alone did. Under "no
difference" each such image is a fair coin, so ``c`` ~ Binomial(b + c, 1/2): McNemar's exact
test. The accuracy difference is ``(c - b) / n``; its interval comes from the Clopper-Pearson
interval of that coin's bias, ``(b + c) / n * (2 * [lo, hi] - 1)`` - the interval the exact
test inverts, so the interval and the verdict never disagree (the difference is
significant exactly when its interval excludes 0).

Rules (the run parameter ``promotion_rule``):

``not_worse``             promote unless the challenger is significantly worse, or its accuracy
                          is below the champion's minus ``promotion_margin``
``significantly_better``  promote only when it is significantly better

scipy is imported where used: the DAG file never loads it.
"""
from __future__ import annotations

from typing import Any

CONFIDENCE = 0.95
RULES = ("not_worse", "significantly_better")
TEST_NAME = "McNemar's exact test (two-sided) on the discordant images; Clopper-Pearson interval"


class PairingError(ValueError):
    """The two models were not scored on the same images in the same order."""


def paired_comparison(
    challenger: str, champion: str, *, rule: str = "not_worse", margin: float = 0.0,
) -> dict[str, Any]:
    """The paired comparison of two per-image correctness strings (``"1"`` right, ``"0"`` wrong).

    Returns ``difference`` (challenger minus champion accuracy), its ``interval``, the
    ``p_value``, the counts, the ``verdict`` (``better`` | ``worse`` | ``no significant
    difference``), the ``rule`` and whether it ``promote``s, with the ``reason`` in words.
    """
    from scipy.stats import binomtest

    if rule not in RULES:
        raise ValueError(f"promotion rule {rule!r} is not one of {RULES}")
    if len(challenger) != len(champion) or not challenger:
        raise PairingError(f"{len(challenger)} images scored for the new model, {len(champion)} for the published one")
    n = len(challenger)
    champion_only = sum(1 for new, old in zip(challenger, champion) if old == "1" and new == "0")
    challenger_only = sum(1 for new, old in zip(challenger, champion) if new == "1" and old == "0")
    discordant = champion_only + challenger_only
    if discordant:
        test = binomtest(challenger_only, discordant, 0.5)
        bias = test.proportion_ci(confidence_level=CONFIDENCE, method="exact")
        interval = [discordant / n * (2 * bias.low - 1), discordant / n * (2 * bias.high - 1)]
        p_value = float(test.pvalue)
    else:  # the two models agree on every image
        interval, p_value = [0.0, 0.0], 1.0
    difference = (challenger_only - champion_only) / n
    verdict = "better" if interval[0] > 0 else "worse" if interval[1] < 0 else "no significant difference"
    promote, reason = _ruling(rule, verdict, difference, margin)
    return {
        "images": n, "champion_only": champion_only, "challenger_only": challenger_only,
        "difference": difference, "interval": interval, "confidence": CONFIDENCE, "p_value": p_value,
        "test": TEST_NAME, "verdict": verdict, "rule": rule, "margin": margin, "promote": promote,
        "reason": reason,
    }


def _ruling(rule: str, verdict: str, difference: float, margin: float) -> tuple[bool, str]:
    if rule == "significantly_better":
        if verdict == "better":
            return True, "significantly better (rule significantly_better)"
        return False, f"not significantly better ({verdict}; rule significantly_better)"
    if verdict == "worse":
        return False, "significantly worse (rule not_worse)"
    if difference < -margin:
        return False, f"accuracy {difference:+.4f} below the margin {margin:g} (rule not_worse)"
    return True, f"not significantly worse ({verdict}; rule not_worse)"


def describe(comparison: dict[str, Any]) -> str:
    """One line for logs, the run summary and the approver's page."""
    low, high = comparison["interval"]
    return (f"difference {comparison['difference']:+.4f} ({comparison['confidence']:.0%} interval "
            f"{low:+.4f} to {high:+.4f}; {comparison['challenger_only']} images only the new model got right, "
            f"{comparison['champion_only']} only the published one; p={comparison['p_value']:.3g}): "
            f"{comparison['verdict']} -> {'promote' if comparison['promote'] else 'keep the published model'}")
