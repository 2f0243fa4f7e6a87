"""GPU check: training and inference speed on CUDA and a short three-step training run, in one JSON file.

    .venv/bin/python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--budget-s 480]
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/x.json   # dry run, < 1 min on 2 cores

Usually run by benchmarks/gpu_check.sh (install, `pytest -m cuda`, then this). Sections, each given a
share of --budget-s (a section, or a configuration within one, that would not fit records
"skipped: budget" instead of running over); the JSON is rewritten after every section, so a machine
taken away mid-run leaves what was measured:

1. train_speed: samples/s of each training step (segmentation, fusion, joint: forward under autocast,
   the step's loss in float32, backward, gradient clip, optimizer step, as `fusionnet.train.loop.run_step`
   does, built from its parts: `accumulate_gradients` (step_module's forward, `step_loss`),
   `set_trainable`, `set_train_mode`, `make_optimizer`, `training_settings`) for
   densenet201 (params-paper.yaml's widths) and efficientnet_lite0 (params-photos.yaml's), 512x512,
   batch sizes 2/4/8, bf16 and fp16 autocast, channels-last on and off; peak memory
   (torch.cuda.max_memory_allocated) per configuration; warm-up iterations excluded, data loading
   excluded (one batch of toy composites stays on the device); an OOM is recorded per configuration.
2. inference: ms per 800x800 image through `fusionnet.inference.network.PreparedNetwork` at batch 1
   and 8, and mean |d alpha| against fp32 on the same inputs (alphamatting-dev photos from
   ../shared/data when present, else synthetic). The issue's "fp32, bf16, + channels-last, + compile"
   map onto PreparedNetwork's precisions: fp32 (eager, NCHW), fp32-cl (BatchNorms folded,
   channels-last), bf16 (folded, channels-last, bf16 autocast on CUDA: bf16 always comes with
   channels-last there), fp16 (the same in fp16), bf16+compile (bf16 with torch.compile).
3. training_run: segmentation -> fusion -> joint with `run_step` on the photo profile
   (params-photos.yaml) on shards built from ../shared/data the way dvc.yaml's data stages build them
   (collect_foregrounds -> composite -> shard_crops, called in-process), or toy shards without it;
   validation SAD/MSE before and after each step. The profile's schedule is scaled down (same epochs,
   fewer iterations per epoch) when a probe of a few iterations says it would not fit the budget.

--device cpu --tiny: 32 px training steps, 64 px images, batch 2, 1 warm-up + 1 timed iteration, tiny
data, one torch thread: every code path once, so the script cannot rot (tests/test_gpu_check.py).
fp16 autocast and peak memory need CUDA and are recorded "n/a on cpu"; training runs fp32 there; the
compile variant traces with torch.compile's "eager" backend (inductor takes about a minute per graph
on 2 cores), and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command, header, machine, results_folder  # noqa: E402

from fusionnet.io.atomic import write_text_atomic  # noqa: E402
from fusionnet.model import LateFusionNet  # noqa: E402
from fusionnet.train.config import STEPS, StepConfig  # noqa: E402
from fusionnet.train.forward import accumulate_gradients, step_module  # noqa: E402
from fusionnet.train.freezing import make_optimizer, set_train_mode, set_trainable  # noqa: E402
from fusionnet.train.torchsettings import training_settings  # noqa: E402
from fusionnet.train.toy import toy_sample, write_toy_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PHOTOS = SHARED / "alphamatting-dev"
BACKBONES = ("densenet201", "efficientnet_lite0")
PROFILE_OF = {"densenet201": "params-paper.yaml", "efficientnet_lite0": "params-photos.yaml"}  # widths, loss weights
PHOTO_PROFILE = "params-photos.yaml"
SECTIONS = ("train_speed", "inference", "training_run")
SHARES = {"train_speed": 0.35, "inference": 0.25, "training_run": 0.40}  # of --budget-s; unused time passes on
INFERENCE_VARIANTS = {  # name -> (PreparedNetwork precision, compile)
    "fp32": ("fp32", False), "fp32-cl": ("fp32-cl", False), "bf16": ("bf16", False),
    "fp16": ("fp16", False), "bf16+compile": ("bf16", True),
}
NA_CPU = "n/a on cpu"
MIB = 2**20


# ---------------------------------------------------------------------------------------------- budget
class Budget:
    """Wall-clock budget: the whole run ends by `start + total`; section i by the end of its share."""

    def __init__(self, total_s: float):
        self.start, self.total = time.perf_counter(), float(total_s)
        self.section_end = self.start

    def open_section(self, name: str, enabled: list[str]) -> None:
        # a section may use its share plus whatever earlier sections left; later sections keep theirs
        later = sum(SHARES[s] for s in enabled[enabled.index(name) + 1:])
        self.section_end = self.start + self.total * (1 - later)

    def left(self) -> float:
        """Seconds left in the current section."""
        return self.section_end - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ---------------------------------------------------------------------------------------------- helpers
def gpu_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                            "cuda_available": torch.cuda.is_available(),
                            "cudnn_benchmark_default": torch.backends.cudnn.benchmark}  # training_settings turns it on for training
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count(),
                    bf16_supported=torch.cuda.is_bf16_supported(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:
        info["gpu"] = None
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | str:
    return round(torch.cuda.max_memory_allocated(device) / MIB, 1) if device.type == "cuda" else NA_CPU


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(value: Any, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def error_text(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def model_widths(backbone: str) -> dict[str, Any]:
    section = yaml.safe_load((ROOT / PROFILE_OF[backbone]).read_text())["model"]
    return {"fpn_width": section["fpn_width"], "fusion_widths": list(section["fusion_widths"]),
            "decoder_max_width": section.get("decoder_max_width")}


def build_model(backbone: str, seed: int = 0) -> LateFusionNet:
    """`backbone` at its profile's widths, torch's default init from `seed` (no ImageNet weights: speed only)."""
    torch.manual_seed(seed)
    return LateFusionNet(backbone, pretrained=False, **model_widths(backbone))


@functools.lru_cache(maxsize=8)
def toy_batch(batch: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (N,3,S,S) float [0,1], alpha (N,1,S,S) float [0,1]) of toy composites (paper Eq. 1)."""
    rng = np.random.default_rng(seed)
    pairs = [toy_sample(rng, size) for _ in range(batch)]
    image = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float().div_(255)
    alpha = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None].float().div_(255)
    return image.contiguous(), alpha.contiguous()


