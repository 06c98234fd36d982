"""FusedAdamEMA: AdamW and any number of parameter EMAs updated in one pass.

guided-diffusion steps AdamW and then, per EMA rate, reads every parameter again. Here the
C++/CUDA op ``torch.ops.fastdiff.adam_ema_`` updates parameter, moments and all EMAs per
element while the new parameter is still in registers, optionally unscaling (fp16 loss
scaling), clipping, and writing a bf16/fp16 copy of the parameter in the same pass.

One step is at most two passes over memory:

1. only when needed (``loss_scale`` without a ``found_inf``, or ``max_grad_norm``): one
   read of the gradients by ``torch.ops.fastdiff.grad_norm_sq`` giving the sum of squares of
   the unscaled gradients and whether any is non-finite;
2. the update itself, which reads the found-inf flag and the clip factor from device memory
   (no host synchronisation) and skips everything when the flag is set.

Without the extension (no compiler) the same semantics run on torch foreach ops
(:func:`adam_ema_foreach`, :func:`grad_norm_sq_foreach`).
"""
import logging
import math

import torch
from torch.optim import Optimizer

from fastdiff.optim import _ext
from fastdiff.runtime import local_tensor

LOG = logging.getLogger("fastdiff")

BACKENDS = ("auto", "extension", "foreach")
LOW_PRECISION = (torch.bfloat16, torch.float16)
SUPPORTED_DTYPES = (torch.float32,) + LOW_PRECISION
# Offset torch.nn.utils.clip_grad_norm_ adds to the norm before dividing.
CLIP_EPS = 1e-6


def clip_factor_from_norm(total_norm, max_norm):
    """clip_grad_norm_'s scale factor min(1, max_norm / (total_norm + 1e-6)) as a tensor.

    Computed with tensor ops so that it stays on the device (no synchronisation).
    """
    return torch.clamp(max_norm / (total_norm + CLIP_EPS), max=1.0)


def inv_scale_from_loss_scale(loss_scale, device):
    """1 / loss_scale as a float32 tensor on ``device``, rounded as torch's GradScaler does."""
    if isinstance(loss_scale, torch.Tensor):
        return loss_scale.to(device=device, dtype=torch.float64).reciprocal().float()
    if not loss_scale > 0:
        raise ValueError(f"loss_scale must be positive, got {loss_scale}")
    return torch.full((), 1.0 / loss_scale, dtype=torch.float32, device=device)


def adam_ema_foreach(params, grads, exp_avgs, exp_avg_sqs, emas, model_params, steps, lr,
                     beta1, beta2, eps, weight_decay, ema_rates, inv_scale=None,
                     clip_factor=None, found_inf=None):
    """Pure-torch ``torch.ops.fastdiff.adam_ema_``: same arguments, same semantics.

    Reads the scalars on the host (device synchronisation), so it is a fallback, not a
    fast path. ``emas`` is rate-major: ``emas[k * len(params) + i]``.
    """
    if found_inf is not None and found_inf.item() != 0:
        return
    if not params:
        return
    grads = [g.to(torch.float32) for g in grads]  # may alias fp32 grads: only read below
    if inv_scale is not None:
        grads = torch._foreach_mul(grads, inv_scale)
    if clip_factor is not None:
        grads = torch._foreach_mul(grads, clip_factor)
    torch._foreach_add_(steps, 1.0)
    step_values = [s.item() for s in steps]
    lr = lr.item()
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** s) for s in step_values])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom,
                            [-lr / (1 - beta1 ** s) for s in step_values])
    n = len(params)
    for k, rate in enumerate(ema_rates):
        torch._foreach_mul_(emas[k * n:(k + 1) * n], rate)
        torch._foreach_add_(emas[k * n:(k + 1) * n], params, alpha=1 - rate)
    if model_params:
        torch._foreach_copy_(model_params, params)


