"""UNet: GD's state_dict layout, initialisation, flags and kernel backends (CPU)."""
import importlib.util
import logging
import math
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiff.models import (
    GroupNorm32,
    GroupNormAct,
    QKVAttention,
    QKVAttentionLegacy,
    UNetModel,
    create_model,
    fuse_norm_act,
    timestep_embedding,
)
from fastdiff.models import layers
from fastdiff.models.unet import _parse_channel_mult

# 32×32, two levels, attention at 16×16 (downsample rate 2), every structural flag on.
TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="16", learn_sigma=True, class_cond=True,
            resblock_updown=True, use_scale_shift_norm=True, num_heads=2)


def _has_module(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False



def _randomize(model, seed=1):
    """Non-zero random weights, so zero-initialised convs cannot hide a wrong path.

    Scaled like a trained net (norm gains ≈ 1, weights ~ 1/√fan_in) so activations keep
    their size and fp32 gradients are not dominated by cancellation.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() > 1:
                param.copy_(noise / math.sqrt(param[0].numel()))
            elif "norm" in name or name.startswith("out.0") or "layers.0" in name:
                param.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            else:
                param.copy_(0.1 * noise + 0.02)
    return model


def _inputs(model, batch=2, seed=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.image_size, model.image_size, generator=gen) + 0.3
    t = torch.tensor([3, 871, 500, 17][:batch])
    y = torch.tensor([7, 999, 0, 5][:batch]) if model.num_classes else None
    return x, t, y


def _out_and_grads(model, x, t, y):
    model.zero_grad(set_to_none=True)
    out = model(x, t, y)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- layout

def _resblock_keys(prefix, cin, cout, emb, scale_shift):
    keys = {
        f"{prefix}.in_layers.0.weight": (cin,), f"{prefix}.in_layers.0.bias": (cin,),
        f"{prefix}.in_layers.2.weight": (cout, cin, 3, 3), f"{prefix}.in_layers.2.bias": (cout,),
        f"{prefix}.emb_layers.1.weight": ((2 if scale_shift else 1) * cout, emb),
        f"{prefix}.emb_layers.1.bias": ((2 if scale_shift else 1) * cout,),
        f"{prefix}.out_layers.0.weight": (cout,), f"{prefix}.out_layers.0.bias": (cout,),
        f"{prefix}.out_layers.3.weight": (cout, cout, 3, 3), f"{prefix}.out_layers.3.bias": (cout,),
    }
    if cin != cout:
        keys[f"{prefix}.skip_connection.weight"] = (cout, cin, 1, 1)
        keys[f"{prefix}.skip_connection.bias"] = (cout,)
    return keys


def _attention_keys(prefix, c):
    return {f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,),
            f"{prefix}.qkv.weight": (3 * c, c, 1), f"{prefix}.qkv.bias": (3 * c,),
            f"{prefix}.proj_out.weight": (c, c, 1), f"{prefix}.proj_out.bias": (c,)}


def _expected_tiny_keys():
    """GD's state_dict for TINY, spelled out block by block from GD's naming rules."""
    emb = 128
    keys = {"time_embed.0.weight": (emb, 32), "time_embed.0.bias": (emb,),
            "time_embed.2.weight": (emb, emb), "time_embed.2.bias": (emb,),
            "label_emb.weight": (1000, emb),
            "input_blocks.0.0.weight": (32, 3, 3, 3), "input_blocks.0.0.bias": (32,),
            "out.0.weight": (32,), "out.0.bias": (32,),
            "out.2.weight": (6, 32, 3, 3), "out.2.bias": (6,)}
    res = lambda p, i, o: keys.update(_resblock_keys(p, i, o, emb, True))  # noqa: E731
    res("input_blocks.1.0", 32, 32)
    res("input_blocks.2.0", 32, 32)  # resblock_updown downsample
    res("input_blocks.3.0", 32, 64)
    keys.update(_attention_keys("input_blocks.3.1", 64))
    res("middle_block.0", 64, 64)
    keys.update(_attention_keys("middle_block.1", 64))
    res("middle_block.2", 64, 64)
    res("output_blocks.0.0", 128, 64)
    keys.update(_attention_keys("output_blocks.0.1", 64))
    res("output_blocks.1.0", 96, 64)
    keys.update(_attention_keys("output_blocks.1.1", 64))
    res("output_blocks.1.2", 64, 64)  # resblock_updown upsample
    res("output_blocks.2.0", 96, 32)
    res("output_blocks.3.0", 64, 32)
    return keys


@pytest.mark.parametrize("norm_backend", ["torch", "fused"])
def test_state_dict_keys_and_shapes_are_gds(norm_backend):
    model = create_model(**TINY, norm_backend=norm_backend)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _expected_tiny_keys()


def test_torch_backend_keeps_gd_module_tree():
    model = create_model(**TINY)
    block = model.input_blocks[1][0]
    assert type(block.in_layers[0]) is GroupNorm32 and type(block.in_layers[1]) is nn.SiLU
    assert type(block.out_layers[0]) is GroupNorm32 and type(block.out_layers[1]) is nn.SiLU
    assert type(model.out[0]) is GroupNorm32 and type(model.out[1]) is nn.SiLU
    assert type(model.middle_block[1].norm) is GroupNorm32
    assert type(model.middle_block[1].attention) is QKVAttentionLegacy
    new_order = create_model(**TINY, use_new_attention_order=True)
    assert type(new_order.middle_block[1].attention) is QKVAttention
    assert not any(isinstance(m, GroupNormAct) for m in model.modules())


def test_fused_backend_swaps_norm_silu_pairs():
    model = create_model(**TINY, norm_backend="fused")
    block = model.output_blocks[1][2]
    for seq in (block.in_layers, block.out_layers, model.out):
        assert isinstance(seq[0], GroupNormAct) and seq[0].act
        assert type(seq[1]) is nn.Identity
    attn_norm = model.middle_block[1].norm
    assert isinstance(attn_norm, GroupNormAct) and not attn_norm.act
    assert not any(isinstance(m, GroupNorm32) for m in model.modules())
    # SiLUs not preceded by a norm (time embedding, ResBlock emb_layers) stay
    silus = {name for name, m in model.named_modules() if isinstance(m, nn.SiLU)}
    assert silus and all(name == "time_embed.1" or name.endswith("emb_layers.0") for name in silus)


def test_fuse_norm_act_shares_parameters():
    norm = GroupNorm32(4, 8, eps=1e-6)
    seq = nn.Sequential(norm, nn.SiLU(), nn.Linear(8, 8))
    fused = fuse_norm_act(seq, 0)
    assert seq[0] is fused and type(seq[1]) is nn.Identity
    assert fused.weight is norm.weight and fused.bias is norm.bias
    assert (fused.num_groups, fused.eps, fused.act) == (4, 1e-6, True)
    no_act = fuse_norm_act(nn.Sequential(GroupNorm32(4, 8), nn.Linear(8, 8)), 0)
    assert not no_act.act
    with pytest.raises(TypeError, match="GroupNorm"):
        fuse_norm_act(nn.Sequential(nn.Linear(8, 8)), 0)


def test_zero_initialised_convs_are_gds():
    model = create_model(**TINY)
    zeroed = {k for k, v in model.state_dict().items() if v.dim() > 1 and not v.any()}
    expected = {"out.2.weight"}
    expected |= {k for k in zeroed if k.endswith("out_layers.3.weight")}
    expected |= {k for k in zeroed if k.endswith("proj_out.weight")}
    assert zeroed == expected
    n_res = sum(isinstance(m, layers.ResBlock) for m in model.modules())
    n_attn = sum(isinstance(m, layers.AttentionBlock) for m in model.modules())
    assert len(expected) == 1 + n_res + n_attn
    for key in expected:
        assert not model.state_dict()[key.replace("weight", "bias")].any()


# ----------------------------------------------------------------------------- forward

def test_output_shape_learn_sigma_class_cond():
    model = create_model(**TINY)
    x, t, y = _inputs(model)
    assert model(x, t, y).shape == (2, 6, 32, 32)
    plain = create_model(**{**TINY, "learn_sigma": False, "class_cond": False})
    assert plain(x, t).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)
    with pytest.raises(ValueError, match="class-conditional"):
        plain(x, t, y)
    with pytest.raises(ValueError, match="shape"):
        model(x, t, y[:1])


def test_checkpoint_on_off_identical():
    # dropout on: the recomputed forward must replay the same masks
    cfg = {**TINY, "dropout": 0.3}
    plain = _randomize(create_model(**cfg))
    ckpt = create_model(**cfg, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict(), strict=True)
    x, t, y = _inputs(plain)
    torch.manual_seed(5)  # same dropout masks; non-reentrant checkpoint replays the RNG
    out_a, grads_a = _out_and_grads(plain, x, t, y)
    torch.manual_seed(5)
    out_b, grads_b = _out_and_grads(ckpt, x, t, y)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0, msg=name)


def _assert_rel_close(got, want, rel, what=""):
    err = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    assert err <= rel * scale, f"{what}: max err {err:.3g} > {rel} * {scale:.3g}"


def _assert_grads_close(got, want, rel=1e-4):
    """Per-tensor relative error ≤ ``rel``, judged against at least 1e-3 of the largest
    gradient: with 32 channels in 32 groups a per-channel add before a GroupNorm is erased
    by its mean subtraction, so e.g. level-0 emb_layers gradients are pure rounding noise."""
    floor = 1e-3 * max(g.abs().max().item() for g in want.values())
    for name, grad in want.items():
        err = (got[name] - grad).abs().max().item()
        assert err <= rel * max(grad.abs().max().item(), floor), f"{name}: err {err:.3g}"


@pytest.mark.parametrize("legacy_order", [True, False])
@pytest.mark.parametrize("heads,head_dim,length", [(1, 16, 37), (3, 24, 50)])
def test_sdpa_matches_math_attention(legacy_order, heads, head_dim, length):
    qkv = (torch.randn(2, 3 * heads * head_dim, length, dtype=torch.float64) * 2 + 0.5).float()
    qkv.requires_grad_(True)
    grad_out = torch.randn(2, heads * head_dim, length)
    results = []
    for backend in ("math", "sdpa"):
        attn = layers.MultiHeadQKVAttention(heads, legacy_order, backend)
        out = attn(qkv)
        (grad,) = torch.autograd.grad(out, qkv, grad_out)
        results.append((out, grad))
    _assert_rel_close(results[1][0], results[0][0], 1e-5, "output")
    _assert_rel_close(results[1][1], results[0][1], 1e-5, "grad")


@pytest.mark.parametrize("legacy_order", [True, False])
def test_math_attention_matches_reference(legacy_order):
    """GD's einsum path against softmax(qᵀk/√C)v in float64 with an explicit head split."""
    heads, ch, length = 2, 8, 19
    qkv = torch.randn(3, 3 * heads * ch, length) + 0.2
    attn = QKVAttentionLegacy(heads) if legacy_order else QKVAttention(heads)
    ref_in = qkv.double()
    if legacy_order:  # [N, H, (q,k,v), C, T]
        q, k, v = ref_in.reshape(3, heads, 3, ch, length).unbind(2)
    else:  # [N, (q,k,v), H, C, T]
        q, k, v = ref_in.reshape(3, 3, heads, ch, length).unbind(1)
    weights = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(ch), dim=-1)  # [N, H, T, S]
    ref = (v @ weights.transpose(-1, -2)).reshape(3, heads * ch, length)
    torch.testing.assert_close(attn(qkv).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("new_order", [False, True])
def test_model_sdpa_matches_math(new_order):
    cfg = {**TINY, "use_new_attention_order": new_order, "num_head_channels": 32}
    math_model = _randomize(create_model(**cfg))
    sdpa_model = create_model(**cfg, attention_backend="sdpa")
    sdpa_model.load_state_dict(math_model.state_dict(), strict=True)
    x, t, y = _inputs(math_model)
    out_m, grads_m = _out_and_grads(math_model, x, t, y)
    out_s, grads_s = _out_and_grads(sdpa_model, x, t, y)
    _assert_rel_close(out_s, out_m, 1e-5, "output")
    _assert_grads_close(grads_s, grads_m)


def test_xformers_layout_with_stand_in(monkeypatch):
    """Our q/k/v/out layout for xformers ([N, T, H, C]), checked with a torch stand-in."""
    def memory_efficient_attention(q, k, v):
        assert q.shape == k.shape == v.shape and q.stride(-1) == 1
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    fake_ops = types.ModuleType("xformers.ops")
    fake_ops.memory_efficient_attention = memory_efficient_attention
    fake = types.ModuleType("xformers")
    fake.ops = fake_ops
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake_ops)
    qkv = torch.randn(2, 3 * 3 * 8, 21) + 0.1
    for legacy in (True, False):
        want = layers.MultiHeadQKVAttention(3, legacy, "math")(qkv)
        got = layers.MultiHeadQKVAttention(3, legacy, "xformers")(qkv)
        _assert_rel_close(got, want, 1e-5, f"legacy={legacy}")