def photo_batch(count: int, size: int) -> tuple[torch.Tensor, str]:
    """`(count,3,size,size)` float32 in [0,1]: alphamatting-dev photos (resized to cover, centre-cropped)
    when ../shared/data is there, else toy composites."""
    files = sorted((PHOTOS / "image").glob("*.png"))
    if not files:
        return toy_batch(count, size, seed=1)[0], f"{count} synthetic toy composites (no {PHOTOS})"
    from PIL import Image

    images = []
    for path in [files[i % len(files)] for i in range(count)]:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = size / min(im.size)
            im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
            left, top = (im.width - size) // 2, (im.height - size) // 2
            images.append(np.asarray(im.crop((left, top, left + size, top + size)), np.float32) / 255)
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    names = ", ".join(p.stem for p in files[:count])
    return batch, f"{count} alphamatting-dev photos ({names}), centre crops"


# ---------------------------------------------------------------------------------------------- section 1
def train_configs(args, device: torch.device) -> list[dict[str, Any]]:
    """Every configuration, most wanted first (what the budget cuts is the tail): channels-last in each
    precision (bf16, fp16), then NCHW; within each, the batch sizes; within those, both backbones' steps.
    On a CPU, fp16 rows are listed as n/a."""
    precisions = list(args.precisions) + (["fp16"] if device.type == "cpu" and "fp16" not in args.precisions else [])
    configs = []
    for channels_last, precision in [(cl, p) for cl in (True, False) for p in precisions]:
        for batch in args.batches:
            for backbone in args.backbones:
                for step in STEPS:
                    configs.append({"backbone": backbone, "step": step, "batch": batch, "precision": precision,
                                    "channels_last": channels_last})
    return configs


def step_config(backbone: str, step: str, **changes) -> StepConfig:
    """The backbone's profile's step settings (loss weights, optimizer, frozen BNs), one micro-batch a step."""
    params = yaml.safe_load((ROOT / PROFILE_OF[backbone]).read_text())
    return StepConfig.from_params(params, step).replace(pretrained=False, global_batch_size=None, **changes)


