"""Run a few training steps on a fixed global batch, on 1 or N ranks (torchrun), and dump
the resulting full parameters, EMAs, sampler weights and per-rank state sizes.

Every rank draws the same global batch, timesteps and noise from one seeded generator and
takes its own slice, so N ranks × B images must equal 1 rank × N·B images.
Usage: torchrun --nproc_per_node N fsdp_steps.py OUT.pt GLOBAL_BATCH OPTIMIZER
"""
import sys
import types

import torch
import torch.distributed as dist

from fastdiff import config as C
from fastdiff.diffusion import create_named_schedule_sampler
from fastdiff.train.loop import Trainer
from fastdiff.train.parallel import parallelize, setup_distributed, teardown_distributed


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(out, global_batch, optimizer):
    info = setup_distributed("cpu")
    torch.manual_seed(0)
    kw = C.model_and_diffusion_defaults()
    kw.update(image_size=16, num_channels=64, num_res_blocks=1, channel_mult="1,2",
              attention_resolutions="8", num_heads=2, class_cond=True, learn_sigma=True,
              diffusion_steps=100)
    model, diffusion = C.create_model_and_diffusion(**kw)
    with torch.no_grad():  # GD zero-initialises output convs: their first gradients would be
        for p in model.parameters():  # pure rounding noise, which Adam amplifies to ±lr
            if not p.any():
                p.normal_(0, 0.02)
    parallelize(model, info, "fp32", compile=False)
    cfg = types.SimpleNamespace(batch_size=global_batch // info.world_size, microbatch=-1,
                                ema_rate="0.9,0.99", precision="fp32", optimizer=optimizer,
                                lr=1e-3, weight_decay=0.01, log_interval=1, save_interval=100,
                                lr_anneal_steps=0, max_steps=0, grad_clip=1.0,
                                skip_nonfinite=False, keep_latest=0, fp16_scale_growth=1e-3)
    sampler = create_named_schedule_sampler("loss-second-moment", diffusion, seed=info.rank)
    trainer = Trainer(model=model, diffusion=diffusion, data=None, schedule_sampler=sampler,
                      cfg=cfg, dist_info=info, log_dir=None)
    gen = torch.Generator().manual_seed(1)
    lo = info.rank * cfg.batch_size
    hi = lo + cfg.batch_size
    first_grads = None
    for step in range(3):
        x = torch.randn(global_batch, 3, 16, 16, generator=gen)
        y = torch.randint(0, 10, (global_batch,), generator=gen)
        t = torch.randint(0, 100, (global_batch,), generator=gen)
        noise = torch.randn(x.shape, generator=gen)
        trainer.optimizer.zero_grad()
        losses = diffusion.training_losses(model, x[lo:hi], t[lo:hi], model_kwargs={"y": y[lo:hi]},
                                           noise=noise[lo:hi])
        losses["loss"].mean().backward()
        if step == 0:
            first_grads = {n: full(p.grad).clone() for n, p in zip(trainer.param_names, trainer.params)}
        trainer.optimizer_step()
    # The loss-aware sampler: each rank feeds different losses; the all-gather must leave
    # every rank with the same history, hence the same weights.
    for i in range(400):
        ts = torch.randint(0, 100, (2 + info.rank,), generator=torch.Generator().manual_seed(100 + 7 * i + info.rank))
        sampler.update_with_local_losses(ts, torch.rand(ts.shape[0]) + info.rank)
    weights = torch.from_numpy(sampler.weights().copy())

    def local_bytes(tensors):
        return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size()
                   for t in tensors)

    state = {
        "params": {n: full(p.detach()).clone() for n, p in zip(trainer.param_names, trainer.params)},
        "emas": {r: [full(e).clone() for e in trainer.optimizer.get_ema(r)] for r in (0.9, 0.99)},
        "first_grads": first_grads,
        "sampler_weights": weights,
        "state_bytes": local_bytes(trainer.params)
        + sum(local_bytes(trainer.optimizer.get_ema(r)) for r in (0.9, 0.99))
        + sum(local_bytes([s["exp_avg"], s["exp_avg_sq"]]) for s in trainer.optimizer.state_tensors()),
    }
    gathered = [None] * info.world_size
    if info.distributed:
        dist.all_gather_object(gathered, (state["sampler_weights"], state["state_bytes"]))
    else:
        gathered = [(state["sampler_weights"], state["state_bytes"])]
    state["per_rank"] = gathered
    if info.is_main:
        torch.save(state, out)
    teardown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