@torch.no_grad()
def lerp_emas_(emas, params, rate, found_inf=None):
    """``ema = rate·ema + (1−rate)·p`` for every pair (GD's update_ema), in place.

    With ``found_inf`` (a 0-dim tensor) a nonzero flag leaves the EMAs unchanged, decided on
    the device: the rate becomes 1 and the parameters' weight 0 (no synchronisation).
    """
    if not emas:
        return
    if found_inf is None:
        torch._foreach_mul_(emas, rate)
        torch._foreach_add_(emas, params, alpha=1 - rate)
        return
    skip = found_inf != 0
    torch._foreach_mul_(emas, torch.where(skip, 1.0, rate).float())
    torch._foreach_add_(emas, torch._foreach_mul(params, torch.where(skip, 0.0, 1 - rate).float()))


def grad_norm_sq_foreach(grads, inv_scale=None):
    """Pure-torch ``torch.ops.fastdiff.grad_norm_sq``: (sum of squares, found_inf) float32."""
    grads = [g.to(torch.float32) for g in grads]
    if inv_scale is not None:
        grads = torch._foreach_mul(grads, inv_scale)
    # Squares accumulated in float64 cannot overflow for finite float32 values, so a
    # non-finite sum means a non-finite gradient, as in the C++ op.
    norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
    sum_sq = torch.stack(norms).square().sum()
    return sum_sq.float(), (~torch.isfinite(sum_sq)).float()


