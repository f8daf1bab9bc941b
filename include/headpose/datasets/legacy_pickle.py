"""Import the tutorial's ``HeadPoseData_trn_test_x15_py2.pkl`` into TFRecord shards.

The tutorial's ``preprocessingDataset_py2.py`` pickled, with Python 2's ``pickle.dump``
and no protocol argument - so protocol 0, the text protocol - a tuple of four numpy
arrays in this order:

=============  ==================  =================================================
``trn_im``     float32 N x 3 x H x W  training crops, values in [0, 1] (pixels / 255)
``test_im``    float32 M x 3 x H x W  validation crops (persons 05, 10, 15)
``trn_output`` float32 N x 2          column 0 tilt, column 1 pan, degrees / 90
``test_output`` float32 M x 2         the same for ``test_im``
=============  ==================  =================================================

Protocol 0 writes each array's raw buffer as one escaped text line, where a byte takes
one to four characters: the arrays themselves (12 training persons x 186 images x 15
crops and 3 held-out persons x 186 x 3, at 3 x 84 x 84 float32) are about 3 GB, the file
6.7 GB. Pickles written with protocol 2 (Python 2 or 3) are read too.

Column order: the script builds the outputs as ``concatenate((tilt, pan), axis=1)`` and
the tutorial's ``resnet_headpose.py`` reads ``[:, 0]`` as tilt and ``[:, 1]`` as pan
(it negates column 1 when mirroring, and mirroring changes pan).

Channel order: the crops were read with ``cv2.imread``, so the pickle holds **BGR**
(``pickle_channel_order="bgr"``; pass ``"rgb"`` for a pickle known to hold RGB). The
shards are written in ``channel_order`` (default ``bgr``, the tutorial's own), so by
default the pixels go through unchanged; the manifest records the order.

Unpickling runs code chosen by whoever wrote the file. ``import_legacy_pickle`` refuses
unless called with ``trust_pickle=True`` (``--trust-pickle``), and even then the
unpickler only resolves the few globals a numpy array pickle needs.

Memory: a pickle cannot be read in pieces, so the arrays are loaded whole. At protocol 0
the unpickler holds an array's escaped text line, its decoded bytes, a latin-1 string
and the array at once: loading a Python 2 protocol-0 pickle peaked at about 8 times its
largest array here, with random pixels (protocol 2: about 2.6 times). The tutorial's
training crops are about 2.8 GB, so importing its file needs about 20 GB of free memory.
Writing is streamed: one image at a time goes through ``ShardWriter``.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path
from typing import Any

from headpose.datasets.settings import CHANNEL_ORDERS, DEFAULT_CHANNEL_ORDER, checked_channel_order
from headpose.training.checksums import file_sha256

SOURCE = "legacy_pickle"
# 2: shards in channel_order (default bgr, the pickle's own; 1 always wrote RGB).
IMPORTER_VERSION = 2
MANIFEST_NAME = "manifest.json"
VALUE_RANGES = ("auto", "unit", "byte")

# (module, name) pairs a numpy-array pickle refers to: Python 2 and NumPy 1 pickles use
# numpy.core, NumPy 2 writes numpy._core; Python 3 at protocols 0-2 wraps bytes in
# _codecs.encode.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class UntrustedPickleError(PermissionError):
    """Loading was refused because the caller did not vouch for the pickle."""


class LegacyPickleError(ValueError):
    """The pickle is not the tutorial's four arrays."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays and nothing else (defence in depth)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise LegacyPickleError(
                f"the pickle refers to {module}.{name}; only numpy arrays are accepted")
        # numpy.core is a deprecated alias of numpy._core in NumPy 2: go to the real one.
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


