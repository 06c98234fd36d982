"""The optimizer + EMA update behind one interface, for the two paths the trainer offers.

``fused``: fastdiff.optim.FusedAdamEMA — AdamW, the fp16 unscale/skip, clipping and every
EMA rate in one pass over the parameters (C++/CUDA).
``torch``: torch.optim.AdamW followed by GD's EMA loop (one mul_/add_ pass per rate).

Both take device tensors from the trainer (``loss_scale`` to undo, ``found_inf`` to skip the
step, ``clip_factor``), so a step never waits on the host. Under FSDP2 the parameters are
DTensor shards and both paths update the local shards.
"""
import logging

import torch
import torch.distributed as dist

from fastdiff.optim.fused_adam_ema import (grad_norm_sq_foreach, inv_scale_from_loss_scale,
                                           lerp_emas_)
from fastdiff.runtime import is_distributed, local_tensor

log = logging.getLogger("fastdiff")


class _OptimizerPath:
    """What the trainer needs of either path; ``self.opt`` is the torch Optimizer inside.

    A step is two calls, neither of which reads the device: :meth:`grad_stats` (the global
    sum of squares of the unscaled gradients and a found-inf flag, all-reduced over FSDP2's
    mesh) and :meth:`step` (unscale, clip, AdamW and every EMA; skipped on the device when
    ``found_inf`` is set).
    """

    def set_lr(self, lr):
        for group in self.opt.param_groups:
            group["lr"] = lr

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def get_ema_by_name(self, name):
        """The EMA tensors of the slot named ``name`` (fixed: '0.9999'; power: 'std0.050')."""
        try:
            return self.get_ema_slot(self.ema_names.index(str(name)))
        except ValueError:
            raise ValueError(f"no EMA named {name!r}; keeping {self.ema_names}") from None

    @staticmethod
    def _names(ema_rates, ema_names):
        names = [str(r) for r in ema_rates] if ema_names is None else [str(n) for n in ema_names]
        if len(names) != len(ema_rates) or len(set(names)) != len(names):
            raise ValueError(f"ema_names must be distinct, one per rate: {names}")
        return names


class TorchAdamEMA(_OptimizerPath):
    """Stock path: AdamW, then for each rate ``ema = rate·ema + (1−rate)·p`` (GD's update_ema).

    On CUDA, AdamW(fused=True) unscales and skips on ``found_inf`` itself (the attributes
    GradScaler sets), so no step reads the device. On the CPU, torch's foreach AdamW reads
    its step counts anyway, and a skipped step is decided on the host.
    """

    name = "torch"

    def __init__(self, params, lr, weight_decay, ema_rates, ema_names=None):
        self.params = list(params)
        self.ema_rates = list(ema_rates)
        self.ema_names = self._names(self.ema_rates, ema_names)
        self.fused = all(p.is_cuda for p in self.params)
        kwargs = {"fused": True} if self.fused else {"foreach": True}
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, **kwargs)
        self.emas = [[p.detach().clone() for p in self.params] for _ in self.ema_rates]
        self._materialise_state()

    @torch.no_grad()
    def grad_stats(self, loss_scale=None):
        grads = [local_tensor(p.grad) for p in self.params if p.grad is not None]
        device = local_tensor(self.params[0]).device
        inv_scale = None if loss_scale is None else inv_scale_from_loss_scale(loss_scale, device)
        if grads:
            sum_sq, found_inf = grad_norm_sq_foreach(grads, inv_scale)
        else:
            sum_sq = torch.zeros((), dtype=torch.float32, device=device)
            found_inf = torch.zeros((), dtype=torch.float32, device=device)
        if is_distributed():  # FSDP2 shards: sum the squares, any rank's inf counts
            dist.all_reduce(sum_sq, op=dist.ReduceOp.SUM)
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
        return sum_sq, found_inf

    @torch.no_grad()
    def step(self, loss_scale=None, found_inf=None, clip_factor=None, ema_rates=None):
        """``ema_rates``: host floats, one per EMA slot, for this step only (else the
        constructed ones)."""
        rates = self.ema_rates if ema_rates is None else [float(r) for r in ema_rates]
        if len(rates) != len(self.emas):
            raise ValueError(f"step(ema_rates=...) needs {len(self.emas)} rates, got {len(rates)}")
        grads = [p.grad for p in self.params if p.grad is not None]
        if clip_factor is not None and grads:
            torch._foreach_mul_(grads, clip_factor)
        if self.fused:
            device = local_tensor(self.params[0]).device
            self.opt.grad_scale = (None if loss_scale is None else
                                   torch.as_tensor(loss_scale, device=device).float())
            self.opt.found_inf = None if found_inf is None else found_inf.float()
            try:
                self.opt.step()
            finally:
                del self.opt.grad_scale, self.opt.found_inf
        else:
            if found_inf is not None and found_inf.item() != 0:
                return
            if loss_scale is not None and grads:
                device = local_tensor(self.params[0]).device
                torch._foreach_mul_(grads, inv_scale_from_loss_scale(loss_scale, device))
            self.opt.step()
            found_inf = None
        locals_ = [local_tensor(p.detach()) for p in self.params]
        for rate, ema in zip(rates, self.emas):
            lerp_emas_([local_tensor(e) for e in ema], locals_, rate, found_inf)

    def get_ema(self, rate):
        return self.emas[self.ema_rates.index(rate)]

    def get_ema_slot(self, index):
        return self.emas[index]

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

    def __init__(self, params, lr, weight_decay, ema_rates, ema_names=None):
        from fastdiff.optim import FusedAdamEMA
        self.params = list(params)
        self.ema_rates = list(ema_rates)
        self.ema_names = self._names(self.ema_rates, ema_names)
        self.opt = FusedAdamEMA(self.params, lr=lr, weight_decay=weight_decay,
                                ema_rates=tuple(self.ema_rates), ema_names=self.ema_names)
        self.name = f"fused ({self.opt.backend})"

    def grad_stats(self, loss_scale=None):
        return self.opt.grad_norm_sq(loss_scale)

    def step(self, loss_scale=None, found_inf=None, clip_factor=None, ema_rates=None):
        # Constant rates (None): the op's call is exactly what it was before per-step rates.
        extra = {} if ema_rates is None else {"ema_rates": ema_rates}
        self.opt.step(loss_scale=loss_scale, found_inf=found_inf, clip_factor=clip_factor,
                      **extra)

    def get_ema(self, rate):
        return self.opt.get_ema(rate)

    def get_ema_slot(self, index):
        return self.opt.get_ema_slot(index)

    def state_tensors(self):
        return [{k: self.opt.state[p][k] for k in ("exp_avg", "exp_avg_sq", "step")}
                for p in self.params]


def build_optimizer(kind, params, lr, weight_decay, ema_rates, ema_names=None):
    """``ema_rates``: one (nominal) rate per EMA slot; ``ema_names``: their keys (default
    ``str(rate)``; power-function slots need names, their nominal rates may repeat)."""
    if kind == "torch":
        return TorchAdamEMA(params, lr, weight_decay, ema_rates, ema_names)
    if kind == "fused":
        return FusedAdamEMAPath(params, lr, weight_decay, ema_rates, ema_names)
    raise ValueError(f"--optimizer must be fused or torch, got {kind!r}")
