"""int8 variants of ONNX Runtime static quantisation: accuracy on real photos vs seconds per 800x800.

Which parts of the network int8 may touch decides both its error and its speed. For each variant of
`fusionnet.onnx.quantize.quantize_onnx` (all in one run, CPU flags in the header):
  accuracy  mean |d alpha| vs ORT fp32 and SAD change on real photos (GT01.., 800 px, raw alpha), a
            trained checkpoint (default models/joint/model.safetensors, make run's), calibrated on its
            training composites (data/shards/train beside it);
  speed     s/image at 800x800 and x ORT fp32, densenet201 paper widths, random init (seed 0): the
            cost of the shipped architecture, which the accuracy model may not have.
Variants: all ops (the default: Conv, Concat, pools, Resize, Relu, Add), conv only, the two decoders
kept fp32, and both. Results go to benchmarks/results/int8.json. Target (issue 12): mean |d alpha|
<= 0.005 and SAD within 1%; a variant that meets it is printed with its speed; none meeting it exits 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import (  # noqa: E402
    PHOTOS, ROOT, TARGET_MEAN_DIFF, TARGET_SAD_CHANGE, calibration_for, default_model, load_text)
from machine import command, header, record  # noqa: E402

from fusionnet.onnx.defaults import DECODERS, INT8_SCHEMES  # noqa: E402

VARIANTS = {  # export --int8-scheme fast / accurate are the first and last
    "all ops": INT8_SCHEMES["fast"],
    "conv only": {"op_types": ("Conv",)},
    "decoders fp32": {"exclude_scopes": DECODERS},
    "conv only, decoders fp32": INT8_SCHEMES["accurate"],
}


def photo_inputs(photos: list[Path], side: int) -> list[tuple[torch.Tensor, tuple[int, int], np.ndarray]]:
    """(network input (1,3,h,w), original size, ground-truth alpha) per photo, longer side `side`."""
    from fusionnet.io.images import fit_within, load_image
    from fusionnet.model.geometry import resize_maps

    out = []
    for path in photos:
        rgb = load_image(path).rgb
        gt = load_image(PHOTOS / "alpha" / path.name).rgb[..., 0]
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()
        out.append((resize_maps(x, fit_within(rgb.shape[:2], side)).clamp_(0, 1), tuple(rgb.shape[:2]), gt))
    return out


@torch.inference_mode()
def alphas(path: Path, inputs) -> list[np.ndarray]:
    from fusionnet.model.geometry import resize_maps
    from fusionnet.onnx.runtime import OnnxMatter

    matter = OnnxMatter(path, device="cpu", refine=False)
    return [resize_maps(matter.run_network(x)[:, :1], size).clamp_(0, 1)[0, 0].numpy() for x, size, _ in inputs]


def seconds(path: Path, side: int, repeats: int) -> float:
    """Median seconds of one session.run on a (1,3,side,side) input, after two warm-up runs.

    Two: ORT's second run at a new size is its slowest (measured 4.8, 8.7, then 3.15 s steady)."""
    from fusionnet.onnx.runtime import INPUT_NAME, create_session

    session, _ = create_session(path, device="cpu")
    x = np.random.default_rng(0).random((1, 3, side, side), dtype=np.float32)
    for _ in range(2):
        session.run(None, {INPUT_NAME: x})
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {INPUT_NAME: x})
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accuracy-model", default=str(ROOT / "models" / "joint" / "model.safetensors"))
    parser.add_argument("--photos", type=int, default=4, help="real photos (GT01..) scored")
    parser.add_argument("--calibration", type=int, default=16, help="calibration images (training composites)")
    parser.add_argument("--side", type=int, default=800, help="photo and timing side")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    parser.add_argument("--no-speed", action="store_true", help="accuracy only (skips the densenet201 export)")
    args = parser.parse_args(argv)
    from fusionnet.model.geometry import as_float_image
    from fusionnet.inference.loading import load_model
    from fusionnet.metrics import sad
    from fusionnet.onnx.export import export_onnx
    from fusionnet.onnx.quantize import quantize_onnx

    print(header() + f"; torch threads {torch.get_num_threads()}", flush=True)
    photos = sorted((PHOTOS / "image").glob("*.png"))[: args.photos]
    model_path = Path(args.accuracy_model)
    if not photos or not model_path.is_file():
        print(f"no accuracy figures: needs {model_path} (make run) and photos in {PHOTOS}", file=sys.stderr)
        return 1
    acc: dict[str, tuple[float, float]] = {}
    speed: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        tmp = Path(tmp)
        calibration, source = calibration_for(model_path, args.calibration, {p.stem for p in photos})
        images = [as_float_image(image) for image in calibration]
        print(f"\n== accuracy: {model_path}, {len(photos)} photos at {args.side} px; calibration: {source}", flush=True)
        inputs = photo_inputs(photos, args.side)
        fp32 = export_onnx(load_model(model_path), tmp / "acc.onnx")
        ref = alphas(fp32, inputs)
        ref_sad = float(np.mean([sad(a, gt) for a, (_, _, gt) in zip(ref, inputs)]))
        print(f"   ort fp32: SAD {ref_sad:.2f}", flush=True)
        for name, options in VARIANTS.items():
            out = alphas(quantize_onnx(fp32, tmp / "acc-int8.onnx", images, **options), inputs)
            diff = float(np.mean([np.abs(a - b).mean() for a, b in zip(out, ref)]))
            change = float(np.mean([sad(a, gt) for a, (_, _, gt) in zip(out, inputs)])) / ref_sad - 1
            acc[name] = (diff, change)
            print(f"   {name:<26} mean|da| {diff:.5f}  SAD {100 * change:+.2f}%", flush=True)
        if not args.no_speed:
            print(f"\n== speed: densenet201, paper widths, random init (seed 0), {args.side}x{args.side}; "
                  f"before: {load_text()}", flush=True)
            fp32 = export_onnx(default_model(), tmp / "speed.onnx")
            speed["ort fp32"] = seconds(fp32, args.side, args.repeats)
            print(f"   {'ort fp32':<26} {speed['ort fp32']:.2f} s", flush=True)
            for name, options in VARIANTS.items():
                speed[name] = seconds(quantize_onnx(fp32, tmp / "speed-int8.onnx", images, **options), args.side,
                                      args.repeats)
                print(f"   {name:<26} {speed[name]:.2f} s ({speed['ort fp32'] / speed[name]:.2f}x ort fp32)", flush=True)
            print(f"   after: {load_text()}", flush=True)
    meets = [n for n, (d, c) in acc.items() if d <= TARGET_MEAN_DIFF and abs(c) <= TARGET_SAD_CHANGE]
    cells = []
    for name, (diff, change) in acc.items():
        cell = f"{name}: |da| {diff:.4f}, SAD {100 * change:+.2f}%"
        if name in speed:
            cell += f", {speed[name]:.2f} s ({speed['ort fp32'] / speed[name]:.2f}x ort fp32 {speed['ort fp32']:.2f} s)"
        cells.append(cell)
    record("int8", [{"what": f"ORT int8 variants: accuracy on {len(photos)} real photos at {args.side} px "
                     f"({model_path.name}, {len(images)} composites calibrate), s/image {args.side}x{args.side} densenet201",
                     "command": command(), "result": "; ".join(cells),
                     "target": f"|da| <= {TARGET_MEAN_DIFF}, SAD within {100 * TARGET_SAD_CHANGE:.0f}%"}])
    fastest = min(meets, key=lambda n: speed.get(n, 0.0)) if meets else None
    print(f"\nmeet the bound: {', '.join(meets) or 'none'}" + (f"; fastest of them: {fastest}" if fastest and speed else ""))
    print(f"{'PASS' if meets else 'FAIL'} ({load_text()})")
    return 0 if meets else 1


if __name__ == "__main__":
    sys.exit(main())
