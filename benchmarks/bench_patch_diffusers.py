"""A diffusers UNet2DModel training step before and after ``fastdiff.patch`` (GPU only).

Model: the DDPM CIFAR-10 UNet (Ho et al. 2020; the google/ddpm-cifar10-32 config, 35.7M
parameters): 32×32, channels 128-256-256-256, two ResnetBlock2D per level, attention at
16×16. Its attention is one head of 256 channels, wider than the Triton kernel's 128,
so ``patch`` fuses only the GroupNorm+SiLU pairs there (the report says so); the
``heads64`` variant (4 heads of 64) also runs fastdiff's attention.

Step: ε-prediction MSE on a batch of 128 noised images, forward in bf16 autocast
(fp32 master weights, as diffusers' training scripts do), backward, fused AdamW. Timing:
device events through benchmarks/common.gpu_time_ms, the unpatched and patched model
measured alternately on the same instance (patch/unpatch between rounds), medians.

Parity, asserted before timing:
- fp32 with TF32 off: patched output and every gradient within 1e-4 of the tensor's max
  (the kernels sum in a different order than cuDNN/SDPA, and the error compounds over
  ~40 layers; a gradient that is mathematically zero is held to 1e-7 of the largest);
- bf16 autocast: the patched model's output error against the fp32 result is at most
  twice the unpatched model's error plus 1e-3 of the output's max (FlashAttention's
  criterion for low-precision kernels).
"""
import statistics

import pytest
import torch
import torch.nn.functional as F

from common import gpu_time_ms

diffusers = pytest.importorskip("diffusers")

from fastdiff.patch import patch, unpatch  # noqa: E402

DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=32, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
VARIANTS = {"ddpm-cifar10": dict(attention_head_dim=None), "ddpm-cifar10-heads64": dict(attention_head_dim=64)}
BATCH = 128
PARITY_BATCH = 8
ROUNDS = 3


def make_model(variant):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**DDPM_CIFAR10, **VARIANTS[variant]).cuda()


def make_batch(batch):
    """Noised images x_t, timesteps and the noise target under DDPM's linear schedule."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    x0 = torch.rand(batch, 3, 32, 32, device="cuda", generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, device="cuda", generator=gen)
    t = torch.randint(0, 1000, (batch,), device="cuda", generator=gen)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device="cuda"), 0)[t].view(-1, 1, 1, 1)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise, t, noise


def forward_backward(model, batch, autocast):
    """Output and parameter gradients of the ε-MSE loss."""
    x_t, t, noise = batch
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        pred = model(x_t, t).sample
    F.mse_loss(pred.float(), noise).backward()
    return pred.detach().float(), [torch.zeros_like(p) if p.grad is None else p.grad.float()
                                   for p in model.parameters()]


def check_parity(model):
    batch = make_batch(PARITY_BATCH)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ref_out, ref_grads = forward_backward(model, batch, autocast=False)
        base_bf16, _ = forward_backward(model, batch, autocast=True)
        report = patch(model)
        out, grads = forward_backward(model, batch, autocast=False)
        patched_bf16, _ = forward_backward(model, batch, autocast=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        unpatch(model)
    names = ["output"] + [n for n, _ in model.named_parameters()]
    # Gradients that are mathematically zero (key biases under softmax) hold rounding
    # noise: their bound is set by the largest gradient instead of their own size.
    floor = max(g.abs().max().item() for g in ref_grads) * 1e-3
    for name, got, ref in zip(names, [out] + grads, [ref_out] + ref_grads):
        err = (got - ref).abs().max().item()
        assert err <= 1e-4 * max(ref.abs().max().item(), floor), f"fp32 {name}: max err {err:.3g}"
    base_err = (base_bf16 - ref_out).abs().max().item()
    patched_err = (patched_bf16 - ref_out).abs().max().item()
    assert patched_err <= 2 * base_err + 1e-3 * ref_out.abs().max().item(), (
        f"bf16: patched error {patched_err:.3g} vs unpatched {base_err:.3g}")
    return report, base_err, patched_err


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_diffusers_unet_train_step(benchmark, variant):
    model = make_model(variant).train()
    report, base_err, patched_err = check_parity(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = make_batch(BATCH)

    def step():
        forward_backward(model, batch, autocast=True)
        optimizer.step()

    times = {"unpatched": [], "patched": []}
    for _ in range(ROUNDS):  # alternate so drift on the card hits both alike
        for state in ("unpatched", "patched"):
            if state == "patched":
                patch(model)
            step()  # Triton autotuning / cuDNN algorithm choice outside the timed region
            times[state].append(gpu_time_ms(step, warmup_ms=200, rep_ms=1500))
            unpatch(model)
    ms = {state: statistics.median(v) for state, v in times.items()}

    info = benchmark.extra_info
    info.update(device=torch.cuda.get_device_name(), variant=variant, batch=BATCH,
                params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                replaced=len(report.replaced), left_alone=[str(e) for e in report.left_alone],
                bf16_max_err_unpatched=base_err, bf16_max_err_patched=patched_err)
    for state, value in ms.items():
        info[f"{state}_ms"] = round(value, 2)
        info[f"{state}_img_per_s"] = round(BATCH / (value * 1e-3), 1)
    info["speedup"] = round(ms["unpatched"] / ms["patched"], 3)
    print(f"\n{variant} on {info['device']}: {info['unpatched_img_per_s']} → "
          f"{info['patched_img_per_s']} img/s ({info['speedup']}×)\n{report}")

    patch(model)

    def patched_synced():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(patched_synced, rounds=10, warmup_rounds=2)
    unpatch(model)
