"""One ray-cast head at a given pose: the synthetic dataset's renderer.

Heads are ray-cast, not painted as 2D sprites, so that every pose cue moves the way a
real head's does: an ellipsoid skull and jaw, a protruding nose and ears, and eyes,
eyebrows, mouth and hair laid on the skull's surface. The head is rotated by tilt
(about its left-right axis) and pan (about the vertical axis), projected orthographically
and shaded by a random light. Faces at 15 and 30 degrees differ by how far the nose and
eyes have moved across the face and by how much of each ear shows, which is what the
tutorial's bin thresholds (about 19.5 degrees) ask a model to tell apart.

Conventions: positive pan turns the face towards the image's right, positive tilt turns
it upwards. Images are RGB; the dataset writers store them in their ``channel_order``.
Drawing uses numpy only (no image library).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

DEFAULT_SIZE = 84
_SUPERSAMPLE = 2  # rendered at twice the size and averaged down: cheap anti-aliasing

# Object ids in the depth buffer.
_BACKGROUND, _SKULL, _JAW, _NOSE, _EAR_RIGHT, _EAR_LEFT = range(6)


@dataclass(frozen=True)
class _Scene:
    """Every random choice behind one image, drawn before anything is rendered."""

    radius: float  # head half-height in output pixels
    offset_x: float  # head centre from the image centre, output pixels
    offset_y: float
    roll: float  # in-plane head rotation, radians
    light: tuple[float, float, float]  # unit vector towards the light (x right, y up, z viewer)
    ambient: float
    diffuse: float
    head_width: float  # skull half-width relative to half-height
    eye_height: float
    eye_spacing: float
    mouth_width: float
    gaze_x: float
    hairline: float  # where the hair starts on the forehead
    hair_back: float  # how far down the back of the head the hair reaches
    skin: np.ndarray  # RGB in [0, 1]
    hair: np.ndarray
    iris: np.ndarray
    lips: np.ndarray
    background: np.ndarray  # (n, n, 3) at the supersampled size, values in [0, 1]
    noise: np.ndarray  # (size, size, 3) additive sensor noise
    gain: float
    bias: float


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _smooth_noise(rng: np.random.Generator, n: int, cells: int, channels: int) -> np.ndarray:
    """Bilinearly upsampled random grid: blotchy low-frequency texture in [0, 1]."""
    grid = rng.random((cells + 1, cells + 1, channels))
    pos = np.linspace(0.0, cells, n, endpoint=False) + cells / (2 * n)
    index = np.minimum(pos.astype(int), cells - 1)
    frac = (pos - index)[:, None, None]
    rows = grid[index] * (1 - frac) + grid[index + 1] * frac
    frac_c = (pos - index)[None, :, None]
    return rows[:, index] * (1 - frac_c) + rows[:, index + 1] * frac_c


def _draw_background(rng: np.random.Generator, n: int) -> np.ndarray:
    """Clutter: a blotchy base, then random boxes, discs and stripe patches."""
    base = rng.random(3) * 0.8 + 0.1
    image = base * (0.6 + 0.8 * _smooth_noise(rng, n, int(rng.integers(2, 7)), 1))
    coords = np.arange(n) / n
    for _ in range(int(rng.integers(4, 12))):
        colour = rng.random(3)
        cx, cy = rng.random(2)
        half_w, half_h = rng.uniform(0.04, 0.35, size=2)
        kind = rng.integers(3)
        if kind == 2:
            angle = rng.uniform(0, math.pi)
            period = rng.uniform(0.03, 0.15)
        # Every shape lies inside its box, so only the box's pixels are tested: a few
        # times faster than masks over the whole image, and the same pixels.
        cols = np.flatnonzero(np.abs(coords - cx) < half_w)
        rows = np.flatnonzero(np.abs(coords - cy) < half_h)
        if not cols.size or not rows.size:
            continue
        xx, yy = coords[cols][None, :], coords[rows][:, None]
        if kind == 0:
            mask = np.ones((rows.size, cols.size), dtype=bool)
        elif kind == 1:
            mask = ((xx - cx) / half_w) ** 2 + ((yy - cy) / half_h) ** 2 < 1
        else:
            phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period
            mask = np.sin(2 * math.pi * phase) > 0
        image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1][mask] = colour
    return np.clip(image, 0.0, 1.0)


def _draw_scene(rng: np.random.Generator, size: int) -> _Scene:
    # Mostly light-to-dark skin tones; hair from blond to black, sometimes grey.
    skin_tone = rng.uniform(0.0, 1.0)
    skin = np.array([0.95, 0.78, 0.65]) * (1 - skin_tone) + np.array([0.42, 0.27, 0.18]) * skin_tone
    skin = np.clip(skin * rng.uniform(0.9, 1.1, 3), 0, 1)
    hair_kind = rng.random()
    if hair_kind < 0.15:
        hair = np.full(3, rng.uniform(0.55, 0.85))
    else:
        hair = np.array([0.85, 0.7, 0.4]) * rng.uniform(0.05, 1.0) ** 1.5
    hair = np.clip(hair * rng.uniform(0.85, 1.15, 3), 0, 1)
    iris = np.array([[0.35, 0.2, 0.1], [0.25, 0.4, 0.6], [0.3, 0.45, 0.25]])[rng.integers(3)]
    lips = np.clip(skin * np.array([0.85, 0.5, 0.5]), 0, 1)
    light = _unit(np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.3, 0.9), rng.uniform(0.5, 1.0)]))
    n = size * _SUPERSAMPLE
    return _Scene(
        radius=size * rng.uniform(0.27, 0.35),
        offset_x=size * rng.uniform(-0.08, 0.08),
        offset_y=size * rng.uniform(-0.08, 0.08),
        roll=math.radians(rng.uniform(-6, 6)),
        light=tuple(float(v) for v in light),
        ambient=float(rng.uniform(0.3, 0.5)),
        diffuse=float(rng.uniform(0.5, 0.8)),
        head_width=float(rng.uniform(0.74, 0.86)),
        eye_height=float(rng.uniform(0.11, 0.15)),
        eye_spacing=float(rng.uniform(0.27, 0.33)),
        mouth_width=float(rng.uniform(0.16, 0.24)),
        gaze_x=float(rng.uniform(-0.02, 0.02)),
        hairline=float(rng.uniform(0.5, 0.62)),
        hair_back=float(rng.uniform(-0.75, -0.2)),
        skin=skin,
        hair=hair,
        iris=iris,
        lips=lips,
        background=_draw_background(rng, n),
        noise=rng.normal(0.0, rng.uniform(0.0, 0.04), (size, size, 3)),
        gain=float(rng.uniform(0.8, 1.2)),
        bias=float(rng.uniform(-0.08, 0.08)),
    )


def _mirror(scene: _Scene) -> _Scene:
    """The same scene reflected left-right (the head model itself is symmetric)."""
    lx, ly, lz = scene.light
    return replace(
        scene,
        offset_x=-scene.offset_x,
        roll=-scene.roll,
        light=(-lx, ly, lz),
        gaze_x=-scene.gaze_x,
        background=scene.background[:, ::-1],
        noise=scene.noise[:, ::-1],
    )


def _rotation(tilt: float, pan: float, roll: float) -> np.ndarray:
    """Head-to-world rotation: tilt about the head's x axis, then pan, then in-plane roll."""
    ct, st = math.cos(tilt), math.sin(tilt)
    cp, sp = math.cos(pan), math.sin(pan)
    cr, sr = math.cos(roll), math.sin(roll)
    tilt_m = np.array([[1, 0, 0], [0, ct, st], [0, -st, ct]])  # face (+z) turns to +y
    pan_m = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])  # face turns to +x
    roll_m = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return roll_m @ pan_m @ tilt_m


