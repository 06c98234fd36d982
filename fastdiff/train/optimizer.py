"""The optimizer + EMA update behind one interface, for the two paths the trainer offers.

``fused``: fastdiff.optim.FusedAdamEMA — AdamW, the fp16 unscale/skip, clipping and every
EMA rate in one pass over the parameters (C++/CUDA).
``torch``: torch.optim.AdamW followed by GD's EMA loop (one mul_/add_ pass per rate).

Both take the gradient already checked by the trainer: ``inv_scale`` undoes the fp16 loss
scale and ``clip`` is the clip factor (1.0 = no clipping). Under FSDP2 the parameters are
DTensor shards and both paths update the local shards.
"""
import logging

import torch

log = logging.getLogger("fastdiff")


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


class _OptimizerPath:
    """What the trainer needs of either path; ``self.opt`` is the torch Optimizer inside."""

    def set_lr(self, lr):
        for group in self.opt.param_groups:
            group["lr"] = lr

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)


class TorchAdamEMA(_OptimizerPath):
    """Stock path: AdamW, then for each rate ``ema = rate·ema + (1−rate)·p`` (GD's update_ema)."""

    name = "torch"

    def __init__(self, params, lr, weight_decay, ema_rates):
        self.params = list(params)
        self.ema_rates = list(ema_rates)
        kwargs = {}
        if all(p.is_cuda for p in self.params):
            kwargs["fused"] = True
        else:
            kwargs["foreach"] = True
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, **kwargs)
        self.emas = [[p.detach().clone() for p in self.params] for _ in self.ema_rates]
        self._materialise_state()

    def step(self, inv_scale=1.0, clip=1.0):
        factor = inv_scale * clip
        grads = [p.grad for p in self.params if p.grad is not None]
        if factor != 1.0 and grads:
            torch._foreach_mul_(grads, factor)
        self.opt.step()
        with torch.no_grad():
            locals_ = [_local(p) for p in self.params]
            for rate, ema in zip(self.ema_rates, self.emas):
                ema_local = [_local(e) for e in ema]
                torch._foreach_mul_(ema_local, rate)
                torch._foreach_add_(ema_local, locals_, alpha=1 - rate)

    def get_ema(self, rate):
        return self.emas[self.ema_rates.index(rate)]

    def state_tensors(self):
        """Live per-parameter AdamW state {exp_avg, exp_avg_sq, step}, in params order.

        Materialised at construction (zeros, step 0: the same math as a fresh AdamW), so a
        checkpoint can be loaded into it in place.
        """
        return [self.opt.state[p] for p in self.params]

    def _materialise_state(self):
        fused = self.opt.defaults.get("fused")
        for p in self.params:
            self.opt.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu"),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }


class FusedAdamEMAPath(_OptimizerPath):
    """Fast path: fastdiff.optim.FusedAdamEMA (one fused pass: AdamW + all EMAs)."""

    name = "fused"

    def __init__(self, params, lr, weight_decay, ema_rates):
        from fastdiff.optim import FusedAdamEMA
        self.params = list(params)
        self.ema_rates = list(ema_rates)
        self.opt = FusedAdamEMA(self.params, lr=lr, weight_decay=weight_decay,
                                ema_rates=tuple(self.ema_rates))
        self.name = f"fused ({self.opt.backend})"
        device = _local(self.params[0]).device
        # The trainer has already checked the gradients across all ranks: "no overflow".
        self._no_inf = torch.zeros((), dtype=torch.float32, device=device)
        self._device = device

    def step(self, inv_scale=1.0, clip=1.0):
        kwargs = {}
        if inv_scale != 1.0:
            kwargs.update(loss_scale=1.0 / inv_scale, found_inf=self._no_inf)
        if clip != 1.0:
            kwargs["clip_factor"] = torch.tensor(clip, dtype=torch.float32, device=self._device)
        self.opt.step(**kwargs)

    def get_ema(self, rate):
        return self.opt.get_ema(rate)

    def state_tensors(self):
        return [{k: self.opt.state[p][k] for k in ("exp_avg", "exp_avg_sq", "step")}
                for p in self.params]


def build_optimizer(kind, params, lr, weight_decay, ema_rates):
    if kind == "torch":
        return TorchAdamEMA(params, lr, weight_decay, ema_rates)
    if kind == "fused":
        return FusedAdamEMAPath(params, lr, weight_decay, ema_rates)
    raise ValueError(f"--optimizer must be fused or torch, got {kind!r}")
