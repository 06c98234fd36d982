"""The training step never waits on the host: no device→host read inside ``train_step``.

On a GPU every read (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``float()``,
``int()``, ``bool()``, ``__index__`` on a tensor) drains the launch queue, so the CPU stops
running ahead of the GPU. They are counted here on the CPU with a TorchFunctionMode around
``Trainer.train_step`` (every tensor method goes through it), with the configuration that used
to read the most: a 16×16 model, microbatch 2 of 4, the loss-second-moment sampler, gradient
clipping, two EMAs and the fused optimizer; then fp16 loss scaling, and bf16.
"""
import types

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fastdiff import config as C
from fastdiff.diffusion import create_named_schedule_sampler
from fastdiff.runtime import DistInfo
from fastdiff.train.loop import Trainer

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


# Tensors made from Python numbers or lists: on a GPU each is a blocking host→device copy
# (torch.cuda.set_sync_debug_mode flags it), so the step must not make them either.
FROM_HOST = ("tensor", "as_tensor")


class HostReads(TorchFunctionMode):
    """Counts the tensor → host reads (and host-data → tensor copies) made inside the
    ``with`` block, with their names."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            self.reads.append(name)
        elif name in FROM_HOST and args and not isinstance(args[0], torch.Tensor):
            self.reads.append(f"{name}(host data)")
        return func(*args, **(kwargs or {}))


def tiny_trainer(precision="fp32", optimizer="fused", **overrides):
    torch.manual_seed(0)
    kw = C.model_and_diffusion_defaults()
    kw.update(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
              attention_resolutions="8", num_heads=2, class_cond=True, learn_sigma=True,
              diffusion_steps=50)
    model, diffusion = C.create_model_and_diffusion(**kw)
    cfg = types.SimpleNamespace(**{**dict(
        batch_size=4, microbatch=2, ema_rate="0.9999,0.99", precision=precision,
        optimizer=optimizer, lr=1e-4, weight_decay=0.0, lr_anneal_steps=1000, max_steps=0,
        grad_clip=1.0, log_interval=10, save_interval=10**6, skip_nonfinite=False,
        keep_latest=0, fp16_scale_growth=1e-3), **overrides})
    sampler = create_named_schedule_sampler("loss-second-moment", diffusion, seed=0)
    return Trainer(model=model, diffusion=diffusion, data=None, schedule_sampler=sampler,
                   cfg=cfg, dist_info=DistInfo(), log_dir=None, metrics_table=False)


def batch(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 16, 16, generator=gen), {"y": torch.randint(0, 10, (4,), generator=gen)}


def reads_per_step(trainer, steps=3):
    """Reads of each of ``steps`` steps, after one warm-up step (first use builds the
    per-device tables: the respacing map, the samplers' generator, the schedule arrays)."""
    trainer.train_step(*batch(99))
    trainer.step += 1
    counts = []
    for i in range(steps):
        x, cond = batch(i)
        with HostReads() as mode:
            trainer.train_step(x, cond)
        trainer.step += 1
        counts.append(list(mode.reads))
    return counts


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_train_step_makes_no_host_read(precision):
    """The default path (the fused optimizer). The stock ``--optimizer torch`` path is left
    out on the CPU: torch's foreach AdamW reads its step counts there (on CUDA it runs
    AdamW(fused=True), which takes the loss scale and found-inf as tensors)."""
    trainer = tiny_trainer(precision, "fused")
    assert [r for r in reads_per_step(trainer) if r] == []


def test_the_counter_sees_reads():
    """The mode must see what the step must not do (else the test above cannot fail)."""
    t = torch.tensor([1.5, 2.0])
    with HostReads() as mode:
        t.sum().item(), float(t[0]), int(t[1]), bool(t.any()), t.tolist(), t.cpu(), t.numpy()
        [1, 2, 3][t.long()[0]]
        torch.tensor(1.0), torch.as_tensor([2.0]), torch.as_tensor(t)
    assert sorted(set(mode.reads)) == sorted(READS + tuple(f"{n}(host data)" for n in FROM_HOST))


def test_classifier_step_makes_no_host_read():
    """GD's classifier_train step (fastdiff/train/objectives.py): whole-batch q_sample,
    microbatches weighted to the batch mean, accuracy metrics, no EMA; fp16 loss scaling."""
    from fastdiff.train.objectives import ClassifierObjective, ClassifierSchedule
    for precision in ("fp32", "fp16"):
        torch.manual_seed(0)
        kw = C.classifier_and_diffusion_defaults()
        kw.update(image_size=16, classifier_width=32, classifier_depth=1,
                  classifier_attention_resolutions="8", diffusion_steps=50)
        model, diffusion = C.create_classifier_and_diffusion(**kw, classifier_channel_mult="1,2")
        cfg = types.SimpleNamespace(
            batch_size=4, microbatch=2, precision=precision, optimizer="fused", lr=1e-4,
            weight_decay=0.0, max_steps=0, grad_clip=1.0, log_interval=10, save_interval=10**6,
            skip_nonfinite=False, keep_latest=0, fp16_scale_growth=1e-3)
        sampler = create_named_schedule_sampler("uniform", diffusion, seed=0)
        trainer = Trainer(model=model, diffusion=diffusion, data=None, schedule_sampler=sampler,
                          cfg=cfg, dist_info=DistInfo(), log_dir=None, metrics_table=False,
                          objective=ClassifierObjective(diffusion, sampler),
                          schedule=ClassifierSchedule(cfg.lr, 1000, anneal_lr=True))
        assert [r for r in reads_per_step(trainer) if r] == [], precision
