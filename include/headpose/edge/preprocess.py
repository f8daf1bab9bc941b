"""An image file -> the model's input, exactly as the format's metadata says.

Size, channel order, value range and resize method come from ``preprocessing`` in the
format's metadata (or ``frozen_model.json``: ``colour_order`` is read there as the older
name of ``channel_order``), never from constants here. Pillow reads the file (any format
it knows, EXIF orientation applied); the resize is written here, see ``resize_bilinear``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from headpose.edge.errors import EdgeClientError

if TYPE_CHECKING:
    import numpy as np

# How the training crops were resized (``datasets/prima_crops.py``, as cv2's INTER_LINEAR),
# which frozen_model.json does not record: the exporter writes it into each format's
# preprocessing, and it is the only method this client knows.
RESIZE = "bilinear-half-pixel"
RESIZE_METHODS = (RESIZE,)
# The values of ``channel_order`` (as in the published record); this module imports no
# other part of the project, so the exporter and validation can share it.
CHANNEL_ORDERS = ("bgr", "rgb")


@dataclass(frozen=True)
class Preprocessing:
    height: int
    width: int
    channel_order: str
    low: float
    high: float
    resize: str


def preprocessing_of(metadata: Mapping[str, Any]) -> Preprocessing:
    """The ``preprocessing`` block of a format's metadata, refused unless the client can follow it."""
    block = metadata.get("preprocessing")
    if not isinstance(block, Mapping):
        raise EdgeClientError("the model's metadata has no preprocessing block")
    if block.get("layout") != "NHWC":
        raise EdgeClientError(f"the model expects layout {block.get('layout')!r}; this client feeds NHWC")
    size = block.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise EdgeClientError(f"the model's image_size {size!r} is not [height, width]")
    order = str(block.get("channel_order") or block.get("colour_order") or "").lower()
    if order not in CHANNEL_ORDERS:
        raise EdgeClientError(f"the model's channel order {order!r} is not one of {CHANNEL_ORDERS}")
    value_range = block.get("value_range")
    if not (isinstance(value_range, list) and len(value_range) == 2 and value_range[0] < value_range[1]):
        raise EdgeClientError(f"the model's value_range {value_range!r} is not [low, high]")
    resize = block.get("resize", RESIZE)
    if resize not in RESIZE_METHODS:
        raise EdgeClientError(f"the model wants resize {resize!r}; this client knows {RESIZE_METHODS}")
    return Preprocessing(size[0], size[1], order, float(value_range[0]), float(value_range[1]), resize)


def load_image(path: str | Path, preprocessing: Preprocessing) -> np.ndarray:
    """The image file as the model's input: float32 ``[1, H, W, 3]``."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # UnidentifiedImageError is an OSError
        raise EdgeClientError(f"cannot read image {path}: {error}") from None
    import numpy as np

    return model_input(np.asarray(rgb), preprocessing)


def model_input(rgb: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """A uint8 ``H x W x 3`` RGB picture -> float32 ``[1, H', W', 3]`` in the model's order and range."""
    import numpy as np

    pixels = resize_bilinear(rgb, preprocessing.height, preprocessing.width)
    if preprocessing.channel_order == "bgr":
        pixels = pixels[..., ::-1]
    scale = (preprocessing.high - preprocessing.low) / 255.0
    return (pixels.astype(np.float32) * np.float32(scale) + np.float32(preprocessing.low))[None]


def resize_bilinear(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres and no antialiasing, rounded to uint8.

    What the training crops went through (``tf.raw_ops.ResizeBilinear`` with
    ``half_pixel_centers``, as cv2's INTER_LINEAR), computed in the same order in float32.
    Written here because Pillow's bilinear filter widens its support when it shrinks an
    image (antialiasing), which would feed the model softer pictures than it was trained on.
    """
    import numpy as np

    source = np.asarray(rgb, dtype=np.float32)
    if source.shape[:2] == (height, width):
        return np.asarray(rgb, dtype=np.uint8)
    rows, row_lerp = _sample_points(source.shape[0], height)
    cols, col_lerp = _sample_points(source.shape[1], width)
    top = source[rows[0]][:, cols[0]], source[rows[0]][:, cols[1]]
    bottom = source[rows[1]][:, cols[0]], source[rows[1]][:, cols[1]]
    x = col_lerp[None, :, None]
    upper = top[0] + (top[1] - top[0]) * x
    lower = bottom[0] + (bottom[1] - bottom[0]) * x
    resized = upper + (lower - upper) * row_lerp[:, None, None]
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def _sample_points(in_size: int, out_size: int):
    """TensorFlow's half-pixel sample points: lower and upper source index and the weight."""
    import numpy as np

    scale = np.float32(in_size / out_size)
    position = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(position)
    lower = np.maximum(floor, 0).astype(np.int64)
    upper = np.minimum(np.ceil(position), in_size - 1).astype(np.int64)
    return (lower, upper), (position - floor).astype(np.float32)
