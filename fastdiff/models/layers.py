"""UNet building blocks with guided-diffusion's module tree and parameter names.

Every module here keeps the attribute names and ``nn.Sequential`` positions of
guided-diffusion's ``unet.py``/``nn.py`` (GD below), so state_dicts load both ways with
``strict=True``. Two kernel choices are fixed at construction:

* ``norm_backend``: ``"torch"`` keeps GD's ``GroupNorm32`` + ``nn.SiLU`` pairs;
  ``"fused"`` turns each pair into one :class:`GroupNormAct` (the fastdiff
  ``group_norm_silu`` op) and the SiLU slot into ``nn.Identity``.
* ``attention_backend``: ``"math"`` (GD's einsum), ``"sdpa"``, ``"triton"`` (the fastdiff
  ``qkv_attention`` op) or ``"xformers"``.
"""
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Largest head dim the Triton attention kernel handles; wider heads go to SDPA.
from fastdiff.kernels.inputs import MAX_HEAD_DIM as TRITON_MAX_HEAD_DIM

NORM_BACKENDS = ("torch", "fused")
ATTENTION_BACKENDS = ("math", "sdpa", "triton", "xformers")
NORM_GROUPS = 32

logger = logging.getLogger("fastdiff")


# ---------------------------------------------------------------------------------------
# Small helpers (GD's nn.py)
# ---------------------------------------------------------------------------------------

def conv_nd(dims, *args, **kwargs):
    """An ``nn.Conv{1,2,3}d`` chosen by ``dims``."""
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """An ``nn.AvgPool{1,2,3}d`` chosen by ``dims``."""
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](*args, **kwargs)


def zero_module(module):
    """Zero every parameter of ``module`` in place and return it."""
    for param in module.parameters():
        param.detach().zero_()
    return module


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps, shape [N, dim].

    The first half holds ``cos(t·f_j)``, the second ``sin(t·f_j)`` with
    ``f_j = max_period^(-j/half)``, ``half = dim // 2``; an odd ``dim`` gets a zero last
    column. Computed in fp32 with GD's exact operation order so outputs match bitwise.
    """
    half = dim // 2
    exponents = torch.arange(start=0, end=half, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(max_period) * exponents).to(device=timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def convert_module_to_f16(module):
    """Cast a conv module's weight and bias to fp16 (GD's fp16 torso; other modules stay fp32)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module):
    """Undo :func:`convert_module_to_f16`."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()


def _check_backend(kind, name, allowed):
    if name not in allowed:
        raise ValueError(f"unknown {kind} backend {name!r}; choose one of {', '.join(allowed)}")


# ---------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------

class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back to the input dtype (GD's class)."""

    def forward(self, x):
        # The affine parameters are upcast too: under FSDP2's MixedPrecisionPolicy they
        # arrive in bf16/fp16 (GD keeps norms in fp32; for fp32 weights this is a no-op).
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels):
    """GD's standard norm layer: 32-group :class:`GroupNorm32`."""
    return GroupNorm32(NORM_GROUPS, channels)


class GroupNormAct(nn.Module):
    """GroupNorm, optional FiLM scale/shift and optional SiLU as one fused op.

    ``y = act((GN(x)·weight + bias)·(1 + scale) + shift)`` with ``scale``/``shift`` per
    (sample, channel), shaped [N, C] or [N, C, 1, ...]. Statistics are fp32; the output
    has ``x``'s dtype. Parameters are named ``weight``/``bias`` like ``nn.GroupNorm``, so
    swapping it in leaves state_dict keys unchanged.
    """

    def __init__(self, num_channels, act=True, num_groups=NORM_GROUPS, eps=1e-5):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_channels {num_channels} is not divisible by num_groups {num_groups}")
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = eps
        self.act = act
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    @classmethod
    def from_group_norm(cls, norm, act):
        """A GroupNormAct that shares ``norm``'s parameter objects (optimizers keep them)."""
        if not isinstance(norm, nn.GroupNorm) or not norm.affine:
            raise TypeError(f"expected an affine nn.GroupNorm, got {type(norm).__name__}")
        fused = cls(norm.num_channels, act=act, num_groups=norm.num_groups, eps=norm.eps)
        fused.weight = norm.weight
        fused.bias = norm.bias
        return fused

    def forward(self, x, scale=None, shift=None):
        # Imported from the op's own file: the lazy name on fastdiff.ops can be shadowed by
        # the submodule of the same name once that is imported.
        from fastdiff.ops.group_norm_silu import group_norm_silu

        return group_norm_silu(x, self.weight, self.bias, self.num_groups, eps=self.eps,
                               scale=scale, shift=shift, act=self.act)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, act={self.act}"


