"""`fusionnet export`: a model file or registry URI -> an ONNX file, checked against PyTorch.

Only the standard library at import (`fusionnet --help` must not pay for torch); the work is
`fusionnet.onnx.export.export_model_file`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fusionnet.cli.argtypes import int_at_least, positive_number

FORMATS = ("onnx",)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `export` subcommand's options."""
    from fusionnet.onnx.defaults import (DEFAULT_INT8_SCHEME, DEFAULT_OPSET, DEFAULT_VERIFY_SIDE, FP32_TOLERANCE,
                                         INT8_SCHEMES, INT8_TOLERANCE, MIN_OPSET)

    parser.add_argument("model", metavar="MODEL", help="model file (.safetensors) or a URI such as models:/name@alias")
    parser.add_argument("--format", choices=FORMATS, required=True, help="export format (onnx)")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="file to write (replaced atomically)")
    parser.add_argument("--opset", type=int_at_least(MIN_OPSET), default=DEFAULT_OPSET,
                        help=f"ONNX opset (default {DEFAULT_OPSET}; the dynamo exporter writes {MIN_OPSET} and up)")
    parser.add_argument("--int8", action="store_true",
                        help="quantise to int8 (ONNX Runtime static QDQ, per-channel weights); needs --calibrate")
    parser.add_argument("--calibrate", type=Path, metavar="SHARDS_OR_IMAGE_DIR",
                        help="training composites to calibrate int8 on: a shard folder (data/shards) or images")
    parser.add_argument("--int8-scheme", choices=tuple(INT8_SCHEMES), default=DEFAULT_INT8_SCHEME,
                        help="what int8 touches: accurate (default; convolutions of the encoder and fusion net, the "
                        "decoders fp32) or fast (every op; ~1.5x faster, about 1.5x the error: benchmarks/bench_int8.py)")
    parser.add_argument("--calibration-images", type=int_at_least(1), default=16, metavar="N",
                        help="how many calibration images (default 16)")
    parser.add_argument("--verify-image", type=Path, metavar="IMAGE",
                        help="photo to check the export on (default: ../shared/data/alphamatting-dev GT01 beside the project "
                        "holding the current folder, if present)")
    parser.add_argument("--verify-side", type=int_at_least(32), default=DEFAULT_VERIFY_SIDE,
                        help=f"network side for the check (default {DEFAULT_VERIFY_SIDE})")
    parser.add_argument("--tolerance", type=positive_number(), default=FP32_TOLERANCE,
                        help=f"largest max |d alpha| fp32 ONNX vs PyTorch (default {FP32_TOLERANCE:g})")
    parser.add_argument("--int8-tolerance", type=positive_number(), default=INT8_TOLERANCE,
                        help=f"largest mean |d alpha| int8 ONNX vs PyTorch fp32 (default {INT8_TOLERANCE:g})")


def run(args: argparse.Namespace) -> int:
    """0 written and checked; 1 the export or its check failed; 2 a usage problem (bad model, options)."""
    from fusionnet.cli.matte import UsageError

    if args.int8 and args.calibrate is None:
        raise UsageError("--int8 needs --calibrate SHARDS_OR_IMAGE_DIR (training composites to calibrate on)")
    if args.calibrate is not None and not args.int8:
        raise UsageError("--calibrate is only used with --int8")
    if args.out.exists() and args.out.is_dir():
        raise UsageError(f"--out {args.out}: is a directory")
    for option, path in (("--calibrate", args.calibrate), ("--verify-image", args.verify_image)):
        if path is not None and not path.exists():  # before a minute of export, not after it
            raise UsageError(f"{option} {path}: no such file or folder")
    from fusionnet.onnx.export import ExportError, export_model_file

    try:
        report = export_model_file(
            args.model, args.out, opset=args.opset, int8=args.int8, calibrate=args.calibrate,
            calibration_count=args.calibration_images, int8_scheme=args.int8_scheme, verify_image=args.verify_image, verify_side=args.verify_side,
            tolerance=args.tolerance, int8_tolerance=args.int8_tolerance,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except (OSError, LookupError, ValueError) as exc:
        raise UsageError(f"{args.model}: {exc}" if str(args.model) not in str(exc) else str(exc)) from exc
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {report.out} (ONNX opset {report.opset}, {report.precision}; input image N,3,H,W with H, W "
          "multiples of 32; outputs alpha, fg_prob, bg_prob)")
    return EXIT_OK
