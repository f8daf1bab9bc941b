"""The tutorial's random face-containing crops of one Prima image.

Each image draws from its own random stream (``image_rng``), so the crops depend on the
seed and the image only, not on the order in which the archive is read.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from headpose.datasets.prima_archive import FaceBox, ImageKey, PrimaFormatError

if TYPE_CHECKING:
    from headpose.datasets.prima import PrimaSettings


# The tutorial rounds crop heights down to a multiple of 9 (its 16:9 option needs that).
_CROP_STEP = 9


# The tutorial samples crops until one fits; a cap turns a box that admits no crop into an
# error rather than an endless loop.
_MAX_CROP_ATTEMPTS = 100_000


def crop_windows(rng, image_height: int, image_width: int, box: FaceBox, count: int,
                 out_width: int, out_height: int, member: str = "") -> list[tuple[int, int, int, int]]:
    """``count`` crops ``(x, y, width, height)`` that each contain ``box``: the tutorial's sampler.

    The top-left corner is uniform between the image origin and the face's top-left
    corner; the height uniform between just covering the face and reaching the image
    bottom, rounded down to a multiple of 9; the width follows the output aspect ratio;
    draws that do not contain the face or leave the image are rejected. Boxes reaching
    past the image are first clipped to it (the tutorial would loop for ever on them).
    """
    left, top = max(box.left, 0), max(box.top, 0)
    # The tutorial's acceptance test is strict (crop end < image size), hence the -2.
    right, bottom = min(box.right, image_width - 2), min(box.bottom, image_height - 2)
    if left > right or top > bottom:
        raise PrimaFormatError(member, f"face box {box} lies outside the {image_width}x"
                               f"{image_height} image")
    windows = []
    for _ in range(count):
        for _attempt in range(_MAX_CROP_ATTEMPTS):
            x = int(rng.random() * left)
            y = int(rng.random() * top)
            min_height, max_height = bottom - y, image_height - y
            height = (min_height + int(rng.random() * (max_height - min_height))) // _CROP_STEP * _CROP_STEP
            width = height * out_width // out_height
            if right < x + width < image_width and bottom < y + height < image_height:
                windows.append((x, y, width, height))
                break
        else:
            raise PrimaFormatError(member, f"no {out_width}:{out_height} crop of the "
                                   f"{image_width}x{image_height} image contains face box {box}")
    return windows


def image_rng(seed: int, key: ImageKey):
    """The random stream of one image: independent of archive order and of other images."""
    import numpy as np

    return np.random.default_rng(np.random.SeedSequence([seed, key.person, key.series, key.index]))


def augment(image, key: ImageKey, box: FaceBox, count: int, settings: PrimaSettings,
            member: str = "") -> Iterator:
    """The ``count`` uint8 crops of one decoded image (H x W x 3 uint8), in its channel order."""
    import numpy as np
    import tensorflow as tf

    height, width = image.shape[:2]
    windows = crop_windows(image_rng(settings.seed, key), height, width, box, count,
                           settings.width, settings.height, member)
    for x, y, crop_width, crop_height in windows:
        # Bilinear with half-pixel centres and no antialiasing: what cv2.resize's
        # INTER_LINEAR, used by the tutorial, computes, and what tf.image.resize(...,
        # "bilinear") runs - called as the raw op because that wrapper's Python overhead
        # doubles the time per crop.
        resized = tf.raw_ops.ResizeBilinear(
            images=image[None, y:y + crop_height, x:x + crop_width],
            size=[settings.height, settings.width], half_pixel_centers=True,
        ).numpy()[0]
        yield np.clip(np.rint(resized), 0, 255).astype(np.uint8)