def fuse_norm_act(seq, index=0):
    """Swap the GroupNorm at ``seq[index]`` for a :class:`GroupNormAct`, in place.

    When ``seq[index + 1]`` is an ``nn.SiLU`` it is folded into the fused op and replaced by
    ``nn.Identity``, so Sequential positions (and state_dict keys) stay the same. Returns
    the new module.
    """
    follows_silu = index + 1 < len(seq) and isinstance(seq[index + 1], nn.SiLU)
    seq[index] = GroupNormAct.from_group_norm(seq[index], act=follows_silu)
    if follows_silu:
        seq[index + 1] = nn.Identity()
    return seq[index]


# ---------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------

def _xformers_ops():
    try:
        import xformers.ops
    except ImportError as err:
        raise ImportError(f"attention_backend='xformers' needs xformers, which does not import "
                          f"here ({err}); use 'sdpa' or 'triton'") from err
    return xformers.ops


_logged_triton_fallback = False


def resolve_attention_backend(backend, head_dim):
    """The backend that will run attention with ``head_dim`` channels per head.

    The Triton kernel handles head dims up to ``TRITON_MAX_HEAD_DIM``; wider heads use
    SDPA, logged once per process.
    """
    global _logged_triton_fallback
    _check_backend("attention", backend, ATTENTION_BACKENDS)
    if backend != "triton" or head_dim <= TRITON_MAX_HEAD_DIM:
        return backend
    if not _logged_triton_fallback:
        logger.info("triton attention handles head dims up to %d; head dim %d uses sdpa",
                    TRITON_MAX_HEAD_DIM, head_dim)
        _logged_triton_fallback = True
    return "sdpa"


class MultiHeadQKVAttention(nn.Module):
    """Multi-head self-attention over a packed [N, 3·H·C, T] qkv tensor → [N, H·C, T].

    ``legacy_order=True`` reads qkv as heads-then-(q,k,v) (GD's QKVAttentionLegacy),
    ``False`` as (q,k,v)-then-heads (GD's QKVAttention). ``backend`` picks the kernel:
    ``math`` is GD's einsum (q and k each scaled by C^-1/4, softmax in fp32), ``sdpa``
    PyTorch's fused attention, ``triton`` the fastdiff op, ``xformers`` its
    memory-efficient attention. All compute softmax(qᵀk/√C)·v.
    """

    def __init__(self, n_heads, legacy_order, backend="math"):
        super().__init__()
        _check_backend("attention", backend, ATTENTION_BACKENDS)
        if backend == "xformers":
            _xformers_ops()  # fail when the model is built, not at the first step
        self.n_heads = n_heads
        self.legacy_order = legacy_order
        self.backend = backend

    def forward(self, qkv):
        batch, width, length = qkv.shape
        if width % (3 * self.n_heads):
            raise ValueError(f"qkv width {width} is not divisible by 3 * n_heads ({self.n_heads})")
        head_dim = width // (3 * self.n_heads)
        if self.backend == "math":
            return self._math(qkv)
        if self.backend == "triton":
            from fastdiff.ops.attention import qkv_attention

            return qkv_attention(qkv, self.n_heads, self.legacy_order)
        if self.backend == "sdpa":
            return self._sdpa(qkv, head_dim)
        return self._xformers(qkv, head_dim)

    def _math(self, qkv):
        # GD's einsum, op for op (bitwise GD in fp32); the qkv op's CPU forward runs it too.
        from fastdiff.ops.attention import gd_qkv_attention

        return gd_qkv_attention(qkv, self.n_heads, self.legacy_order)

    def _qkv_heads_last(self, qkv, head_dim, layout):
        """q, k, v with head channels last (stride 1), as fused kernels require.

        ``layout="bhtc"`` gives [N, H, T, C] (SDPA), ``"bthc"`` [N, T, H, C] (xformers).
        One copy of qkv moves channels last; q, k, v are views of it.
        """
        batch, _, length = qkv.shape
        heads = self.n_heads
        if self.legacy_order:
            packed = qkv.reshape(batch, heads, 3, head_dim, length)
            dims = (0, 1, 4, 2, 3) if layout == "bhtc" else (0, 4, 1, 2, 3)
            return packed.permute(*dims).contiguous().unbind(-2)
        packed = qkv.reshape(batch, 3, heads, head_dim, length)
        dims = (0, 1, 2, 4, 3) if layout == "bhtc" else (0, 1, 4, 2, 3)
        return packed.permute(*dims).contiguous().unbind(1)

    def _sdpa(self, qkv, head_dim):
        batch, _, length = qkv.shape
        q, k, v = self._qkv_heads_last(qkv, head_dim, "bhtc")
        out = F.scaled_dot_product_attention(q, k, v)  # [N, H, T, C]
        return out.transpose(-1, -2).reshape(batch, -1, length)

    def _xformers(self, qkv, head_dim):
        batch, _, length = qkv.shape
        q, k, v = self._qkv_heads_last(qkv, head_dim, "bthc")
        out = _xformers_ops().memory_efficient_attention(q, k, v)  # [N, T, H, C]
        return out.permute(0, 2, 3, 1).reshape(batch, -1, length)


