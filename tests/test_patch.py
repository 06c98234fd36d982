"""fastdiff.patch / unpatch on guided-diffusion-style and diffusers models (CPU fallbacks).

Every comparison runs the same model instance (or a fused-backend twin with the same
state_dict) on the same inputs with the same dropout RNG, and compares the output and
the gradients of the input and every parameter. Tolerance (fp32): 1e-5 relative,
|err| <= 1e-5 * (|ref| + max|ref|) per tensor. A few gradients are mathematically zero
(a key bias under softmax, a conv bias right before a one-channel-per-group norm) and
hold only rounding noise; for those both runs must be below 1e-5 of the largest
gradient in the model.
"""
import copy

import pytest
import torch
import torch.nn as nn

from fastdiff.models.layers import AttentionBlock, GroupNormAct, QKVAttentionLegacy
from fastdiff.models.unet import UNetModel
from fastdiff.patch import (FastdiffAttnProcessor, PatchReport, ResnetBlock2DForward,
                            ScaleShiftResBlockForward, patch, unpatch)

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

RTOL = 1e-5


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def perturb(model, seed=1):
    """Add noise to every parameter: GD zero-initialises the last conv of each block,
    which would hide the attention and out_layers paths from the gradients."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def run(model, *inputs, seed=7):
    """Output and gradients (inputs that require grad, then every parameter) of a
    fixed random projection of the output. The RNG is reseeded so dropout masks match."""
    torch.manual_seed(seed)
    out = model(*inputs)
    out = getattr(out, "sample", out)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), leaves + list(model.parameters()))
    return [out.detach()] + list(grads)


def assert_runs_match(got, ref, names):
    noise_floor = RTOL * max((t.abs().max().item() for t in ref[1:]), default=0.0)
    for name, a, b in zip(names, got, ref):
        assert a.shape == b.shape, name
        if b.abs().max() <= noise_floor:  # a mathematically zero gradient
            assert a.abs().max() <= noise_floor, f"{name}: {a.abs().max():.3g} should be ~0"
            continue
        err = (a - b).abs()
        bound = RTOL * (b.abs() + b.abs().max())
        assert (err <= bound).all(), f"{name}: max err {err.max():.3g}, ref max {b.abs().max():.3g}"


def run_names(model, n_leaves):
    return ["output"] + [f"input{i}.grad" for i in range(n_leaves)] + [
        n + ".grad" for n, _ in model.named_parameters()]


def assert_exact(got, ref):
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def module_snapshot(model):
    """Every module object by path, and which modules carry an instance-level forward."""
    modules = dict(model.named_modules())
    overrides = {p for p, m in modules.items() if {"forward", "_forward"} & set(m.__dict__)}
    return modules, overrides


def check_patch_roundtrip(model, inputs, modes=("train", "eval")):
    """patch → same outputs/grads in train and eval mode, same state_dict keys and the
    same Parameter objects; unpatch → the original modules and bit-identical results."""
    names = run_names(model, sum(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs))
    refs = {}
    for mode in modes:
        model.train(mode == "train")
        refs[mode] = run(model, *inputs)
    keys, params = list(model.state_dict()), list(model.parameters())
    modules, overrides = module_snapshot(model)
    processors = {p: m.processor for p, m in modules.items() if isinstance(m, Attention)}

    report = patch(model)
    assert isinstance(report, PatchReport) and report.replaced
    assert list(model.state_dict()) == keys
    now = list(model.parameters())
    assert len(now) == len(params) and all(a is b for a, b in zip(now, params))
    for mode in modes:
        model.train(mode == "train")
        assert_runs_match(run(model, *inputs), refs[mode], names)

    assert unpatch(model) > 0
    after, after_overrides = module_snapshot(model)
    assert after.keys() == modules.keys() and all(after[p] is modules[p] for p in modules)
    assert after_overrides == overrides
    assert all(after[p].processor is proc for p, proc in processors.items())
    for mode in modes:
        model.train(mode == "train")
        assert_exact(run(model, *inputs), refs[mode])
    return report


def paths(entries):
    return {e.path for e in entries}


# ---------------------------------------------------------------------------------------
# guided-diffusion module tree (fastdiff's UNet, torch backend)
# ---------------------------------------------------------------------------------------

# 64 channels so a GroupNorm(32) group holds 2 channels; attention at 4×4, 4 heads of 32.
GD_BASE = dict(image_size=8, in_channels=3, model_channels=64, out_channels=6, num_res_blocks=1,
               attention_resolutions=(2,), dropout=0.1, channel_mult=(1, 2), num_heads=4)
GD_VARIANTS = {
    "scale_shift+updown+legacy+classes": dict(use_scale_shift_norm=True, resblock_updown=True,
                                              num_classes=5),
    "add_emb+new_order+checkpoint": dict(use_new_attention_order=True, use_checkpoint=True),
}


def gd_model(variant, **backends):
    torch.manual_seed(0)
    return UNetModel(**GD_BASE, **GD_VARIANTS[variant], **backends)


def gd_inputs(model):
    x = (torch.randn(3, 3, 8, 8) + 0.3).requires_grad_()
    t = torch.tensor([1.0, 40.0, 900.0])
    return (x, t, torch.tensor([0, 3, 4])) if model.num_classes else (x, t)


@pytest.mark.parametrize("variant", list(GD_VARIANTS))
def test_gd_patched_equals_original_and_fused_backend(variant):
    model = perturb(gd_model(variant))
    fused = gd_model(variant, norm_backend="fused", attention_backend="triton")
    fused.load_state_dict(model.state_dict())
    inputs = gd_inputs(model)
    names = run_names(model, 1)
    fused_runs = {}
    for mode in ("train", "eval"):
        fused.train(mode == "train")
        fused_runs[mode] = run(fused, *inputs)

    report = check_patch_roundtrip(model, inputs)
    assert not report.left_alone, str(report)

    patch(model)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        assert_runs_match(run(model, *inputs), fused_runs[mode], names)
    # Same module classes at the same paths as the model built fused.
    types = {p: type(m) for p, m in model.named_modules()}
    assert types == {p: type(m) for p, m in fused.named_modules()}


def test_gd_report_lists_every_replacement():
    model = gd_model("scale_shift+updown+legacy+classes")
    resblocks = [p for p, m in model.named_modules() if type(m).__name__ == "ResBlock"]
    attention = [p for p, m in model.named_modules() if type(m).__name__ == "AttentionBlock"]
    report = patch(model)
    expected = ({f"{p}.in_layers.0" for p in resblocks} | set(resblocks) | {"out.0"}
                | {f"{p}.norm" for p in attention} | {f"{p}.attention" for p in attention})
    assert paths(report.replaced) == expected
    assert len(report.replaced) == len(expected)
    assert not report.left_alone and not report.already_patched
    for p in resblocks:  # the scale-shift ResBlocks run fastdiff's _forward on this instance
        block = model.get_submodule(p)
        assert isinstance(block.__dict__["_forward"], ScaleShiftResBlockForward)
        assert isinstance(block.out_layers[0], GroupNormAct) and isinstance(block.out_layers[1], nn.Identity)
    text = str(report)
    assert f"{len(expected)} replaced" in text and "out.0" in text and "qkv_attention" in text


def test_gd_patch_is_idempotent_and_fused_backend_is_already_patched():
    model = perturb(gd_model("scale_shift+updown+legacy+classes"))
    inputs = gd_inputs(model)
    first = patch(model)
    out = run(model, *inputs)
    second = patch(model)
    assert not second.replaced and not second.left_alone
    assert len(second.already_patched) == len(first.replaced)
    assert_exact(run(model, *inputs), out)
    assert "already patched" in str(second)

    fused = gd_model("scale_shift+updown+legacy+classes", norm_backend="fused", attention_backend="triton")
    report = patch(fused)
    assert not report.replaced and len(report.already_patched) == len(first.replaced)
    assert unpatch(fused) == 0


def test_gd_kernels_one_at_a_time():
    model = perturb(gd_model("scale_shift+updown+legacy+classes"))
    inputs = gd_inputs(model)
    ref = run(model, *inputs)
    modules, _ = module_snapshot(model)
    attention_only = patch(model, kernels=("attention",))
    assert {e.module for e in attention_only.replaced} == {"QKVAttentionLegacy"}
    assert not any(isinstance(m, GroupNormAct) for m in model.modules())
    norms = patch(model, kernels="group_norm_silu")
    assert norms.replaced and all(e.module != "QKVAttentionLegacy" for e in norms.replaced)
    assert not any(type(m) is nn.SiLU for p, m in model.named_modules()
                   if p.endswith(("in_layers.1", "out_layers.1")))
    assert_runs_match(run(model, *inputs), ref, run_names(model, 1))
    unpatch(model)
    assert all(dict(model.named_modules())[p] is m for p, m in modules.items())
    assert_exact(run(model, *inputs), ref)


def test_gd_checkpoints_load_both_ways_and_optimizer_keeps_training_the_same_tensors():
    model = perturb(gd_model("scale_shift+updown+legacy+classes"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    patch(model)
    inputs = gd_inputs(model)
    for net, opt in ((model, optimizer), (twin, twin_optimizer)):
        opt.zero_grad()
        torch.manual_seed(3)  # same dropout masks
        net(*inputs).square().mean().backward()
        opt.step()
    assert_runs_match([p.detach() for p in model.parameters()],
                      [p.detach() for p in twin.parameters()], [n for n, _ in model.named_parameters()])
    fresh = gd_model("scale_shift+updown+legacy+classes")
    fresh.load_state_dict(model.state_dict(), strict=True)  # patched → plain
    model.load_state_dict(twin.state_dict(), strict=True)  # plain → patched


def test_deepcopy_of_a_patched_model_unpatches_its_own_modules():
    model = gd_model("add_emb+new_order+checkpoint")
    patch(model)
    clone = copy.deepcopy(model)
    assert unpatch(clone) > 0
    assert not any(isinstance(m, GroupNormAct) for m in clone.modules())
    assert sum(isinstance(m, GroupNormAct) for m in model.modules()) > 0  # the original stays patched


def test_gd_attention_with_wide_heads_is_left_alone():
    block = AttentionBlock(256, num_heads=1)
    report = patch(block)
    assert isinstance(block.attention, QKVAttentionLegacy) and block.attention.backend == "math"
    (entry,) = report.left_alone
    assert entry.path == "attention" and "head dim 256 > 128" in entry.detail
    assert paths(report.replaced) == {"norm"}


# ---------------------------------------------------------------------------------------
# guided-diffusion's classifier (EncoderUNetModel) and super-res model (SuperResModel)
# ---------------------------------------------------------------------------------------

import os  # noqa: E402
import sys  # noqa: E402

from fastdiff.models.classifier import AttentionPool2d, EncoderUNetModel  # noqa: E402
from fastdiff.models.layers import MultiHeadQKVAttention  # noqa: E402
from fastdiff.models.super_res import SuperResModel  # noqa: E402

# The module trees patched: fastdiff's torch-backend classes (GD's tree; always) and GD's own
# classes when FASTDIFF_GD_CHECKOUT names a guided-diffusion checkout (CI has none).
GD_CHECKOUT = os.environ.get("FASTDIFF_GD_CHECKOUT")
MODEL_SOURCES = ["fastdiff", "gd_checkout"]


def model_classes(source):
    """(EncoderUNetModel, SuperResModel) of fastdiff (torch backend) or of GD's checkout."""
    if source == "fastdiff":
        return EncoderUNetModel, SuperResModel
    if not GD_CHECKOUT:
        pytest.skip("set FASTDIFF_GD_CHECKOUT to a guided-diffusion checkout to patch GD's classes")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
    from gd_checkout import import_guided_diffusion

    unet = import_guided_diffusion(GD_CHECKOUT).unet
    return unet.EncoderUNetModel, unet.SuperResModel