class FusedAdamEMA(Optimizer):
    """AdamW (torch semantics) plus one EMA of the parameters per rate, fused in one pass.

    Args:
        params: parameters or parameter groups, as for any torch optimizer. float32,
            bfloat16 or float16 tensors (or FSDP2 DTensors of them). For bf16/fp16
            parameters the optimizer keeps a float32 master copy (state ``"master"``),
            updates it, and writes the rounded result back to the parameter in the
            same pass.
        lr: learning rate (float, or a float32 tensor on the parameters' device, which
            the step reads without synchronising).
        betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay).
        ema_rates: EMA decay rates; after every step ``ema = rate * ema + (1 - rate) * p``.
            EMAs start as copies of the (master) parameters at construction. A step may
            override them for that step only (``step(ema_rates=...)``: warmups and
            power-function EMAs, whose rate changes every step).
        ema_names: one name per EMA slot (default ``str(rate)``); the names must be
            distinct, the rates need not be (a power-function slot's nominal rate may
            equal a fixed one's). :meth:`get_ema_by_name` looks slots up by name.
        backend: "auto" (the C++/CUDA op when it builds, otherwise the foreach path with a
            warning), "extension" (fail if it does not build) or "foreach".

    State per parameter: ``step`` (float32 0-dim tensor on the parameter's device),
    ``exp_avg``, ``exp_avg_sq``, ``ema0``, ``ema1``, ... (one per rate, in ``ema_rates``
    order; every param group records ``ema_rates``) and, for bf16/fp16 parameters,
    ``master``. All float32. Created eagerly, so ``get_ema`` and ``state_dict`` work
    before the first step.

    Parameters without a gradient are not stepped (as in torch), but their EMAs still
    move towards them, as guided-diffusion's EMA loop does for every parameter.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 ema_rates=(0.9999,), *, ema_names=None, backend="auto"):
        if not isinstance(lr, torch.Tensor) and not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.ema_rates = tuple(float(r) for r in ema_rates)
        if not all(0.0 <= r <= 1.0 for r in self.ema_rates):
            raise ValueError(f"ema_rates must lie in [0, 1], got {ema_rates}")
        if ema_names is None:
            if len(set(self.ema_rates)) != len(self.ema_rates):
                raise ValueError(f"ema_rates must be distinct, got {ema_rates}")
            ema_names = [str(r) for r in self.ema_rates]
        self.ema_names = tuple(str(n) for n in ema_names)
        if len(self.ema_names) != len(self.ema_rates):
            raise ValueError(f"ema_names needs one name per rate, got {ema_names} for "
                             f"{self.ema_rates}")
        if len(set(self.ema_names)) != len(self.ema_names):
            raise ValueError(f"ema_names must be distinct, got {ema_names}")
        if len(self.ema_rates) > 8:
            raise ValueError(f"at most 8 EMA rates are supported, got {len(self.ema_rates)}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.last_found_inf = None
        self.last_grad_norm = None
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        ema_rates=self.ema_rates)
        super().__init__(params, defaults)
        self.backend = self._resolve_backend(backend)
        LOG.info("FusedAdamEMA: %s path", "C++/CUDA extension" if self.backend == "extension"
                 else "pure-torch foreach")

    # ---- construction -----------------------------------------------------------------
    def _all_params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _resolve_backend(self, backend):
        if backend == "foreach":
            return "foreach"
        available = _ext.extension_available()
        if backend == "extension" and not available:
            raise RuntimeError("FusedAdamEMA(backend='extension'): the C++ extension could "
                               "not be built or loaded (see the 'fastdiff' log)")
        needs_cuda = any(local_tensor(p).is_cuda for p in self._all_params())
        if available and needs_cuda and not _ext.has_cuda_kernels():
            if backend == "extension":
                raise RuntimeError("FusedAdamEMA(backend='extension'): the loaded extension "
                                   "has no CUDA kernels (built without nvcc or against a "
                                   "CPU torch)")
            LOG.warning("FusedAdamEMA: the C++ extension has no CUDA kernels; using the "
                        "pure-torch foreach path (fastdiff.optim.fused_adam_ema."
                        "adam_ema_foreach)")
            return "foreach"
        return "extension" if available else "foreach"

    def add_param_group(self, param_group):
        rates = tuple(float(r) for r in param_group.get("ema_rates", self.ema_rates))
        if rates != self.ema_rates:
            raise ValueError(f"every param group must use the optimizer's ema_rates "
                             f"{self.ema_rates}, got {rates}")
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"FusedAdamEMA supports float32, bfloat16 and float16 "
                                f"parameters, got {p.dtype}")
            self._init_state(p)

    def _init_state(self, p):
        fp32 = dict(dtype=torch.float32, memory_format=torch.contiguous_format)
        state = self.state[p]
        master = p.detach()
        if p.dtype in LOW_PRECISION:
            master = p.detach().to(copy=True, **fp32)
            state["master"] = master
        state["step"] = torch.zeros((), dtype=torch.float32, device=local_tensor(p).device)
        state["exp_avg"] = torch.zeros_like(p, **fp32)
        state["exp_avg_sq"] = torch.zeros_like(p, **fp32)
        for k in range(len(self.ema_rates)):
            state[f"ema{k}"] = master.clone(memory_format=torch.contiguous_format)

    # ---- public helpers ---------------------------------------------------------------
    def get_ema(self, rate):
        """The EMA tensors (float32) for ``rate``, in the order of the parameters."""
        try:
            k = self.ema_rates.index(float(rate))
        except ValueError:
            raise ValueError(f"no EMA with rate {rate}; this optimizer keeps "
                             f"{self.ema_rates}") from None
        return self.get_ema_slot(k)

    def get_ema_slot(self, index):
        """The EMA tensors (float32) of slot ``index`` (construction order)."""
        if not 0 <= index < len(self.ema_rates):
            raise IndexError(f"no EMA slot {index}; this optimizer keeps {len(self.ema_rates)}")
        return [self.state[p][f"ema{index}"] for p in self._all_params()]

    def get_ema_by_name(self, name):
        """The EMA tensors (float32) of the slot named ``name`` (see ``ema_names``)."""
        try:
            k = self.ema_names.index(str(name))
        except ValueError:
            raise ValueError(f"no EMA named {name!r}; this optimizer keeps "
                             f"{self.ema_names}") from None
        return self.get_ema_slot(k)

    def _rates_for_this_step(self, ema_rates):
        """The per-step override (validated, host floats) or the constructed rates."""
        if ema_rates is None:
            return self.ema_rates
        rates = tuple(float(r) for r in ema_rates)
        if len(rates) != len(self.ema_rates):
            raise ValueError(f"step(ema_rates=...) needs {len(self.ema_rates)} rates (one per "
                             f"EMA slot), got {len(rates)}")
        if not all(0.0 <= r <= 1.0 for r in rates):
            raise ValueError(f"ema_rates must lie in [0, 1], got {ema_rates}")
        return rates

    def master_params(self):
        """The float32 parameters the optimizer updates (the params themselves if fp32)."""
        return [self.state[p].get("master", p) for p in self._all_params()]

    @property
    def last_step_skipped(self):
        """Whether the last step was skipped for a non-finite gradient (synchronises)."""
        return self.last_found_inf is not None and bool(self.last_found_inf.item() != 0)

    def _ops(self):
        if self.backend == "extension":
            return torch.ops.fastdiff.adam_ema_, torch.ops.fastdiff.grad_norm_sq
        return adam_ema_foreach, grad_norm_sq_foreach

    def _grads_by_dtype(self):
        buckets = {}
        for p in self._all_params():
            if p.grad is not None:
                grad = local_tensor(p.grad)
                buckets.setdefault(grad.dtype, []).append(grad)
        return buckets

    @torch.no_grad()
    def grad_norm_sq(self, loss_scale=None):
        """(sum of squares of the unscaled gradients, found_inf) over all parameters.

        float32 0-dim tensors on the parameters' device; found_inf is 1.0 if any unscaled
        gradient is inf or NaN. For DTensor (FSDP2) parameters sharded over one mesh
        dimension both are all-reduced over the mesh, so every rank gets the global value.
        """
        buckets = self._grads_by_dtype()
        device = local_tensor(self._all_params()[0]).device
        inv_scale = None if loss_scale is None else inv_scale_from_loss_scale(loss_scale, device)
        _, grad_norm_sq_op = self._ops()
        results = [grad_norm_sq_op(grads, inv_scale) for grads in buckets.values()]
        zero = torch.zeros((), dtype=torch.float32, device=device)  # no gradients at all
        sum_sq = torch.stack([zero] + [r[0] for r in results]).sum()
        found_inf = torch.stack([zero] + [r[1] for r in results]).amax()
        self._all_reduce_over_mesh(sum_sq, found_inf)
        return sum_sq, found_inf

    def _all_reduce_over_mesh(self, sum_sq, found_inf):
        params = self._all_params()
        meshes = {p.device_mesh for p in params if hasattr(p, "device_mesh")}
        if not meshes:
            return
        mesh = next(iter(meshes))
        sharded_1d = (len(meshes) == 1 and mesh.ndim == 1
                      and all(hasattr(p, "device_mesh") and p.placements[0].is_shard()
                              for p in params))
        if not sharded_1d:
            raise ValueError("FusedAdamEMA computes global gradient norms only for DTensor "
                             "parameters all sharded over one 1-D mesh; compute the norm "
                             "yourself and pass found_inf= / clip_factor= to step()")
        group = mesh.get_group()
        torch.distributed.all_reduce(sum_sq, op=torch.distributed.ReduceOp.SUM, group=group)
        torch.distributed.all_reduce(found_inf, op=torch.distributed.ReduceOp.MAX, group=group)

    # ---- the step ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, loss_scale=None, found_inf=None, clip_factor=None,
             max_grad_norm=None, ema_rates=None):
        """One AdamW + EMA step; returns the closure's loss (or None).

        Args:
            loss_scale: the gradients are divided by it (float or tensor), as
                GradScaler.unscale_ does. Unless ``found_inf`` is given, a non-finite
                unscaled gradient then skips the step.
            found_inf: float32 0-dim tensor; nonzero skips the whole step: parameters,
                moments, EMAs and step counters stay bit-identical. Pass it when it was
                computed across ranks (see :meth:`grad_norm_sq`).
            max_grad_norm: clip the unscaled gradients to this global norm, as
                torch.nn.utils.clip_grad_norm_.
            clip_factor: multiply the unscaled gradients by this tensor instead (e.g.
                :func:`clip_factor_from_norm` of a norm reduced across ranks).
            ema_rates: host floats, one per EMA slot in construction order, used instead
                of the constructed rates for this step only (the op takes the rates per
                call anyway: no extra pass, no device read).

        Non-finite gradients skip a step only when ``loss_scale`` or ``found_inf`` is
        given; otherwise, as in torch, they propagate. ``last_found_inf`` (tensor or None)
        and ``last_step_skipped`` report whether this step was skipped; ``last_grad_norm``
        holds the global norm of the unscaled gradients when this step computed it
        (``loss_scale`` without ``found_inf``, or ``max_grad_norm``), else None.
        """
        if clip_factor is not None and max_grad_norm is not None:
            raise ValueError("pass either clip_factor or max_grad_norm, not both")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        rates = self._rates_for_this_step(ema_rates)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        self.last_grad_norm = None
        need_stats = max_grad_norm is not None or (loss_scale is not None and found_inf is None)
        if need_stats:
            sum_sq, grads_found_inf = self.grad_norm_sq(loss_scale)
            self.last_grad_norm = sum_sq.sqrt()
            if found_inf is None and loss_scale is not None:
                found_inf = grads_found_inf
            if max_grad_norm is not None:
                clip_factor = clip_factor_from_norm(self.last_grad_norm, max_grad_norm)
        self.last_found_inf = found_inf

        for group in self.param_groups:
            self._step_group(group, loss_scale, found_inf, clip_factor, rates)
        return loss

    def _step_group(self, group, loss_scale, found_inf, clip_factor, ema_rates):
        params = group["params"]
        if not params:
            return
        device = local_tensor(params[0]).device
        lr = group["lr"]
        lr = (lr.to(device=device, dtype=torch.float32) if isinstance(lr, torch.Tensor)
              else torch.full((), lr, dtype=torch.float32, device=device))
        inv_scale = None if loss_scale is None else inv_scale_from_loss_scale(loss_scale, device)
        beta1, beta2 = group["betas"]
        adam_ema_op, _ = self._ops()
        num_rates = len(ema_rates)

        # One op call per (parameter dtype, gradient dtype): the kernels take one of each.
        buckets = {}
        without_grad = []
        for p in params:
            if p.grad is None:
                without_grad.append(p)
            else:
                buckets.setdefault((p.dtype, p.grad.dtype), []).append(p)
        for (param_dtype, _), bucket in buckets.items():
            states = [self.state[p] for p in bucket]
            low_precision = param_dtype in LOW_PRECISION
            adam_ema_op(
                [local_tensor(s["master"] if low_precision else p) for s, p in zip(states, bucket)],
                [local_tensor(p.grad) for p in bucket],
                [local_tensor(s["exp_avg"]) for s in states],
                [local_tensor(s["exp_avg_sq"]) for s in states],
                [local_tensor(s[f"ema{k}"]) for k in range(num_rates) for s in states],
                [local_tensor(p) for p in bucket] if low_precision else [],
                [s["step"] for s in states],
                lr, beta1, beta2, group["eps"], group["weight_decay"], list(ema_rates),
                inv_scale=inv_scale, clip_factor=clip_factor, found_inf=found_inf,
            )
        if without_grad and num_rates:
            self._move_emas_only(without_grad, found_inf, ema_rates)

    def _move_emas_only(self, params, found_inf, ema_rates):
        """EMA update of parameters that got no gradient (they did not move)."""
        states = [self.state[p] for p in params]
        masters = [local_tensor(s.get("master", p)) for s, p in zip(states, params)]
        for k, rate in enumerate(ema_rates):
            lerp_emas_([local_tensor(s[f"ema{k}"]) for s in states], masters, rate, found_inf)

    # ---- checkpoints ------------------------------------------------------------------
    def load_state_dict(self, state_dict):
        """Load a state_dict from :meth:`state_dict`; state stays float32 (torch's default
        loader would cast it to the parameter dtype, rounding fp32 masters to bf16)."""
        for group in state_dict["param_groups"]:
            rates = tuple(float(r) for r in group.get("ema_rates", ()))
            if rates != self.ema_rates:
                raise ValueError(f"state_dict holds EMAs for rates {rates}, this optimizer "
                                 f"keeps {self.ema_rates}")
        saved_state = state_dict["state"]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict({**state_dict, "state": {}})
        for group in self.param_groups:
            group["ema_rates"] = self.ema_rates
        for saved_id, p in zip(saved_ids, self._all_params()):
            expected = {"step", "exp_avg", "exp_avg_sq"} | {
                f"ema{k}" for k in range(len(self.ema_rates))}
            if p.dtype in LOW_PRECISION:
                expected.add("master")
            saved = saved_state.get(saved_id, {})
            missing = expected - set(saved)
            if missing:
                raise ValueError(f"state_dict lacks {sorted(missing)} for parameter {saved_id}")
            self.state[p] = {
                key: (torch.as_tensor(value).to(device=local_tensor(p).device, dtype=torch.float32,
                                                copy=True) if key == "step"
                      else value.to(device=p.device, dtype=torch.float32, copy=True))
                for key, value in saved.items()
            }
