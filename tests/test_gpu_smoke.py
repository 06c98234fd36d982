"""GPU smoke checks: what a lent GPU must show first, in one short pytest run.

benchmarks/gpu_suite.sh runs this file as its ``smoke`` section, before any benchmark, so
that a wrong kernel or a step that waits on the host is known even if the rest of the
suite runs out of time. Every test is ``gpu``-marked (skipped without CUDA). One case each,
sized to compile and run in about a minute on an H100/H200:

1. each kernel once against its reference, on fresh random (never zero) inputs:
   GroupNorm+SiLU forward and backward against fp64; attention forward and backward
   against fp64, held to twice PyTorch SDPA's own error in the same dtype; the fused
   Adam+EMA CUDA kernel (``FusedAdamEMA(...).step()`` with no arguments) against
   ``torch.optim.AdamW`` + guided-diffusion's EMA loop;
2. one compiled bf16 training step of a small UNet (fused GroupNorm+SiLU, Triton
   attention, whole-model ``torch.compile``, fused optimizer), after checking that the
   compiled bf16 model's loss and gradients match the eager fp32 GD-module model;
3. the sync check (issue 14): a Trainer built as benchmarks/bench_train_step.py builds it
   takes two warm-up steps (compile, autotune, extension load), then six non-logging
   steps under ``torch.cuda.set_sync_debug_mode("error")``: any synchronising CUDA call
   inside ``Trainer.train_step`` (``.item()``, ``.cpu()``, a blocking host↔device copy...)
   raises. Batches come from pinned host memory, as the data loader gives them.

Errors are relative norms, ‖out − ref‖ / ‖ref‖ (tolerances next to each check).
"""
import types

import pytest
import torch
import torch.nn.functional as F

from fastdiff import config as C
from fastdiff.diffusion import create_named_schedule_sampler
from fastdiff.ops.attention import attention
from fastdiff.ops.group_norm_silu import group_norm_silu
from fastdiff.optim import FusedAdamEMA, _ext
from fastdiff.runtime import DistInfo, autocast
from fastdiff.train.loop import Trainer
from fastdiff.train.parallel import parallelize

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
# A small GD-style UNet that still reaches every fused path: scale-shift GroupNorm+SiLU,
# resblock up/down sampling, attention at 16x16 (one head, S=256) and 8x8 (two heads, S=64),
# head dim 64 as in GD's ImageNet-64 model, class labels, learned sigmas (the vb term).
UNET_FLAGS = dict(image_size=16, num_channels=64, num_res_blocks=1, channel_mult="1,2",
                  attention_resolutions="16,8", num_head_channels=64, resblock_updown=True,
                  use_new_attention_order=True, use_scale_shift_norm=True, class_cond=True,
                  learn_sigma=True, diffusion_steps=50, dropout=0.0)
BATCH, MICROBATCH = 8, 4
WARMUP_STEPS, SYNC_FREE_STEPS = 2, 6


def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64 (NaN if out has a NaN: then every bound fails)."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def assert_within(name, out, ref, bound):
    err = rel_err(out, ref)
    assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g}"