# 64 channels (two per GroupNorm group), attention at 4x4 with 32-channel heads; the attention
# pool attends over 4x4 + 1 = 17 tokens with 4 heads.
CLASSIFIER_BASE = dict(image_size=8, in_channels=3, model_channels=64, out_channels=5,
                       num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2),
                       num_head_channels=32, dropout=0.1)
CLASSIFIER_VARIANTS = {
    "adaptive+scale_shift": dict(pool="adaptive", use_scale_shift_norm=True),
    "attention+updown": dict(pool="attention", resblock_updown=True),
    "spatial": dict(pool="spatial"),
    "spatial_v2+scale_shift+updown": dict(pool="spatial_v2", use_scale_shift_norm=True,
                                          resblock_updown=True),
}
# What each head adds to the report: its norm + SiLU, the pool's attention.
HEAD_REPLACEMENTS = {"adaptive": {"out.0"}, "attention": {"out.0", "out.2.attention"},
                     "spatial": set(), "spatial_v2": {"out.1"}}
SR_KWARGS = dict(image_size=8, in_channels=3, model_channels=64, out_channels=6, num_res_blocks=1,
                 attention_resolutions=(2,), dropout=0.1, channel_mult=(1, 2), num_heads=4,
                 use_scale_shift_norm=True, resblock_updown=True)


