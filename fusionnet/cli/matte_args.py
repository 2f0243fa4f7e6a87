"""`fusionnet matte`'s options and usage error, importable with the standard library alone.

`fusionnet matte --help` and an argument error answer from here before torch is imported (issue 27:
6-8 s per `--help`); `fusionnet.cli.matte` runs the command.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fusionnet.cli.argtypes import int_at_least, positive_number
from fusionnet.defaults import (
    DEFAULT_GUIDED_EPS,
    DEFAULT_GUIDED_RADIUS,
    DEFAULT_MAX_OUTPUT_SIDE,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    DEVICES,
    OUTPUT_KINDS,
    PRECISIONS,
)

DEFAULT_BACKGROUND = "white"
EXIT_OK, EXIT_FILE_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with the command as a whole (exit 2), not with one input file."""


_positive_int = int_at_least(1)
_non_negative_int = int_at_least(0)
_positive_float = positive_number()


def add_arguments(matte: argparse.ArgumentParser) -> None:
    """The `matte` subcommand's options, but for the video ones (`fusionnet.cli.video_args.add_video_arguments`)."""
    matte.add_argument(
        "inputs", nargs="+", metavar="INPUT", type=Path,
        help="image files, video files, folders (searched recursively), or - for one image on stdin (PNG to stdout)",
    )
    matte.add_argument(
        "--model", required=True, metavar="CHECKPOINT",
        help="model file (fusionnet.model.save), a .onnx file (fusionnet export; runs on ONNX Runtime), "
        "or a URI handled by a fusionnet.model_resolvers plugin",
    )
    matte.add_argument(
        "--out", type=Path, metavar="DIR",
        help="output directory (created; mirrors the layout of folder inputs); required unless INPUT is -",
    )
    matte.add_argument(
        "--glob", metavar="PATTERN",
        help="in folder inputs, only files whose path relative to the folder matches, case-insensitively "
        "('**/*.jpg': any depth; '*.jpg': top level only)",
    )
    matte.add_argument(
        "--skip-existing", action="store_true",
        help="skip inputs whose requested outputs all exist already (re-runs over big folders)",
    )
    matte.add_argument(
        "--save", nargs="+", choices=OUTPUT_KINDS, default=["alpha"], metavar="KIND",
        help=f"what to write per image, any of {', '.join(OUTPUT_KINDS)} (default: alpha)",
    )
    matte.add_argument(
        "--background", default=DEFAULT_BACKGROUND, metavar="COLOUR|IMAGE",
        help="composite background: a colour ('white', '#00ff00', 'rgb(0,0,255)') or an image file, "
        "scaled to cover and centre-cropped (default: white)",
    )
    # serving settings: None = not given, so the model's stored settings apply (fusionnet.inference.opening)
    matte.add_argument(
        "--refine", action=argparse.BooleanOptionalAction, default=None,
        help="refine alpha with the guided filter at full resolution (default: the model's setting, else on)",
    )
    matte.add_argument(
        "--radius", type=_non_negative_int, default=None,
        help=f"guided filter radius in pixels (default: the model's setting, else {DEFAULT_GUIDED_RADIUS}; "
        "0 disables it)",
    )
    matte.add_argument(
        "--eps", type=_positive_float, default=None,
        help=f"guided filter eps on the [0,1] colour scale (default: the model's setting, else {DEFAULT_GUIDED_EPS:g})",
    )
    matte.add_argument(
        "--max-side", type=_positive_int, default=None,
        help=f"longer side of the network input (default: the model's setting, else {DEFAULT_MAX_SIDE}, as in "
        "the paper)",
    )
    matte.add_argument(
        "--max-output-side", type=_positive_int, default=DEFAULT_MAX_OUTPUT_SIDE,
        help="larger images are decoded downscaled to this longer side and their outputs have that size "
        f"(bounds memory; default {DEFAULT_MAX_OUTPUT_SIDE})",
    )
    matte.add_argument(
        "--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
        help=f"refuse images with more pixels than this (decompression-bomb guard; default {DEFAULT_MAX_PIXELS})",
    )
    matte.add_argument("--device", choices=DEVICES, default="auto", help="default: cuda if available, else cpu")
    matte.add_argument(
        "--precision", choices=PRECISIONS, default=None,
        help="default: the model's setting, else auto (the fastest of fp32-cl, bf16 and a calibrated int8 "
        "measured on this machine); "
        "fp32 (eager reference), fp32-cl (folded BN, channels-last), bf16, int8 (CPU; python -m "
        "fusionnet.inference.int8 calibrates), fp16 (CUDA autocast)",
    )
    matte.add_argument(
        "--compile", action="store_true",
        help="torch.compile the network: sizes are padded to buckets, so at most 16 compiles (minutes each) "
             "per batch size; pays off only for many images",
    )
    matte.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="progress bar (default: on for more than one file when stderr is a terminal)",
    )
