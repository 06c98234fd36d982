"""fastdiff's fp16 loss scaling against guided-diffusion's own TrainLoop (issue 17).

tests/fixtures/gd_loss_scale.pt (written by tools/gd_golden_loss_scale.py) holds what GD's
``TrainLoop.run_step`` with ``use_fp16=True`` did over 8 steps with an inf injected into one
gradient at steps 2, 4 and 5: the lg_loss_scale it logged each step, the value after each
step, and which steps it skipped. fastdiff's ``Trainer`` with precision fp16 (autocast, fp32
master weights: its weights differ from GD's fp16 ones), the same weights, images and
injected overflows must give the same sequence and skip the same steps — with either
optimizer path — and report the value under GD's ``lg_loss_scale`` metrics key.
"""
import os
import sys

import pytest
import torch

import fastdiff
from fastdiff import config as C
from fastdiff.diffusion import create_named_schedule_sampler
from fastdiff.train.loop import Trainer
from fastdiff.train.parallel import DistInfo

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import gd_golden_loss_scale as golden  # noqa: E402

# GD and fastdiff both add 1e-3 to a Python float per good step and subtract 1 per overflow:
# the same float operations in the same order give the same bits; 1e-9 only allows a
# reordered sum, and is far below one step's growth.
SCALE_ATOL = 1e-9


@pytest.fixture(scope="module")
def gd():
    return torch.load(golden.FIXTURE_PATH, weights_only=False)


def make_trainer(gd, optimizer):
    torch.manual_seed(golden.SEED)
    model, diffusion = fastdiff.create_model_and_diffusion(**gd["kwargs"])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(golden.initial_state(shapes), strict=True)
    train = gd["train"]
    cfg = C.TrainConfig(batch_size=train["batch_size"], lr=train["lr"],
                        weight_decay=train["weight_decay"], ema_rate=train["ema_rate"],
                        fp16_scale_growth=train["fp16_scale_growth"], precision="fp16",
                        optimizer=optimizer, log_interval=1)
    sampler = create_named_schedule_sampler("uniform", diffusion, seed=golden.SEED)
    return Trainer(model=model, diffusion=diffusion, data=None, schedule_sampler=sampler,
                   cfg=cfg, dist_info=DistInfo(device=torch.device("cpu")), log_dir=None,
                   metrics_table=False)


def state_tensors(trainer):
    """Parameters and every EMA, as copies."""
    emas = [e for rate in trainer.ema_rates for e in trainer.optimizer.get_ema(rate)]
    return [t.detach().clone() for t in list(trainer.params) + emas]


def state_names(trainer):
    return list(trainer.param_names) + [f"ema_{rate}/{name}" for rate in trainer.ema_rates
                                        for name in trainer.param_names]


def run_fastdiff(gd, optimizer):
    """GD's loop, step for step, through Trainer.train_step (the loop's own step)."""
    trainer = make_trainer(gd, optimizer)
    named = dict(zip(trainer.param_names, trainer.params))
    injector = golden.OverflowInjector(named[gd["overflow_param"]], gd["overflow_steps"])
    logged, after, outcomes, returned, unchanged = [], [], [], [], {}
    for step in range(gd["steps"]):
        injector.step = step
        before = state_tensors(trainer)
        returned.append(bool(trainer.train_step(gd["images"][step], {})))
        trainer.step += 1
        trainer.device_metrics.drain_into(trainer.metrics)  # the device-side interval means
        logged.append(trainer.metrics.dumpkvs().get("lg_loss_scale"))
        after.append(trainer.lg_loss_scale)
        now = state_tensors(trainer)
        outcomes.append(golden.step_outcome(before, now))
        if outcomes[-1] == "mixed":  # for the failure message: what did not move
            unchanged[step] = [n for n, b, a in zip(state_names(trainer), before, now)
                               if torch.equal(b, a)][:10]
    assert injector.fired == gd["overflow_steps"]
    return {"logged": logged, "after": after, "outcomes": outcomes, "returned": returned,
            "unchanged_in_mixed_steps": unchanged}


@pytest.fixture(scope="module", params=["fused", "torch"])
def ours(request, gd):
    return run_fastdiff(gd, request.param)


def test_fixture_is_gds_fp16_run(gd):
    assert len(gd["gd_commit"]) == 40
    assert gd["kwargs"]["use_fp16"] is True
    assert gd["logged_lg_loss_scale"][0] == 20.0  # GD's initial lg_loss_scale
    assert [s for s, skipped in enumerate(gd["skipped"]) if skipped] == gd["overflow_steps"]


def test_logged_lg_loss_scale_matches_gd(gd, ours):
    assert None not in ours["logged"], "every step logs lg_loss_scale, skipped ones too"
    assert ours["logged"] == pytest.approx(gd["logged_lg_loss_scale"], rel=0, abs=SCALE_ATOL)


def test_lg_loss_scale_after_each_step_matches_gd(gd, ours):
    assert ours["after"] == pytest.approx(gd["lg_loss_scale_after"], rel=0, abs=SCALE_ATOL)


def test_same_steps_skipped_as_gd(gd, ours):
    # Skipped: parameters and every EMA bitwise unchanged; taken: every one of them changed.
    expected = ["skipped" if s else "taken" for s in gd["skipped"]]
    assert ours["outcomes"] == expected, ours["unchanged_in_mixed_steps"]
    assert ours["returned"] == [not s for s in gd["skipped"]]