def classifier(cls, variant, **backends):
    torch.manual_seed(0)
    return cls(**CLASSIFIER_BASE, **CLASSIFIER_VARIANTS[variant], **backends)


def classifier_inputs():
    return (torch.randn(3, 3, 8, 8) + 0.3).requires_grad_(), torch.tensor([1.0, 40.0, 900.0])


def guidance_grad(model, x, t, y=torch.tensor([0, 3, 4])):
    """d/dx sum log_softmax(model(x, t))[i, y_i], what classifier guidance asks of a model."""
    x = x.detach().requires_grad_()
    log_probs = torch.log_softmax(model(x, t), dim=-1)
    return torch.autograd.grad(log_probs[range(len(y)), y].sum(), x)[0]


def expected_replacements(model):
    """Every path patch() should report for a GD-style model built with GD's modules."""
    expected = set()
    for path, module in model.named_modules():
        if type(module).__name__ == "ResBlock":
            expected |= {f"{path}.in_layers.0",
                         path if module.use_scale_shift_norm else f"{path}.out_layers.0"}
        elif type(module).__name__ == "AttentionBlock":
            expected |= {f"{path}.norm", f"{path}.attention"}
    return expected


@pytest.mark.parametrize("source", MODEL_SOURCES)
@pytest.mark.parametrize("variant", list(CLASSIFIER_VARIANTS))
def test_gd_classifier_patch_matches_and_unpatch_restores(source, variant):
    cls, _ = model_classes(source)
    model = perturb(classifier(cls, variant))
    x, t = classifier_inputs()
    model.eval()
    guidance = guidance_grad(model, x, t)

    report = check_patch_roundtrip(model, (x, t))
    pool = CLASSIFIER_VARIANTS[variant]["pool"]
    assert paths(report.replaced) == expected_replacements(model) | HEAD_REPLACEMENTS[pool]
    assert not report.left_alone, str(report)

    # Classifier guidance through the patched kernels: the input gradient of log p(y|x) in
    # eval mode is unchanged; unpatching brings back the exact original.
    model.eval()
    patch(model)
    assert_runs_match([guidance_grad(model, x, t)], [guidance], ["guidance grad"])
    unpatch(model)
    assert torch.equal(guidance_grad(model, x, t), guidance)


