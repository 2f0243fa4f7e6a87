"""The `fusionnet` command line.

    fusionnet matte INPUT... --model CHECKPOINT --out DIR [--save alpha rgba composite trimap]
    fusionnet serve [MODEL] [--host 127.0.0.1] [--port 8000]
    fusionnet pull [models:/late-fusion-matting@champion] --out DIR
    fusionnet --version

`matte` writes, per input `<stem>.<ext>`: `<stem>_alpha.png` (L), `<stem>_rgba.png` (cut-out with
estimated foreground colours), `<stem>_composite.png` (over `--background`, a colour or an image) and
`<stem>_trimap.png` (the implicit trimap of the two decoder branches, 0/128/255).

Output names: inputs whose stems collide (case-insensitively, e.g. `a/cat.png` and `b/Cat.jpg`) are
disambiguated in command-line order: the first keeps `<stem>`, later ones get `<stem>-2`, `<stem>-3`,
... (never a stem another input already uses), with a `note:` on stderr. The same file given twice
is matted once.

A file that fails (missing, not an image, truncated, too large, ...) prints `error: <path>: <problem>`
on stderr, leaves no output behind and does not stop the batch; the exit status is 1 if any file
failed, 2 for a usage error (bad option, unreadable model, unusable --background), else 0.

`--model` takes a path or a URI such as `models:/name@alias`, resolved by
`fusionnet.infer.resolve_model_path` through plugins of entry-point group `fusionnet.model_resolvers`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fusionnet import __version__
from fusionnet.imageio import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, to_uint8, write_pngs_atomic
from fusionnet.infer import (
    DEFAULT_GUIDED_EPS,
    DEFAULT_GUIDED_RADIUS,
    DEFAULT_MAX_OUTPUT_SIDE,
    DEFAULT_MAX_SIDE,
    DEVICES,
    PRECISIONS,
    MatteResult,
)
from fusionnet.render import OUTPUT_KINDS, Background, render_outputs

DEFAULT_BACKGROUND = "white"
EXIT_OK, EXIT_FILE_FAILED, EXIT_USAGE = 0, 1, 2

class UsageError(Exception):
    """A problem with the command as a whole (exit 2), not with one input file."""

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value

def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value

def _positive_float(text: str) -> float:
    value = float(text)
    if not (0.0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusionnet", description="Late Fusion CNN for digital matting (Zhang et al., CVPR 2019)."
    )
    parser.add_argument("--version", action="version", version=f"fusionnet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    matte = commands.add_parser(
        "matte",
        help="predict alpha mattes for images",
        description="Predict an alpha matte for each input image (no trimap needed).",
    )
    matte.add_argument("inputs", nargs="+", metavar="INPUT", type=Path, help="image files")
    matte.add_argument(
        "--model", required=True, metavar="CHECKPOINT",
        help="model file (fusionnet.model.save), or a URI handled by a fusionnet.model_resolvers plugin",
    )
    matte.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (created)")
    matte.add_argument(
        "--save", nargs="+", choices=OUTPUT_KINDS, default=["alpha"], metavar="KIND",
        help=f"what to write per image, any of {', '.join(OUTPUT_KINDS)} (default: alpha)",
    )
    matte.add_argument(
        "--background", default=DEFAULT_BACKGROUND, metavar="COLOUR|IMAGE",
        help="composite background: a colour ('white', '#00ff00', 'rgb(0,0,255)') or an image file, "
        "scaled to cover and centre-cropped (default: white)",
    )
    matte.add_argument(
        "--refine", action=argparse.BooleanOptionalAction, default=True,
        help="refine alpha with the guided filter at full resolution (default: on)",
    )
    matte.add_argument(
        "--radius", type=_non_negative_int, default=DEFAULT_GUIDED_RADIUS,
        help=f"guided filter radius in pixels (default {DEFAULT_GUIDED_RADIUS}; 0 disables it)",
    )
    matte.add_argument(
        "--eps", type=_positive_float, default=DEFAULT_GUIDED_EPS,
        help=f"guided filter eps on the [0,1] colour scale (default {DEFAULT_GUIDED_EPS:g})",
    )
    matte.add_argument(
        "--max-side", type=_positive_int, default=DEFAULT_MAX_SIDE,
        help=f"longer side of the network input (default {DEFAULT_MAX_SIDE}, as in the paper)",
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
        "--precision", choices=PRECISIONS, default="fp32",
        help="fp32 (reference), bf16 (fast path: channels-last bfloat16; CPU or CUDA), fp16 (CUDA autocast)",
    )
    matte.add_argument(
        "--compile", action="store_true",
        help="torch.compile the network: minutes of compiling per image size, so only for many same-size images",
    )
    matte.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="progress bar (default: on for more than one file when stderr is a terminal)",
    )
    matte.set_defaults(handler=run_matte)

    from fusionnet import server  # stdlib-only at import; torch is loaded when the server starts

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
    pull.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to create (replaced if it exists)")
    pull.set_defaults(handler=run_pull)
    return parser

MODEL_PULLER_GROUP = "fusionnet.model_pullers"
DEFAULT_PULL_URI = "models:/late-fusion-matting@champion"

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
        folder = found[0].load()(args.uri, args.out)
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
    try:
        return args.handler(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

# ---------------------------------------------------------------------------------------------
# fusionnet matte
# ---------------------------------------------------------------------------------------------

def assign_output_stems(paths: Sequence[Path]) -> tuple[list[tuple[Path, str]], list[str]]:
    """Pair each distinct input with a unique output stem; returns (pairs, notes for stderr).

    Stems compare case-insensitively (case-insensitive file systems would merge them).
    """
    notes: list[str] = []
    distinct: list[Path] = []
    seen: dict[Path, Path] = {}
    for path in paths:
        key = path.resolve()
        if key in seen:
            notes.append(f"note: {path}: same file as {seen[key]}; matted once")
            continue
        seen[key] = path
        distinct.append(path)
    taken = {path.stem.casefold() for path in distinct}
    owner: dict[str, Path] = {}
    pairs: list[tuple[Path, str]] = []
    for path in distinct:
        stem = path.stem
        if stem.casefold() in owner:
            first = owner[stem.casefold()]
            k = 2
            while f"{stem}-{k}".casefold() in taken:
                k += 1
            new_stem = f"{stem}-{k}"
            taken.add(new_stem.casefold())
            notes.append(f"note: {path}: output name '{stem}' is taken by {first}; writing {new_stem}_*.png")
            stem = new_stem
        owner[stem.casefold()] = path
        pairs.append((path, stem))
    return pairs, notes

def parse_background(value: str, max_side: int, max_pixels: int) -> Background:
    """A colour name/spec as an RGB tuple, or an existing image file as `(H,W,3)` float in [0,1]."""
    from PIL import ImageColor

    if Path(value).is_file():
        try:
            return load_image(value, max_side=max_side, max_pixels=max_pixels).rgb
        except ImageLoadError as exc:
            raise UsageError(f"--background {exc}") from exc
    try:
        return ImageColor.getrgb(value)[:3]
    except ValueError:
        raise UsageError(
            f"--background {value!r}: neither an image file nor a colour (e.g. white, '#00ff00')"
        ) from None

def _render_and_write(
    image: np.ndarray, result: MatteResult, args: argparse.Namespace, background: Background, stem: str
) -> str | None:
    """Write one image's outputs (all or none); returns the problem, or None on success."""
    try:
        outputs = render_outputs(image, result, args.save, background)
    except (ValueError, RuntimeError, MemoryError) as exc:
        return f"cannot compute outputs ({type(exc).__name__}: {exc})"
    try:
        write_pngs_atomic({args.out / f"{stem}_{kind}.png": array for kind, array in outputs.items()})
    except (OSError, ValueError, MemoryError) as exc:
        return f"cannot write outputs ({type(exc).__name__}: {exc})"
    return None