@pytest.mark.skipif(_has_module("xformers"), reason="xformers is installed here")
def test_xformers_missing_fails_at_construction():
    with pytest.raises(ImportError, match="xformers"):
        create_model(**TINY, attention_backend="xformers")


def test_triton_falls_back_to_sdpa_for_wide_heads(monkeypatch, caplog):
    monkeypatch.setattr(layers, "_logged_triton_fallback", False)
    cfg = {**TINY, "num_channels": 160, "channel_mult": "1", "num_heads": 1,
           "attention_resolutions": "32"}
    with caplog.at_level(logging.INFO, logger="fastdiff"):
        model = create_model(**cfg, attention_backend="triton")
    attentions = [m for m in model.modules() if isinstance(m, layers.MultiHeadQKVAttention)]
    assert attentions and all(a.backend == "sdpa" for a in attentions)
    fallback_lines = [r for r in caplog.records if "head dim 160" in r.getMessage()]
    assert len(fallback_lines) == 1
    narrow = create_model(**TINY, attention_backend="triton")  # head dim 32 or 16
    assert all(m.backend == "triton" for m in narrow.modules()
               if isinstance(m, layers.MultiHeadQKVAttention))


@pytest.mark.parametrize("new_order", [False, True])
def test_model_triton_attention_matches_math(new_order):
    """The triton backend through fastdiff.ops.qkv_attention (its CPU path here)."""
    cfg = {**TINY, "use_new_attention_order": new_order}
    math_model = _randomize(create_model(**cfg))
    triton_model = create_model(**cfg, attention_backend="triton")
    triton_model.load_state_dict(math_model.state_dict(), strict=True)
    x, t, y = _inputs(math_model)
    out_m, grads_m = _out_and_grads(math_model, x, t, y)
    out_t, grads_t = _out_and_grads(triton_model, x, t, y)
    _assert_rel_close(out_t, out_m, 1e-5, "output")
    _assert_grads_close(grads_t, grads_m)


