"""Video matting: flicker with and without temporal smoothing, and frames/s by batch size.

    .venv/bin/python benchmarks/bench_video.py [--model CHECKPOINT] [--random calibrated|plain] [--frames 12]
        [--size 160] [--noise 2] [--strengths 0.5 0.7 0.9] [--thresholds 0.01 0.02 0.04 0.08] [--batch-sizes 1 4]

The clip: a static camera. A real photo (../shared/data/alphamatting-dev/image/GT04.png, scaled to
--size on its longer side; a synthetic disc when the data is missing) repeated --frames times with
independent Gaussian sensor noise of --noise levels (of 255) per frame, written as an MJPG .avi and
decoded again (so compression noise is in it too). A second clip pans the same photo 2 px a frame
(the camera moves): there smoothing must not smear.

Flicker = mean over frames and pixels of |alpha_t - alpha_{t-1}| (as `fusionnet.video.temporal.flicker`)
of the final alpha (guided-filter refined), computed streaming, without and with `AlphaSmoother` at
each --strengths value, motion-gated (--motion-threshold) and ungated (a plain moving average), and
in a sweep of --thresholds at --sweep-strength. Smear: the true alpha (../shared/data's ground truth,
panned with the photo) stands in for each frame's matte, so the error of the smoothed matte against
it, where the true alpha changed since the last frame, is what the smoothing alone smears.

Frames/s: `fusionnet.video.matte.matte_frames` over the decoded clip at each --batch-sizes value, in
interleaved rounds (median), network + guided filter, no rendering or encoding.

Model: --model, else models/joint/model.safetensors if the pipeline has trained one, else a random
network (--random): "calibrated" (default) is bench_inference's densenet201 with BatchNorm statistics
from the clip's first frame and heads rescaled so alpha spreads over [0,1]; such a network is chaotic
(small input changes move alpha a lot), so it overstates flicker: a stress test. "plain" is a random
densenet121 whose alpha is ~0.5 everywhere and hardly flickers. Random figures show the mechanism,
not what a trained model does. Set OMP_NUM_THREADS (e.g. 1) when the host is shared.
Records the figures, naming the model, in benchmarks/results/video.json (benchmarks/machine.py); no target.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from fusionnet.inference.loading import load_model
from fusionnet.inference.matter import Matter
from fusionnet.model import LateFusionNet
from fusionnet.model.geometry import pad_to_multiple
from fusionnet.video.io import VideoReader
from fusionnet.video.matte import matte_frames
from fusionnet.video.temporal import DEFAULT_MOTION_THRESHOLD, AlphaSmoother

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import command, header, record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "models" / "joint" / "model.safetensors"
PHOTO = ROOT.parent / "shared" / "data" / "alphamatting-dev" / "image" / "GT04.png"
TRUE_ALPHA = PHOTO.parent.parent / "alpha" / PHOTO.name
PAN_PX = 2  # even, so the panning margin keeps sizes even


def load_text() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def cpu_flags() -> str:
    found = subprocess.run(
        "grep -o 'amx[a-z_0-9]*\\|avx512_bf16' /proc/cpuinfo | sort -u", shell=True, capture_output=True, text=True
    ).stdout.split()
    return " ".join(found) or "none of amx*/avx512_bf16"


def base_photo(size: int, margin: int) -> tuple[np.ndarray, np.ndarray, str]:
    """`(h, w + margin, 3)` uint8 RGB with longer side `size` (before the panning margin), its true alpha
    `(h, w + margin)` float in [0,1], and a description."""
    if PHOTO.is_file():
        bgr = cv2.imread(str(PHOTO), cv2.IMREAD_COLOR)
        true_alpha = cv2.imread(str(TRUE_ALPHA), cv2.IMREAD_GRAYSCALE)
        scale = size / max(bgr.shape[:2])
        # even sizes: 4:2:0 codecs drop an odd last row/column
        target = (2 * round(bgr.shape[1] * scale / 2) + margin, 2 * round(bgr.shape[0] * scale / 2))
        bgr = cv2.resize(bgr, target, interpolation=cv2.INTER_AREA)
        true_alpha = cv2.resize(true_alpha, target, interpolation=cv2.INTER_AREA).astype(np.float32) / 255
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), true_alpha, f"{PHOTO.name} at {size} px"
    h, w = 2 * (size * 3 // 8), size + margin
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 3) ** 2
    rgb = np.where(disc[..., None], [220, 160, 70], [40, 80, 130]) + 30 * np.sin(xx / 9.0 + yy / 13.0)[..., None]
    return np.clip(rgb, 0, 255).astype(np.uint8), disc.astype(np.float32), "synthetic disc (no ../shared/data)"


Setting = tuple[float, float]  # (strength, motion threshold); a threshold of inf is the ungated EMA


def smear_figures(
    frames: list[np.ndarray], true_alphas: list[np.ndarray], settings: list[Setting]
) -> dict[Setting, float]:
    """setting -> mean over frames of mean |smoothed - true alpha| where the true alpha changed since
    the last frame (the moving edges). The per-frame matte is the true alpha itself, so any error is
    smear from the smoothing alone."""
    errors: dict[Setting, list[float]] = {setting: [] for setting in settings}
    smoothers = {setting: AlphaSmoother(setting[0], min(setting[1], 1e9)) for setting in settings}
    for t, (frame, alpha) in enumerate(zip(frames, true_alphas)):
        rgb = frame.astype(np.float32) / 255
        moved = np.abs(alpha - true_alphas[t - 1]) > 0.02 if t else None
        for setting, smoother in smoothers.items():
            out = smoother(rgb, alpha)
            if moved is not None and moved.any():
                errors[setting].append(float(np.abs(out - alpha)[moved].mean()))
    return {setting: float(np.mean(e)) if e else 0.0 for setting, e in errors.items()}


def write_clip(path: Path, photo: np.ndarray, width: int, frames: int, noise: float, pan: int) -> Path:
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"MJPG"), 25.0,
                             (width, photo.shape[0]))
    for t in range(frames):
        frame = photo[:, pan * t : pan * t + width].astype(np.float32)
        frame = np.clip(frame + rng.normal(0.0, noise, frame.shape) + 0.5, 0, 255).astype(np.uint8)
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def decode(path: Path) -> list[np.ndarray]:
    with VideoReader(path) as reader:
        return list(reader)


def smoothing_figures(
    matter: Matter, frames: list[np.ndarray], settings: list[Setting], batch_size: int
) -> dict[Setting, tuple[float, float]]:
    """setting -> (flicker, mean |smoothed - unsmoothed alpha|), streaming over one pass of the network.
    The setting (0, inf) is smoothing off."""
    smoothers = {setting: AlphaSmoother(setting[0], min(setting[1], 1e9)) for setting in settings}
    previous: dict[Setting, np.ndarray] = {}
    flicker_sum = dict.fromkeys(smoothers, 0.0)
    change_sum = dict.fromkeys(smoothers, 0.0)
    for rgb, result in matte_frames(matter, frames, batch_size):
        for setting, smoother in smoothers.items():
            alpha = smoother(rgb, result.alpha).astype(np.float64)
            if setting in previous:
                flicker_sum[setting] += float(np.abs(alpha - previous[setting]).mean())
            change_sum[setting] += float(np.abs(alpha - result.alpha).mean())
            previous[setting] = alpha
    n = len(frames)
    return {setting: (flicker_sum[setting] / (n - 1), change_sum[setting] / n) for setting in smoothers}


def frames_per_second(
    matter: Matter, frames: list[np.ndarray], batch_sizes: list[int], rounds: int
) -> dict[int, float]:
    seconds: dict[int, list[float]] = {b: [] for b in batch_sizes}
    list(matte_frames(matter, frames[: max(batch_sizes)], max(batch_sizes)))  # warm-up (numba, oneDNN)
    for _ in range(rounds):
        for b in batch_sizes:
            started = time.perf_counter()
            for _ in matte_frames(matter, frames, b):
                pass
            seconds[b].append(time.perf_counter() - started)
    return {b: len(frames) / statistics.median(s) for b, s in seconds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"a trained checkpoint (default: {TRAINED.relative_to(ROOT)} if present)")
    parser.add_argument("--random", choices=["calibrated", "plain"], default="calibrated",
                        help="the random network used when there is no trained model (see above)")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--size", type=int, default=160, help="longer side of the clip in pixels")
    parser.add_argument("--noise", type=float, default=2.0, help="sensor noise std in 8-bit levels")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--motion-threshold", type=float, default=DEFAULT_MOTION_THRESHOLD)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.01, 0.02, 0.04, 0.08],
                        help="motion thresholds to sweep at --sweep-strength")
    parser.add_argument("--sweep-strength", type=float, default=0.7)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per batch size (median)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()

    photo, true_alpha, source = base_photo(args.size, PAN_PX * args.frames)
    width = photo.shape[1] - PAN_PX * args.frames
    spec = args.model or (str(TRAINED) if TRAINED.is_file() else None)
    print(header())
    if spec:
        model, model_text = load_model(spec), f"trained checkpoint {spec}"
    elif args.random == "calibrated":
        from bench_inference import calibrated_model  # the sibling benchmark script

        first = torch.from_numpy(photo[:, :width].astype(np.float32) / 255).permute(2, 0, 1)[None]
        model = calibrated_model(pad_to_multiple(first))
        model_text = "random densenet201 calibrated on the first frame (stress test; NO trained model)"
    else:
        torch.manual_seed(0)
        model = LateFusionNet(backbone="densenet121", pretrained=False)
        model_text = "random densenet121 (seed 0), flat alpha (NO trained model)"
    matter = Matter(model, device="cpu", precision=args.precision)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"CPU flags: {cpu_flags()}, {load_text()}")
    print(f"model: {model_text}; precision {args.precision}")
    print(f"clip: {source}, {width}x{photo.shape[0]}, {args.frames} frames, noise {args.noise:g}/255, MJPG")

    with tempfile.TemporaryDirectory() as tmp:
        static = decode(write_clip(Path(tmp) / "static.avi", photo, width, args.frames, args.noise, 0))
        moving = decode(write_clip(Path(tmp) / "pan.avi", photo, width, args.frames, args.noise, PAN_PX))
    batch, threshold, sweep = max(args.batch_sizes), args.motion_threshold, args.sweep_strength
    off, inf = (0.0, float("inf")), float("inf")
    settings = [off, *[(st, threshold) for st in args.strengths], *[(st, inf) for st in args.strengths]]
    settings += [(sweep, t) for t in args.thresholds if (sweep, t) not in settings]
    static_figures = smoothing_figures(matter, static, settings, batch)
    pan_figures = smoothing_figures(matter, moving, settings, batch)
    panned_alpha = [true_alpha[:, PAN_PX * t : PAN_PX * t + width] for t in range(args.frames)]
    smear = smear_figures(moving, panned_alpha, settings)

    def row(setting: Setting) -> str:
        (flick, change), pan_flick = static_figures[setting], pan_figures[setting][0]
        return (f"{flick:10.6f} {flick / static_figures[off][0]:6.2f}x {change:9.5f} "
                f"{pan_flick / pan_figures[off][0]:9.2f}x {smear[setting]:10.5f}")

    print("\n== flicker = mean |alpha_t - alpha_t-1| on the static clip (the model's final alpha); change = mean "
          "|smoothed - unsmoothed|;\n   pan = flicker on the panning clip vs off; smear = the true alpha as each "
          "frame's matte on the pan,\n   mean |smoothed - true alpha| where it changed since the last frame "
          "(moving edges; 0 = no smear)")
    columns = f"{'flicker':>10} {'vs off':>7} {'change':>9} {'pan':>10} {'smear':>10}"
    print(f"   {'smooth':>6} {'threshold':>10} {columns}")
    print(f"   {'off':>6} {'':>10} {row(off)}")
    for st in args.strengths:
        for setting in ((st, threshold), (st, inf)):
            label = f"{setting[1]:g}" if setting[1] != inf else "ungated"
            print(f"   {st:6.2f} {label:>10} {row(setting)}")
    print(f"\n== motion threshold sweep at smooth {sweep:g}")
    print(f"   {'threshold':>10} {columns}")
    for t in args.thresholds:
        print(f"   {t:10g} {row((sweep, t))}")

    fps = frames_per_second(matter, static, args.batch_sizes, args.rounds)
    print(f"\n== frames/s, matte_frames (network + guided filter), {width}x{photo.shape[0]}, median of {args.rounds}")
    base = fps[args.batch_sizes[0]]
    for b, value in fps.items():
        print(f"   batch {b:>2}: {value:7.3f} frames/s ({value / base:.2f}x batch {args.batch_sizes[0]})")
    print(f"   after: {load_text()} (figures on a shared host are noisy; ratios from one run are safer)")
    flick_off = static_figures[off][0]
    gated = "; ".join(f"{st:g}: {static_figures[(st, threshold)][0] / flick_off:.2f}x" for st in args.strengths)
    smear_text = "; ".join(f"{st:g}: {smear[(st, threshold)]:.3f} gated vs {smear[(st, inf)]:.3f} ungated"
                           for st in args.strengths)
    clip = f"{source}, {width}x{photo.shape[0]}, {args.frames} frames, noise {args.noise:g}/255, MJPG"
    record("video", [
        {"what": f"video flicker, static clip ({clip}), off vs `--smooth S` (motion threshold {threshold:g}); "
                 f"model: {model_text}, {args.precision}", "command": command(),
         "result": f"flicker {flick_off:.4f} off; x off at S = {gated}", "target": ""},
        {"what": f"video smear on a {PAN_PX} px/frame pan (true alpha as each frame's matte), gated vs ungated",
         "command": "(same run)", "result": smear_text, "target": ""},
        {"what": f"video frames/s, `matte_frames` (network + guided filter), {width}x{photo.shape[0]}, "
                 f"torch threads {torch.get_num_threads()}; model: {model_text}", "command": "(same run)",
         "result": "; ".join(f"batch {b}: {v:.2f} frames/s ({v / base:.2f}x)" for b, v in fps.items()), "target": ""},
    ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
