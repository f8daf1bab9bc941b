"""Label binning exactly as the tutorial, on the dataset's real angle values."""
import math

import pytest

from headpose.training import labels

# Bin of each angle of the Prima grid: the thresholds sit at +-19.47 degrees, so 15 is
# still "centre" and 30 is already an outer bin.
EXPECTED_BIN = {-90: 0, -75: 0, -60: 0, -45: 0, -30: 0, -15: 1, 0: 1, 15: 1, 30: 2, 45: 2, 60: 2, 75: 2, 90: 2}


def test_thresholds_are_the_tutorials_formula():
    low, high = labels.BIN_THRESHOLDS
    assert low == pytest.approx(math.asin(2 / 3 - 1) / math.pi * 2)
    assert high == pytest.approx(math.asin(4 / 3 - 1) / math.pi * 2)
    assert low == pytest.approx(-high)
    assert high * 90 == pytest.approx(19.47, abs=0.01)


@pytest.mark.parametrize("degrees,expected", sorted(EXPECTED_BIN.items()))
def test_bin_of_every_dataset_angle(degrees, expected):
    assert labels.angle_bin(labels.normalise(degrees)) == expected


def test_angle_grids_are_the_datasets():
    assert labels.PAN_ANGLES == (-90, -75, -60, -45, -30, -15, 0, 15, 30, 45, 60, 75, 90)
    assert labels.TILT_ANGLES == (-90, -60, -30, -15, 0, 15, 30, 60, 90)


def test_class_is_pan_bin_times_three_plus_tilt_bin():
    seen = set()
    for tilt in labels.TILT_ANGLES:
        for pan in labels.PAN_ANGLES:
            cls = labels.class_index(labels.normalise(tilt), labels.normalise(pan))
            assert cls == EXPECTED_BIN[pan] * 3 + EXPECTED_BIN[tilt]
            seen.add(cls)
    assert seen == set(range(labels.NUM_CLASSES))


@pytest.mark.parametrize("tilt", labels.TILT_ANGLES)
@pytest.mark.parametrize("pan", labels.PAN_ANGLES)
def test_mirroring_negates_pan_and_mirrors_the_pan_bin(tilt, pan):
    t, p = labels.mirrored(labels.normalise(tilt), labels.normalise(pan))
    assert (t, p) == (labels.normalise(tilt), labels.normalise(-pan))
    assert labels.angle_bin(p) == 2 - labels.angle_bin(labels.normalise(pan))
    assert labels.angle_bin(t) == labels.angle_bin(labels.normalise(tilt))


def test_tensorflow_binning_matches_python():
    import tensorflow as tf

    from headpose.training import shards

    tilts = [labels.normalise(t) for t in labels.TILT_ANGLES for _ in labels.PAN_ANGLES]
    pans = [labels.normalise(p) for _ in labels.TILT_ANGLES for p in labels.PAN_ANGLES]
    got = shards.class_of(tf.constant(tilts), tf.constant(pans)).numpy().tolist()
    assert got == [labels.class_index(t, p) for t, p in zip(tilts, pans)]


def test_class_names_follow_class_order():
    names = labels.class_names()
    assert len(names) == 9
    assert names[0] == "pan=negative/tilt=negative"
    assert names[5] == "pan=centre/tilt=positive"