def time_train_config(model: LateFusionNet, initial: dict, c: dict, device: torch.device, size: int,
                      warmup: int, iters: int, max_s: float) -> dict[str, Any]:
    """One configuration: run_step's iteration (autocast forward, float32 loss, backward, clip, step), built
    from its own parts (accumulate_gradients -> step_module's forward and step_loss; set_trainable,
    set_train_mode, make_optimizer; training_settings)."""
    step, precision, channels_last = c["step"], c["precision"], c["channels_last"]
    cfg = step_config(c["backbone"], step, batch_size=c["batch"], precision=precision, channels_last=channels_last,
                      device=device.type)
    model.load_state_dict(initial)  # every configuration starts from the same weights
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    trainable = set_trainable(model, step, cfg.encoder_bn_frozen, train_encoder=cfg.encoder_trained)
    set_train_mode(model, step, cfg.encoder_bn_frozen)
    optimizer = make_optimizer(model, trainable, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    module = step_module(model, step)
    image, alpha = toy_batch(c["batch"], size)
    image, alpha = image.to(device, copy=True), alpha.to(device, copy=True)  # toy_batch's are cached
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext  # run_step's
    batches = itertools.repeat({"image": image, "alpha": alpha})

    def iteration() -> torch.Tensor:
        """run_step's _train_iteration, one micro-batch (no accumulation), without its LR schedule and logging."""
        optimizer.zero_grad(set_to_none=True)
        terms, _wait = accumulate_gradients(module, batches, 1, step, cfg, device, autocast, scaler, False)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        return terms["loss"]

    try:
        with training_settings(device, None, cfg.deterministic):  # run_step's: cudnn.benchmark on CUDA
            reset_peak(device)
            for _ in range(warmup):
                iteration()
            sync(device)
            times: list[float] = []
            started = time.perf_counter()
            while len(times) < iters and (len(times) < 2 or time.perf_counter() - started < max_s):
                t0 = time.perf_counter()
                loss = iteration()
                sync(device)
                times.append(time.perf_counter() - t0)
        per_iter = sum(times) / len(times)
        return {"status": "ok", "samples_per_s": c["batch"] / per_iter, "s_per_iter": per_iter,
                "s_per_iter_median": statistics.median(times), "timed_iters": len(times), "warmup_iters": warmup,
                "peak_mem_mib": peak_mib(device), "loss": float(loss), "loss_finite": bool(math.isfinite(float(loss))),
                "trainable_params": sum(p.numel() for p in trainable)}
    except torch.OutOfMemoryError as exc:
        return {"status": "oom", "peak_mem_mib": peak_mib(device), "error": " ".join(str(exc).split())[:200]}
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer, scaler, image, alpha, batches
        free_memory(device)


def section_train_speed(args, device: torch.device, budget: Budget, log: Callable[[str], None]) -> dict[str, Any]:
    settings = {"size": args.size, "batches": args.batches, "backbones": args.backbones, "precisions": args.precisions,
                "warmup_iters": args.warmup,
                "max_timed_iters": args.iters, "max_timed_s_per_config": args.config_s,
                "widths": {b: model_widths(b) for b in args.backbones},
                "what": "one training iteration as run_step runs it (autocast forward, float32 loss, backward, "
                        "grad clip, optimizer step; cudnn.benchmark on CUDA), one micro-batch per optimizer step "
                        "(samples/s = batch / s per iteration); data loading excluded; "
                        "one batch of toy composites on the device; random init (pretrained=False)"}
    models: dict[str, LateFusionNet] = {}
    initial: dict[str, dict] = {}
    results = []
    estimate = 0.0  # seconds the slowest configuration so far took: the next one must fit
    for c in train_configs(args, device):
        row = dict(c)
        if device.type == "cpu" and c["precision"] == "fp16":
            results.append({**row, "status": NA_CPU, "peak_mem_mib": NA_CPU})
            continue
        if budget.left() < max(estimate, 1.0):
            results.append({**row, "status": "skipped: budget"})
            continue
        started = time.perf_counter()
        try:
            if c["backbone"] not in models:
                models[c["backbone"]] = build_model(c["backbone"]).to(device)
                initial[c["backbone"]] = copy.deepcopy(models[c["backbone"]].state_dict())
            row.update(time_train_config(models[c["backbone"]], initial[c["backbone"]], c, device, args.size,
                                         args.warmup, args.iters, args.config_s))
        except Exception as exc:  # one bad configuration does not end the section
            row.update(status=error_text(exc), traceback=traceback.format_exc(limit=4))
        row["seconds"] = round(time.perf_counter() - started, 2)
        estimate = max(estimate, row["seconds"])
        if device.type == "cpu":
            row["peak_mem_mib"] = NA_CPU
        results.append(row)
        figure = f"{row['samples_per_s']:.2f} samples/s, peak {row['peak_mem_mib']} MiB" if row["status"] == "ok" else row["status"]
        log(f"   {c['backbone']:<18} {c['step']:<13} batch {c['batch']} {c['precision']}{' cl' if c['channels_last'] else '   '}: "
            f"{figure} ({row['seconds']:.1f} s)")
    models.clear()
    initial.clear()
    free_memory(device)
    return {"settings": settings, "results": results}


# ---------------------------------------------------------------------------------------------- section 2
@contextlib.contextmanager
def compile_backend(device: torch.device) -> Iterator[str]:
    """On a CPU, torch.compile inside PreparedNetwork traces with the "eager" backend (the code path is
    the same; inductor would take about a minute per graph on 2 cores); on CUDA it is left alone."""
    if device.type == "cuda":
        yield "inductor (PreparedNetwork's default)"
        return
    original = torch.compile

    def eager(model=None, **kwargs):
        kwargs.pop("options", None)
        return original(model, **{**kwargs, "backend": "eager"})

    torch.compile = eager
    try:
        yield "eager (CPU dry run: dynamo traces, inductor does not compile)"
    finally:
        torch.compile = original


def time_network(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device,
                 repeats: int, max_s: float) -> tuple[list[float], torch.Tensor, float]:
    """(seconds per call, alpha of the last call, seconds of the first call: compile, cuDNN choice)."""
    t0 = time.perf_counter()
    out = run(x)
    sync(device)
    first = time.perf_counter() - t0
    out = run(x)  # second warm-up call
    sync(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats and (len(times) < 2 or time.perf_counter() - started < max_s):
        t0 = time.perf_counter()
        out = run(x)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, out[:, :1].float(), first


def section_inference(args, device: torch.device, budget: Budget, log: Callable[[str], None]) -> dict[str, Any]:
    from fusionnet.inference.network import PreparedNetwork

    inputs, source = photo_batch(max(args.infer_batches), args.infer_size)
    settings = {"size": args.infer_size, "batches": args.infer_batches, "inputs": source,
                "backbones": args.infer_backbones, "widths": {b: model_widths(b) for b in args.infer_backbones},
                "weights": args.model or "random init (seed 0)",
                "variants": {n: {"precision": p, "compile": c} for n, (p, c) in INFERENCE_VARIANTS.items()},
                "mapping": "issue's fp32 -> fp32; + channels-last -> fp32-cl (BN folded, NHWC); bf16 -> bf16 "
                           "(folded, NHWC: bf16 always comes with channels-last in PreparedNetwork); + compile -> "
                           "bf16+compile; fp16 beside them",
                "what": "PreparedNetwork.run_network on a device-resident batch (pad, network, alpha/F/B maps), "
                        "no resize or guided filter; ms per image = median call / batch; mean |d alpha| against "
                        "fp32 (true float32: PreparedNetwork turns TF32 off for it) on the same inputs; "
                        "first_call_s: the first call (compile, cuDNN/oneDNN kernel choice)"}
    results = []
    models: dict[str, LateFusionNet] = {}
    reference: dict[tuple[str, int], torch.Tensor] = {}  # (backbone, batch) -> fp32 alpha
    # every eager variant of every backbone first, the compiles (minutes on CUDA) last: what the budget cuts
    order = [(b, n) for compiled in (False, True) for b in args.infer_backbones
             for n, (_p, c) in INFERENCE_VARIANTS.items() if c == compiled]
    with compile_backend(device) as backend:
        settings["compile_backend"] = backend
        settings["compile_estimate_s"] = args.compile_s
        estimate = 0.0
        for backbone, name in order:
            precision, compiled = INFERENCE_VARIANTS[name]
            rows = [{"backbone": backbone, "variant": name, "precision": precision, "compile": compiled, "batch": b}
                    for b in args.infer_batches]
            if device.type == "cpu" and precision == "fp16":
                results += [{**r, "status": NA_CPU, "peak_mem_mib": NA_CPU} for r in rows]
                continue
            # a compiled variant's first call per batch size compiles (inductor on CUDA: about a minute or more)
            need = max(estimate, 1.0) + (args.compile_s if compiled else 0.0)
            if budget.left() < need:
                results += [{**r, "status": "skipped: budget", "needed_s": round(need, 1)} for r in rows]
                continue
            if backbone not in models:
                if args.model and backbone == "efficientnet_lite0":
                    from fusionnet.model import load

                    models[backbone] = load(args.model).eval()
                else:
                    models[backbone] = build_model(backbone).eval()
            started = time.perf_counter()
            try:
                # bucket_side = the image side, as Matter passes its max_side: compile pads 800 to 800, not 896
                extra = {"bucket_side": args.infer_size} if compiled else {}
                network = PreparedNetwork(copy.deepcopy(models[backbone]), device=device, precision=precision,
                                          compile=compiled, **extra)
            except Exception as exc:
                results += [{**r, "status": error_text(exc)} for r in rows]
                continue
            padded = list(network.padded_size(args.infer_size, args.infer_size)) if hasattr(network, "padded_size") else None
            for row in rows:
                batch = row["batch"]
                if row is not rows[0] and budget.left() < need:
                    results.append({**row, "status": "skipped: budget", "needed_s": round(need, 1)})
                    continue
                t0 = time.perf_counter()
                x = inputs[:batch].to(device)
                try:
                    reset_peak(device)
                    times, alpha, first = time_network(network.run_network, x, device, args.repeats, args.config_s)
                    if name == "fp32":
                        reference[backbone, batch] = alpha
                    ref = reference.get((backbone, batch))
                    diff = (alpha - ref).abs() if ref is not None else None
                    row.update(status="ok", network_input=padded, ms_per_image=1000 * statistics.median(times) / batch,
                               ms_per_call_min=1000 * min(times), timed_calls=len(times), first_call_s=round(first, 3),
                               mean_abs_d_alpha_vs_fp32=float(diff.mean()) if diff is not None else None,
                               max_abs_d_alpha_vs_fp32=float(diff.max()) if diff is not None else None,
                               peak_mem_mib=peak_mib(device))
                except torch.OutOfMemoryError as exc:
                    row.update(status="oom", peak_mem_mib=peak_mib(device), error=" ".join(str(exc).split())[:200])
                except Exception as exc:
                    row.update(status=error_text(exc), traceback=traceback.format_exc(limit=4))
                row["seconds"] = round(time.perf_counter() - t0, 2)
                results.append(row)
                if row["status"] == "ok":
                    d = row["mean_abs_d_alpha_vs_fp32"]
                    figure = (f"{row['ms_per_image']:.2f} ms/image, |d alpha| {'n/a' if d is None else f'{d:.2e}'}, "
                              f"peak {row['peak_mem_mib']} MiB, first call {row['first_call_s']:.1f} s")
                else:
                    figure = row["status"]
                log(f"   {backbone:<18} {name:<13} batch {batch}: {figure}")
            if not compiled:
                estimate = max(estimate, time.perf_counter() - started)
            del network
            free_memory(device)
    del models, reference
    return {"settings": settings, "results": results}


# ---------------------------------------------------------------------------------------------- section 3
def photo_shards(params: dict, work: Path, tiny: bool, workers: int, log: Callable[[str], None]) -> tuple[Path, dict]:
    """The photo profile's data stages (collect_foregrounds -> composite -> shard_crops), in-process, into
    `work`; --tiny: tiny composites (96 px) and crops (64 px), one background per foreground."""
    from fusionnet.data.backgrounds import background_lists_from_params, backgrounds_from_params
    from fusionnet.data.collect import CollectConfig, collect_foregrounds, read_manifest
    from fusionnet.data.composite import CompositeConfig, build_composites
    from fusionnet.data.crops import CropParams
    from fusionnet.data.shards import build_shards
    from fusionnet.data.sources import candidates_from_params

    params = copy.deepcopy(params)
    if tiny:
        params["foregrounds"]["max_side"] = 96
        params["composite"].update(bg_per_fg=1, bg_per_test_fg=1, max_side=96)
        params["composite"]["backgrounds"]["folder"] = str(SHARED / "backgrounds" / "cbsd68")  # small photos only
        params["crops"].update(sizes=[64], out_size=64, warmup_size=64, max_side=96)
    timings = {}
    t0 = time.perf_counter()
    # relative roots in params resolve from the project root, as the stages resolve them from params.yaml's folder
    collected = collect_foregrounds(candidates_from_params(params["foregrounds"], ROOT), work / "foregrounds",
                                    CollectConfig.from_params(params, workers=workers))
    timings["collect_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    backgrounds, test_backgrounds = backgrounds_from_params(params["composite"], int(params["seed"]), ROOT)
    rows, _pools = build_composites(read_manifest(work / "foregrounds"), work / "foregrounds", backgrounds, test_backgrounds,
                                    work / "composites", CompositeConfig.from_params(params, workers=workers),
                                    background_lists_from_params(params["composite"], ROOT))
    timings["composite_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    summary = build_shards(work / "composites", work / "shards", CropParams.from_params(params), int(params["seed"]),
                           workers=workers)
    timings["shard_s"] = round(time.perf_counter() - t0, 1)
    info = {"source": f"photo profile data stages on {PHOTOS} + {SHARED / 'backgrounds'}", "foregrounds": collected.split_counts(),
            "composites": len(rows), "train_rows": summary["train"]["rows"], "val_rows": summary["val"]["rows"],
            "crop_size": params["crops"]["out_size"], "working_size": params["crops"]["max_side"], **timings}
    log(f"   data: {info}")
    return work / "shards", info


def nominal_iterations(cfg: StepConfig, train_rows: int) -> int:
    """Iterations the profile's schedule runs for this step (an epoch: every composite as a crop, plus
    once whole in warm-up epochs; capped by max_iters_per_epoch)."""
    total = 0
    for epoch in range(cfg.epochs):
        per_epoch = max(1, train_rows * (2 if epoch < cfg.warmup_epochs else 1) // cfg.batch_size)
        total += min(per_epoch, cfg.max_iters_per_epoch or per_epoch)
    return total


STEP_COST = {"segmentation": 1.0, "fusion": 1.0, "joint": 1.6}  # seconds per iteration relative to segmentation's


def plan_schedule(cfgs: dict[str, StepConfig], nominal: dict[str, int], s_iter: float, val_per_image: float,
                  overhead: float, left: float, fixed_length: bool = False) -> tuple[dict[str, StepConfig] | None, dict]:
    """Fit the three steps into `left` seconds: first drop the validations between epoch ends
    (val_every), then scale the iterations per epoch (same epochs, so the LR cycles keep their shape).
    Returns (the steps' configs, or None when under 5% of the schedule would fit; what was planned)."""
    need = sum(nominal[s] * STEP_COST[s] * s_iter for s in cfgs)

    def validation_s(every: bool) -> float:
        count = sum((c.epochs + 1 + (nominal[s] // c.val_every if every and c.val_every else 0)) * (c.val_max_images or 24)
                    for s, c in cfgs.items())
        return count * val_per_image + len(cfgs) * overhead

    keep_every = fixed_length or need + validation_s(True) <= left
    fixed = validation_s(keep_every)
    scale = 1.0 if fixed_length or need <= 0 else max(0.0, min(1.0, (left - fixed) / need))
    plan = {"nominal_iterations": nominal, "scale": round(scale, 3), "val_every_kept": bool(keep_every),
            "estimated_s": round(need * scale + fixed, 1), "available_s": round(left, 1)}
    if scale < 0.05:
        return None, plan
    if not keep_every:
        cfgs = {s: c.replace(val_every=None) for s, c in cfgs.items()}
    if scale < 1.0:
        cfgs = {s: c.replace(max_iters_per_epoch=max(1, math.ceil(nominal[s] * scale / c.epochs))) for s, c in cfgs.items()}
    return cfgs, plan


def read_kept(history_path: Path) -> dict[str, Any]:
    try:
        return json.loads(history_path.read_text()).get("kept") or {}
    except (OSError, ValueError):
        return {}


def section_training_run(args, device: torch.device, budget: Budget, log: Callable[[str], None]) -> dict[str, Any]:
    from fusionnet.train.loop import run_step

    os.environ.setdefault("FUSIONNET_PROGRESS", "plain")
    params = yaml.safe_load((ROOT / PHOTO_PROFILE).read_text())
    cuda = device.type == "cuda"
    common = {"device": device.type, "precision": "auto" if cuda else "fp32",
              "num_workers": min(4, max(0, (os.cpu_count() or 1) // 4)) if cuda else 0}
    if args.threads:
        common["threads"] = args.threads
    if cuda:
        common["val_batch_size"] = 8  # validation has no gradients: batches of 8 keep the GPU busy (paper profile)
    if args.tiny:
        common.update(batch_size=2, val_max_images=2, val_every=None, visual_count=0, checkpoint_every=10_000)
    out: dict[str, Any] = {"profile": PHOTO_PROFILE, "overrides": dict(common)}
    minimum = 3.0 if args.tiny else 60.0  # data, a probe and three short steps
    if budget.left() < minimum:
        return {**out, "status": "skipped: budget", "available_s": round(budget.left(), 1)}
    with tempfile.TemporaryDirectory(prefix="gpu_check_run_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        if (PHOTOS / "image").is_dir() and (SHARED / "backgrounds").is_dir():
            shards, out["data"] = photo_shards(params, work / "data", args.tiny, 1 if args.tiny else min(16, os.cpu_count() or 1), log)
        else:
            size = 64 if args.tiny else 160
            shards = write_toy_shards(work / "toy", n_train=8 if args.tiny else 64, n_val=2 if args.tiny else 8, size=size,
                                      whole_val=True)
            out["data"] = {"source": f"toy shards (fusionnet.train.toy; no {PHOTOS})", "crop_size": size}
        out["data"]["seconds"] = round(time.perf_counter() - t0, 1)
        train_rows = int(out["data"].get("train_rows", 8 if args.tiny else 64))
        cfgs = {step: StepConfig.from_params(params, step).replace(**common) for step in STEPS}
        if args.tiny:
            cfgs = {s: c.replace(epochs=1, max_iters_per_epoch=2, warmup_epochs=min(c.warmup_epochs, 1)) for s, c in cfgs.items()}
        # probe: a few segmentation iterations and a warm validation give s/iteration and s/val image
        probe_cfg = cfgs["segmentation"].replace(epochs=1, max_iters_per_epoch=1 if args.tiny else 8, val_every=None,
                                                 val_max_images=1 if args.tiny else 4, visual_count=0, warmup_epochs=0)
        t0 = time.perf_counter()
        probe = run_step("segmentation", probe_cfg, shards, work / "probe")
        s_iter = probe.train_s / max(1, probe.iterations)
        warm_val = probe.history[-1] if probe.history else probe.initial_val  # the second validation: kernels chosen
        val_per_image = float(warm_val.get("val_s", 0.0)) / max(1.0, float(warm_val.get("val_images") or 1))
        out["probe"] = {"iterations": probe.iterations, "s_per_iter": s_iter, "val_s_per_image": val_per_image,
                        "wall_s": round(time.perf_counter() - t0, 1)}
        nominal = {s: nominal_iterations(c, train_rows) for s, c in cfgs.items()}
        overhead = 8.0 if not args.tiny else 1.0  # per step: model build, DataLoader start, files
        cfgs, out["schedule"] = plan_schedule(cfgs, nominal, s_iter, val_per_image, overhead, budget.left(),
                                              fixed_length=args.tiny)
        if cfgs is None:
            out["status"] = "skipped: budget"
            log(f"   training run: skipped ({out['schedule']})")
            return out
        steps_out, init = [], None
        for step in STEPS:
            cfg = cfgs[step]
            row: dict[str, Any] = {"step": step, "epochs": cfg.epochs, "max_iters_per_epoch": cfg.max_iters_per_epoch,
                                   "batch": cfg.batch_size, "val_every": cfg.val_every}
            if budget.left() < 2 * overhead:
                row["status"] = "skipped: budget"
                steps_out.append(row)
                init = None
                break
            t0 = time.perf_counter()
            result = run_step(step, cfg, shards, work / step, init_checkpoint=init)
            kept = read_kept(result.history_path)
            before, last = result.initial_val, (result.history[-1] if result.history else {})
            row.update(status="ok", val_sad_before=before.get("val_sad"), val_mse_before=before.get("val_mse"),
                       val_sad_after=kept.get("val_sad", last.get("val_sad")), val_mse_after=kept.get("val_mse", last.get("val_mse")),
                       val_sad_last=last.get("val_sad"), kept_iteration=kept.get("iteration"),
                       improved=(kept.get("val_sad", last.get("val_sad", math.inf)) < before.get("val_sad", -math.inf)),
                       val_images=before.get("val_images"), iterations=result.iterations,
                       samples_per_s=result.samples_per_s, data_wait_fraction=result.data_wait_fraction,
                       train_s=round(result.train_s, 1), wall_s=round(time.perf_counter() - t0, 1))
            log(f"   {step}: val SAD {fmt(row['val_sad_before'])} -> {fmt(row['val_sad_after'])} "
                f"({result.iterations} iterations, {result.samples_per_s:.1f} samples/s, {row['wall_s']} s)")
            steps_out.append(row)
            init = result.model_path
        out["steps"] = steps_out
        done = [r for r in steps_out if r.get("status") == "ok"]
        if len(done) < len(STEPS):
            out["status"] = "skipped: budget" if not done else "partial: budget"
        if done:
            out["val_sad_untrained"] = done[0]["val_sad_before"]
            out["val_sad_final"] = done[-1]["val_sad_after"]
            out["val_sad_falls"] = bool(out["val_sad_final"] < out["val_sad_untrained"])
    return out


# ---------------------------------------------------------------------------------------------- summary
def summary_rows(doc: dict) -> list[dict[str, str]]:
    """README speed-table rows (scripts/speed_table.py reads benchmarks/results/*.json): one per part."""
    gpu = doc["machine"].get("gpu") or "CPU"
    cmd = doc["run"]["command"]
    rows: list[dict[str, str]] = []
    speed = doc["sections"].get("train_speed", {})
    for backbone in speed.get("settings", {}).get("backbones", []):
        best = []
        for step in STEPS:
            ok = [r for r in speed["results"] if r["backbone"] == backbone and r["step"] == step and r["status"] == "ok"]
            if ok:
                r = max(ok, key=lambda r: r["samples_per_s"])
                best.append(f"{step} {r['samples_per_s']:.1f}/s ({r['precision']}{' cl' if r['channels_last'] else ''}, "
                            f"batch {r['batch']}, peak {r['peak_mem_mib']} MiB)")
        if best:
            rows.append({"what": f"{gpu}: training samples/s, {speed['settings']['size']} px, {backbone}, fastest configuration per step",
                         "command": cmd if not rows else "(same run)", "result": "; ".join(best), "target": ""})
    infer = doc["sections"].get("inference", {})
    for backbone in infer.get("settings", {}).get("backbones", []):
        for batch in infer["settings"]["batches"]:
            ok = [r for r in infer["results"] if r["backbone"] == backbone and r["batch"] == batch and r["status"] == "ok"]
            if ok:
                text = ", ".join(f"{r['variant']} {r['ms_per_image']:.1f} ms (|da| {fmt(r['mean_abs_d_alpha_vs_fp32'], '.1e')})" for r in ok)
                rows.append({"what": f"{gpu}: inference {infer['settings']['size']}x{infer['settings']['size']}, {backbone}, batch {batch}: ms/image",
                             "command": cmd if not rows else "(same run)", "result": text, "target": ""})
    run = doc["sections"].get("training_run", {})
    if run.get("steps"):
        text = "; ".join(f"{r['step']} {fmt(r['val_sad_before'], '.3f')} -> {fmt(r['val_sad_after'], '.3f')}" for r in run["steps"] if r.get("status") == "ok")
        rows.append({"what": f"{gpu}: three-step training run, photo profile, val SAD before -> after",
                     "command": cmd if not rows else "(same run)", "result": text, "target": "falls"})
    return rows


def write(doc: dict, path: Path) -> None:
    try:
        doc["rows"] = summary_rows(doc)
    except Exception as exc:  # a summary that cannot be drawn must not cost the figures
        doc["rows"] = []
        doc["rows_error"] = error_text(exc)
    write_text_atomic(path, json.dumps(doc, indent=1, allow_nan=True) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="dry run sizes: training 32 px, inference 64 px, batch 2, 1+1 iterations, tiny data")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default: benchmarks/results/gpu_check.json; --tiny: $TMPDIR/gpu_check-tiny.json)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for all sections")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--size", type=int, default=None, help="training crop side (default 512; --tiny 32, the network's stride)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="training batch sizes (default 2 4 8; --tiny 2)")
    parser.add_argument("--precisions", nargs="+", choices=("bf16", "fp16", "fp32"), default=None,
                        help="training autocast precisions (default bf16 fp16; --device cpu: fp32, fp16 listed as n/a)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up iterations per configuration (default 3; --tiny 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per configuration, at most (default 10; --tiny 1)")
    parser.add_argument("--config-s", type=float, default=None, help="stop timing a configuration after this long (default 2)")
    parser.add_argument("--infer-size", type=int, default=None, help="inference image side (default 800; --tiny 64)")
    parser.add_argument("--infer-batches", type=int, nargs="+", default=None, help="default 1 8; --tiny 1 2")
    parser.add_argument("--infer-backbones", nargs="+", choices=BACKBONES, default=None,
                        help="default both; --tiny efficientnet_lite0 (densenet201's dynamo trace alone takes ~25 s on 2 cores)")
    parser.add_argument("--repeats", type=int, default=None, help="timed inference calls, at most (default 20; --tiny 1)")
    parser.add_argument("--compile-s", type=float, default=None,
                        help="budget a compiled variant needs beyond its timing (default 150 on CUDA, 10 on CPU)")
    parser.add_argument("--model", default=None, help="a trained efficientnet_lite0 checkpoint for the inference rows")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's; --device cpu --tiny: 1, as a shared 2-core "
                             "host runs tiny layers ~5x slower with 2 oversubscribed OpenMP threads)")
    parser.add_argument("--pytest-rc", type=int, default=None, help="(from gpu_check.sh) exit status of pytest -m cuda")
    parser.add_argument("--pytest-summary", default=None, help="(from gpu_check.sh) its last line, or why it did not run")
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = {"size": (32, 512), "batches": ([2], [2, 4, 8]), "warmup": (1, 3), "iters": (1, 10), "config_s": (2.0, 2.0),
                "infer_size": (64, 800), "infer_batches": ([1, 2], [1, 8]),
                "infer_backbones": (["efficientnet_lite0"], list(BACKBONES)), "repeats": (1, 20)}
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if tiny else full)
    if args.threads is None and tiny and args.device == "cpu":
        args.threads = 1
    if args.compile_s is None:
        args.compile_s = 10.0 if args.device == "cpu" else 150.0
    if args.precisions is None:
        args.precisions = ["fp32"] if args.device == "cpu" else ["bf16", "fp16"]
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "gpu_check-tiny.json" if tiny else results_folder() / "gpu_check.json"
    return args


def pytest_record(args) -> dict[str, Any]:
    if args.pytest_rc is None and args.pytest_summary is None:
        return {"status": "not run (gpu_check.py called directly; gpu_check.sh runs pytest -m cuda)"}
    rc = args.pytest_rc
    status = {None: "not run", 0: "passed", 5: "no tests marked cuda were collected"}.get(rc, f"failed (exit status {rc})")
    if rc == 0 and " passed" not in f" {args.pytest_summary or ''}":
        status = "passed: every test skipped (no CUDA device seen)"
    return {"status": status, "rc": rc, "summary": args.pytest_summary}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --device cpu --tiny for a dry run", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    budget = Budget(args.budget_s)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(text: str) -> None:
        print(text, flush=True)

    log(header())
    doc: dict[str, Any] = {
        "machine": {**machine(), **gpu_info(device)},
        "run": {"command": command(), "device": args.device, "tiny": args.tiny, "budget_s": args.budget_s,
                "torch_threads": torch.get_num_threads(),
                "sections": args.sections, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "elapsed_s": 0.0},
        "pytest_cuda": pytest_record(args),
        "sections": {},
    }
    log(f"gpu_check: {doc['machine'].get('gpu') or 'CPU'}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"budget {args.budget_s:.0f} s; JSON -> {args.out}")
    failed = False
    functions = {"train_speed": section_train_speed, "inference": section_inference, "training_run": section_training_run}
    args.sections = [s for s in SECTIONS if s in args.sections]  # run (and share the budget) in this order
    for name in SECTIONS:
        if name not in args.sections:
            doc["sections"][name] = {"status": "skipped: not requested"}
            continue
        budget.open_section(name, args.sections)
        log(f"\n== {name}: {budget.left():.0f} s of the budget")
        started = time.perf_counter()
        try:
            section = functions[name](args, device, budget, log)
            if "results" in section:
                counts: dict[str, int] = {}
                for r in section["results"]:
                    counts[r["status"]] = counts.get(r["status"], 0) + 1
                section["counts"] = counts
                if not counts.get("ok") and counts.get("skipped: budget"):
                    section["status"] = "skipped: budget"
                elif counts.get("skipped: budget"):
                    section["status"] = "partial: budget"
            section.setdefault("status", "done")
        except Exception as exc:
            section = {"status": error_text(exc), "traceback": traceback.format_exc(limit=6)}
            log(section["traceback"])
        if section["status"].startswith("error"):
            failed = True
        section["seconds"] = round(time.perf_counter() - started, 1)
        doc["sections"][name] = section
        doc["run"]["elapsed_s"] = round(budget.elapsed(), 1)
        write(doc, args.out)
        log(f"== {name}: {section['status']} in {section['seconds']} s")
    doc["run"]["elapsed_s"] = round(budget.elapsed(), 1)
    write(doc, args.out)
    log(f"\ngpu_check: {doc['run']['elapsed_s']} s; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