class no_tf32:
    """fp32 matmuls and convolutions in full fp32 (references must not round to TF32)."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


# ---- 1. kernels against their references ---------------------------------------------------
def test_group_norm_silu_forward_backward_match_fp64():
    # Odd spatial size and 3 channels per group: partial tiles and group boundaries.
    N, C, G, H, W = 2, 96, 32, 13, 11
    dtype = torch.bfloat16
    x = (torch.randn(N, C, H, W, device=DEVICE) * 1.7 + 0.6).to(dtype)
    weight = torch.randn(C, device=DEVICE) * 0.4 + 1.0
    bias = torch.randn(C, device=DEVICE) * 0.5 + 0.2
    emb = (torch.randn(N, 2 * C, 1, 1, device=DEVICE) * 0.5).to(dtype)
    dy = torch.randn(N, C, H, W, device=DEVICE, dtype=dtype)

    def forward_backward(leaves, dy):
        x, weight, bias, emb = leaves
        scale, shift = emb.chunk(2, dim=1)
        y = group_norm_silu(x, weight, bias, G, scale=scale, shift=shift, act=True)
        return [y] + list(torch.autograd.grad(y, leaves, dy))

    def reference(leaves, dy):  # the unfused math, in fp64 on the same rounded inputs
        x, weight, bias, emb = leaves
        scale, shift = emb.chunk(2, dim=1)
        y = F.silu(F.group_norm(x, G, weight, bias, 1e-5) * (1 + scale) + shift)
        return [y] + list(torch.autograd.grad(y, leaves, dy))

    inputs = (x, weight, bias, emb)
    got = forward_backward([t.detach().requires_grad_() for t in inputs], dy)
    ref = reference([t.detach().double().requires_grad_() for t in inputs], dy.double())
    # bf16 inputs and outputs: one rounding is 2^-9 ≈ 2e-3 relative; 1e-2 leaves room for a
    # few (bf16 intermediates, fp32 sums in another order) and is far below the error of a
    # wrong index, group count or factor (a shift off by 10% alone gives 4e-2). The fp32
    # affine-weight gradients land far closer; the per-element bounds are in
    # test_group_norm_silu.py, which the suite runs after the benchmarks.
    for name, g, r in zip(["y", "dx", "dweight", "dbias", "demb"], got, ref):
        assert_within(f"group_norm_silu {name}", g, r, 1e-2)


def test_attention_forward_backward_within_twice_sdpa_error():
    # S = 300: not a multiple of any block size (masked tails); D = 64 as in the UNet.
    B, H, S, D = 2, 3, 300, 64
    dtype = torch.bfloat16
    q, k, v = ((torch.randn(B, H, S, D, device=DEVICE) + 0.3).to(dtype) for _ in range(3))
    dout = torch.randn(B, H, S, D, device=DEVICE, dtype=dtype)

    def forward_backward(fn, dtype_):
        leaves = [t.detach().to(dtype_).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return [out] + list(torch.autograd.grad(out, leaves, dout.to(dtype_)))

    ref = forward_backward(lambda a, b, c: torch.softmax(a @ b.transpose(-1, -2) / D ** 0.5, -1) @ c,
                           torch.float64)
    sdpa = forward_backward(F.scaled_dot_product_attention, dtype)
    got = forward_backward(attention, dtype)
    # FlashAttention's criterion: at most twice the error of PyTorch's own kernel in the same
    # dtype, plus a floor of one bf16 rounding (2^-9) for cases where SDPA happens to land
    # very close. A wrong mask, scale or softmax statistic is off by > 0.1.
    for name, g, s, r in zip(["out", "dq", "dk", "dv"], got, sdpa, ref):
        assert_within(f"attention {name}", g, r, 2 * rel_err(s, r) + 2e-3)


def test_fused_adam_ema_cuda_kernel_matches_adamw_and_gd_ema():
    assert _ext.extension_available() and _ext.has_cuda_kernels(), (
        "the C++/CUDA extension has no CUDA kernels here: FusedAdamEMA would run the foreach "
        "fallback (see the build_ext section of the suite and the 'fastdiff' log)")
    hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    rates = (0.999, 0.9)
    # Odd sizes: vector tails; 65537 spans several blocks.
    shapes = [(1,), (7,), (33, 17), (4099,), (65537,)]
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE) + 0.5) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = FusedAdamEMA(params, ema_rates=rates, **hyper)
    assert opt.backend == "extension"
    ref_opt = torch.optim.AdamW(ref, **hyper)
    ref_emas = {rate: [r.detach().clone() for r in ref] for rate in rates}
    for _ in range(5):
        for p, r in zip(params, ref):
            p.grad = torch.randn_like(p) + 0.3
            r.grad = p.grad.clone()
        opt.step()  # the plain optimizer API: no clip, no found-inf tensor
        ref_opt.step()
        with torch.no_grad():
            for rate in rates:  # guided-diffusion's EMA loop
                for ema, r in zip(ref_emas[rate], ref):
                    ema.mul_(rate).add_(r, alpha=1 - rate)
    # FMA contraction and another order of the same fp32 operations change the last bits;
    # over 5 steps that stays near 1e-7 relative. A wrong bias correction, decay or EMA
    # weight is off by more than 1e-4.
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)
    for rate in rates:
        for ema, r in zip(opt.get_ema(rate), ref_emas[rate]):
            torch.testing.assert_close(ema, r, rtol=1e-5, atol=1e-6)


# ---- 2. and 3. a compiled bf16 UNet: parity, one train step, the sync check -------------------
def build_unet(norm_backend, attention_backend, state=None):
    kwargs = {**C.model_and_diffusion_defaults(), **UNET_FLAGS}
    with torch.device(DEVICE):
        model, diffusion = C.create_model_and_diffusion(
            **kwargs, norm_backend=norm_backend, attention_backend=attention_backend)
    if state is not None:
        model.load_state_dict(state)
    return model, diffusion


@torch.no_grad()
def randomize_zero_init(model):
    """GD zero-initialises every output conv: the output would be 0 and attention would add
    nothing, so a broken kernel could not change the loss. Small random values instead."""
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if not p.any():
            p.copy_(torch.randn(p.shape, generator=gen).to(p.device) * 0.02)


def fixed_batch(num_timesteps, size):
    """x, class labels, timesteps and noise on the device: the loss is then a function of
    the weights alone, so two models can be compared."""
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(size, 3, 16, 16, generator=gen) * 2 - 1
    y = torch.randint(0, 1000, (size,), generator=gen)
    t = torch.randint(0, num_timesteps, (size,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    return [a.to(DEVICE) for a in (x, y, t, noise)]


def loss_and_grads(model, diffusion, batch, precision):
    x, y, t, noise = batch
    model.zero_grad(set_to_none=True)
    with autocast(precision, DEVICE):
        losses = diffusion.training_losses(model, x, t, model_kwargs={"y": y}, noise=noise)
    loss = losses["loss"].float().mean()
    loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
             for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.fixture(scope="module")
def compiled_unet():
    """The fused, compiled UNet (weights from an eager GD-module model) and how far its bf16
    loss and gradients are from that model's fp32 ones on one fixed microbatch. The parity
    pass also compiles the forward and backward graphs the training steps reuse."""
    torch.manual_seed(0)
    reference, diffusion = build_unet("torch", "math")
    randomize_zero_init(reference)
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    batch = fixed_batch(diffusion.num_timesteps, MICROBATCH)  # the steps' shapes: no recompile
    with no_tf32():
        ref_loss, ref_grads = loss_and_grads(reference, diffusion, batch, "fp32")
    del reference
    model, _ = build_unet("fused", "triton", state)
    wrapping = parallelize(model, DistInfo(device=torch.device(DEVICE)), "bf16", compile=True)
    loss, grads = loss_and_grads(model, diffusion, batch, "bf16")
    flat, ref_flat = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads])
    cosine = torch.nn.functional.cosine_similarity(flat.double(), ref_flat.double(), dim=0).item()
    return types.SimpleNamespace(model=model, diffusion=diffusion, wrapping=wrapping,
                                 loss_rel_err=abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
                                 grad_cosine=cosine)


def make_trainer(model, diffusion, sampler):
    """A Trainer as benchmarks/bench_train_step.py builds one (no data loader, no log dir),
    with the options that used to read from the device: microbatches, gradient clipping,
    two EMAs, the fused optimizer."""
    cfg = C.TrainConfig(batch_size=BATCH, microbatch=MICROBATCH, lr=1e-4, ema_rate="0.9999,0.99",
                        precision="bf16", optimizer="fused", grad_clip=1.0)
    return Trainer(model=model, diffusion=diffusion, data=None,
                   schedule_sampler=create_named_schedule_sampler(sampler, diffusion, seed=0),
                   cfg=cfg, dist_info=DistInfo(device=torch.device(DEVICE)), log_dir=None)


def pinned_batch(seed):
    """One batch as the data loader hands it over: host tensors in pinned memory."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(BATCH, 3, 16, 16, generator=gen) * 2 - 1).pin_memory()
    y = torch.randint(0, 1000, (BATCH,), generator=gen).pin_memory()
    return x, {"y": y}