def _ellipse(x: np.ndarray, y: np.ndarray, cx, cy, rx, ry) -> np.ndarray:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1.0


_HEAD_REACH = 1.2  # no part of the head model lies further than this from its centre


def _render(scene: _Scene, tilt_degrees: float, pan_degrees: float, size: int) -> np.ndarray:
    n = size * _SUPERSAMPLE
    # Pixel centres, symmetric about the image centre so that mirroring is exact.
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE - size / 2
    x_line = (coords - scene.offset_x) / scene.radius
    y_line = -(coords - scene.offset_y) / scene.radius  # world y points up
    image = scene.background.copy()

    # The neck stays upright in the world whatever the head does: a vertical cylinder
    # whose look depends on x alone. Its depth decides what of it the head hides.
    neck_r, neck_z = 0.5 * scene.head_width, -0.15
    neck_cols = np.abs(x_line) < neck_r
    neck_rows = y_line < -0.55
    neck_front = np.sqrt(np.maximum(neck_r**2 - x_line**2, 0.0))
    neck_normal = np.stack([x_line, np.zeros_like(x_line), neck_front], axis=-1)
    neck_colour = scene.skin * 0.85 * _shade(scene, neck_normal)  # (n, 3)
    image[np.ix_(neck_rows, neck_cols)] = neck_colour[neck_cols]

    # Ray-cast only the square around the head: about half the pixels, same result.
    cols = np.flatnonzero(np.abs(x_line) < _HEAD_REACH)
    rows = np.flatnonzero(np.abs(y_line) < _HEAD_REACH)
    if cols.size and rows.size:
        window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        colour, depth = _render_head(
            scene, tilt_degrees, pan_degrees, x_line[window[1]], y_line[window[0]]
        )
        neck_depth = np.where(
            neck_rows[window[0], None] & neck_cols[None, window[1]],
            neck_z + neck_front[None, window[1]],
            -np.inf,
        )
        head = depth > neck_depth
        image[window][head] = colour[head]

    image = image.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    image = (image + scene.noise) * scene.gain + scene.bias
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _shade(scene: _Scene, normal: np.ndarray) -> np.ndarray:
    """Ambient plus Lambert factor (..., 1) for world-space normals of any length."""
    unit = normal / np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-9)
    lambert = np.clip(unit @ np.asarray(scene.light), 0.0, None)
    return (scene.ambient + scene.diffuse * lambert)[..., None]


