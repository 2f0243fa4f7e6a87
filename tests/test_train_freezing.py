"""What each training step trains (paper Sec. 3.4): trainable sets, frozen BatchNorm, the step forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusionnet.model import LateFusionNet
from fusionnet.train.config import StepConfig
from fusionnet.train.forward import SegmentationNet, step_loss, step_module
from fusionnet.train.freezing import batchnorm_modules, set_train_mode, set_trainable


# tiny tensors: a second thread only adds spin-waiting when other jobs share the cores
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def net() -> LateFusionNet:
    torch.manual_seed(0)
    return LateFusionNet("densenet121")


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_trainable_parameters_per_step(net):
    groups = {k: _ids(v) for k, v in net.parameter_groups().items()}
    bn_params = _ids(p for bn in batchnorm_modules(net) for p in bn.parameters(recurse=False))
    seg = _ids(set_trainable(net, "segmentation"))
    assert seg == groups["encoder"] | groups["fg_decoder"] | groups["bg_decoder"]
    assert not seg & groups["fusion"]
    fusion = _ids(set_trainable(net, "fusion"))
    assert fusion == groups["fusion"]
    joint = _ids(set_trainable(net, "joint"))
    everything = set().union(*groups.values())
    assert joint == everything - bn_params
    assert bn_params and not joint & bn_params
    # requires_grad agrees with the returned list
    assert _ids(p for p in net.parameters() if p.requires_grad) == joint


def test_train_mode_per_step(net):
    set_train_mode(net, "fusion")
    assert net.fusion.training and all(bn.training for bn in batchnorm_modules(net.fusion))
    assert not any(bn.training for part in (net.encoder, net.fg_decoder, net.bg_decoder) for bn in batchnorm_modules(part))
    set_train_mode(net, "joint")
    assert net.training and not any(bn.training for bn in batchnorm_modules(net))
    set_train_mode(net, "segmentation")
    assert net.encoder.training and net.fg_decoder.training and not net.fusion.training


def _one_optimizer_step(net: LateFusionNet, step: str) -> None:
    cfg = StepConfig(step=step, backbone="densenet121", pretrained=False)
    trainable = set_trainable(net, step)
    set_train_mode(net, step)
    opt = torch.optim.SGD(trainable, lr=0.05, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(1)
    image, alpha = torch.rand(2, 3, 64, 64), torch.rand(2, 1, 64, 64)
    loss, _ = step_loss(step, step_module(net, step)(image), alpha, cfg)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_joint_step_freezes_every_batchnorm(net):
    bns = batchnorm_modules(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _one_optimizer_step(net, "joint")
    after = net.state_dict()
    bn_names = {name for name, m in net.named_modules() if m in bns}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    bn_keys = {k for k in before if k.rsplit(".", 1)[0] in bn_names}
    # running_mean/var, num_batches_tracked, weight and bias of every BN are bit-identical
    assert bn_keys and not changed & bn_keys
    # ...while the convolutions of every part did move
    for part in ("encoder.", "fg_decoder.", "bg_decoder.", "fusion."):
        assert any(k.startswith(part) for k in changed), part


def test_fusion_step_leaves_segmentation_network_untouched(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _one_optimizer_step(net, "fusion")
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("fusion.") for k in changed)


def test_segmentation_step_updates_bn_statistics_but_not_fusion(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _one_optimizer_step(net, "segmentation")
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "encoder.stem.1.running_mean" in changed  # BN trains normally in step 1
    assert not any(k.startswith("fusion.") for k in changed)


def test_segmentation_net_matches_the_full_forward(net):
    net.eval()
    image = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        full = net(image)
        sides = SegmentationNet(net)(image)
    for a, b in zip(full.fg_side_logits + full.bg_side_logits, sides.fg_side_logits + sides.bg_side_logits):
        assert torch.equal(a, b)
    for a, b in zip(full.fg_sides + full.bg_sides, sides.fg_sides + sides.bg_sides):
        assert torch.equal(a, b)


def test_segmentation_net_rejects_bad_sizes(net):
    with pytest.raises(ValueError, match="multiple of 32"):
        SegmentationNet(net)(torch.rand(1, 3, 50, 64))


def test_step_module_shares_weights(net):
    module = step_module(net, "segmentation")
    assert isinstance(module, nn.Module) and _ids(module.parameters()) == _ids(net.parameters())
    assert step_module(net, "joint") is net


def test_freeze_encoder_bn_keeps_the_encoders_statistics_and_affine_in_every_step():
    torch.manual_seed(0)
    net = LateFusionNet("efficientnet_lite0", fpn_width=16, fusion_widths=(16, 16))
    encoder_bns = batchnorm_modules(net.encoder)
    assert encoder_bns
    for step in ("segmentation", "joint"):
        before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
        trainable = set_trainable(net, step, freeze_encoder_bn=True)
        set_train_mode(net, step, freeze_encoder_bn=True)
        assert not any(bn.training for bn in encoder_bns)
        assert not _ids(p for bn in encoder_bns for p in bn.parameters(recurse=False)) & _ids(trainable)
        assert net.encoder.conv_stem.weight.requires_grad  # the convolutions still learn
        if step == "segmentation":  # the decoders' BNs still train in step 1
            assert all(bn.training for bn in batchnorm_modules(net.fg_decoder))
        opt = torch.optim.SGD(trainable, lr=0.05)
        out = step_module(net, step)(torch.rand(2, 3, 64, 64))
        loss, _ = step_loss(step, out, torch.rand(2, 1, 64, 64), StepConfig(step=step, pretrained=False))
        opt.zero_grad()
        loss.backward()
        opt.step()
        after = net.encoder.state_dict()
        for name in before:
            is_bn_state = any(name.startswith(prefix) for prefix in
                              {n + "." for n, m in net.encoder.named_modules() if m in encoder_bns})
            if is_bn_state:
                assert torch.equal(before[name], after[name]), name
        assert not torch.equal(before["conv_stem.weight"], after["conv_stem.weight"])