@pytest.mark.parametrize("source", MODEL_SOURCES)
@pytest.mark.parametrize("variant", list(CLASSIFIER_VARIANTS))
def test_gd_classifier_patched_equals_fused_backend(source, variant):
    cls, _ = model_classes(source)
    model = perturb(classifier(cls, variant)).eval()
    fused = classifier(EncoderUNetModel, variant, norm_backend="fused",
                       attention_backend="triton").eval()
    fused.load_state_dict(model.state_dict(), strict=True)
    x, t = classifier_inputs()
    reference = run(fused, x, t)
    patch(model)
    assert_runs_match(run(model, x, t), reference, run_names(model, 1))
    assert_runs_match([guidance_grad(model, x, t)], [guidance_grad(fused, x, t)], ["guidance grad"])
    # No GroupNorm or GD attention is left, and fastdiff's kernels sit at the paths where a
    # classifier built with the fused backends has them.
    leftovers = [p for p, m in model.named_modules() if isinstance(m, nn.GroupNorm) or (
        type(m).__name__ in ("QKVAttention", "QKVAttentionLegacy")
        and not (isinstance(m, MultiHeadQKVAttention) and m.backend == "triton"))]
    assert not leftovers

    def kernels(net):
        return {p: (type(m), getattr(m, "backend", None)) for p, m in net.named_modules()
                if isinstance(m, (GroupNormAct, MultiHeadQKVAttention))}

    assert kernels(model) == kernels(fused)


