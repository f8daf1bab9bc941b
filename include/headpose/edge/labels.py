"""The names the tutorial's DeepLens inference Lambda printed for the nine classes.

From the Head Pose Detection sample project's Lambda (AWS DeepLens Developer Guide,
"Create an Inference Lambda Function to Detect Head Poses", its ``output_map``), in class
index order (class = pan_bin * 3 + tilt_bin). That Lambda mirrored each camera frame
(``cv2.flip(frame, 1)``) before inference, so its Left and Right are as seen in the
mirrored picture; this client names the class index the same way and flips nothing.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

DEEPLENS_LABELS: tuple[str, ...] = (
    "Bottom Right", "Middle Right", "Top Right",
    "Bottom Middle", "Middle Middle", "Top Middle",
    "Bottom Left", "Middle Left", "Top Left",
)


def class_labels(classes: Sequence[Mapping[str, Any]]) -> list[str]:
    """The printed name of each class: the Lambda's for the nine-class model, else the metadata's."""
    if len(classes) == len(DEEPLENS_LABELS):
        return list(DEEPLENS_LABELS)
    return [str(entry.get("name", entry.get("index", i))) for i, entry in enumerate(classes)]
