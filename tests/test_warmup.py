"""Warmups: ``--lr_warmup_steps`` (linear from 0, times GD's anneal) and ``--ema_warmup``
(diffusers' ``EMAModel`` rule for the fixed-rate EMAs); both off by default, both resumable
exactly, and the step stays free of device reads with them (and with power EMAs) on.
"""
import types

import pytest
import torch

from fastdiff import config as C
from fastdiff import power_ema as P
from fastdiff.diffusion import create_named_schedule_sampler
from fastdiff.runtime import DistInfo
from fastdiff.train import cli
from fastdiff.train.loop import Trainer

LR = 1e-3
TRAIN = dict(batch_size=2, microbatch=-1, ema_rate="0.99,0.5", precision="fp32",
             optimizer="fused", lr=LR, weight_decay=0.0, lr_anneal_steps=0, max_steps=0,
             grad_clip=0.0, log_interval=10**6, save_interval=10**6, skip_nonfinite=False,
             keep_latest=0, fp16_scale_growth=1e-3)


def tiny_trainer(**overrides):
    torch.manual_seed(0)
    kw = C.model_and_diffusion_defaults()
    kw.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
              attention_resolutions="-1", diffusion_steps=50)
    model, diffusion = C.create_model_and_diffusion(**kw)
    cfg = types.SimpleNamespace(**{**TRAIN, **overrides})
    sampler = create_named_schedule_sampler("uniform", diffusion)
    return Trainer(model=model, diffusion=diffusion, data=None, schedule_sampler=sampler,
                   cfg=cfg, dist_info=DistInfo(), log_dir=None, metrics_table=False)


def lrs_of_steps(trainer, steps):
    """The lr each of ``steps`` real training steps ran with (1-based order)."""
    gen = torch.Generator().manual_seed(1)
    used = []
    for _ in range(steps):
        trainer.train_step(torch.randn(2, 3, 8, 8, generator=gen), {})
        used.append(trainer.optimizer.opt.param_groups[0]["lr"])
        trainer.step += 1
    return used


# ----------------------------------------------------------------------------- lr warmup
# Exact equality: the schedule is a product of host floats computed the same way, so the
# expected values below are exact up to the order of the two multiplications (checked with
# approx at 1e-15 relative, a few ulps).
def test_lr_warmup_without_anneal_at_steps_1_n_and_n_plus_1():
    n = 4
    lrs = lrs_of_steps(tiny_trainer(lr_warmup_steps=n), n + 1)
    assert lrs[0] == pytest.approx(LR / n, rel=1e-15)       # step 1: lr·1/N
    assert lrs[1] == pytest.approx(LR * 2 / n, rel=1e-15)
    assert lrs[n - 1] == pytest.approx(LR, rel=1e-15)       # step N: full lr
    assert lrs[n] == pytest.approx(LR, rel=1e-15)           # step N+1: stays


def test_lr_warmup_composes_with_gd_anneal():
    n, anneal = 4, 10
    lrs = lrs_of_steps(tiny_trainer(lr_warmup_steps=n, lr_anneal_steps=anneal), n + 1)
    # GD: step 1 uses lr, step k >= 2 uses lr·(1 − (k−2)/anneal); times min(1, k/N).
    assert lrs[0] == pytest.approx(LR * (1 / n), rel=1e-15)
    assert lrs[n - 1] == pytest.approx(LR * (1 - (n - 2) / anneal), rel=1e-15)
    assert lrs[n] == pytest.approx(LR * (1 - (n - 1) / anneal), rel=1e-15)


def test_no_lr_warmup_keeps_gd_anneal_exactly():
    anneal = 10
    lrs = lrs_of_steps(tiny_trainer(lr_anneal_steps=anneal), 4)
    assert lrs == [LR, LR, LR * (1 - 1 / anneal), LR * (1 - 2 / anneal)]  # bitwise: GD's floats


# ---------------------------------------------------------------------------- EMA warmup
# diffusers EMAModel.get_decay with use_ema_warmup=True, inv_gamma=1, power=2/3,
# update_after_step=0 at optimization_step 1, 2, 10 (its step - 1 = 0, 1, 9):
# 0.0, 1 - 2**(-2/3), 1 - 10**(-2/3), evaluated in float64.
DIFFUSERS_DECAY = {1: 0.0, 2: 0.3700394750525634, 10: 0.7845565309968117}


@pytest.mark.parametrize("step", [1, 2, 10])
def test_ema_warmup_rates_follow_diffusers_capped_at_the_rate(step):
    trainer = tiny_trainer(ema_warmup=True, ema_inv_gamma=1.0, ema_power=2 / 3)
    rates = trainer.ema_rates_for_step(step)
    assert rates[0] == pytest.approx(DIFFUSERS_DECAY[step], rel=1e-14, abs=0.0)  # < 0.99
    assert rates[1] == pytest.approx(min(0.5, DIFFUSERS_DECAY[step]), rel=1e-14, abs=0.0)


def test_ema_warmup_off_by_default_and_on_it_reaches_the_optimizer():
    assert tiny_trainer().ema_rates_for_step(1) is None  # GD's constant rates
    trainer = tiny_trainer(ema_warmup=True, ema_inv_gamma=1.0, ema_power=2 / 3)
    lrs_of_steps(trainer, 1)
    # Rate 0 at step 1: both EMAs are the weights after the first step, bit for bit.
    for rate in (0.99, 0.5):
        for e, p in zip(trainer.optimizer.get_ema(rate), trainer.params):
            assert torch.equal(e, p.detach())


def test_step_stays_sync_free_with_warmups_and_power_emas():
    from test_sync_free_step import reads_per_step, tiny_trainer as sync_trainer
    trainer = sync_trainer(ema_std="0.05,0.10", ema_warmup=True, ema_inv_gamma=1.0,
                           ema_power=2 / 3, lr_warmup_steps=3)
    assert trainer.ema_rates_for_step(2) is not None
    assert reads_per_step(trainer, steps=2) == [[], []]


# -------------------------------------------------------------------------- exact resume
TINY = ["--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
        "--attention_resolutions", "-1", "--image_size", "8", "--batch_size", "2",
        "--log_interval", "2", "--save_interval", "2", "--sample_grid", "False",
        "--diffusion_steps", "20", "--seed", "3", "--tensorboard", "False",
        "--ema_rate", "0.9", "--lr_warmup_steps", "3", "--lr_anneal_steps", "6",
        "--ema_warmup", "True"]


def test_resume_with_both_warmups_is_bitwise_exact(tmp_path):
    def run(name, *extra):
        rc = cli.main(TINY + ["--log_dir", str(tmp_path / name)] + list(extra))
        assert rc == 0
        return tmp_path / name

    full = run("full", "--max_steps", "4")
    run("part", "--max_steps", "2")
    part = run("part", "--max_steps", "4", "--resume_checkpoint", "latest")
    for name in ("model000004.pt", "ema_0.9_000004.pt"):
        a = torch.load(full / name, weights_only=True)
        b = torch.load(part / name, weights_only=True)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    # The lr GD's opt file records (the next step's) is the warmed-up, annealed one.
    opt = torch.load(part / "opt000004.pt", weights_only=True)
    assert opt["param_groups"][0]["lr"] == pytest.approx(5e-4 * (1 - 3 / 6), rel=1e-15)
