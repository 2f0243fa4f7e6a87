"""`fusionnet matte`: its options, and matting a batch of files, folders and videos or a stdin pipe.

The command's behaviour is documented in `fusionnet.cli.main`; what is matted and where its outputs go is
`fusionnet.cli.inputs`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fusionnet.cli.inputs import CollectedInputs, MatteJob, collect_inputs, outputs_exist
from fusionnet.cli.matte_args import (  # noqa: F401  re-exported: the parser lives where --help need not import torch
    DEFAULT_BACKGROUND,
    EXIT_FILE_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    add_arguments,
)
from fusionnet.cli.video_args import video_options
from fusionnet.inference.matter import Matter, MatteResult, matte_files
from fusionnet.inference.opening import OpenedModel, open_model
from fusionnet.inference.render import Background, render_outputs
from fusionnet.io.images import (
    ImageLoadError,
    LoadedImage,
    encode_png,
    load_image,
    load_image_bytes,
    write_pngs_atomic,
)
from fusionnet.video import matte as video

STDIN = "-"
STDIN_NAME, STDOUT_NAME = "<stdin>", "<stdout>"
# rate_noinv: tqdm would switch to s/image below one image a second; image/s reads the same at any speed.
PROGRESS_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"


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


def describe_device(matter: Matter, requested_precision: str) -> str:
    """What `matte` reports on stderr: `cpu (precision fp32)`, `cuda:0 NVIDIA H200 (precision bf16)`."""
    describe = getattr(matter, "describe", None)
    if describe is not None:  # an OnnxMatter: the ONNX Runtime provider and the file's precision
        return describe()
    device = matter.device
    name = str(device)
    if device.type == "cuda":
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        name = f"cuda:{index} {torch.cuda.get_device_name(index)}"
    reason = f": {matter.precision_reason}" if requested_precision == "auto" else ""
    return f"{name} (precision {matter.precision}{reason})"


def _render(
    image: np.ndarray, result: MatteResult, kinds: Sequence[str], background: Background | None
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """(uint8 outputs by kind, None), or (None, the problem)."""
    try:
        return render_outputs(image, result, kinds, background), None
    except (ValueError, RuntimeError, MemoryError) as exc:
        return None, f"cannot compute outputs ({type(exc).__name__}: {exc})"


def _write_outputs(outputs: dict[str, np.ndarray], out_dir: Path, stem: str) -> str | None:
    """Write `<stem>_<kind>.png` files (all or none); returns the problem, or None on success."""
    try:
        write_pngs_atomic({out_dir / f"{stem}_{kind}.png": array for kind, array in outputs.items()})
    except (OSError, ValueError, MemoryError) as exc:
        return f"cannot write outputs ({type(exc).__name__}: {exc})"
    return None


def _downscaled_note(name: str | Path, image: LoadedImage) -> str:
    (oh, ow), (h, w) = image.original_size, image.size
    return f"note: {name}: {ow}x{oh} is larger than --max-output-side; outputs are {w}x{h}"


def _check_matte_usage(args: argparse.Namespace) -> bool:
    """Raise UsageError for a command that cannot work; returns whether it pipes stdin to stdout."""
    if any(str(path) == STDIN for path in args.inputs):
        if len(args.inputs) > 1:
            raise UsageError(f"INPUT {STDIN} (one image on stdin) cannot be combined with other inputs")
        if len(set(args.save)) != 1:
            kinds = " ".join(args.save)
            raise UsageError(f"with INPUT {STDIN} one PNG goes to stdout, so --save takes exactly one kind, got {kinds}")
        if args.out is not None or args.skip_existing:
            raise UsageError(f"--out and --skip-existing are not used with INPUT {STDIN} (the PNG goes to stdout)")
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError(f"INPUT {STDIN} reads an image from stdin, which is a terminal; pipe one in (< photo.jpg)")
        if sys.stdout is None or sys.stdout.isatty():
            raise UsageError("stdout is a terminal; redirect the PNG (> alpha.png) or pipe it on")
        return True
    if args.out is None:
        raise UsageError(f"--out DIR is required (only INPUT {STDIN} writes to stdout)")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    _check_creatable(args.out)
    return False


def _check_creatable(out: Path) -> None:
    """UsageError unless `out` exists or its nearest existing parent is a folder this process may write in."""
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent == out:
        problem = None if os.access(out, os.W_OK | os.X_OK) else "folder is not writable"
    elif not parent.is_dir():
        problem = f"cannot be created: {parent} is not a directory"
    else:
        problem = None if os.access(parent, os.W_OK | os.X_OK) else f"cannot be created: {parent} is not writable"
    if problem:
        raise UsageError(f"--out {out}: {problem}")


def _make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a race with the check above, or a limit os.access does not see (read-only fs)
        raise UsageError(f"--out {out}: cannot be created ({exc.strerror or exc})") from exc


def run(args: argparse.Namespace) -> int:
    """`fusionnet matte`: the exit status (0 all matted or skipped, 1 some input failed)."""
    started = time.perf_counter()
    piped = _check_matte_usage(args)
    try:
        collected = None if piped else collect_inputs(args.inputs, args.out, args.glob)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if collected is not None:
        for note in collected.notes:
            print(note, file=sys.stderr)
        for path, problem in collected.errors:
            print(f"error: {path}: {problem}", file=sys.stderr)
        if not collected.jobs:  # nothing to matte: say so before loading a model or creating --out
            return EXIT_USAGE
    background = (
        parse_background(args.background, args.max_output_side, args.max_pixels)
        if "composite" in args.save
        else None
    )
    opened = _open(args)
    matter = opened.matter
    for note in opened.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"device: {describe_device(matter, opened.settings['precision'])}", file=sys.stderr)
    by_source: dict[str, list[str]] = {}
    for key, source in sorted(opened.settings_from.items()):
        if source not in ("command line", "default"):
            by_source.setdefault(source, []).append(f"{key}={opened.settings[key]}")
    for source, keys in by_source.items():  # the model's own settings (its header, a registry's settings.json)
        print(f"note: {', '.join(keys)} from {source}", file=sys.stderr)
    if collected is None:
        return _on_inference_thread(_matte_stdin, matter, args, background)
    return _on_inference_thread(_matte_batch, matter, args, background, collected, started)


def _on_inference_thread(work, *args):
    """`work(*args)` on one worker thread with this process's torch thread count, as the server runs
    each request (issue 27: under a loaded CPU, the same model and threads ran 1.4-1.7x slower from
    the main thread than from a worker thread; benchmarks/bench_cli.py --busy measures both ends)."""
    import threading

    import torch

    threads = torch.get_num_threads()  # OMP_NUM_THREADS if set, else the cores
    outcome: dict = {}

    def target() -> None:
        torch.set_num_threads(threads)
        try:
            outcome["value"] = work(*args)
        except BaseException as exc:  # re-raised on the main thread (UsageError, KeyboardInterrupt...)
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="fusionnet-matte", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)  # a timed join keeps Ctrl-C working on the main thread
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _open(args: argparse.Namespace) -> OpenedModel:
    """--model opened the one way every front end opens it (UsageError if unusable)."""
    try:
        return open_model(args.model, device=args.device, compile=args.compile, max_side=args.max_side,
                          precision=args.precision, refine=args.refine, radius=args.radius, eps=args.eps)
    except ImportError as exc:  # an .onnx model without onnxruntime installed
        raise UsageError(f"--model {args.model}: ONNX models need onnxruntime ({exc})") from exc
    except (OSError, LookupError, ValueError, RuntimeError) as exc:
        # a problem with the file names it ("--model x.safetensors: ..."); one with a device or setting does not
        raise UsageError(f"--model {exc}" if str(args.model) in str(exc) else str(exc)) from exc


def _matte_stdin(matter: Matter, args: argparse.Namespace, background: Background | None) -> int:
    """INPUT -: one image from stdin, one PNG (of the one `--save` kind) to stdout, messages to stderr."""
    try:
        data = sys.stdin.buffer.read()
    except OSError as exc:
        print(f"error: {STDIN_NAME}: cannot read ({exc})", file=sys.stderr)
        return EXIT_FILE_FAILED
    try:
        image = load_image_bytes(data, STDIN_NAME, max_side=args.max_output_side, max_pixels=args.max_pixels)
        result = matter(image.rgb)
    except ImageLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FILE_FAILED
    except (RuntimeError, ValueError, MemoryError) as exc:
        print(f"error: {STDIN_NAME}: inference failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        return EXIT_FILE_FAILED
    outputs, problem = _render(image.rgb, result, args.save, background)
    if outputs is None:
        print(f"error: {STDIN_NAME}: {problem}", file=sys.stderr)
        return EXIT_FILE_FAILED
    if image.downscaled:
        print(_downscaled_note(STDIN_NAME, image), file=sys.stderr)
    encoded = encode_png(outputs[args.save[0]])  # the whole PNG first: a failure never leaves half of one on stdout
    try:
        sys.stdout.buffer.write(encoded)
        sys.stdout.buffer.flush()
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):  # the reader went away: keep Python's exit-time flush quiet
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass
        print(f"error: {STDOUT_NAME}: cannot write the PNG ({exc.strerror or exc})", file=sys.stderr)
        return EXIT_FILE_FAILED
    return EXIT_OK


def _make_dirs(directory: Path) -> list[Path]:
    """`mkdir -p directory`; returns the folders it created, innermost first (to undo on failure)."""
    created: list[Path] = []
    parent = directory
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    directory.mkdir(parents=True, exist_ok=True)
    return created


def _matte_job(
    matter: Matter, job: MatteJob, args: argparse.Namespace, background: Background | None, progress: bool
) -> str | None:
    """Matte one image or video into `job.out_dir`; returns the problem, or None on success."""
    try:
        created = _make_dirs(job.out_dir)
    except OSError as exc:
        return f"cannot create output folder {job.out_dir} ({exc.strerror or exc})"
    problem = None
    if job.is_video:
        try:
            video.matte_video(matter, job.path, job.out_dir, job.stem, args.save, background, video_options(args),
                              progress)
        except video.VideoError as exc:
            problem = exc.problem
    else:
        (item,) = matte_files(matter, [job.path], max_output_side=args.max_output_side, max_pixels=args.max_pixels)
        problem = item.error
        if problem is None:
            assert item.image is not None and item.result is not None
            outputs, problem = _render(item.image.rgb, item.result, args.save, background)
            if outputs is not None:
                problem = _write_outputs(outputs, job.out_dir, job.stem)
        if problem is None and item.image is not None and item.image.downscaled:
            from tqdm import tqdm

            tqdm.write(_downscaled_note(job.path, item.image), file=sys.stderr)
    if problem is not None:
        for folder in created:  # a failed input leaves no empty folders behind either
            try:
                folder.rmdir()
            except OSError:
                break
    return problem


def _matte_batch(
    matter: Matter, args: argparse.Namespace, background: Background | None, collected: CollectedInputs, started: float
) -> int:
    from tqdm import tqdm

    _make_out(args.out)
    jobs = collected.jobs
    todo = [job for job in jobs if not outputs_exist(job, args.save)] if args.skip_existing else jobs
    skipped = len(jobs) - len(todo)
    total = len(jobs) + len(collected.errors)
    show_progress = args.progress if args.progress is not None else len(todo) > 1 and sys.stderr.isatty()
    video_progress = args.progress if args.progress is not None else sys.stderr.isatty()  # frames: one is enough
    failed = len(collected.errors)
    with tqdm(
        total=len(todo), disable=not show_progress, unit="image", file=sys.stderr, bar_format=PROGRESS_FORMAT
    ) as bar:
        for job in todo:
            problem = _matte_job(matter, job, args, background, video_progress)
            if problem is not None:
                failed += 1
                tqdm.write(f"error: {job.path}: {problem}", file=sys.stderr)
            bar.update(1)
    done = total - failed - skipped
    elapsed = time.perf_counter() - started
    counts = f"{failed} failed, {skipped} skipped: outputs exist" if args.skip_existing else f"{failed} failed"
    videos = sum(job.is_video for job in jobs)
    noun = "images" if not videos else "videos" if videos == total else "images and videos"
    print(f"matted {done} of {total} {noun} ({counts}) in {elapsed:.1f} s; outputs in {args.out}")
    return EXIT_FILE_FAILED if failed else EXIT_OK