def test_gd_attention_pool_patch_and_wide_heads():
    torch.manual_seed(0)
    pool = AttentionPool2d(4, 128, 64, output_dim=5)  # 17 tokens, 2 heads of 64
    tokens = torch.randn(2, 128, 4, 4, requires_grad=True)
    reference = run(pool, tokens)
    report = patch(pool)
    assert paths(report.replaced) == {"attention"} and "head_dim=64" in report.replaced[0].detail
    assert pool.attention.backend == "triton"
    assert_runs_match(run(pool, tokens), reference, run_names(pool, 1))
    again = patch(pool)
    assert paths(again.already_patched) == {"attention"} and not again.replaced
    unpatch(pool)
    assert pool.attention.backend == "math"
    built_fused = AttentionPool2d(4, 128, 64, output_dim=5, attention_backend="triton")
    assert paths(patch(built_fused).already_patched) == {"attention"}

    wide = AttentionPool2d(4, 256, 256, output_dim=5)  # one 256-channel head
    report = patch(wide)
    (entry,) = report.left_alone
    assert entry.path == "attention" and "head dim 256 > 128" in entry.detail
    assert wide.attention.backend == "math" and not report.replaced


@pytest.mark.parametrize("source", MODEL_SOURCES)
def test_gd_super_res_patch_matches_and_unpatch_restores(source):
    _, cls = model_classes(source)
    torch.manual_seed(0)
    model = perturb(cls(**SR_KWARGS))
    x = (torch.randn(2, 3, 8, 8) + 0.3).requires_grad_()
    low_res = (torch.randn(2, 3, 5, 5) - 0.2).requires_grad_()
    report = check_patch_roundtrip(model, (x, torch.tensor([3.0, 700.0]), low_res))
    assert paths(report.replaced) == expected_replacements(model) | {"out.0"}
    assert not report.left_alone, str(report)

    torch.manual_seed(0)
    fused = SuperResModel(**SR_KWARGS, norm_backend="fused", attention_backend="triton").eval()
    fused.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    patch(model)
    inputs = (x, torch.tensor([3.0, 700.0]), low_res)
    assert_runs_match(run(model, *inputs), run(fused, *inputs), run_names(model, 2))



# ---------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------

UNET2D_VARIANTS = {
    # attention at the lower resolution, conv resampling, additive time embedding
    "default": dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "UpBlock2D"), resnet_time_scale_shift="default"),
    # scale/shift time embedding and ResnetBlock2D's own up/down resampling paths
    "scale_shift+resnet_resample": dict(down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                                        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                                        resnet_time_scale_shift="scale_shift",
                                        downsample_type="resnet", upsample_type="resnet"),
}


def unet2d(variant):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=16, dropout=0.1,
                       **UNET2D_VARIANTS[variant])


@pytest.mark.parametrize("variant", list(UNET2D_VARIANTS))
def test_unet2d_patch_matches_and_unpatch_restores(variant):
    model = unet2d(variant)
    resnets = [p for p, m in model.named_modules() if isinstance(m, ResnetBlock2D)]
    attentions = [p for p, m in model.named_modules() if isinstance(m, Attention)]
    if variant != "default":
        blocks = [model.get_submodule(p) for p in resnets]
        assert any(b.up for b in blocks) and any(b.down for b in blocks)
    x = (torch.randn(2, 3, 16, 16) + 0.3).requires_grad_()
    report = check_patch_roundtrip(model, (x, torch.tensor([3, 500])))
    norms = {f"{p}.group_norm" for p in attentions if model.get_submodule(p).group_norm is not None}
    expected = set(resnets) | set(attentions) | norms | {"conv_norm_out"}
    assert paths(report.replaced) == expected and not report.left_alone
    scale_shift = [e for e in report.replaced if "scale" in e.detail]
    assert len(scale_shift) == (len(resnets) if variant != "default" else 0)


def test_unet2d_patched_modules():
    model = unet2d("scale_shift+resnet_resample")
    patch(model)
    for module in model.modules():
        if isinstance(module, ResnetBlock2D):
            assert isinstance(module.__dict__["forward"], ResnetBlock2DForward)
            assert isinstance(module.norm1, GroupNormAct) and module.norm1.act
            assert isinstance(module.norm2, GroupNormAct) and module.norm2.act
            assert type(module.nonlinearity) is nn.SiLU  # still used for the time embedding
        if isinstance(module, Attention):
            assert isinstance(module.processor, FastdiffAttnProcessor)
            assert isinstance(module.processor.original, AttnProcessor2_0)
            if module.group_norm is not None:
                assert isinstance(module.group_norm, GroupNormAct) and not module.group_norm.act
    assert isinstance(model.conv_norm_out, GroupNormAct) and isinstance(model.conv_act, nn.Identity)


