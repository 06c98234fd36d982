"""guided-diffusion's UNetModel and its ``create_model`` factory, with kernel backends.

The module tree, parameter names and shapes, initialisation and arithmetic are GD's
(``guided_diffusion/unet.py`` and ``script_util.create_model``), so checkpoints move
between the two with ``strict=True`` and fp32 outputs agree to rounding.
"""
import torch
import torch.nn as nn

from .layers import (
    ATTENTION_BACKENDS,
    NORM_BACKENDS,
    AttentionBlock,
    Downsample,
    MultiHeadQKVAttention,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    _check_backend,
    conv_nd,
    convert_module_to_f16,
    convert_module_to_f32,
    fuse_norm_act,
    normalization,
    timestep_embedding,
    zero_module,
)

NUM_CLASSES = 1000

# Default channel multipliers per image size (GD's, plus 32 which GD rejects).
DEFAULT_CHANNEL_MULT = {
    32: (1, 2, 2, 2),
    64: (1, 2, 3, 4),
    128: (1, 1, 2, 3, 4),
    256: (1, 1, 2, 2, 4, 4),
    512: (0.5, 1, 1, 2, 2, 4, 4),
}


def encoder_blocks(dims, in_channels, model_channels, channel_mult, num_res_blocks,
                   attention_resolutions, res_block, attention_block, resblock_updown,
                   conv_resample):
    """GD's encoder half, shared by the UNet and the classifier (``input_blocks``).

    A 3×3 input conv, then per level ``num_res_blocks`` ResBlocks (each followed by an
    attention block where the downsample rate is in ``attention_resolutions``) and, between
    levels, a downsampling ResBlock or ``Downsample``. ``res_block(ch, out_ch, down=False)``
    and ``attention_block(ch)`` build the blocks. Returns (the ``nn.ModuleList``, the channel
    count after each of its blocks, the final downsample rate).
    """
    ch = int(channel_mult[0] * model_channels)
    blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
    widths = [ch]
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = [res_block(ch, int(mult * model_channels))]
            ch = int(mult * model_channels)
            if ds in attention_resolutions:
                layers.append(attention_block(ch))
            blocks.append(TimestepEmbedSequential(*layers))
            widths.append(ch)
        if level != len(channel_mult) - 1:
            down = (res_block(ch, ch, down=True) if resblock_updown
                    else Downsample(ch, conv_resample, dims=dims, out_channels=ch))
            blocks.append(TimestepEmbedSequential(down))
            widths.append(ch)
            ds *= 2
    return blocks, widths, ds


class UNetModel(nn.Module):
    """GD's UNet with timestep (and optional class) conditioning and attention.

    Arguments are GD's; ``attention_resolutions`` holds downsample rates (4 means
    attention at 4× downsampling). Two additions pick the kernels, fixed at construction:
    ``norm_backend`` ("torch" or "fused") and ``attention_backend`` ("math", "sdpa",
    "triton" or "xformers"); neither changes the parameters or state_dict keys.

    ``null_class`` (fastdiff's, for classifier-free guidance) adds one label-embedding row:
    label ``num_classes`` means "unconditional".

    ``use_checkpoint`` recomputes each block's activations in backward through
    ``torch.utils.checkpoint`` (non-reentrant, so it composes with torch.compile and FSDP2).
    ``use_fp16`` is accepted for GD compatibility; ``convert_to_fp16()`` casts the torso's
    convs to fp16 as GD does. ``self.dtype`` follows those conversions rather than the
    flag, so a model built with ``use_fp16=True`` but kept in fp32 (the trainer's autocast
    path) runs instead of failing on an fp16 input to fp32 convs.
    """

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True,
                 dims=2, num_classes=None, use_checkpoint=False, use_fp16=False, num_heads=1,
                 num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False,
                 resblock_updown=False, use_new_attention_order=False, norm_backend="torch",
                 attention_backend="math", null_class=False):
        super().__init__()
        _check_backend("norm", norm_backend, NORM_BACKENDS)
        _check_backend("attention", attention_backend, ATTENTION_BACKENDS)
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
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.dtype = torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.norm_backend = norm_backend
        self.attention_backend = attention_backend

        # Modules are created in GD's order so the same seed gives the same initial weights.
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        # Classifier-free guidance: one extra embedding row, label ``num_classes``, stands for
        # "no class" (fastdiff's; without it the state_dict is GD's).
        self.null_class = num_classes if (null_class and num_classes is not None) else None
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + (self.null_class is not None), time_embed_dim)

        def res_block(channels, out_channels=None, up=False, down=False):
            return ResBlock(channels, time_embed_dim, dropout, out_channels=out_channels, dims=dims,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm,
                            up=up, down=down, norm_backend=norm_backend)

        def attention_block(channels, heads):
            return AttentionBlock(channels, num_heads=heads, num_head_channels=num_head_channels,
                                  use_checkpoint=use_checkpoint,
                                  use_new_attention_order=use_new_attention_order,
                                  norm_backend=norm_backend, attention_backend=attention_backend)

        input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks, skip_channels, ds = encoder_blocks(
            dims, in_channels, model_channels, channel_mult, num_res_blocks,
            attention_resolutions, res_block, lambda ch: attention_block(ch, num_heads),
            resblock_updown, conv_resample)
        ch = skip_channels[-1]

        self.middle_block = TimestepEmbedSequential(
            res_block(ch),
            attention_block(ch, num_heads),
            res_block(ch),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attention_block(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res_block(ch, ch, up=True) if resblock_updown
                                  else Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )
        if norm_backend == "fused":
            fuse_norm_act(self.out, 0)

    def kernel_backends(self):
        """The kernels this model was built with, e.g. {"norm": "fused", "attention": "triton"}."""
        # What the attention blocks actually run: a head dim over the Triton kernel's limit
        # falls back to SDPA per block, and the log must say so, not repeat the request.
        used = sorted({m.backend for m in self.modules() if isinstance(m, MultiHeadQKVAttention)})
        return {"norm": self.norm_backend,
                "attention": ", ".join(used) if used else self.attention_backend}

    def _torso(self):
        return (self.input_blocks, self.middle_block, self.output_blocks)

    def convert_to_fp16(self):
        """Cast the torso's conv weights to fp16 (GD's fp16 mode; norms and embeddings stay fp32)."""
        for part in self._torso():
            part.apply(convert_module_to_f16)
        self.dtype = torch.float16

    def convert_to_fp32(self):
        """Undo :meth:`convert_to_fp16`."""
        for part in self._torso():
            part.apply(convert_module_to_f32)
        self.dtype = torch.float32

    def forward(self, x, timesteps, y=None):
        """Predict from noisy ``x`` [N, C, ...] at ``timesteps`` [N]; ``y`` [N] class labels
        if and only if the model is class-conditional. Returns [N, out_channels, ...]."""
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass y (class labels) if and only if the model is class-conditional "
                             f"(num_classes={self.num_classes})")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)

        skips = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


