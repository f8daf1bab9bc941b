"""``python -m headpose.artifacts.freeze``: freeze a SavedModel or a ``model.tar.gz`` from the shell."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from headpose.artifacts.freeze import (
    DEFAULT_INPUTS,
    DEFAULT_OUTPUTS,
    DEFAULT_PARITY_TOLERANCE,
    DEFAULT_SIGNATURE,
    freeze_model_archive,
    freeze_saved_model,
)
from headpose.planning.layout import FROZEN_MODEL_FILE, FROZEN_MODEL_JSON_FILE
from headpose.training.serving import CHANNEL_ORDERS

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m headpose.artifacts.freeze",
        description=(
            "Freeze a TensorFlow SavedModel (or a SageMaker model.tar.gz holding one under "
            "export/*/*) into frozen_model.pb plus frozen_model.json metadata. Prints a JSON "
            "summary (paths, sha256, node counts, parity) on stdout."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--saved-model-dir", type=Path,
                        help="folder holding saved_model.pb and variables/")
    source.add_argument("--model-tar", type=Path,
                        help="model.tar.gz to extract safely (path-traversal and size checks) "
                             "and search for its one export/*/* SavedModel")
    parser.add_argument("--output-dir", type=Path, required=True,
                        help=f"folder for {FROZEN_MODEL_FILE} and {FROZEN_MODEL_JSON_FILE} (created)")
    parser.add_argument("--input-node", action="append", dest="input_nodes", metavar="NAME",
                        help="input placeholder name, or Const_1 (the tutorial's) to rename the "
                             "signature's input; repeat for several (default: inputs)")
    parser.add_argument("--output-node", action="append", dest="output_nodes", metavar="NAME",
                        help="output node name: a signature output key, softmax_tensor (the "
                             "tutorial's name of probabilities) or a graph node; repeat for "
                             "several (default: softmax_tensor)")
    parser.add_argument("--signature-key", default=DEFAULT_SIGNATURE,
                        help="SavedModel signature to freeze (default: %(default)s)")
    parser.add_argument("--parity-tolerance", type=float, default=DEFAULT_PARITY_TOLERANCE,
                        help="fail if the frozen graph's outputs differ from the SavedModel's "
                             "by more than this on a fixed random batch; negative skips the "
                             "check (default: %(default)s)")
    parser.add_argument("--channel-order", choices=CHANNEL_ORDERS, default=None,
                        help="channel order the model was trained on, for frozen_model.json "
                             "(default: the SavedModel's assets.extra/preprocessing.json, "
                             "else bgr; a contradiction with that record is an error)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where --model-tar is extracted (default: the system temp folder)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = {
        "input_node_names": tuple(args.input_nodes or DEFAULT_INPUTS),
        "output_node_names": tuple(args.output_nodes or DEFAULT_OUTPUTS),
        "signature_key": args.signature_key,
        "parity_tolerance": None if args.parity_tolerance < 0 else args.parity_tolerance,
        "channel_order": args.channel_order,
    }
    try:
        if args.model_tar is not None:
            result = freeze_model_archive(args.model_tar, args.output_dir, args.work_dir, **options)
        else:
            result = freeze_saved_model(args.saved_model_dir, args.output_dir, **options)
    except (ValueError, FileNotFoundError) as error:  # FreezeError and ArchiveError included
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
