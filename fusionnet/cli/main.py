"""The `fusionnet` command line.

    fusionnet matte INPUT... --model CHECKPOINT --out DIR [--save alpha rgba composite trimap]
                             [--glob PATTERN] [--skip-existing]
    fusionnet matte - --model CHECKPOINT [--save KIND] < photo.jpg > photo_alpha.png
    fusionnet serve [MODEL] [--host 127.0.0.1] [--port 8000]
    fusionnet pull [models:/late-fusion-matting@champion] --out DIR [--force] [--project DIR]
    fusionnet export MODEL --format onnx --out model.onnx [--opset N] [--int8 --calibrate SHARDS_OR_IMAGE_DIR [--int8-scheme accurate|fast]]
    fusionnet --version

`matte` writes, per input `<stem>.<ext>`: `<stem>_alpha.png` (L), `<stem>_rgba.png` (cut-out with
estimated foreground colours), `<stem>_composite.png` (over `--background`, a colour or an image) and
`<stem>_trimap.png` (the implicit trimap of the two decoder branches, 0/128/255).

Inputs: image files, video files (suffix in `fusionnet.video.matte.VIDEO_SUFFIXES`, any case; handed to
`fusionnet.video.matte.matte_video`) and folders, mixed in any order. A folder is searched recursively for
images (suffixes PIL decodes, any case: png, jpg, jpeg, webp, bmp, tif, tiff, ...) and videos; hidden
files and folders are skipped, symlinked folders not followed, and `--out` is not searched when it lies
inside the folder. `--glob PATTERN` keeps the files whose path relative to each folder matches,
case-insensitively (`'**/*.jpg'`: any depth; `'*.jpg'`: the folder's top level only). The folder's
layout is mirrored under `--out`: `in/a/b.jpg` -> `OUT/a/b_alpha.png`. A folder with nothing to matte
fails like a bad file (`error: DIR: is a directory with no image or video files`). `--skip-existing`
skips an input whose requested outputs all exist (re-runs over big folders; counted in the summary
line, nothing recomputed).

INPUT `-` reads one image from stdin and writes one PNG to stdout: `--save` then names exactly one kind
and `--out` is not given; every message goes to stderr, and a bad image is `error: <stdin>: <problem>`.

The device and precision used go to stderr (`device: cpu (precision fp32)`, `device: cuda:0 NVIDIA
H200 (precision bf16)`; `--device auto`, the default, takes CUDA when present). A progress bar with
images/s and the time remaining is drawn on stderr for more than one input when stderr is a terminal
(`--progress` / `--no-progress` force it); otherwise only `note:`/`error:` lines and the summary appear.

Output names: inputs whose stems collide (case-insensitively, e.g. `a/cat.png` and `b/Cat.jpg`) in one
output folder are disambiguated in command-line order: the first keeps `<stem>`, later ones get
`<stem>-2`, `<stem>-3`, ... (never a stem another input already uses), with a `note:` on stderr. The
same file given twice is matted once.

A file that fails (missing, not an image, truncated, too large, ...) prints `error: <path>: <problem>`
on stderr, leaves no output behind and does not stop the batch; the exit status is 1 if any file
failed, 2 for a usage error (bad option, unreadable model, unusable --background, an `--out` that
cannot be created, or no input that exists: then nothing is created and no model loaded), else 0.
The summary line counts images, videos or "images and videos".

`--model` takes a path or a URI such as `models:/name@alias`, resolved by
`fusionnet.inference.loading.resolve_model_path` through plugins of entry-point group `fusionnet.model_resolvers`.
A path ending in `.onnx` (from `fusionnet export`) runs through ONNX Runtime (`fusionnet.onnx.runtime`):
same options and outputs; the precision is the file's (fp32 or int8), so `--precision` and `--compile`
do not apply (a note says so when given).

`export` writes an ONNX file (`fusionnet.onnx.export`): input "image" (N,3,H,W) float32 in [0,1] with
N, H, W dynamic and H, W multiples of 32, outputs "alpha", "fg_prob", "bg_prob"; the opset is printed
and stored in the file's metadata. It is checked against PyTorch fp32 on a photo (`--verify-image`,
default ../shared/data/alphamatting-dev/image/GT01.png beside the project holding the current folder when
present, else a synthetic image) and fails (exit 1, nothing written) beyond `--tolerance`. `--int8` quantises it with ONNX Runtime, calibrated
on `--calibrate` (shards of training composites, or a folder of images); `--int8-scheme` says what
int8 touches (accurate, the default: encoder and fusion convolutions; fast: every op).

Code: this module parses and dispatches; `fusionnet.cli.matte` runs `matte`, `fusionnet.cli.inputs`
decides what it mattes and where each output goes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fusionnet import __version__
from fusionnet.cli import matte_args
from fusionnet.cli.matte_args import EXIT_FILE_FAILED, EXIT_OK, EXIT_USAGE, UsageError
from fusionnet.cli.video_args import add_video_arguments

__all__ = ["EXIT_FILE_FAILED", "EXIT_OK", "EXIT_USAGE", "UsageError", "assign_output_stems", "build_parser",
           "main", "parse_background"]
# Only the standard library until a command runs: `--help` and argument errors answer without torch.
_LAZY = {"assign_output_stems": "fusionnet.cli.inputs", "parse_background": "fusionnet.cli.matte"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _handler(module: str, function: str = "run") -> Callable[[argparse.Namespace], int]:
    """`module.function`, imported when the command runs (not when the parser is built)."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusionnet", description="Late Fusion CNN for digital matting (Zhang et al., CVPR 2019)."
    )
    parser.add_argument("--version", action="version", version=f"fusionnet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    matte = commands.add_parser(
        "matte",
        help="predict alpha mattes for images, folders, videos or stdin",
        description="Predict an alpha matte for each input image (no trimap needed).",
    )
    matte_args.add_arguments(matte)
    add_video_arguments(matte)
    add_project_argument(matte)
    matte.set_defaults(handler=_handler("fusionnet.cli.matte"))

    from fusionnet.server import main as server  # stdlib-only at import; torch is loaded when the server starts

    serve = commands.add_parser(
        "serve",
        help="HTTP server: POST /matte, GET /health, GET / (a page to try it)",
        description="Serve a model over HTTP on 127.0.0.1 (unless --host): POST /matte answers a PNG.",
    )
    server.add_arguments(serve)
    serve.set_defaults(handler=server.run)

    pull = commands.add_parser(
        "pull",
        help="download a registered model to a folder",
        description="Download a registered model (a plugin of entry-point group "
        f"{MODEL_PULLER_GROUP!r} handles the URI's scheme; pipeline/ registers one for MLflow).",
    )
    pull.add_argument("uri", nargs="?", default=DEFAULT_PULL_URI, help=f"model URI (default {DEFAULT_PULL_URI})")
    pull.add_argument("--out", required=True, type=Path, metavar="DIR",
                      help="folder to write: a new or empty one, or one an earlier pull wrote (replaced)")
    pull.add_argument("--force", action="store_true", help="replace --out even if it holds files pull did not write")
    add_project_argument(pull)
    pull.set_defaults(handler=run_pull)

    from fusionnet.cli import export as cli_export  # stdlib-only at import, like server

    export = commands.add_parser(
        "export",
        help="export a model to ONNX (fp32, or int8 with --int8), checked against PyTorch",
        description="Export a model file or URI to ONNX for ONNX Runtime (fusionnet matte/serve --model x.onnx).",
    )
    cli_export.add_arguments(export)
    export.set_defaults(handler=cli_export.run)
    return parser