def _parse_channel_mult(channel_mult, image_size):
    if channel_mult in ("", None, ()):
        if image_size not in DEFAULT_CHANNEL_MULT:
            sizes = ", ".join(str(s) for s in DEFAULT_CHANNEL_MULT)
            raise ValueError(f"unsupported image_size {image_size}: default channel_mult exists for "
                             f"{sizes}; pass channel_mult for other sizes")
        return DEFAULT_CHANNEL_MULT[image_size]
    if isinstance(channel_mult, str):
        try:
            values = [float(part) for part in channel_mult.split(",")]
        except ValueError:
            raise ValueError(f"channel_mult must be comma-separated numbers, got {channel_mult!r}") from None
        # Integral multipliers stay ints (GD parses them with int()); 0.5 is allowed too.
        return tuple(int(v) if v.is_integer() else v for v in values)
    return tuple(channel_mult)


def _attention_downsample_rates(attention_resolutions, image_size):
    if isinstance(attention_resolutions, str):
        parts = [p for p in attention_resolutions.split(",") if p.strip()]
        try:
            resolutions = [int(p) for p in parts]
        except ValueError:
            raise ValueError("attention_resolutions must be comma-separated integers, got "
                             f"{attention_resolutions!r}") from None
    else:
        resolutions = [int(r) for r in attention_resolutions]
    return tuple(image_size // res for res in resolutions)


def create_model(image_size, num_channels, num_res_blocks, channel_mult="", learn_sigma=False,
                 class_cond=False, use_checkpoint=False, attention_resolutions="16", num_heads=1,
                 num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False,
                 dropout=0.0, resblock_updown=False, use_fp16=False, use_new_attention_order=False,
                 norm_backend="torch", attention_backend="math", class_dropout_prob=0.0):
    """Build a :class:`UNetModel` from GD's image-model flags (``script_util.create_model``).

    ``channel_mult`` "" picks the default for ``image_size`` (32, 64, 128, 256, 512);
    ``attention_resolutions`` are feature-map sizes ("16,8") turned into downsample rates;
    3 input channels, 6 outputs with ``learn_sigma`` (mean and variance) else 3, and
    1000 classes with ``class_cond``. ``class_dropout_prob`` > 0 (fastdiff's classifier-free
    guidance) adds the null-class row to a class-conditional model.
    """
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_downsample_rates(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=_parse_channel_mult(channel_mult, image_size),
        num_classes=NUM_CLASSES if class_cond else None,
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        norm_backend=norm_backend,
        attention_backend=attention_backend,
        null_class=class_cond and class_dropout_prob > 0,
    )
