"""guided-diffusion's super-resolution UNet (``SuperResModel``) and its factory.

A :class:`UNetModel` with twice the input channels: the low-resolution image, upsampled
bilinearly to the output size, is concatenated to the noisy image (GD's
``guided_diffusion/unet.py`` and ``script_util.sr_create_model``). Parameter names are the
UNet's, so GD super-res checkpoints load with ``strict=True`` both ways.
"""
import torch
import torch.nn.functional as F

from .unet import NUM_CLASSES, UNetModel, _attention_downsample_rates, _parse_channel_mult

# GD's sr_create_model defaults (note 512: not the image UNet's (0.5, 1, ...)).
SR_DEFAULT_CHANNEL_MULT = {
    64: (1, 2, 3, 4),
    256: (1, 1, 2, 2, 4, 4),
    512: (1, 1, 2, 2, 4, 4),
}


class SuperResModel(UNetModel):
    """``forward(x, timesteps, low_res, y=None)``: ``x`` [N, C, H, W] noisy high-resolution
    images, ``low_res`` [N, C, h, w] the images to upsample (any h, w)."""

    def __init__(self, image_size, in_channels, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def forward(self, x, timesteps, low_res=None, **kwargs):
        if low_res is None:
            raise ValueError("SuperResModel needs low_res (the low-resolution images)")
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return super().forward(torch.cat([x, upsampled], dim=1), timesteps, **kwargs)


def _sr_channel_mult(channel_mult, large_size):
    if channel_mult in ("", None, ()):
        if large_size not in SR_DEFAULT_CHANNEL_MULT:
            sizes = ", ".join(str(s) for s in SR_DEFAULT_CHANNEL_MULT)
            raise ValueError(f"unsupported large_size {large_size}: a default channel_mult exists "
                             f"for {sizes}; pass channel_mult for other sizes")
        return SR_DEFAULT_CHANNEL_MULT[large_size]
    return _parse_channel_mult(channel_mult, large_size)


def sr_create_model(large_size, small_size, num_channels, num_res_blocks, learn_sigma, class_cond,
                    use_checkpoint, attention_resolutions, num_heads, num_head_channels,
                    num_heads_upsample, use_scale_shift_norm, dropout, resblock_updown, use_fp16,
                    channel_mult="", class_dropout_prob=0.0, norm_backend="torch",
                    attention_backend="math"):
    """GD's ``sr_create_model``. fastdiff's optional keywords: ``channel_mult`` ("" = GD's
    default for ``large_size``: 64, 256, 512), ``class_dropout_prob`` (> 0: the null-class row
    of classifier-free guidance) and the kernel backends."""
    if small_size >= large_size:
        raise ValueError(f"small_size ({small_size}) must be below large_size ({large_size})")
    return SuperResModel(
        image_size=large_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_downsample_rates(attention_resolutions, large_size),
        dropout=dropout,
        channel_mult=_sr_channel_mult(channel_mult, large_size),
        num_classes=NUM_CLASSES if class_cond else None,
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        norm_backend=norm_backend,
        attention_backend=attention_backend,
        null_class=class_cond and class_dropout_prob > 0,
    )
