"""Training settings and the cyclical learning rate: params parsing and hand-computed schedule values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fusionnet.train.config import STEPS, STEP_SECTIONS, StepConfig
from fusionnet.train.schedule import half_cycle_iterations, triangular_lr

ROOT = Path(__file__).resolve().parents[1]


def test_triangular_lr_hand_computed():
    # base 5e-4, max 1.5e-3, half-cycle 4 iterations: +2.5e-4 per iteration up, then down, then repeat
    lrs = [triangular_lr(i, 5e-4, 1.5e-3, 4) for i in range(10)]
    expected = [5e-4, 7.5e-4, 1e-3, 1.25e-3, 1.5e-3, 1.25e-3, 1e-3, 7.5e-4, 5e-4, 7.5e-4]
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_triangular_lr_half_cycle_of_one_alternates():
    assert [triangular_lr(i, 1e-5, 5e-4, 1) for i in range(5)] == pytest.approx([1e-5, 5e-4, 1e-5, 5e-4, 1e-5])


def test_triangular_lr_flat_when_base_equals_max():
    assert {triangular_lr(i, 1e-3, 1e-3, 3) for i in range(12)} == {1e-3}


@pytest.mark.parametrize("bad", [dict(iteration=-1), dict(half_cycle_iters=0)])
def test_triangular_lr_rejects_bad_arguments(bad):
    args = dict(iteration=0, base_lr=1e-4, max_lr=1e-3, half_cycle_iters=2) | bad
    with pytest.raises(ValueError):
        triangular_lr(**args)


def test_half_cycle_in_iterations():
    assert half_cycle_iterations(2, 50) == 100  # the paper's code: 2 epochs
    assert half_cycle_iterations(0.5, 3) == 2  # rounded, never 0
    assert half_cycle_iterations(0.01, 3) == 1


def _params(**step_section) -> dict:
    return {
        "seed": 3,
        "model": {"backbone": "densenet121", "pretrained": False, "input_norm": "authors"},
        "train_common": {"device": "cpu", "batch_size": 4},
        "train_seg": {"epochs": 2, "base_lr": 1e-4, "max_lr": 1e-3, **step_section},
        "train_fusion": {"epochs": 5},
    }


def test_from_params_reads_only_its_own_step_section():
    cfg = StepConfig.from_params(_params(), "segmentation")
    assert (cfg.seed, cfg.backbone, cfg.input_norm, cfg.batch_size, cfg.epochs) == (3, "densenet121", "authors", 4, 2)
    assert (cfg.base_lr, cfg.max_lr) == (1e-4, 1e-3)
    fusion = StepConfig.from_params(_params(), "fusion")
    assert fusion.epochs == 5 and fusion.base_lr == StepConfig.base_lr  # train_seg's lrs are not read


def test_from_params_rejects_unknown_keys_and_missing_sections():
    with pytest.raises(ValueError, match="train_seg: unknown key.*'epoch'"):
        StepConfig.from_params(_params(epoch=3), "segmentation")
    with pytest.raises(ValueError, match="missing section 'train_joint'"):
        StepConfig.from_params(_params(), "joint")
    with pytest.raises(ValueError, match="base_lr <= max_lr"):
        StepConfig.from_params(_params(base_lr=1e-2), "segmentation")
    with pytest.raises(ValueError, match="unknown step"):
        StepConfig.from_params(_params(), "finetune")


def test_resume_key_ignores_io_knobs_only():
    cfg = StepConfig.from_params(_params(), "segmentation")
    assert cfg.replace(checkpoint_every=7, num_workers=3).resume_key() == cfg.resume_key()
    assert cfg.replace(max_lr=2e-3).resume_key() != cfg.resume_key()


@pytest.mark.parametrize("name", ["params.yaml", "params-paper.yaml"])
def test_project_params_files_parse_for_every_step(name):
    path = ROOT / name
    params = yaml.safe_load(path.read_text())
    for step in STEPS:
        cfg = StepConfig.from_params(params, step)
        assert cfg.step == step
    assert set(STEP_SECTIONS.values()) <= set(params)


def test_paper_profile_has_the_papers_settings():
    params = yaml.safe_load((ROOT / "params-paper.yaml").read_text())
    seg, fusion, joint = (StepConfig.from_params(params, s) for s in STEPS)
    assert (seg.backbone, seg.pretrained, seg.batch_size) == ("densenet201", True, 2)
    assert (seg.epochs, fusion.epochs, joint.epochs) == (15, 4, 7)
    assert (seg.base_lr, seg.max_lr) == (5e-4, 1.5e-3)
    assert (fusion.base_lr, fusion.max_lr) == (5e-4, 1.5e-3)
    assert (joint.base_lr, joint.max_lr) == (5e-4, 1e-3)
    assert seg.half_cycle_epochs == 2 and seg.grad_clip == 5 and seg.momentum == 0.9
    assert params["crops"]["sizes"] == [512, 800] and params["crops"]["out_size"] == 512
    assert params["composite"]["bg_per_fg"] == 100 and params["composite"]["bg_per_test_fg"] == 20


def test_paper_profile_has_every_key_of_the_default_profile():
    """params-paper.yaml is a drop-in params.yaml: same keys, the paper's values."""

    def keys(tree: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in tree.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= keys(v, f"{prefix}{k}.")
        return out

    default = yaml.safe_load((ROOT / "params.yaml").read_text())
    paper = yaml.safe_load((ROOT / "params-paper.yaml").read_text())
    assert keys(default) == keys(paper), keys(default) ^ keys(paper)