class QKVAttentionLegacy(MultiHeadQKVAttention):
    """GD's QKVAttentionLegacy: qkv split into heads first, then into q, k, v."""

    def __init__(self, n_heads, backend="math"):
        super().__init__(n_heads, legacy_order=True, backend=backend)


class QKVAttention(MultiHeadQKVAttention):
    """GD's QKVAttention: qkv split into q, k, v first, then into heads."""

    def __init__(self, n_heads, backend="math"):
        super().__init__(n_heads, legacy_order=False, backend=backend)


# ---------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------

class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x, emb):
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands ``emb`` to the children that are TimestepBlocks."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2× upsampling (inner two dims for 3-D), then an optional 3×3 conv."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2× downsampling by a strided 3×3 conv or average pooling (inner two dims for 3-D)."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample without a conv cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """GD's residual block: norm-SiLU-conv, timestep conditioning (added, or FiLM
    scale/shift with ``use_scale_shift_norm``), norm-SiLU-dropout-zero-conv, skip.

    ``up``/``down`` resample inside the block; ``use_conv`` makes a channel-changing skip a
    3×3 instead of a 1×1 conv.
    """

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False,
                 down=False, norm_backend="torch"):
        super().__init__()
        _check_backend("norm", norm_backend, NORM_BACKENDS)
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

        if norm_backend == "fused":
            fuse_norm_act(self.in_layers, 0)
            fuse_norm_act(self.out_layers, 0)

    def forward(self, x, emb):
        if self.use_checkpoint:
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x, emb):
        if self.updown:
            # Resample between the norm/activation and the conv, as GD does.
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)  # [N, C] or [N, 2C]
        spatial = (None,) * (h.dim() - 2)
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            if isinstance(out_norm, GroupNormAct):
                h = out_norm(h, scale=scale, shift=shift)
            else:
                h = out_norm(h) * (1 + scale[(..., *spatial)]) + shift[(..., *spatial)]
            h = out_rest(h)
        else:
            h = self.out_layers(h + emb_out[(..., *spatial)])
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a residual connection.

    Heads: ``num_heads``, or ``channels // num_head_channels`` when that is given.
    """

    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False,
                 use_new_attention_order=False, norm_backend="torch", attention_backend="math"):
        super().__init__()
        _check_backend("norm", norm_backend, NORM_BACKENDS)
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} is not divisible by num_head_channels "
                                 f"{num_head_channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"channels {channels} is not divisible by num_heads {self.num_heads}")
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        backend = resolve_attention_backend(attention_backend, channels // self.num_heads)
        attention_cls = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = attention_cls(self.num_heads, backend=backend)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))
        if norm_backend == "fused":
            self.norm = GroupNormAct.from_group_norm(self.norm, act=False)

    def forward(self, x):
        # GD checkpoints every attention block whatever use_checkpoint says. The result is
        # identical either way; honouring the flag saves recomputing attention in backward
        # (~15% of a CPU step) when checkpointing is off.
        if self.use_checkpoint:
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x):
        batch, channels, *spatial = x.shape
        flat = x.reshape(batch, channels, -1)
        h = self.attention(self.qkv(self.norm(flat)))
        h = self.proj_out(h)
        # Add in the input's own shape: the same sums as GD's (x + h).reshape(...), but the
        # block returns a fresh tensor rather than a view (FSDP2's backward hook needs that).
        return x + h.reshape(batch, channels, *spatial)
