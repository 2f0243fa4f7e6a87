"""`run_step`: one of the paper's three training steps (Sec. 3.4), resumable and DDP-ready.

Per iteration (one optimizer step): triangular cyclical LR; for each of the step's micro-batches
(gradient accumulation: `global_batch_size` samples a step whatever the process count) read it (order
fixed by (seed, epoch)), forward under autocast, the step's loss, backward; gradient-norm clip, SGD
step. Loss terms stay on the device (no host sync per iteration) and are reduced, checked for NaN and
logged every `log_every` iterations (fusionnet.train.losslog: loss_log.jsonl and the logger).
Per epoch: validation SAD/MSE, samples/s, data-wait share, a PNG grid and the loss curves.
Console (rank 0): a bar or a few plain lines per epoch, one summary line (fusionnet.train.progress).
state.pt is written atomically every `checkpoint_every` iterations and at every epoch end; a step
killed at any moment continues from its last state.pt when run again and, on CPU with a fixed seed,
ends with the same weights as an uninterrupted run.
Outputs in out_dir: model.safetensors, state.pt, loss_log.jsonl, history.json, plots/.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from typing import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from fusionnet import model as fmodel
from fusionnet.io.hashing import file_sha256
from fusionnet.model import LateFusionNet
from fusionnet.train import data as tdata, selection
from fusionnet.train.averaging import WeightAverage
from fusionnet.train.config import StepConfig
from fusionnet.train.distributed import (
    DistContext, barrier, broadcast_object, ddp_options, init_distributed, shutdown,
)
from fusionnet.io.atomic import write_atomic
from fusionnet.train.forward import accumulate_gradients, step_module
from fusionnet.train.freezing import make_optimizer, set_train_mode, set_trainable
from fusionnet.train.losslog import LOSS_LOG_FILE, LossLog, LossWindow
from fusionnet.train.precision import resolve_precision
from fusionnet.train.progress import StepProgress
from fusionnet.train.schedule import half_cycle_iterations, triangular_lr
from fusionnet.train.state import STATE_FILE, capture_rng, load_state, restore_rng, save_state
from fusionnet.train.torchsettings import training_settings
from fusionnet.train.tracking import StepResult, TrainLogger
from fusionnet.train.validate import validate_shared
from fusionnet.train.visuals import save_loss_curves, save_val_grid

MODEL_FILE = "model.safetensors"
HISTORY_FILE = "history.json"


def run_step(
    step: str,
    cfg: StepConfig,
    shards_dir: Path,
    out_dir: Path,
    init_checkpoint: Path | None = None,
    logger: TrainLogger | None = None,
    resume: bool = True,
) -> StepResult:
    """Train `step` ("segmentation" | "fusion" | "joint") and write out_dir (see module doc).

    init_checkpoint: the previous step's model.safetensors (None: a fresh network, ImageNet encoder
    weights when cfg.pretrained). logger: called on rank 0 only. resume: continue from
    out_dir/state.pt when it exists and was written with the same settings.
    """
    if step != cfg.step:
        raise ValueError(f"run_step({step!r}) got a StepConfig for step {cfg.step!r}")
    owns_group = not torch.distributed.is_initialized()
    ctx = init_distributed(cfg.device)
    try:
        with training_settings(ctx.device, cfg.threads, cfg.deterministic):  # the caller's settings come back after
            return _Trainer(step, cfg, Path(shards_dir), Path(out_dir), init_checkpoint, logger, resume, ctx).run()
    finally:
        if owns_group:
            shutdown(ctx)


class _Trainer:
    def __init__(self, step, cfg, shards_dir, out_dir, init_checkpoint, logger, resume, ctx: DistContext):
        self.step, self.cfg, self.ctx = step, cfg, ctx
        self.shards_dir, self.out_dir = shards_dir, out_dir
        self.init_checkpoint = Path(init_checkpoint) if init_checkpoint else None
        self.logger = logger if ctx.is_main else None
        self.resume = resume
        self.state_path = out_dir / STATE_FILE
        self.loss_log, self.window = LossLog(out_dir / LOSS_LOG_FILE), LossWindow()
        self.accumulation = cfg.accumulation(ctx.world_size)  # micro-batches per optimizer step
        self.global_batch = cfg.batch_size * self.accumulation * ctx.world_size
        self.device = ctx.device
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("params train_common.precision fp16 needs device cuda; use bf16 (or fp32) on cpu")
        self.precision, self.precision_reason = "fp32", ""
        self.init_sha256 = file_sha256(self.init_checkpoint) if self.init_checkpoint else None
        self.progress = StepProgress(step, ctx.is_main)  # a bad FUSIONNET_PROGRESS fails before any work

    # ------------------------------------------------------------------ setup
    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _configure_torch(self) -> None:
        self.precision, self.precision_reason = resolve_precision(self.cfg.precision, self.device)
        if self.ctx.is_main:
            print(f"{self.step} step: precision {self.precision} ({self.precision_reason})", flush=True)
            print(f"{self.step} step: global batch {self.global_batch} = {self.ctx.world_size} process(es) x "
                  f"{self.accumulation} micro-batch(es) of {self.cfg.batch_size}", flush=True)
        torch.manual_seed(self.cfg.seed)

    def _build_model(self) -> LateFusionNet:
        cfg = self.cfg
        if self.init_checkpoint is None:
            return LateFusionNet(cfg.backbone, pretrained=cfg.pretrained, input_norm=cfg.input_norm,
                                 fpn_width=cfg.fpn_width, fusion_widths=cfg.fusion_widths,
                                 decoder_max_width=cfg.decoder_max_width)
        model = fmodel.load(self.init_checkpoint)
        want = {"backbone": cfg.backbone, "input_norm": cfg.input_norm, "fpn_width": cfg.fpn_width,
                "fusion_widths": list(cfg.fusion_widths), "decoder_max_width": cfg.decoder_max_width}
        if {k: model.config.get(k) for k in want} != want:
            raise ValueError(f"{self.init_checkpoint}: model config {model.config} does not match params model {want}")
        return model

    def _load_resume_state(self) -> dict[str, Any] | None:
        if not self.state_path.is_file():
            return None
        if not self.resume:
            return None
        state = load_state(self.state_path)
        state.pop("loss_log", None)  # states written before loss_log.jsonl held the log themselves
        key = self.resume_key()
        if state.get("config") != key:
            if self.ctx.is_main:
                old = state.get("config") or {}
                changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
                print(f"{self.state_path}: written with other settings ({', '.join(changed)}); "
                      f"starting the {self.step} step afresh", flush=True)
            return None
        return state

    def resume_key(self) -> dict[str, Any]:
        """What must match for a state.pt to be resumed or returned as finished: the step config, the
        precision actually used, the init checkpoint's sha256, the data version and the global batch
        (not the process count: with global_batch_size set, a step resumes on fewer GPUs with more
        accumulation and sees the same batches, `tdata.rank_indices`)."""
        return {**self.cfg.resume_key(), "precision_used": self.precision, "init_sha256": self.init_sha256,
                "data_version": self.data_version, "global_batch": self.global_batch}

    # ------------------------------------------------------------------ main
    def run(self) -> StepResult:
        cfg, ctx = self.cfg, self.ctx
        self._configure_torch()
        if ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        barrier(ctx)
        self.data_version = tdata.data_version(self.shards_dir)
        state = self._load_resume_state()
        if state is not None and state["finished"] and (self.out_dir / MODEL_FILE).is_file():
            return self._result(state)

        model = self._build_model().to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        trainable = set_trainable(model, self.step, cfg.encoder_bn_frozen, train_encoder=cfg.encoder_trained)
        optimizer = make_optimizer(model, trainable, cfg)
        scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        if state is None:
            state = self._fresh_state()
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            restore_rng(state["rng"], self.device)
        self.average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay is not None else None
        if self.average is not None and state.get("ema") is not None:
            self.average.load_state_dict(state.pop("ema"))
        self.model, self.optimizer, self.scaler, self.trainable, self.state = model, optimizer, scaler, trainable, state

        self.train_set = tdata.training_set(self.shards_dir, cfg.seed, warmup=False)
        self.warmup_set = self.train_set.with_warmup() if cfg.warmup_epochs > 0 else None
        self.val_set = tdata.open_split(self.shards_dir, "val", return_index=True)
        self.val_radii = tdata.val_band_radii(self.val_set, cfg.val_band_radius)
        self._check_sizes()
        self.iters_per_epoch = tdata.steps_in_epoch(len(self.train_set), self.global_batch, cfg.max_iters_per_epoch)
        if self.iters_per_epoch < 1:
            raise ValueError(f"{self.shards_dir / 'train'}: {len(self.train_set)} crops are fewer than one global batch "
                             f"of {self.global_batch} ({cfg.batch_size} per process x {ctx.world_size} processes x "
                             f"{self.accumulation} accumulation)")
        self.half_cycle = half_cycle_iterations(cfg.half_cycle_epochs, self.iters_per_epoch)

        module = step_module(model, self.step)
        if ctx.enabled:
            set_train_mode(model, self.step, cfg.encoder_bn_frozen)  # which BatchNorms train decides broadcast_buffers
            module = DistributedDataParallel(module, **ddp_options(module, self.device))
        self.module = module
        if ctx.is_main:
            self.loss_log.start(state["iteration"])  # a resumed step drops rows written after its checkpoint

        if self.logger is not None:
            self.logger.log_params({**cfg.to_dict(), "world_size": ctx.world_size, "init_checkpoint": str(self.init_checkpoint),
                                    "precision_used": self.precision, "precision_reason": self.precision_reason,
                                    "init_sha256": str(self.init_sha256), "data_version": self.data_version,
                                    "accumulation": self.accumulation, "global_batch": self.global_batch,
                                    "iters_per_epoch": self.iters_per_epoch, "half_cycle_iters": self.half_cycle})
        if state["initial_val"] is None:
            state["initial_val"] = self._validate_and_note(epoch=0, at=0.0)
            self._checkpoint()
        while state["epoch"] < cfg.epochs:
            self._train_epoch(state["epoch"])
            self._end_epoch(state["epoch"])
        return self._finish()

    def _fresh_state(self) -> dict[str, Any]:
        return {
            "config": self.resume_key(), "step": self.step, "finished": False,
            "epoch": 0, "batch_in_epoch": 0, "iteration": 0,
            "initial_val": None, "history": [], "validations": [], "best": None, "last_lr": self.cfg.base_lr,
            "totals": {"samples": 0, "wait_s": 0.0, "train_s": 0.0},
            "epoch_acc": _zero_epoch_acc(),
        }

    def _check_sizes(self) -> None:
        h, w = tdata.sample_size(self.train_set)
        stride = LateFusionNet.stride
        if h % stride or w % stride:
            raise ValueError(f"{self.shards_dir / 'train'}: crops are {h}x{w}; the network needs multiples of {stride} "
                             f"(set crops.out_size to e.g. {max(stride, h // stride * stride)})")

    # ------------------------------------------------------------------ epochs
    def _train_epoch(self, epoch: int) -> None:
        cfg, ctx, state = self.cfg, self.ctx, self.state
        set_train_mode(self.model, self.step, self.cfg.encoder_bn_frozen)
        dataset = self.warmup_set if epoch < cfg.warmup_epochs and self.warmup_set is not None else self.train_set
        order = tdata.epoch_order(len(dataset), cfg.seed, epoch)
        n_steps = tdata.steps_in_epoch(len(order), self.global_batch, cfg.max_iters_per_epoch)
        first = state["batch_in_epoch"]
        indices = tdata.rank_indices(order, first, n_steps, cfg.batch_size, self.accumulation, ctx.rank, ctx.world_size)
        loader = tdata.epoch_loader(dataset, indices, cfg.batch_size, cfg.num_workers, cfg.seed, epoch,
                                    pin_memory=self.device.type == "cuda")
        batches = iter(loader)
        with self.progress.epoch(epoch + 1, cfg.epochs, n_steps, first) as shown:
            for b in range(first, n_steps):
                t0 = time.perf_counter()
                lr, wait_s = self._train_iteration(batches)
                t2 = time.perf_counter()
                for acc in (state["totals"], state["epoch_acc"]):
                    acc["samples"] += self.global_batch
                    acc["wait_s"] += wait_s
                    acc["train_s"] += t2 - t0
                state["batch_in_epoch"] = b + 1
                state["iteration"] += 1
                state["last_lr"] = lr
                it = state["iteration"]
                flush = it % cfg.log_every == 0 or it % cfg.checkpoint_every == 0 or b + 1 == n_steps
                shown.update(self._flush_losses(epoch, lr) if flush else None, lr)
                if cfg.val_every and it % cfg.val_every == 0 and b + 1 < n_steps:  # epoch ends validate anyway
                    self._validate_and_note(epoch + 1, at=epoch + (b + 1) / n_steps, grid=False)
                if it % cfg.checkpoint_every == 0:
                    self._checkpoint()
        del batches, loader

    def _train_iteration(self, batches: Iterator[dict]) -> tuple[float, float]:
        """One optimizer step over `accumulation` micro-batches; returns (lr, seconds spent waiting for data).
        Its loss terms go to the device-side window (no host sync here)."""
        cfg = self.cfg
        lr = triangular_lr(self.state["iteration"], cfg.base_lr, cfg.max_lr, self.half_cycle)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        self.optimizer.zero_grad(set_to_none=True)
        step_terms, wait_s = accumulate_gradients(self.module, batches, self.accumulation, self.step, cfg, self.device,
                                                  self.autocast, self.scaler, self.ctx.enabled)
        self.scaler.unscale_(self.optimizer)
        step_terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.average is not None:
            self.average.update(self.model)
        self.window.add(step_terms, self.state["iteration"] + 1)
        return lr, wait_s

    def _flush_losses(self, epoch: int, lr: float) -> float | None:
        """Reduce, check and log the loss window (see fusionnet.train.losslog); the window's mean loss."""
        it = self.state["iteration"]
        row = self.window.flush(self.ctx, self.step, it)
        if row is None:
            return None
        acc = self.state["epoch_acc"]
        acc["loss_sum"] += row["loss"] * row["iterations"]
        acc["loss_count"] += row["iterations"]
        if self.ctx.is_main:
            self.loss_log.append({"iteration": it, "epoch": epoch + 1, "lr": lr, **row})
            if self.logger is not None:
                terms = {f"train/{k}": v for k, v in row.items() if k != "iterations"}
                self.logger.log_metrics({**terms, "train/lr": lr}, step=it)
        return row["loss"]

    def _end_epoch(self, epoch: int) -> None:
        state, ctx = self.state, self.ctx
        acc = state["epoch_acc"]
        val = self._validate_and_note(epoch + 1, at=float(epoch + 1))
        if ctx.is_main:
            row = {
                "epoch": epoch + 1, **val,
                "train_loss": acc["loss_sum"] / max(1, acc["loss_count"]),
                "samples_per_s": acc["samples"] / acc["train_s"] if acc["train_s"] else math.nan,
                "data_wait_fraction": acc["wait_s"] / acc["train_s"] if acc["train_s"] else math.nan,
                "iterations": state["iteration"],
                "lr": state["last_lr"],
                "epoch_s": acc["train_s"],
            }
            state["history"].append(row)
            self.progress.summary(epoch + 1, self.cfg.epochs, row["train_loss"], val.get("val_sad"), acc["train_s"],
                                  val.get("val_s"), int(acc["loss_count"]))
            if self.logger is not None:
                metrics = {f"epoch/{k}": float(v) for k, v in row.items() if k not in ("epoch", "iterations")}
                self.logger.log_metrics({**metrics, "epoch": float(epoch + 1)}, step=state["iteration"])
            self._write_history(finished=False)
            curves = save_loss_curves(self.loss_log.read(max_rows=2000), state["history"], state["initial_val"],
                                      self.out_dir / "plots" / "loss_curves.png", title=f"{self.step} step")
            if curves is not None and self.logger is not None:
                self.logger.log_image(curves, "plots/loss_curves.png")
        state["epoch"] = epoch + 1
        state["batch_in_epoch"] = 0
        state["epoch_acc"] = _zero_epoch_acc()
        self._checkpoint()

    def _validate_and_note(self, epoch: int, at: float, grid: bool = True) -> dict[str, float]:
        """Validate the weights this step hands on (the EMA where train_common.ema_decay is set) and note
        them for `keep: best`; the live weights go on training."""
        with self._handed_on_weights():
            val = self._validate(epoch, grid=grid)
            selection.note_validation(self.state, val, at, self.cfg.keep, self.model, self.ctx.is_main)
        return val

    def _handed_on_weights(self):
        return self.average.swapped_into(self.model) if self.average is not None else nullcontext()

    def _validate(self, epoch: int, grid: bool = True) -> dict[str, float]:
        """Every rank scores its share of the val split (`validate_shared`); returns {"val_sad",
        "val_mse", "val_images", "val_s"} on every rank. Rank 0 draws the grid and logs."""
        cfg, ctx = self.cfg, self.ctx
        scores, visuals = validate_shared(self.model, self.val_set, self.val_radii, cfg, ctx, self.autocast,
                                          cfg.visual_count if grid and ctx.is_main else 0)
        if ctx.is_main:
            name = f"plots/val_epoch_{epoch:03d}.png"
            picture = save_val_grid(visuals, self.out_dir / name,
                                    title=f"{self.step} step, epoch {epoch}: val SAD {scores['val_sad']:.3f}") if grid else None
            if self.logger is not None:
                self.logger.log_metrics({"val/sad": scores["val_sad"], "val/mse": scores["val_mse"]}, step=self.state["iteration"])
                if picture is not None:
                    self.logger.log_image(picture, name)
        return scores

    # ------------------------------------------------------------------ files
    def _checkpoint(self) -> None:
        if self.ctx.is_main:
            state = self.state
            state["model"] = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            state["optimizer"] = self.optimizer.state_dict()
            state["scaler"] = self.scaler.state_dict()
            state["rng"] = capture_rng(self.device)
            if self.average is not None:
                state["ema"] = self.average.state_dict()
            save_state(self.state_path, state)
            for key in ("model", "optimizer", "ema"):
                state.pop(key, None)  # keep only the live copies in memory
        barrier(self.ctx)

    def _write_history(self, finished: bool) -> Path:
        state, totals = self.state, self.state["totals"]
        doc = {
            "step": self.step, "finished": finished,
            "initial_val": state["initial_val"], "epochs": state["history"],
            "validations": state["validations"], "keep": self.cfg.keep, "kept": selection.kept(state, self.cfg.keep),
            "iterations": state["iteration"],
            "samples_per_s": totals["samples"] / totals["train_s"] if totals["train_s"] else math.nan,
            "data_wait_fraction": totals["wait_s"] / totals["train_s"] if totals["train_s"] else math.nan,
            "train_s": totals["train_s"], "world_size": self.ctx.world_size,
            "config": self.cfg.to_dict(),
        }
        text = json.dumps(doc, indent=2, allow_nan=True) + "\n"
        return write_atomic(self.out_dir / HISTORY_FILE, lambda tmp: tmp.write_text(text))

    def _finish(self) -> StepResult:
        if self.ctx.is_main:
            if self.cfg.keep == "best" and self.state.get("best_model") is not None:
                self.model.load_state_dict(self.state["best_model"])  # early stopping on validation
                print(selection.describe(self.step, self.state), flush=True)
                if self.logger is not None:
                    row = selection.kept(self.state, "best")
                    self.logger.log_metrics({"kept/val_sad": row["val_sad"], "kept/iteration": float(row["iteration"])},
                                            step=self.state["iteration"])
            elif self.average is not None:  # keep: last hands on the average, as validated
                self.average.copy_to(self.model)
            fmodel.save(self.model, self.out_dir / MODEL_FILE, extra={"step": self.step, "iterations": self.state["iteration"]},
                        serving=tdata.serving_settings(self.shards_dir))
            self._write_history(finished=True)
            self.state["finished"] = True
            self._checkpoint()
        else:
            barrier(self.ctx)
        # what the result needs (not the weights of "best_model", which only rank 0 holds)
        shared = {k: self.state[k] for k in ("history", "initial_val", "totals", "iteration")} if self.ctx.is_main else None
        return self._result(broadcast_object(shared, self.ctx))  # type: ignore[arg-type]

    def _result(self, state: dict[str, Any]) -> StepResult:
        return StepResult.from_state(self.step, self.out_dir, MODEL_FILE, HISTORY_FILE, state)


def _zero_epoch_acc() -> dict[str, float]:
    return {"samples": 0, "wait_s": 0.0, "train_s": 0.0, "loss_sum": 0.0, "loss_count": 0}