def test_unet2d_idempotent():
    model = unet2d("default").eval()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 500])
    first = patch(model)
    out = model(x, t).sample
    second = patch(model)
    assert not second.replaced and len(second.already_patched) == len(first.replaced)
    assert torch.equal(model(x, t).sample, out)
    unpatch(model)
    assert not any(isinstance(m, GroupNormAct) for m in model.modules())
    assert not any(isinstance(m, Attention) and isinstance(m.processor, FastdiffAttnProcessor)
                   for m in model.modules())


def test_unet2d_condition_self_and_cross_attention():
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8)
    x = (torch.randn(2, 4, 8, 8) + 0.3).requires_grad_()
    context = torch.randn(2, 5, 24).requires_grad_()
    report = check_patch_roundtrip(model, (x, torch.tensor([3, 500]), context))
    cross = [e for e in report.replaced if e.detail.startswith("cross-attention")]
    self_attn = [e for e in report.replaced if e.detail.startswith("self-attention")]
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(cross) == len(self_attn) == len(attentions) // 2 > 0
    # Transformer2DModel's input GroupNorm has no SiLU after it: reported, untouched.
    transformers = {p for p, m in model.named_modules() if type(m).__name__ == "Transformer2DModel"}
    assert paths(report.left_alone) == {f"{p}.norm" for p in transformers} != set()
    assert all("standalone GroupNorm" in e.detail for e in report.left_alone)


def test_attention_mask_falls_back_and_module_scale_is_kept():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16, scale_qk=False, processor=AttnProcessor())
    holder = nn.ModuleDict({"attn": attn})
    x = torch.randn(2, 7, 32) + 0.2
    mask = torch.zeros(2, 1, 7)
    mask[:, :, -2:] = -1e4
    ref, ref_masked = attn(x), attn(x, attention_mask=mask)
    report = patch(holder)
    assert paths(report.replaced) == {"attn"}
    assert isinstance(attn.processor, FastdiffAttnProcessor)
    got = attn(x)  # attn.scale = 1 here (scale_qk=False), which AttnProcessor honours
    assert_runs_match([got], [ref], ["output"])
    assert torch.equal(attn(x, attention_mask=mask), ref_masked)


def test_unsupported_modules_are_left_alone_and_reported():
    class CustomNorm(nn.GroupNorm):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    model = nn.ModuleDict({
        "mish_block": ResnetBlock2D(in_channels=16, temb_channels=8, groups=4, non_linearity="mish"),
        "wide_attention": Attention(query_dim=256, heads=1, dim_head=256),
        "no_affine": nn.Sequential(nn.GroupNorm(4, 16, affine=False), nn.SiLU()),
        "custom": nn.Sequential(CustomNorm(4, 16), nn.SiLU()),
        "fused_pair": nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU(), nn.Conv2d(16, 16, 1)),
    })
    modules, _ = module_snapshot(model)
    report = patch(model)
    reasons = {e.path: e.detail for e in report.left_alone}
    assert "nonlinearity Mish is not nn.SiLU" in reasons["mish_block"]
    assert "head dim 256 > 128" in reasons["wide_attention"]
    assert "affine" in reasons["no_affine.0"]
    assert "CustomNorm overrides GroupNorm.forward" in reasons["custom.0"]
    assert paths(report.replaced) == {"fused_pair.0"}
    after, _ = module_snapshot(model)
    assert all(after[p] is m for p, m in modules.items() if not p.startswith("fused_pair"))
    assert "forward" not in model["mish_block"].__dict__
    assert type(model["wide_attention"].processor) is AttnProcessor2_0
    assert "left alone" in str(report)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        patch("model")
    with pytest.raises(ValueError, match="unknown kernels"):
        patch(nn.Linear(2, 2), kernels=("group_norm_silu", "softmax"))
    with pytest.raises(ValueError, match="unknown kernels"):
        patch(nn.Linear(2, 2), kernels=())
    with pytest.raises(TypeError, match="nn.Module"):
        unpatch(None)
    assert unpatch(nn.Linear(2, 2)) == 0
