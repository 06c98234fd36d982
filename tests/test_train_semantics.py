"""Trainer behaviours that guided-diffusion's TrainLoop defines, pinned on a tiny model on CPU.

fastdiff promises GD's training semantics (README, "Differences from guided-diffusion"): the
gradient of a batch split in k microbatches is k times the unsplit mean's, the lr schedule,
the loss-aware sampler's feed, and mixed precision with fp32 master weights. These are easy
to break without any loss curve noticing, so each test compares the Trainer with a reference
computed by hand:

* the Trainer is built directly (no CLI) and its random draws (timesteps, importance weights,
  noise) are replaced by fixed ones, so a reference can reuse them;
* every optimizer step is observed twice: at the entry of the trainer's optimizer path (the
  gradients, parameters and Adam state it starts from, and ``inv_scale``/``clip``) and through
  the inner torch optimizer's step pre-hook (the lr and keyword arguments it really runs with);
* the update is then recomputed with ``torch.optim.AdamW`` on cloned tensors.
"""
import copy
import functools
import math
import types

import pytest
import torch

from fastdiff import config as C
from fastdiff.diffusion.samplers import LossSecondMomentResampler, UniformSampler
from fastdiff.train.loop import Trainer
from fastdiff.train.parallel import DistInfo

# Cosine: the linear schedule's betas exceed 1 below 20 steps. 10 timesteps keep the
# loss-aware sampler's warm-up (every timestep seen history_per_term times) short.
DIFFUSION_STEPS = 10
BATCH = 4
IMAGE_SIZE = 8
LR = 1e-3
OPTIMIZERS = ["fused", "torch"]

TRAIN_DEFAULTS = dict(
    batch_size=BATCH, microbatch=-1, ema_rate="0.9", precision="fp32", optimizer="fused",
    lr=LR, weight_decay=0.0, lr_anneal_steps=0, max_steps=0, grad_clip=0.0,
    log_interval=10**6, save_interval=10**6, skip_nonfinite=False, keep_latest=0,
    fp16_scale_growth=1e-3,
)


# ----------------------------------------------------------------------------- set-up
@functools.lru_cache(maxsize=None)
def _tiny_model_and_diffusion():
    torch.manual_seed(0)
    kw = C.model_and_diffusion_defaults()
    kw.update(image_size=IMAGE_SIZE, num_channels=32, num_res_blocks=1, channel_mult="1,2",
              attention_resolutions="4", num_heads=1, class_cond=True, learn_sigma=True,
              diffusion_steps=DIFFUSION_STEPS, noise_schedule="cosine")
    model, diffusion = C.create_model_and_diffusion(**kw)
    with torch.no_grad():
        # GD zero-initialises the output convs, so every gradient upstream of them is zero
        # on the first step: a microbatching or scaling bug would go unseen there.
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model, diffusion


def tiny_model_and_diffusion():
    """A fresh copy of the same initial model (the cache keeps the init identical)."""
    model, diffusion = _tiny_model_and_diffusion()
    return copy.deepcopy(model), diffusion


def fixed_batch(seed=1, batch=BATCH):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return x, {"y": y}


class FixedDraws:
    """A sampler stub: one batch's timesteps and importance weights, handed out microbatch by
    microbatch in order (wrapping after a batch), and the noise that goes with them."""

    def __init__(self, seed=2, batch=BATCH):
        gen = torch.Generator().manual_seed(seed)
        self.t = torch.randint(0, DIFFUSION_STEPS, (batch,), generator=gen)
        # Not all ones: the loss must be weighted per sample before the microbatch mean.
        self.weights = torch.rand(batch, generator=gen) + 0.5
        self.noise = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
        self._cursor = 0
        self.current = slice(0, batch)

    def sample(self, n, device):
        lo = self._cursor
        self.current = slice(lo, lo + n)
        self._cursor = (lo + n) % len(self.t)
        return self.t[self.current].to(device), self.weights[self.current].to(device)


