"""Run a few training steps on a fixed global batch, on 1 or N ranks (torchrun), and dump
the parameters and EMAs before and after, the first gradients, sampler weights and
per-rank state sizes: for each optimizer path asked for, in one process (one launch).

Every rank draws the same global batch, timesteps and noise from one seeded generator and
takes its own slice, so N ranks × B images must equal 1 rank × N·B images.
Usage: torchrun --nproc_per_node N fsdp_steps.py OUT.pt GLOBAL_BATCH OPTIMIZER[,OPTIMIZER]
The first optimizer listed also gives the sampler weights and the state sizes.
"""
import sys
import types

import torch
import torch.distributed as dist

from fastdiff import config as C
from fastdiff.diffusion import create_named_schedule_sampler
from fastdiff.train.loop import Trainer
from fastdiff.train.parallel import parallelize, setup_distributed, teardown_distributed

STEPS = 3
LR = 1e-3
WEIGHT_DECAY = 0.01
EMA_RATES = (0.9, 0.99)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local_bytes(tensors):
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size()
               for t in tensors)


def build_model(info):
    torch.manual_seed(0)  # the same initial weights for every optimizer and world size
    kw = C.model_and_diffusion_defaults()
    kw.update(image_size=16, num_channels=64, num_res_blocks=1, channel_mult="1,2",
              attention_resolutions="8", num_heads=2, class_cond=True, learn_sigma=True,
              diffusion_steps=100)
    model, diffusion = C.create_model_and_diffusion(**kw)
    with torch.no_grad():  # GD zero-initialises output convs: their first gradients would be
        for p in model.parameters():  # pure rounding noise, which Adam amplifies to ±lr
            if not p.any():
                p.normal_(0, 0.02)
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    parallelize(model, info, "fp32", compile=False)
    return model, diffusion, params_before


def run_steps(info, global_batch, optimizer):
    """STEPS AdamW+EMA steps with ``optimizer`` on this rank's slice of a fixed global batch."""
    model, diffusion, params_before = build_model(info)
    cfg = types.SimpleNamespace(batch_size=global_batch // info.world_size, microbatch=-1,
                                ema_rate=",".join(map(str, EMA_RATES)), precision="fp32",
                                optimizer=optimizer, lr=LR, weight_decay=WEIGHT_DECAY,
                                log_interval=1, save_interval=100, lr_anneal_steps=0,
                                max_steps=0, grad_clip=1.0, skip_nonfinite=False,
                                keep_latest=0, fp16_scale_growth=1e-3)
    sampler = create_named_schedule_sampler("loss-second-moment", diffusion, seed=info.rank)
    trainer = Trainer(model=model, diffusion=diffusion, data=None, schedule_sampler=sampler,
                      cfg=cfg, dist_info=info, log_dir=None)
    gen = torch.Generator().manual_seed(1)
    lo = info.rank * cfg.batch_size
    hi = lo + cfg.batch_size
    first_grads = None
    for step in range(STEPS):
        x = torch.randn(global_batch, 3, 16, 16, generator=gen)
        y = torch.randint(0, 10, (global_batch,), generator=gen)
        t = torch.randint(0, 100, (global_batch,), generator=gen)
        noise = torch.randn(x.shape, generator=gen)
        trainer.optimizer.zero_grad()
        losses = diffusion.training_losses(model, x[lo:hi], t[lo:hi],
                                           model_kwargs={"y": y[lo:hi]}, noise=noise[lo:hi])
        losses["loss"].mean().backward()
        if step == 0:
            first_grads = {n: full(p.grad).clone()
                           for n, p in zip(trainer.param_names, trainer.params)}
        trainer.optimizer_step()
    return {
        "params_before": params_before,
        "params": {n: full(p.detach()).clone()
                   for n, p in zip(trainer.param_names, trainer.params)},
        "emas": {r: [full(e).clone() for e in trainer.optimizer.get_ema(r)] for r in EMA_RATES},
        "first_grads": first_grads,
        "state_bytes": local_bytes(trainer.params)
        + sum(local_bytes(trainer.optimizer.get_ema(r)) for r in EMA_RATES)
        + sum(local_bytes([s["exp_avg"], s["exp_avg_sq"]])
              for s in trainer.optimizer.state_tensors()),
    }, sampler


def warmed_up_sampler_weights(sampler, info):
    """Each rank feeds different losses; the all-gather must leave every rank with the same
    history, hence the same weights. Equal counts per rank, as the trainer's microbatches are
    (the sampler's all-gather needs them)."""
    for i in range(400):
        gen = torch.Generator().manual_seed(100 + 7 * i + info.rank)
        ts = torch.randint(0, 100, (3,), generator=gen)
        sampler.update_with_local_losses(ts, torch.rand(ts.shape[0]) + info.rank)
    return torch.from_numpy(sampler.weights().copy())


def main(out, global_batch, optimizers):
    info = setup_distributed("cpu")
    state = {"steps": STEPS, "lr": LR, "weight_decay": WEIGHT_DECAY, "by_optimizer": {}}
    for i, optimizer in enumerate(optimizers):
        result, sampler = run_steps(info, global_batch, optimizer)
        state_bytes = result.pop("state_bytes")
        state["by_optimizer"][optimizer] = result
        if i == 0:
            per_rank = (warmed_up_sampler_weights(sampler, info), state_bytes)
            gathered = [per_rank]
            if info.distributed:
                gathered = [None] * info.world_size
                dist.all_gather_object(gathered, per_rank)
            state["per_rank"] = gathered
    if info.is_main:
        torch.save(state, out)
    teardown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","))
