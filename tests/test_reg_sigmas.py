"""Regularisation noise levels (seed 000, Eq. 3-4): `dd treat`'s regulariser and
`dd dreambooth` draw flow-matching noise levels the same way, through the backbone's
shifted schedule (issue 33)."""

from __future__ import annotations

import math

import pytest
import torch

from dd.api.plugins import load_backbone
from dd.engines.dreambooth import flow_sigmas
from dd.testing.tiny import tiny_pipeline_path


def _bb(name, tmp_path_factory):
    model = tiny_pipeline_path(name, tmp_path_factory)
    options = {"max_sequence_length": 32} if name in ("flux", "sd3") else {}
    return load_backbone(name, str(model), device="cpu", dtype=torch.float32, options=options)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_treat_and_dreambooth_draw_the_same_shifted_levels(name, tmp_path_factory):
    bb = _bb(name, tmp_path_factory)
    sc = bb.pipe.scheduler.config
    shift = 1.0 if sc.get("use_dynamic_shifting", False) else float(sc.get("shift", 1.0))
    assert bb.training_shift() == shift
    T = bb.num_train_timesteps
    treat_t = bb.sample_training_timesteps(4096, torch.Generator().manual_seed(0))
    db_s = flow_sigmas(None, 4096, weighting="logit_normal", shift=shift,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(treat_t, (db_s * T).clamp(max=T - 1), rtol=0, atol=T * 2e-4)
    if shift != 1.0:  # the shift moves the median level up: shift * 0.5 / (1 + (shift-1) 0.5)
        median = float(treat_t.median()) / T
        assert median == pytest.approx(shift / (1 + shift), abs=0.02)
        assert not math.isclose(median, 0.5, abs_tol=0.05)


def test_ddpm_models_draw_uniform_integers(tmp_path_factory):
    bb = _bb("sd15", tmp_path_factory)
    t = bb.sample_training_timesteps(2000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) < bb.num_train_timesteps