def run_matte(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fusionnet.infer import Matter, load_model, matte_files

    started = time.perf_counter()
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    background = (
        parse_background(args.background, args.max_output_side, args.max_pixels)
        if "composite" in args.save
        else None
    )
    try:
        model = load_model(args.model, device="cpu")
    except (OSError, LookupError, ValueError, RuntimeError) as exc:
        raise UsageError(f"--model {exc}") from exc
    try:
        matter = Matter(
            model, device=args.device, precision=args.precision, max_side=args.max_side,
            refine=args.refine, radius=args.radius, eps=args.eps, compile=args.compile,
        )
    except (ValueError, RuntimeError) as exc:
        raise UsageError(str(exc)) from exc
    args.out.mkdir(parents=True, exist_ok=True)

    pairs, notes = assign_output_stems(args.inputs)
    for note in notes:
        print(note, file=sys.stderr)
    stems = dict(pairs)
    show_progress = args.progress if args.progress is not None else len(pairs) > 1 and sys.stderr.isatty()
    failed = 0
    with tqdm(total=len(pairs), disable=not show_progress, unit="image", file=sys.stderr) as bar:
        for item in matte_files(
            matter, [path for path, _ in pairs], max_output_side=args.max_output_side, max_pixels=args.max_pixels
        ):
            problem = item.error
            if problem is None:
                assert item.image is not None and item.result is not None
                problem = _render_and_write(item.image.rgb, item.result, args, background, stems[item.path])
            if problem is not None:
                failed += 1
                tqdm.write(f"error: {item.path}: {problem}", file=sys.stderr)
            elif item.image is not None and item.image.downscaled:
                (oh, ow), (h, w) = item.image.original_size, item.image.size
                tqdm.write(
                    f"note: {item.path}: {ow}x{oh} is larger than --max-output-side; outputs are {w}x{h}",
                    file=sys.stderr,
                )
            bar.update(1)
    done = len(pairs) - failed
    elapsed = time.perf_counter() - started
    print(f"matted {done} of {len(pairs)} images ({failed} failed) in {elapsed:.1f} s; outputs in {args.out}")
    return EXIT_FILE_FAILED if failed else EXIT_OK

if __name__ == "__main__":
    sys.exit(main())