class RecordingDiffusion:
    """The diffusion, with every training_losses call recorded (t and the per-sample,
    unweighted losses) and, given ``draws``, the noise of the current microbatch injected."""

    def __init__(self, diffusion, draws=None):
        self.inner = diffusion
        self.num_timesteps = diffusion.num_timesteps
        self.draws = draws
        self.calls = []

    def training_losses(self, model, x_start, t, model_kwargs=None):
        noise = None if self.draws is None else self.draws.noise[self.draws.current]
        losses = self.inner.training_losses(model, x_start, t, model_kwargs=model_kwargs,
                                            noise=noise)
        self.calls.append((t.clone(), losses["loss"].detach().clone()))
        return losses


def make_trainer(model, diffusion, sampler, **overrides):
    cfg = types.SimpleNamespace(**{**TRAIN_DEFAULTS, **overrides})
    return Trainer(model=model, diffusion=diffusion, data=None, schedule_sampler=sampler,
                   cfg=cfg, dist_info=DistInfo(), log_dir=None, metrics_table=False)


class StepSpy:
    """Records every optimizer step the trainer takes.

    At the entry of the trainer's optimizer path: the gradients as the trainer hands them
    over (still loss-scaled), the parameters and Adam state the step starts from, and
    ``inv_scale``/``clip``; through the inner torch optimizer's step pre-hook: the lr of
    every param group and the keyword arguments of the call; after it: the parameters.
    """

    def __init__(self, trainer):
        self.steps = []
        path = trainer.optimizer
        params = trainer.params
        original_step = path.step

        def spying_step(loss_scale=None, found_inf=None, clip_factor=None, ema_rates=None):
            self.steps.append(dict(
                grads=[None if p.grad is None else p.grad.detach().clone() for p in params],
                params=[p.detach().clone() for p in params],
                state=[{k: v.detach().clone() for k, v in st.items()}
                       for st in path.state_tensors()],
                inv_scale=1.0 if loss_scale is None else 1.0 / float(loss_scale),
                clip=1.0 if clip_factor is None else float(clip_factor),
                found_inf=None if found_inf is None else float(found_inf)))
            original_step(loss_scale=loss_scale, found_inf=found_inf, clip_factor=clip_factor,
                          ema_rates=ema_rates)
            self.steps[-1]["params_after"] = [p.detach().clone() for p in params]

        def inner_pre_hook(optimizer, args, kwargs):
            self.steps[-1]["lrs"] = [float(g["lr"]) for g in optimizer.param_groups]
            self.steps[-1]["inner_kwargs"] = dict(kwargs)

        path.step = spying_step
        path.opt.register_step_pre_hook(inner_pre_hook)

    def lrs(self):
        """The lr each step ran with (every param group must agree)."""
        out = []
        for s in self.steps:
            assert len(set(s["lrs"])) == 1, s["lrs"]
            out.append(s["lrs"][0])
        return out


def adamw_reference(step, lr, weight_decay, grad_factor):
    """The parameters after one torch.optim.AdamW step from a recorded step's starting point,
    with the recorded gradients multiplied by ``grad_factor``."""
    params = [torch.nn.Parameter(p.clone()) for p in step["params"]]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)
    for p, g, st in zip(params, step["grads"], step["state"]):
        p.grad = g * grad_factor
        opt.state[p] = {"step": st["step"].detach().float().cpu().reshape(()).clone(),
                        "exp_avg": st["exp_avg"].clone(), "exp_avg_sq": st["exp_avg_sq"].clone()}
    opt.step()
    return [p.detach() for p in params]


def max_abs_diff(xs, ys):
    return max(float((x - y).abs().max()) for x, y in zip(xs, ys))


def repeat_batch(x, cond):
    while True:
        yield x, cond


# ----------------------------------------------------- 1. microbatch gradient summation
def unsplit_mean_loss_and_grads(model, diffusion, x, cond, draws):
    """GD's loss of the whole batch: mean over samples of weight × loss, and its gradient."""
    model.zero_grad(set_to_none=True)
    losses = diffusion.training_losses(model, x, draws.t, model_kwargs=cond, noise=draws.noise)
    loss = (losses["loss"] * draws.weights).mean()
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