@pytest.mark.parametrize("scale_shift", [True, False])
def test_model_fused_norm_matches_torch(scale_shift):
    """GroupNormAct through fastdiff.ops.group_norm_silu (its CPU path here), FiLM included."""
    cfg = {**TINY, "use_scale_shift_norm": scale_shift}
    torch_model = _randomize(create_model(**cfg))
    fused_model = create_model(**cfg, norm_backend="fused")
    fused_model.load_state_dict(torch_model.state_dict(), strict=True)
    x, t, y = _inputs(torch_model)
    out_t, grads_t = _out_and_grads(torch_model, x, t, y)
    out_f, grads_f = _out_and_grads(fused_model, x, t, y)
    _assert_rel_close(out_f, out_t, 1e-5, "output")
    _assert_grads_close(grads_f, grads_t)


# ----------------------------------------------------------------------------- state, API

def test_state_dict_strict_round_trip_across_constructions_and_backends():
    source = _randomize(create_model(**TINY))
    for norm, attn in [("torch", "math"), ("fused", "sdpa"), ("torch", "sdpa")]:
        target = create_model(**TINY, norm_backend=norm, attention_backend=attn)
        target.load_state_dict(source.state_dict(), strict=True)
        back = create_model(**TINY)
        back.load_state_dict(target.state_dict(), strict=True)
        for key, value in source.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key
    other = create_model(**{**TINY, "num_channels": 64})
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(source.state_dict(), strict=True)


