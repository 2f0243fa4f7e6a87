"""Which parts of the network each training step updates (paper Sec. 3.4, method-notes.md).

- segmentation: encoder + foreground and background decoders (the fusion network is not run);
- fusion: only the fusion network; the segmentation network is frozen, its BatchNorms in eval mode
  so their running statistics stay those of step 1;
- joint: everything, with every BatchNorm frozen: eval mode (running statistics unchanged) and
  affine weight/bias not trained.
"""

from __future__ import annotations

import torch
from torch import nn

from fusionnet.model import LateFusionNet

TRAINED_GROUPS: dict[str, tuple[str, ...]] = {
    "segmentation": ("encoder", "fg_decoder", "bg_decoder"),
    "fusion": ("fusion",),
    "joint": ("encoder", "fg_decoder", "bg_decoder", "fusion"),
}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_modules(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BATCHNORMS)]


def set_trainable(model: LateFusionNet, step: str, freeze_encoder_bn: bool = False,
                  train_encoder: bool = True) -> list[nn.Parameter]:
    """Set requires_grad for `step` and return the trainable parameters, in model order.
    freeze_encoder_bn: the encoder's BatchNorm affine weights are not trained in any step (with
    `set_train_mode`'s eval mode: a pretrained encoder keeps its ImageNet statistics, which a
    CPU batch of 4 would otherwise overwrite). train_encoder False (train_common.encoder_lr_scale 0):
    the encoder is not trained at all, so no gradient flows through it (a cheaper backward)."""
    if step not in TRAINED_GROUPS:
        raise ValueError(f"unknown step {step!r}; choose one of {', '.join(TRAINED_GROUPS)}")
    groups = model.parameter_groups()
    for name, params in groups.items():
        for p in params:
            p.requires_grad_(name in TRAINED_GROUPS[step] and (train_encoder or name != "encoder"))
    frozen_bns = batchnorm_modules(model) if step == "joint" else []
    if freeze_encoder_bn:
        frozen_bns += batchnorm_modules(model.encoder)
    for bn in frozen_bns:
        for p in bn.parameters(recurse=False):
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def lr_groups(model: LateFusionNet, trainable: list[nn.Parameter], encoder_lr_scale: float) -> list[dict]:
    """Optimizer groups: the trainable encoder parameters at `encoder_lr_scale` x the schedule's LR,
    the rest at 1x (a pretrained encoder fine-tuned gently while the decoders learn from scratch).
    Each group's `lr_scale` is what the trainer multiplies the scheduled LR by."""
    encoder = {id(p) for p in model.parameter_groups()["encoder"]}
    groups = [{"params": [p for p in trainable if id(p) in encoder], "lr_scale": float(encoder_lr_scale)},
              {"params": [p for p in trainable if id(p) not in encoder], "lr_scale": 1.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: LateFusionNet, trainable: list[nn.Parameter], cfg) -> torch.optim.Optimizer:
    """train_common.optimizer over `lr_groups` (cfg: a fusionnet.train.config.StepConfig)."""
    groups = lr_groups(model, trainable, cfg.encoder_lr_scale)
    if cfg.optimizer == "adam":  # betas (momentum, 0.999): train_common.momentum stays meaningful
        return torch.optim.Adam(groups, lr=cfg.base_lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def set_train_mode(model: LateFusionNet, step: str, freeze_encoder_bn: bool = False) -> None:
    """model.train() except what `step` freezes, which goes to eval mode (BN statistics fixed);
    freeze_encoder_bn: the encoder's BatchNorms too, in every step.

    Call before every epoch's training loop: validation switches the whole model to eval mode.
    """
    model.train()
    if step == "segmentation":
        model.fusion.eval()  # not run in this step
    elif step == "fusion":
        for part in (model.encoder, model.fg_decoder, model.bg_decoder):
            part.eval()
    elif step == "joint":
        for bn in batchnorm_modules(model):
            bn.eval()
    else:
        raise ValueError(f"unknown step {step!r}; choose one of {', '.join(TRAINED_GROUPS)}")
    if freeze_encoder_bn:
        for bn in batchnorm_modules(model.encoder):
            bn.eval()