def take_steps(trainer, steps, batch):
    """What Trainer.train does around each step, minus data loading and logging."""
    for _ in range(steps):
        trainer.train_step(*batch)
        trainer.step += 1


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_trained(before, model):
    after = weights(model)
    assert all(torch.isfinite(p).all() for p in after), "a weight is not finite after training"
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "no weight moved"


def test_compiled_bf16_train_step(compiled_unet):
    assert "torch.compile" in compiled_unet.wrapping, compiled_unet.wrapping
    # bf16 autocast against fp32: the two round differently, by ~1e-3 on the loss; a wrong
    # kernel in any block lands far outside these bounds (as in bench_train_step.py).
    assert compiled_unet.loss_rel_err <= 2e-2, f"loss differs by {compiled_unet.loss_rel_err:.3g}"
    assert compiled_unet.grad_cosine >= 0.99, f"gradient cosine {compiled_unet.grad_cosine:.4f}"
    trainer = make_trainer(compiled_unet.model, compiled_unet.diffusion, "uniform")
    before = weights(compiled_unet.model)
    take_steps(trainer, 1, pinned_batch(0))
    torch.cuda.synchronize()
    assert trainer.step == 1
    assert_trained(before, compiled_unet.model)


@pytest.mark.parametrize("sampler", ["uniform", "loss-second-moment"])
def test_train_steps_never_synchronise(compiled_unet, sampler):
    trainer = make_trainer(compiled_unet.model, compiled_unet.diffusion, sampler)
    batch = pinned_batch(1)
    take_steps(trainer, WARMUP_STEPS, batch)  # compile, autotune, extension load: may sync
    torch.cuda.synchronize()
    before = weights(compiled_unet.model)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        # The mode is live: a read from the device raises (else this test proves nothing).
        with pytest.raises(RuntimeError, match="synchroniz"):
            torch.ones((), device=DEVICE).item()
        take_steps(trainer, SYNC_FREE_STEPS, batch)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert trainer.step == WARMUP_STEPS + SYNC_FREE_STEPS
    assert_trained(before, compiled_unet.model)
