"""Head-pose labels exactly as the original tutorial defined them.

Angles are stored normalised by 90 degrees (so -1..1). Each axis is cut into three bins
at ``arcsin(2a/3 - 1) / pi * 2`` for a = 1, 2 - equal areas on a sphere rather than
equal angles - and the class is ``pan_bin * 3 + tilt_bin``.
"""
from __future__ import annotations

import math

# The angles (degrees) that occur in the Prima Head Pose Image Database.
TILT_ANGLES: tuple[int, ...] = (-90, -60, -30, -15, 0, 15, 30, 60, 90)
PAN_ANGLES: tuple[int, ...] = tuple(range(-90, 91, 15))

BIN_THRESHOLDS: tuple[float, float] = tuple(  # type: ignore[assignment]
    math.asin(2 * a / 3 - 1) / math.pi * 2 for a in (1, 2)
)
NUM_BINS = 3
NUM_CLASSES = NUM_BINS * NUM_BINS

# Sign-based names: which way "negative" faces is the dataset's convention, not ours.
_BIN_NAMES = ("negative", "centre", "positive")


def prima_poses() -> list[tuple[int, int]]:
    """(tilt, pan) in degrees of the Prima grid: 93 poses, tilt +-90 only at pan 0."""
    return [
        (tilt, pan)
        for tilt in TILT_ANGLES
        for pan in PAN_ANGLES
        if abs(tilt) != 90 or pan == 0
    ]


def normalise(angle_degrees: float) -> float:
    """Degrees to the tutorial's [-1, 1] scale."""
    return angle_degrees / 90.0


def angle_bin(normalised_angle: float) -> int:
    """Bin 0, 1 or 2 of a normalised angle (thresholds are exclusive on the upper side)."""
    low, high = BIN_THRESHOLDS
    if normalised_angle < low:
        return 0
    if normalised_angle < high:
        return 1
    return 2


def class_index(tilt: float, pan: float) -> int:
    """Class of normalised (tilt, pan): ``pan_bin * 3 + tilt_bin``."""
    return angle_bin(pan) * NUM_BINS + angle_bin(tilt)


def mirrored(tilt: float, pan: float) -> tuple[float, float]:
    """Angles of the horizontally flipped image: pan changes sign, tilt does not."""
    return tilt, -pan


def class_names() -> list[str]:
    """Human-readable class names in class-index order, e.g. ``pan=negative/tilt=centre``."""
    return [
        f"pan={_BIN_NAMES[p]}/tilt={_BIN_NAMES[t]}"
        for p in range(NUM_BINS)
        for t in range(NUM_BINS)
    ]
