"""guided-diffusion's noisy-image classifier (``EncoderUNetModel``) with kernel backends.

The encoder half of the UNet (time embedding, input blocks, middle block) and one of GD's
four heads (``pool``): "adaptive" (norm-SiLU, global average, 1×1 conv), "attention"
(norm-SiLU, CLIP-style attention pooling), "spatial" and "spatial_v2" (MLPs over the
per-block spatial means). Module tree, parameter names, initialisation order and
arithmetic are GD's (``guided_diffusion/unet.py``, ``script_util.create_classifier``), so
GD classifier checkpoints load with ``strict=True`` both ways. The kernels are chosen as
for the UNet (``norm_backend``, ``attention_backend``); neither changes the state_dict.
"""
import torch
import torch.nn as nn

from .layers import (
    ATTENTION_BACKENDS,
    NORM_BACKENDS,
    AttentionBlock,
    QKVAttention,
    ResBlock,
    TimestepEmbedSequential,
    _check_backend,
    conv_nd,
    convert_module_to_f16,
    convert_module_to_f32,
    fuse_norm_act,
    normalization,
    resolve_attention_backend,
    timestep_embedding,
    zero_module,
)
from .unet import NUM_CLASSES, _attention_downsample_rates, _parse_channel_mult, encoder_blocks

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")

# GD's classifier hard-codes 64 channels per attention head (create_classifier).
CLASSIFIER_HEAD_CHANNELS = 64


class AttentionPool2d(nn.Module):
    """Attention pooling (CLIP's): the spatial mean, prepended as an extra token, attends to
    every position; its output token, projected, is the result [N, output_dim]."""

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None,
                 attention_backend="math"):
        super().__init__()
        # GD's parameter name and initialisation (randn / sqrt(embed_dim)).
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spacial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        backend = resolve_attention_backend(attention_backend, num_heads_channels)
        self.attention = QKVAttention(self.num_heads, backend=backend)

    def forward(self, x):
        batch, channels = x.shape[:2]
        x = x.reshape(batch, channels, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]


class EncoderUNetModel(nn.Module):
    """GD's half UNet: x [N, C, H, W] and timesteps [N] → logits [N, out_channels].

    Arguments are GD's (``attention_resolutions`` are downsample rates); ``norm_backend``
    and ``attention_backend`` pick the kernels as in :class:`fastdiff.models.UNetModel`.
    ``use_fp16`` is accepted for GD compatibility; ``convert_to_fp16()`` casts the torso
    as GD does, and ``self.dtype`` follows the conversion (the trainer uses autocast).
    """

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True,
                 dims=2, use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False, pool="adaptive", norm_backend="torch",
                 attention_backend="math"):
        super().__init__()
        _check_backend("norm", norm_backend, NORM_BACKENDS)
        _check_backend("attention", attention_backend, ATTENTION_BACKENDS)
        if pool not in POOLS:
            raise ValueError(f"classifier_pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if pool == "attention" and num_head_channels == -1:
            raise ValueError("attention pooling needs num_head_channels")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.dtype = torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.norm_backend = norm_backend
        self.attention_backend = attention_backend
        self.pool = pool

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )

        def res_block(channels, out_channels=None, down=False):
            return ResBlock(channels, time_embed_dim, dropout, out_channels=out_channels, dims=dims,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm,
                            down=down, norm_backend=norm_backend)

        def attention_block(channels):
            return AttentionBlock(channels, num_heads=num_heads, num_head_channels=num_head_channels,
                                  use_checkpoint=use_checkpoint,
                                  use_new_attention_order=use_new_attention_order,
                                  norm_backend=norm_backend, attention_backend=attention_backend)

        self.input_blocks, widths, ds = encoder_blocks(
            dims, in_channels, model_channels, channel_mult, num_res_blocks,
            attention_resolutions, res_block, attention_block, resblock_updown, conv_resample)
        ch = widths[-1]

        self.middle_block = TimestepEmbedSequential(
            res_block(ch),
            attention_block(ch),
            res_block(ch),
        )
        # The spatial heads read the mean of every block's output: their widths add up.
        feature_size = sum(widths) + ch
        self._feature_size = feature_size

        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels,
                                attention_backend=attention_backend),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(feature_size, 2048),
                nn.ReLU(),
                nn.Linear(2048, out_channels),
            )
        else:  # spatial_v2
            self.out = nn.Sequential(
                nn.Linear(feature_size, 2048),
                normalization(2048),
                nn.SiLU(),
                nn.Linear(2048, out_channels),
            )
        if norm_backend == "fused":
            index = 1 if pool == "spatial_v2" else 0
            if pool != "spatial":
                fuse_norm_act(self.out, index)

    def kernel_backends(self):
        """The kernels this classifier was built with (as UNetModel.kernel_backends)."""
        from .layers import MultiHeadQKVAttention
        used = sorted({m.backend for m in self.modules() if isinstance(m, MultiHeadQKVAttention)})
        return {"norm": self.norm_backend,
                "attention": ", ".join(used) if used else self.attention_backend}

    def _torso(self):
        return (self.input_blocks, self.middle_block)

    def convert_to_fp16(self):
        """Cast the torso's conv weights to fp16 (GD's fp16 mode)."""
        for part in self._torso():
            part.apply(convert_module_to_f16)
        self.dtype = torch.float16

    def convert_to_fp32(self):
        """Undo :meth:`convert_to_fp16`."""
        for part in self._torso():
            part.apply(convert_module_to_f32)
        self.dtype = torch.float32

    def forward(self, x, timesteps):
        """Logits [N, out_channels] for noisy ``x`` [N, C, H, W] at ``timesteps`` [N]."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        spatial_head = self.pool.startswith("spatial")
        means = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial_head:
                means.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial_head:
            means.append(h.type(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        return self.out(h.type(x.dtype))


def create_classifier(image_size, classifier_use_fp16, classifier_width, classifier_depth,
                      classifier_attention_resolutions, classifier_use_scale_shift_norm,
                      classifier_resblock_updown, classifier_pool, classifier_channel_mult="",
                      norm_backend="torch", attention_backend="math"):
    """GD's ``create_classifier``: an :class:`EncoderUNetModel` with 1000 outputs and 64
    channels per attention head.

    ``classifier_channel_mult`` (fastdiff's; "" = GD's default for ``image_size``: 64, 128,
    256, 512, and 32) lets other sizes run, e.g. "1,2" for the 16×16 digits.
    """
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=classifier_width,
        out_channels=NUM_CLASSES,
        num_res_blocks=classifier_depth,
        attention_resolutions=_attention_downsample_rates(classifier_attention_resolutions,
                                                          image_size),
        channel_mult=_parse_channel_mult(classifier_channel_mult, image_size),
        use_fp16=classifier_use_fp16,
        num_head_channels=CLASSIFIER_HEAD_CHANNELS,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
        norm_backend=norm_backend,
        attention_backend=attention_backend,
    )