@pytest.mark.parametrize("microbatch", [-1, 2, 1])
def test_microbatch_gradients_are_summed_over_microbatches(microbatch):
    model, diffusion = tiny_model_and_diffusion()
    x, cond = fixed_batch()
    draws = FixedDraws()
    ref_loss, ref_grads = unsplit_mean_loss_and_grads(model, diffusion, x, cond, draws)
    k = 1 if microbatch == -1 else BATCH // microbatch

    trainer = make_trainer(model, RecordingDiffusion(diffusion, draws), draws,
                           microbatch=microbatch)
    spy = StepSpy(trainer)
    assert bool(trainer.train_step(x, cond))

    assert len(spy.steps) == 1
    grads = spy.steps[0]["grads"]
    assert all(g is not None for g in grads)
    # The same float32 math summed in another order (batched convs over 4 vs 2 vs 1 images):
    # measured <= 2.1e-6 of the largest gradient. A missing or extra factor k (k = 2 or 4)
    # is a 50-300% error.
    scale = max(float(g.abs().max()) for g in ref_grads)
    for name, g, ref in zip(trainer.param_names, grads, ref_grads):
        torch.testing.assert_close(g, k * ref, rtol=1e-4, atol=1e-5 * scale, msg=name)
    # The reported loss is the mean over microbatches of each microbatch's weighted mean,
    # which for equal microbatches is the batch's weighted mean (not k times it).
    assert trainer.last_loss == pytest.approx(ref_loss, rel=1e-5)
    # One training_losses call per microbatch, each with its own timesteps.
    calls = trainer.diffusion.calls
    assert len(calls) == k
    assert torch.equal(torch.cat([t for t, _ in calls]), draws.t)


# ------------------------------------------- 2. the lr schedule and the lr really applied
def run_training(optimizer, **overrides):
    """Trainer.train() on a fixed batch, checkpoints stubbed out; returns (trainer, spy)."""
    model, diffusion = tiny_model_and_diffusion()
    x, cond = fixed_batch()
    draws = FixedDraws()
    trainer = make_trainer(model, RecordingDiffusion(diffusion, draws), draws,
                           optimizer=optimizer, **overrides)
    trainer.data = repeat_batch(x, cond)
    trainer.saved_at = []
    trainer.save = lambda: trainer.saved_at.append(trainer.step)
    spy = StepSpy(trainer)
    assert trainer.train() == "finished"
    return trainer, spy


def assert_updates_used(spy, lrs, weight_decay):
    """Every recorded step moved the parameters exactly as AdamW with that step's lr."""
    for k, (step, lr) in enumerate(zip(spy.steps, lrs)):
        expected = adamw_reference(step, lr, weight_decay, grad_factor=1.0)
        # float32 AdamW in another operation order: measured <= 1.2e-7 (1 ulp at |p| ~ 1).
        # Adam moves most elements by ~lr, so the lr of a neighbouring step (lr/N = 2e-4
        # apart) is measured >= 8e-5 off.
        err = max_abs_diff(step["params_after"], expected)
        assert err < 1e-6, f"step {k}: the update does not match AdamW with lr={lr} ({err})"


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_lr_anneal_schedule_boundaries_and_applied_lr(optimizer):
    n = 5
    trainer, spy = run_training(optimizer, lr_anneal_steps=n, weight_decay=0.01)
    # GD: steps 0 and 1 at lr, step k >= 1 at lr·(1 − (k−1)/N); the run stops at N.
    expected = [LR, LR] + [LR * (1 - (k - 1) / n) for k in range(2, n)]
    assert len(spy.steps) == n and trainer.step == n
    assert spy.lrs() == pytest.approx(expected, rel=1e-6)
    assert spy.lrs()[n - 1] == pytest.approx(LR * (1 - (n - 2) / n))
    assert trainer.saved_at == [n]  # the final checkpoint, once
    assert_updates_used(spy, expected, weight_decay=0.01)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_no_anneal_keeps_lr_constant_and_max_steps_stops(optimizer):
    trainer, spy = run_training(optimizer, lr_anneal_steps=0, max_steps=3)
    assert len(spy.steps) == 3 and trainer.step == 3
    assert spy.lrs() == [LR] * 3
    assert_updates_used(spy, [LR] * 3, weight_decay=0.0)