def test_same_seed_same_initial_weights():
    torch.manual_seed(3)
    a = create_model(**TINY)
    torch.manual_seed(3)
    b = create_model(**TINY, norm_backend="fused", attention_backend="sdpa")
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key


@pytest.mark.parametrize("dim", [32, 33, 7])
def test_timestep_embedding_closed_form(dim):
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    emb = timestep_embedding(t, dim)
    half = dim // 2
    assert emb.shape == (4, dim) and emb.dtype == torch.float32
    for i, ti in enumerate(t.tolist()):
        for j in range(half):
            arg = ti * math.exp(-math.log(10000) * j / half)
            # fp32 frequencies times t up to 999: argument error ≲ 1e-4
            assert abs(emb[i, j].item() - math.cos(arg)) < 2e-4
            assert abs(emb[i, half + j].item() - math.sin(arg)) < 2e-4
    if dim % 2:
        assert not emb[:, -1].any()


def test_create_model_semantics():
    defaults = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4),
                256: (1, 1, 2, 2, 4, 4), 512: (0.5, 1, 1, 2, 2, 4, 4)}
    for size, mult in defaults.items():
        assert _parse_channel_mult("", size) == mult
    assert _parse_channel_mult("0.5,1,2", 512) == (0.5, 1, 2)
    model = create_model(64, 32, 1, attention_resolutions="32,16,8")
    assert model.channel_mult == (1, 2, 3, 4)
    assert model.attention_resolutions == (2, 4, 8)
    assert model.out_channels == 3 and model.num_classes is None
    conditional = create_model(32, 32, 1, channel_mult="1,2", learn_sigma=True, class_cond=True)
    assert conditional.channel_mult == (1, 2)
    assert conditional.out_channels == 6 and conditional.label_emb.num_embeddings == 1000


