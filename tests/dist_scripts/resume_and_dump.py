"""Run ``fastdiff.train`` (1 process or under torchrun) and, right after the trainer has
resumed, dump what it holds — full tensors, gathered from the shards — before training goes on.

This is what a reshard test compares, by value, with what the saving run wrote: a resume
that loads the model but leaves an EMA, an Adam moment, the step or the loss scale at its
fresh value would still train on without an error.
Usage: [torchrun --nproc_per_node N] resume_and_dump.py DUMP.pt <fastdiff.train flags>
Rank 0 writes DUMP.pt: {"step", "lg_loss_scale", "model": {key: tensor},
"ema": {rate string: {param name: tensor}}, "adam": {param name: {exp_avg, exp_avg_sq, step}},
"sampler": the schedule sampler's state_dict or None}.
"""
import sys

import torch

from fastdiff.train import loop
from fastdiff.train.cli import main


def full_cpu(t):
    """A full copy of a tensor or of a DTensor shard (collective: every rank calls it)."""
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().cpu().clone()


def held_state(trainer):
    """What the trainer holds, read through the model and the optimizer themselves (not
    through the trainer's own checkpoint mapping, which the test must not trust)."""
    names = [n for n, _ in trainer.model.named_parameters()]
    return {
        "step": trainer.step,
        "lg_loss_scale": trainer.lg_loss_scale,
        "model": {k: full_cpu(v) for k, v in trainer.model.state_dict().items()},
        "ema": {str(rate): {n: full_cpu(e) for n, e in zip(names, trainer.optimizer.get_ema(rate))}
                for rate in trainer.ema_rates},
        "adam": {n: {k: full_cpu(v) for k, v in st.items()}
                 for n, st in zip(names, trainer.optimizer.state_tensors())},
        "sampler": trainer.sampler.state_dict() if hasattr(trainer.sampler, "state_dict") else None,
    }


def dump_after_resume(path):
    resume = loop.Trainer.resume

    def resume_then_dump(trainer, checkpoint):
        resume(trainer, checkpoint)
        state = held_state(trainer)
        if trainer.dist.is_main:
            torch.save(state, path)

    loop.Trainer.resume = resume_then_dump


if __name__ == "__main__":
    dump_after_resume(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