def test_max_steps_stops_before_anneal_without_changing_the_schedule():
    trainer, spy = run_training("fused", lr_anneal_steps=10, max_steps=3)
    assert len(spy.steps) == 3 and trainer.step == 3
    assert spy.lrs() == pytest.approx([LR, LR, LR * (1 - 1 / 10)], rel=1e-6)


# ---------------------------------------------------------------- 3. the sampler's feed
class SpiedLossSecondMoment(LossSecondMomentResampler):
    """The real sampler, with every update_with_local_losses call recorded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fed = []
        self.drawn_weights = []

    def sample(self, batch_size, device):
        t, weights = super().sample(batch_size, device)
        self.drawn_weights.append(weights.clone())
        return t, weights

    def update_with_local_losses(self, local_ts, local_losses, accept=None):
        self.fed.append((local_ts.clone(), local_losses.clone(), local_losses.requires_grad))
        super().update_with_local_losses(local_ts, local_losses, accept=accept)


def test_loss_aware_sampler_is_fed_each_microbatch_unweighted_losses():
    model, diffusion = tiny_model_and_diffusion()
    sampler = SpiedLossSecondMoment(diffusion, seed=0)
    # Warm the history with losses growing with t, so the importance weights are not 1 and
    # an accidentally weighted feed would show.
    for t in range(DIFFUSION_STEPS):
        sampler.update_with_all_losses([t] * sampler.history_per_term,
                                       [1.0 + t] * sampler.history_per_term)
    assert len(set(sampler.weights().round(12))) > 1
    recorder = RecordingDiffusion(diffusion)
    trainer = make_trainer(model, recorder, sampler, microbatch=2)
    x, cond = fixed_batch()
    trainer.train_step(x, cond)

    assert len(sampler.fed) == len(recorder.calls) == BATCH // 2
    for (fed_t, fed_losses, requires_grad), (t, losses) in zip(sampler.fed, recorder.calls):
        assert fed_t.shape == (2,) and torch.equal(fed_t, t)
        assert not requires_grad  # detached: no graph kept alive in the history
        # Bitwise: the very tensor training_losses returned, not weighted, not averaged.
        assert torch.equal(fed_losses, losses)
    # The importance weights applied to these losses were not 1, so a weighted feed would
    # have differed from the recorded losses.
    drawn = torch.cat(sampler.drawn_weights)
    assert not torch.allclose(drawn, torch.ones_like(drawn))


def test_loss_aware_sampler_leaves_uniform_after_training_steps():
    model, diffusion = tiny_model_and_diffusion()
    # A short history (2 per timestep) so that 10 steps of 8 images warm every timestep.
    sampler = LossSecondMomentResampler(diffusion, history_per_term=2, seed=0)
    trainer = make_trainer(model, diffusion, sampler, batch_size=8, microbatch=4)
    x, cond = fixed_batch(batch=8)
    assert (sampler.weights() == 1).all()
    for _ in range(10):
        trainer.train_step(x, cond)
    weights = sampler.weights()
    counts = sampler.state_dict()["loss_counts"]
    assert (counts == 2).all(), counts  # every timestep's history is full
    assert weights.max() / weights.min() > 1.5, weights  # the losses differ across t


def test_uniform_sampler_is_not_fed():
    model, diffusion = tiny_model_and_diffusion()
    sampler = UniformSampler(diffusion, seed=0)
    trainer = make_trainer(model, diffusion, sampler, microbatch=2)
    x, cond = fixed_batch()
    assert bool(trainer.train_step(x, cond))
    assert (sampler.weights() == 1).all()
    assert set(sampler.state_dict()) == {"rng_state"}  # no loss history to feed


# ------------------------------------------------------------ 4. bf16 autocast on CPU
def train_steps_recording_dtypes(precision, steps=3):
    model, diffusion = tiny_model_and_diffusion()
    seen = {}

    def record(name):
        def hook(_module, _inputs, output):
            seen.setdefault(name, set()).add(output.dtype)
        return hook

    model.input_blocks[0][0].register_forward_hook(record("conv"))
    model.time_embed[0].register_forward_hook(record("linear"))
    x, cond = fixed_batch()
    draws = FixedDraws()
    trainer = make_trainer(model, RecordingDiffusion(diffusion, draws), draws,
                           precision=precision, optimizer="fused")
    spy = StepSpy(trainer)
    for _ in range(steps):
        assert bool(trainer.train_step(x, cond))
        assert math.isfinite(trainer.last_loss)
    losses = [float(losses.mean()) for _, losses in trainer.diffusion.calls]
    return trainer, spy, seen, losses


def test_bf16_cpu_autocast_trains_with_fp32_master_weights():
    bf16, bf16_spy, bf16_dtypes, bf16_losses = train_steps_recording_dtypes("bf16")
    fp32, fp32_spy, fp32_dtypes, fp32_losses = train_steps_recording_dtypes("fp32")

    assert bf16_dtypes == {"conv": {torch.bfloat16}, "linear": {torch.bfloat16}}
    assert fp32_dtypes == {"conv": {torch.float32}, "linear": {torch.float32}}
    # Master weights, gradients, Adam state and EMAs all stay float32: no "master" copy is
    # needed because the parameters themselves are fp32.
    assert all(p.dtype == torch.float32 for p in bf16.params)
    assert all(g.dtype == torch.float32 for g in bf16_spy.steps[0]["grads"])
    assert all(e.dtype == torch.float32 for e in bf16.optimizer.get_ema(0.9))
    assert all("master" not in bf16.optimizer.opt.state[p] for p in bf16.params)
    assert bf16.optimizer.name.startswith("fused")

    # Close to fp32: bf16 keeps 8 significant bits (~0.4% per rounding), which mostly
    # averages out in the loss: measured <= 1e-4 relative over 3 steps, allowed 1%. The first
    # gradient (same weights, same draws) measured 1.6% apart in norm; allowed 10%.
    assert bf16_losses == pytest.approx(fp32_losses, rel=1e-2)
    g_bf16 = torch.cat([g.flatten() for g in bf16_spy.steps[0]["grads"]])
    g_fp32 = torch.cat([g.flatten() for g in fp32_spy.steps[0]["grads"]])
    assert float((g_bf16 - g_fp32).norm() / g_fp32.norm()) < 0.1
    # ... but not identical: autocast really ran.
    assert bf16_losses != fp32_losses
    assert not all(torch.equal(a, b) for a, b in zip(bf16.params, fp32.params))


# --------------------------------------- 5. the fp16 loss scale + clip the optimizer gets
# Adam is nearly invariant to the scale of the gradient (m / sqrt(v)), except where the
# gradient is comparable to eps = 1e-8. This clip brings the ~9e5 gradient elements to
# ~1e-8 each (sqrt(9e5)·1e-8 ≈ 1e-5), where a missing loss-scale or clip factor changes the
# update by a large fraction of lr.
SMALL_CLIP = 1e-5
START_LG_LOSS_SCALE = 16.0


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_fp16_step_unscales_and_clips_like_adamw_on_unscaled_clipped_grads(optimizer):
    model, diffusion = tiny_model_and_diffusion()
    x, cond = fixed_batch()
    draws = FixedDraws()
    trainer = make_trainer(model, RecordingDiffusion(diffusion, draws), draws,
                           precision="fp16", optimizer=optimizer, grad_clip=SMALL_CLIP,
                           weight_decay=0.01)
    # From GD's 2^20 this model's fp16 activation gradients overflow twice (steps skipped,
    # pinned by the loss-scale tests); start where the steps are taken.
    trainer.lg_loss_scale = START_LG_LOSS_SCALE
    spy = StepSpy(trainer)
    for k in range(2):  # the second step starts from nonzero Adam state
        loss_scale = 2.0 ** trainer.lg_loss_scale
        assert bool(trainer.train_step(x, cond)), "fp16 overflow: no step to check"
        step = spy.steps[k]
        grad_norm = math.sqrt(sum(float(g.double().square().sum()) for g in step["grads"]))
        grad_norm /= loss_scale
        clip = min(1.0, SMALL_CLIP / (grad_norm + 1e-6))
        assert clip < 0.01, "the clip must be active for this test to mean anything"
        assert step["inv_scale"] == pytest.approx(1 / loss_scale, rel=1e-12)
        assert step["clip"] == pytest.approx(clip, rel=1e-6)
        if optimizer == "fused":
            # One fused call does the unscale, the overflow flag and the clip.
            kw = step["inner_kwargs"]
            assert set(kw) == {"loss_scale", "found_inf", "clip_factor"}
            assert kw["loss_scale"] == pytest.approx(loss_scale, rel=1e-12)
            assert float(kw["found_inf"]) == 0.0
            assert float(kw["clip_factor"]) == pytest.approx(clip, rel=1e-6)
        expected = adamw_reference(step, LR, 0.01, grad_factor=clip / loss_scale)
        # float32 AdamW in another operation order: measured <= 1.2e-7 (1 ulp at |p| ~ 1).
        # Leaving out the unscale or the clip is measured ~1e-3 off, halving the clip 1.7e-4.
        err = max_abs_diff(step["params_after"], expected)
        assert err < 1e-6, f"step {k}: {err}"
    assert trainer.lg_loss_scale == pytest.approx(START_LG_LOSS_SCALE + 2e-3)


# ------------------------------------------------------------------- GD-named files
def test_resuming_a_file_guided_diffusion_named_continues_after_the_right_step(tmp_path):
    """GD names a checkpoint by the index of the step it saved after: its model000002.pt
    holds 3 steps, fastdiff's 2. AdamW's step count in the opt file beside it tells them
    apart, so a GD-named file resumes after step 3 (the lr of step 4, GD's next), and a
    fastdiff-named one after step 2."""
    import os
    import shutil

    model, diffusion = tiny_model_and_diffusion()
    trainer = Trainer(model=model, diffusion=diffusion, data=None,
                      schedule_sampler=UniformSampler(diffusion),
                      cfg=types.SimpleNamespace(**{**TRAIN_DEFAULTS, "lr_anneal_steps": 10}),
                      dist_info=DistInfo(), log_dir=str(tmp_path / "run"), metrics_table=False)
    os.makedirs(tmp_path / "run")
    x, cond = fixed_batch()
    for _ in range(3):
        trainer.train_step(x, cond)
        trainer.step += 1
    trainer.save()  # fastdiff's names: model000003.pt, ema_0.9_000003.pt, opt000003.pt
    gd = tmp_path / "gd"
    os.makedirs(gd)
    for src, dst in (("model000003.pt", "model000002.pt"), ("ema_0.9_000003.pt",
                     "ema_0.9_000002.pt"), ("opt000003.pt", "opt000002.pt")):
        shutil.copy(tmp_path / "run" / src, gd / dst)

    def resumed_step(path):
        fresh, _ = tiny_model_and_diffusion()
        other = make_trainer(fresh, diffusion, UniformSampler(diffusion), lr_anneal_steps=10)
        other.resume(str(path))
        for p, q in zip(other.params, trainer.params):
            assert torch.equal(p, q)  # the weights load either way
        return other.step

    assert resumed_step(gd / "model000002.pt") == 3
    assert resumed_step(tmp_path / "run" / "model000003.pt") == 3
    os.remove(gd / "opt000002.pt")  # no optimizer file: nothing tells, the name is taken
    assert resumed_step(gd / "model000002.pt") == 2