@pytest.mark.parametrize("kwargs,match", [
    (dict(image_size=48), "unsupported image_size 48"),
    (dict(channel_mult="1,x"), "channel_mult"),
    (dict(attention_resolutions="16,a"), "attention_resolutions"),
    (dict(norm_backend="apex"), "norm backend 'apex'"),
    (dict(attention_backend="flash"), "attention backend 'flash'"),
    (dict(num_head_channels=24), "num_head_channels"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    cfg = {**TINY, **kwargs}
    if "image_size" in kwargs:
        cfg["channel_mult"] = ""
    with pytest.raises(ValueError, match=match):
        create_model(**cfg)


def test_kernel_backends():
    assert create_model(**TINY).kernel_backends() == {"norm": "torch", "attention": "math"}
    model = create_model(**TINY, norm_backend="fused", attention_backend="sdpa")
    assert model.kernel_backends() == {"norm": "fused", "attention": "sdpa"}


def test_kernel_backends_name_the_sdpa_fallback_of_wide_heads():
    # Heads wider than the Triton kernel's limit (128 channels) run SDPA: the startup log
    # reads kernel_backends(), so it must name what runs, not what was asked for.
    wide = dict(TINY, num_channels=160, attention_resolutions="32,16")
    all_wide = create_model(**{**wide, "num_heads": 1}, attention_backend="triton")
    assert all_wide.kernel_backends()["attention"] == "sdpa"      # head dims 160 and 320
    mixed = create_model(**{**wide, "num_heads": 2}, attention_backend="triton")
    assert mixed.kernel_backends()["attention"] == "sdpa, triton"  # head dims 80 and 160


def test_fp16_conversion_api():
    model = create_model(**TINY, use_fp16=True)
    assert model.dtype == torch.float32  # kept in fp32 until converted (autocast path)
    model.convert_to_fp16()
    assert model.dtype == torch.float16
    assert model.input_blocks[0][0].weight.dtype == torch.float16
    assert model.middle_block[1].qkv.weight.dtype == torch.float16
    assert model.middle_block[0].emb_layers[1].weight.dtype == torch.float32
    assert model.out[2].weight.dtype == torch.float32
    assert model.middle_block[1].norm.weight.dtype == torch.float32
    model.convert_to_fp32()
    assert model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert isinstance(model, UNetModel)