def load_arrays(path: str | Path, trust_pickle: bool = False) -> tuple:
    """The four arrays ``(trn_im, test_im, trn_output, test_output)``, checked for shape."""
    if trust_pickle is not True:
        raise UntrustedPickleError(
            f"refusing to unpickle {path}: unpickling runs code from the file. Pass "
            "trust_pickle=True (CLI: --trust-pickle) only for a file you made or trust.")
    with open(path, "rb") as handle:
        try:
            # latin1: how Python 2 str (numpy's raw buffers) must be decoded, per numpy's docs.
            loaded = _NumpyOnlyUnpickler(handle, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as error:
            raise LegacyPickleError(f"{path} is not a readable pickle: {error}") from error
    return _check_layout(loaded)


def _check_layout(loaded: Any) -> tuple:
    import numpy as np

    if not (isinstance(loaded, tuple) and len(loaded) == 4
            and all(isinstance(a, np.ndarray) for a in loaded)):
        raise LegacyPickleError("expected a tuple of four numpy arrays "
                                "(train images, test images, train outputs, test outputs)")
    trn_im, test_im, trn_out, test_out = loaded
    for name, images, outputs in (("train", trn_im, trn_out), ("test", test_im, test_out)):
        if images.ndim != 4 or images.shape[1] != 3:
            raise LegacyPickleError(f"{name} images must be N x 3 x H x W, got {images.shape}")
        if outputs.shape != (images.shape[0], 2):
            raise LegacyPickleError(f"{name} outputs must be {images.shape[0]} x 2 "
                                    f"(tilt, pan), got {outputs.shape}")
    if trn_im.shape[2:] != test_im.shape[2:]:
        raise LegacyPickleError(f"train and test images differ in size: "
                                f"{trn_im.shape[2:]} vs {test_im.shape[2:]}")
    return trn_im, test_im, trn_out, test_out


def detect_value_range(*arrays) -> str:
    """``"unit"`` for values in [0, 1] (the tutorial's), ``"byte"`` for [0, 255]."""
    low = min(float(a.min()) for a in arrays if a.size)
    high = max(float(a.max()) for a in arrays if a.size)
    if low < 0 or high > 255:
        raise LegacyPickleError(f"image values span [{low}, {high}]: neither [0, 1] nor [0, 255]")
    return "unit" if high <= 1.0 else "byte"


def to_uint8_hwc(image_chw, value_range: str, reverse_channels: bool):
    """One C x H x W image as uint8 H x W x 3, its channels reversed if asked."""
    import numpy as np

    image = np.transpose(image_chw, (1, 2, 0))
    if reverse_channels:
        image = image[..., ::-1]
    scale = 255.0 if value_range == "unit" else 1.0
    return np.clip(np.rint(image.astype(np.float32) * scale), 0, 255).astype(np.uint8)


def import_legacy_pickle(
    pickle_path: str | Path,
    out_dir: str | Path,
    trust_pickle: bool = False,
    channel_order: str = DEFAULT_CHANNEL_ORDER,
    value_range: str = "auto",
    images_per_shard: int = 1000,
    pickle_channel_order: str = "bgr",
) -> dict:
    """Write ``train-*``/``eval-*`` shards and ``manifest.json`` from the tutorial's pickle.

    ``channel_order`` is the shards' order, ``pickle_channel_order`` the pickle's (``bgr``:
    the tutorial read its images with OpenCV); channels are reversed where they differ.
    """
    checked_channel_order(channel_order)
    checked_channel_order(pickle_channel_order)
    if value_range not in VALUE_RANGES:
        raise ValueError(f"value_range must be one of {VALUE_RANGES}, got {value_range!r}")
    trn_im, test_im, trn_out, test_out = load_arrays(pickle_path, trust_pickle)
    if value_range == "auto":
        value_range = detect_value_range(trn_im, test_im)

    from headpose.training.shards import ShardWriter

    out = Path(out_dir)
    splits = {}
    for split, images, outputs in (("train", trn_im, trn_out), ("eval", test_im, test_out)):
        with ShardWriter(out, split, images_per_shard) as writer:
            for image, (tilt, pan) in zip(images, outputs):
                # The pickle stores degrees / 90; ShardWriter takes degrees.
                writer.write(to_uint8_hwc(image, value_range, channel_order != pickle_channel_order),
                             float(tilt) * 90.0, float(pan) * 90.0)
        splits[split] = writer.summary()
    manifest = {
        "source": SOURCE,
        "source_name": Path(pickle_path).name,
        "source_sha256": file_sha256(pickle_path),
        "settings": {"channel_order": channel_order, "pickle_channel_order": pickle_channel_order,
                     "value_range": value_range, "images_per_shard": images_per_shard,
                     "importer_version": IMPORTER_VERSION},
        "channel_order": channel_order,
        "image": {"height": int(trn_im.shape[2]), "width": int(trn_im.shape[3]),
                  "channels": channel_order.upper(), "dtype": "uint8", "angle_scale_degrees": 90},
        "splits": splits,
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m headpose.datasets.legacy_pickle",
        description="Import the tutorial's HeadPoseData_trn_test_x15_py2.pkl (a Python 2 pickle, "
        "protocol 0 or 2, of train images, test images, train outputs, test outputs) into "
        "TFRecord shards and manifest.json. Unpickling runs code from the file: "
        "--trust-pickle is required.",
    )
    add = parser.add_argument
    add("--pickle", required=True, type=Path, help="the legacy .pkl file")
    add("--out", required=True, type=Path, help="output folder for the shards and manifest.json")
    add("--trust-pickle", action="store_true",
        help="confirm that the pickle comes from a trusted source (required)")
    add("--channel-order", choices=CHANNEL_ORDERS, default=DEFAULT_CHANNEL_ORDER,
        help="channel order of the shards written, recorded in manifest.json (default "
        f"{DEFAULT_CHANNEL_ORDER}, as the tutorial trained)")
    add("--pickle-channel-order", choices=CHANNEL_ORDERS, default="bgr",
        help="channel order in the pickle (default bgr: the tutorial read images with OpenCV)")
    add("--value-range", choices=VALUE_RANGES, default="auto",
        help="pixel values in the pickle: unit = [0, 1] (the tutorial's), byte = [0, 255], "
        "auto = decide from the maximum (default)")
    add("--images-per-shard", type=int, default=1000,
        help="most records in one .tfrecord file (default 1000)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        manifest = import_legacy_pickle(
            args.pickle, args.out, trust_pickle=args.trust_pickle,
            channel_order=args.channel_order, value_range=args.value_range,
            images_per_shard=args.images_per_shard,
            pickle_channel_order=args.pickle_channel_order)
    except (ValueError, OSError) as error:  # UntrustedPickleError is an OSError
        print(f"error: {error}", file=sys.stderr)
        return 1
    counts = {split: summary["count"] for split, summary in manifest["splits"].items()}
    print(json.dumps({"out": str(args.out), "counts": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
