"""Non-finite steps never reach the weights or the disk (any precision).

A NaN gradient is injected at step 3 with a checkpoint due at step 3:
* without --skip_nonfinite the run stops at that boundary, before writing anything, with a
  one-line error naming step 3 (the logs' numbering), and the weights are those after step 2;
* with it, step 3 changes no weight, Adam moment or EMA, is counted in the metrics
  (``skipped_nonfinite``), and training goes on; the checkpoint of step 3 is finite.
A NaN loss (not only a NaN gradient) stays out of the loss-aware sampler's history.
"""
import os
import types

import pytest
import torch

from fastdiff import config as C
from fastdiff.diffusion import create_named_schedule_sampler
from fastdiff.runtime import DistInfo
from fastdiff.train.loop import Trainer, TrainingError

BAD_STEP = 3  # as the logs number steps: the third


def make_trainer(tmp_path, precision, skip_nonfinite, sampler="uniform"):
    torch.manual_seed(0)
    kw = C.model_and_diffusion_defaults()
    kw.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
              attention_resolutions="4", num_heads=1, diffusion_steps=20,
              noise_schedule="cosine")
    model, diffusion = C.create_model_and_diffusion(**kw)
    cfg = types.SimpleNamespace(
        batch_size=2, microbatch=-1, ema_rate="0.9", precision=precision, optimizer="fused",
        lr=1e-3, weight_decay=0.0, lr_anneal_steps=0, max_steps=5, grad_clip=0.0,
        log_interval=1, save_interval=BAD_STEP, skip_nonfinite=skip_nonfinite, keep_latest=0,
        fp16_scale_growth=1e-3)
    sampler = create_named_schedule_sampler(sampler, diffusion, seed=0)
    os.makedirs(tmp_path, exist_ok=True)
    data = iter(lambda: (torch.randn(2, 3, 8, 8), {}), None)
    return Trainer(model=model, diffusion=diffusion, data=data, schedule_sampler=sampler,
                   cfg=cfg, dist_info=DistInfo(), log_dir=str(tmp_path), metrics_table=False)


def poison_gradient_at(trainer, bad_step):
    """A NaN in one gradient element during step ``bad_step`` (1-based)."""
    param = trainer.params[0]

    def hook(grad):
        if trainer.step + 1 == bad_step:
            grad = grad.clone()
            grad.view(-1)[0] = float("nan")
        return grad

    param.register_hook(hook)


def poison_loss_at(trainer, bad_step):
    """A NaN model output (so a NaN loss) during step ``bad_step``."""
    def hook(_module, _inputs, output):
        return output * float("nan") if trainer.step + 1 == bad_step else output

    trainer.model.register_forward_hook(hook)


def snapshot(trainer):
    return ([p.detach().clone() for p in trainer.params]
            + [e.clone() for e in trainer.optimizer.get_ema(0.9)]
            + [st[k].clone() for st in trainer.optimizer.state_tensors()
               for k in ("exp_avg", "exp_avg_sq", "step")])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nan_gradient_stops_the_run_before_the_checkpoint(tmp_path, precision):
    trainer = make_trainer(tmp_path, precision, skip_nonfinite=False)
    poison_gradient_at(trainer, BAD_STEP)
    states = []
    original = trainer.train_step

    def recording_step(batch, cond):
        taken = original(batch, cond)
        states.append(snapshot(trainer))
        return taken

    trainer.train_step = recording_step
    with pytest.raises(TrainingError, match=rf"^non-finite loss or gradient at step {BAD_STEP};") as e:
        trainer.train()
    assert "\n" not in str(e.value)
    assert trainer.step == BAD_STEP
    # Step 3 was not applied: everything is as after step 2, and finite.
    for before, after in zip(states[BAD_STEP - 2], states[BAD_STEP - 1]):
        assert torch.equal(before, after)
        assert torch.isfinite(after).all()
    assert not any(name.startswith(("model", "ema_", "opt")) for name in os.listdir(tmp_path))
    assert not os.path.isdir(tmp_path / "checkpoints")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_skip_nonfinite_skips_the_step_counts_it_and_saves_finite_weights(tmp_path, precision):
    trainer = make_trainer(tmp_path, precision, skip_nonfinite=True)
    poison_gradient_at(trainer, BAD_STEP)
    states, dumped = [], []
    original = trainer.train_step
    original_dump = trainer.metrics.dumpkvs

    def recording_step(batch, cond):
        taken = original(batch, cond)
        states.append((bool(taken), snapshot(trainer)))
        return taken

    def recording_dump():
        kvs = original_dump()
        dumped.append(kvs)
        return kvs

    trainer.train_step = recording_step
    trainer.metrics.dumpkvs = recording_dump
    assert trainer.train() == "finished"
    assert [taken for taken, _ in states] == [True, True, False, True, True]
    for before, after in zip(states[BAD_STEP - 2][1], states[BAD_STEP - 1][1]):
        assert torch.equal(before, after)
    # training goes on after the skipped step
    assert not all(torch.equal(b, a) for b, a in zip(states[BAD_STEP - 1][1], states[BAD_STEP][1]))
    assert [kvs.get("skipped_nonfinite") for kvs in dumped] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert all(torch.isfinite(t).all() for t in torch.load(tmp_path / f"model{BAD_STEP:06d}.pt").values())


def test_a_nan_loss_stays_out_of_the_loss_aware_history(tmp_path):
    trainer = make_trainer(tmp_path, "fp32", skip_nonfinite=True, sampler="loss-second-moment")
    poison_loss_at(trainer, BAD_STEP)
    assert trainer.train() == "finished"
    history = trainer.sampler.state_dict()
    tensors = [v for v in history.values() if torch.is_tensor(v) and v.is_floating_point()]
    assert tensors, "the sampler's state holds its loss history"
    assert all(torch.isfinite(t).all() for t in tensors)