MODEL_PULLER_GROUP = "fusionnet.model_pullers"
DEFAULT_PULL_URI = "models:/late-fusion-matting@champion"
# How --project reaches the URI plugins (pipeline.tracking.store.PROJECT_ENV; fusionnet imports no pipeline code).
PROJECT_ENV = "FUSIONNET_PROJECT"


def add_project_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--project", type=Path, metavar="DIR",
        help="the project whose MLflow store (DIR/mlflow.db) models:/ and runs:/ URIs are looked up in "
        "(default: MLFLOW_TRACKING_URI, else the DVC/git project holding the current folder)")


def run_pull(args: argparse.Namespace) -> int:
    """`fusionnet pull`: hand the URI to the puller plugin registered for its scheme."""
    from importlib.metadata import entry_points

    scheme = args.uri.split(":", 1)[0] if ":" in args.uri else ""
    found = [ep for ep in entry_points(group=MODEL_PULLER_GROUP) if ep.name == scheme]
    if not found:
        raise UsageError(
            f"{args.uri}: no puller for {scheme + ':' if scheme else 'this kind of'} model URI is installed "
            f"(entry-point group {MODEL_PULLER_GROUP!r}); install fusionnet with its pipeline extra"
        )
    try:
        folder = found[0].load()(args.uri, args.out, force=args.force)
    except (LookupError, OSError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    print(f"{args.uri} -> {folder}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    project = getattr(args, "project", None)
    if project is not None and not project.is_dir():
        print(f"error: --project {project}: not a folder", file=sys.stderr)
        return EXIT_USAGE
    before = os.environ.get(PROJECT_ENV)
    if project is not None:
        os.environ[PROJECT_ENV] = str(project.resolve())  # for this command only (main may run in-process)
    try:
        return args.handler(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if project is not None:
            if before is None:
                os.environ.pop(PROJECT_ENV, None)
            else:
                os.environ[PROJECT_ENV] = before


if __name__ == "__main__":
    sys.exit(main())
