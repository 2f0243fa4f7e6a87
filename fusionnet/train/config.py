"""One training step's settings, read from params.yaml (paper Sec. 3.4 and method-notes.md "Optimiser").

A step reads `seed`, `model`, `train_common` and ONLY its own section (`train_seg`, `train_fusion` or
`train_joint`), so a DVC stage that lists exactly those keys re-runs only when they change.
Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

STEPS = ("segmentation", "fusion", "joint")
STEP_SECTIONS = {"segmentation": "train_seg", "fusion": "train_fusion", "joint": "train_joint"}
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DEVICES = ("cpu", "cuda", "auto")
OPTIMIZERS = ("sgd", "adam")
KEEPS = ("last", "best")

# Keys each params section may hold -> StepConfig field names (identical names, grouped by section).
MODEL_KEYS = ("backbone", "pretrained", "input_norm", "fpn_width", "fusion_widths", "decoder_max_width")
COMMON_KEYS = (
    "device", "precision", "channels_last", "threads", "deterministic", "batch_size", "global_batch_size",
    "val_batch_size", "num_workers",
    "optimizer", "encoder_lr_scale", "freeze_encoder_bn", "grad_clip", "momentum", "weight_decay", "checkpoint_every", "log_every",
    "val_max_images", "val_band_radius", "visual_count", "val_every", "keep", "ema_decay",
)
STEP_KEYS = (
    "epochs", "max_iters_per_epoch", "base_lr", "max_lr", "half_cycle_epochs", "warmup_epochs",
    "side_weight", "sparsity_weight", "sparsity_gamma",
)


@dataclass(frozen=True)
class StepConfig:
    """Everything `run_step` needs; defaults are the paper's values where the paper gives one.

    Learning rate: triangular cyclical schedule from `base_lr` to `max_lr` and back, each half-cycle
    `half_cycle_epochs` epochs long (Smith 2017, paper Sec. 3.4). `max_iters_per_epoch` caps an epoch
    (None = the whole training set) so a CPU profile can run a short step. `warmup_epochs`: that many
    first epochs of this step also draw the resized whole training composites (paper Sec. 4 "warm-up").
    Joint step loss (paper Eq. 9): L_u + side_weight * (L_F + L_B) + sparsity_weight * L_s(gamma).
    """

    step: str
    seed: int = 0
    # model
    backbone: str = "densenet201"
    pretrained: bool = True
    input_norm: str = "imagenet"
    fpn_width: int = 128  # paper / authors' code: 128
    fusion_widths: tuple[int, ...] = (256, 128, 128, 64, 256)  # authors' code
    decoder_max_width: int | None = None  # cap on the decoders' up-block widths (None: authors' max(skip, 128))
    # train_common
    device: str = "auto"  # cpu | cuda | auto (cuda when available)
    precision: str = "fp32"  # fp32 | bf16 (cpu or cuda autocast) | fp16 (cuda autocast + GradScaler) | auto (measured)
    channels_last: bool = True  # NHWC: oneDNN and cuDNN run the DenseNet convolutions faster
    threads: int | None = None  # torch intra-op threads per process (None = torch's default)
    deterministic: bool = True  # deterministic algorithms on CPU (exact kill-and-resume)
    batch_size: int = 2  # per process and micro-batch (paper: 2 per GPU)
    # samples per optimizer step over all processes (paper: 16 = 8 GPUs x 2); reached by gradient
    # accumulation, global / (batch_size x processes) micro-batches a step. None: batch_size x processes
    global_batch_size: int | None = None
    val_batch_size: int | None = None  # validation batch (no gradients: can be larger); None: batch_size
    num_workers: int = 1
    optimizer: str = "sgd"  # sgd (paper, authors' code) | adam (a CPU-profile deviation: from scratch in minutes)
    encoder_lr_scale: float = 1.0  # encoder LR = this x the schedule's (< 1: keep ImageNet features while decoders learn; 0: frozen)
    freeze_encoder_bn: bool = False  # encoder BNs in eval mode, affine fixed, in every step (a pretrained encoder, small batches)
    grad_clip: float = 5.0  # gradient-norm clip (authors' code)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    checkpoint_every: int = 50  # iterations between state.pt writes (also at each epoch end)
    log_every: int = 1  # iterations between logger.log_metrics calls
    val_max_images: int | None = None  # score at most this many val crops (None = all)
    val_band_radius: int = 25  # the paper's "-25" transition band for val SAD/MSE
    visual_count: int = 4  # val crops shown in the per-epoch PNG grid
    val_every: int | None = None  # also validate every this many iterations (None: at epoch ends only)
    keep: str = "last"  # the step's model: "last" weights (paper) | "best" validated (early stopping)
    ema_decay: float | None = None  # validate and hand on an EMA of the weights (fusionnet.train.averaging); None: the weights
    # step section
    epochs: int = 1
    max_iters_per_epoch: int | None = None
    base_lr: float = 5e-4
    max_lr: float = 1.5e-3
    half_cycle_epochs: float = 2.0
    warmup_epochs: int = 0
    side_weight: float = 0.5  # paper Eq. 9 w1
    sparsity_weight: float = 0.01  # paper Eq. 9 w2
    sparsity_gamma: float = 0.9  # paper Eq. 10 gamma

    def __post_init__(self) -> None:
        where = f"params {STEP_SECTIONS.get(self.step, self.step)}"
        object.__setattr__(self, "fusion_widths", tuple(int(w) for w in self.fusion_widths))
        if self.step not in STEPS:
            raise ValueError(f"unknown step {self.step!r}; choose one of {', '.join(STEPS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"params train_common.precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"params train_common.optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.keep not in KEEPS:
            raise ValueError(f"params train_common.keep {self.keep!r}: choose one of {', '.join(KEEPS)}")
        if self.val_every is not None and int(self.val_every) < 1:
            raise ValueError(f"params train_common.val_every must be >= 1 or null, got {self.val_every}")
        if self.ema_decay is not None and not 0.0 < float(self.ema_decay) < 1.0:
            raise ValueError(f"params train_common.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.device not in DEVICES:
            raise ValueError(f"params train_common.device {self.device!r}: choose one of {', '.join(DEVICES)}")
        for name in ("global_batch_size", "val_batch_size"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"params train_common.{name} must be >= 1 or null, got {getattr(self, name)}")
        if self.global_batch_size is not None and self.global_batch_size % self.batch_size:
            raise ValueError(f"params train_common.global_batch_size {self.global_batch_size} is not a multiple of "
                             f"batch_size {self.batch_size}")
        for name in ("batch_size", "checkpoint_every", "log_every", "epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"params: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_iters_per_epoch is not None and self.max_iters_per_epoch < 1:
            raise ValueError(f"{where}.max_iters_per_epoch must be >= 1 or null, got {self.max_iters_per_epoch}")
        if not 0 < self.base_lr <= self.max_lr:
            raise ValueError(f"{where}: need 0 < base_lr <= max_lr, got {self.base_lr} and {self.max_lr}")
        if not 0 <= float(self.encoder_lr_scale) <= 1:
            raise ValueError(f"params train_common.encoder_lr_scale must be in [0, 1] (0: frozen), got {self.encoder_lr_scale}")
        if self.half_cycle_epochs <= 0:
            raise ValueError(f"{where}.half_cycle_epochs must be > 0, got {self.half_cycle_epochs}")
        if self.num_workers < 0 or self.warmup_epochs < 0 or self.visual_count < 0:
            raise ValueError("params: num_workers, warmup_epochs and visual_count must be >= 0")

    @classmethod
    def from_params(cls, params: dict[str, Any], step: str) -> "StepConfig":
        """Build from the whole params.yaml dict: `seed`, `model`, `train_common`, the step's section."""
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}; choose one of {', '.join(STEPS)}")
        values: dict[str, Any] = {"step": step, "seed": int(params.get("seed", 0))}
        for section, allowed in (("model", MODEL_KEYS), ("train_common", COMMON_KEYS), (STEP_SECTIONS[step], STEP_KEYS)):
            block = params.get(section)
            if block is None:
                raise ValueError(f"params: missing section {section!r} (needed by the {step} training step)")
            if not isinstance(block, dict):
                raise ValueError(f"params: section {section!r} must be a mapping, got {type(block).__name__}")
            unknown = sorted(set(block) - set(allowed))
            if unknown:
                raise ValueError(f"params {section}: unknown key(s) {unknown}; allowed: {list(allowed)}")
            values.update(block)
        return cls(**values)

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each of `world_size` processes, so a step sees
        global_batch_size samples; a clear error when that does not divide."""
        if self.global_batch_size is None:
            return 1
        per_micro = self.batch_size * world_size
        if self.global_batch_size % per_micro:
            raise ValueError(f"params train_common.global_batch_size {self.global_batch_size} is not a multiple of "
                             f"batch_size {self.batch_size} x {world_size} processes; choose a global batch that "
                             f"divides, or another process count")
        return self.global_batch_size // per_micro

    @property
    def encoder_trained(self) -> bool:
        """False with encoder_lr_scale 0: the encoder is frozen in every step."""
        return float(self.encoder_lr_scale) > 0

    @property
    def encoder_bn_frozen(self) -> bool:
        """The encoder's BatchNorms keep their statistics: asked for, or the whole encoder is frozen."""
        return self.freeze_encoder_bn or not self.encoder_trained

    def replace(self, **changes: Any) -> "StepConfig":
        """A copy with some fields changed (e.g. a CLI --device override)."""
        return StepConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resume_key(self) -> dict[str, Any]:
        """Fields that must match for a saved state.pt to be resumed (not logging/IO knobs)."""
        ignore = {"checkpoint_every", "log_every", "num_workers", "visual_count", "threads", "val_batch_size"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ignore}