def _head_parts(head_width: float) -> list[tuple[int, tuple, tuple]]:
    """(object id, centre, radii) of the head's ellipsoids, in head units (half-height 1)."""
    hw = head_width
    return [
        (_SKULL, (0.0, 0.05, 0.0), (hw, 1.0, 0.95)),
        (_JAW, (0.0, -0.42, 0.18), (hw * 0.72, 0.58, 0.72)),
        (_NOSE, (0.0, -0.12, 0.92), (0.1, 0.21, 0.22)),
        (_EAR_RIGHT, (hw * 0.97, -0.02, -0.05), (0.07, 0.2, 0.12)),
        (_EAR_LEFT, (-hw * 0.97, -0.02, -0.05), (0.07, 0.2, 0.12)),
    ]


def _render_head(
    scene: _Scene, tilt_degrees: float, pan_degrees: float, x_line: np.ndarray, y_line: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Shaded colour and depth (-inf where missed) of the head over a grid of world points.

    Orthographic rays start at world (x, y, 0) and travel towards the viewer (+z). In
    head coordinates a ray is ``origin + t * direction`` with origin = R^T (x, y, 0),
    direction = R^T e_z; each ellipsoid's front hit solves a quadratic in t. Coordinates
    are kept as separate 2D arrays, built by broadcasting the row and column lines,
    because that is several times faster than stacked (h, w, 3) arrays.
    """
    rotation = _rotation(math.radians(tilt_degrees), math.radians(pan_degrees), scene.roll)
    xs, ys = x_line[None, :], y_line[:, None]
    origin = [xs * rotation[0, k] + ys * rotation[1, k] for k in range(3)]
    direction = rotation[2]

    shape = (y_line.size, x_line.size)
    depth = np.full(shape, -np.inf)
    object_id = np.zeros(shape, dtype=np.int8)
    parts = _head_parts(scene.head_width)
    for part, centre, radii in parts:
        q0 = [(origin[k] - centre[k]) / radii[k] for k in range(3)]
        w = [direction[k] / radii[k] for k in range(3)]
        a = w[0] ** 2 + w[1] ** 2 + w[2] ** 2
        b = q0[0] * w[0] + q0[1] * w[1] + q0[2] * w[2]
        disc = b * b - a * (q0[0] ** 2 + q0[1] ** 2 + q0[2] ** 2 - 1.0)
        t = (np.sqrt(np.maximum(disc, 0.0)) - b) / a  # the hit nearer the viewer
        closer = (disc > 0) & (t > depth)
        depth[closer] = t[closer]
        object_id[closer] = part

    # The surface point in head coordinates decides the texture (eyes move with the head).
    hit_t = np.where(object_id > _BACKGROUND, depth, 0.0)
    px, py, pz = (origin[k] + hit_t * direction[k] for k in range(3))

    # Ellipsoid normals, (p - centre) / radii^2, gathered by the part each pixel shows.
    centres = np.zeros((len(parts) + 1, 3))
    inv_sq = np.ones((len(parts) + 1, 3))
    for part, centre, radii in parts:
        centres[part], inv_sq[part] = centre, 1.0 / np.square(radii)
    normal_head = np.stack(
        [(p - centres[object_id, k]) * inv_sq[object_id, k] for k, p in enumerate((px, py, pz))],
        axis=-1,
    )

    colour = np.broadcast_to(scene.skin, shape + (3,)).copy()
    colour[object_id >= _EAR_RIGHT] *= 0.9
    face = ((object_id == _SKULL) | (object_id == _JAW)) & (pz > 0.25)
    skull = object_id == _SKULL

    # Hair: above a hairline high on the forehead, above the ears at the temples, low at
    # the back. Streaks run down from the crown; an even function of px keeps the head
    # left-right symmetric, which mirror consistency needs.
    hairline = np.interp(pz / 0.95, (-0.3, 0.05, 0.6), (scene.hair_back, 0.25, scene.hairline))
    hair = skull & (py > hairline)
    streaks = 0.8 + 0.2 * np.cos(14.0 * np.arctan2(px[hair], pz[hair]))
    colour[hair] = scene.hair * streaks[:, None]

    for side in (-1.0, 1.0):
        ex = side * scene.eye_spacing
        ey = scene.eye_height
        brow_y = ey + 0.14 - 1.2 * (px - ex) ** 2
        colour[face & _ellipse(px, py, ex, brow_y, 0.14, 0.03)] = scene.hair * 0.6
        colour[face & _ellipse(px, py, ex, ey, 0.12, 0.055)] = (0.93, 0.92, 0.9)
        colour[face & _ellipse(px, py, ex + scene.gaze_x, ey, 0.05, 0.05)] = scene.iris
        colour[face & _ellipse(px, py, ex + scene.gaze_x, ey, 0.022, 0.022)] = 0.05
    mouth_y = -0.5
    colour[face & _ellipse(px, py, 0.0, mouth_y, scene.mouth_width, 0.05)] = scene.lips
    colour[face & _ellipse(px, py, 0.0, mouth_y, scene.mouth_width * 0.9, 0.01)] = scene.lips * 0.4
    nostril = (object_id == _NOSE) & (py < -0.22) & (np.abs(px) > 0.02) & (np.abs(px) < 0.07)
    colour[nostril] *= 0.35

    return colour * _shade(scene, normal_head @ rotation.T), depth


def generate_image(
    rng: np.random.Generator, tilt_degrees: float, pan_degrees: float, size: int = DEFAULT_SIZE
) -> np.ndarray:
    """One uint8 RGB image (size x size x 3) of a random head at (tilt, pan) degrees.

    The random draws do not depend on the pose; for a negative pan the drawn scene is
    reflected before rendering. So the same generator state at pans p and -p gives two
    images that are each other's mirror image - what the training pipeline's flip
    augmentation (flip the image, negate pan) assumes - while the reflection leaves the
    distribution of scenes unchanged, since every reflected quantity is drawn symmetrically.
    """
    scene = _draw_scene(rng, size)
    if pan_degrees < 0:
        scene = _mirror(scene)
    return _render(scene, tilt_degrees, pan_degrees, size)
