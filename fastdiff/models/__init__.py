"""The guided-diffusion UNet (GD module tree and state_dict keys) with kernel backends."""
from .layers import (
    ATTENTION_BACKENDS,
    NORM_BACKENDS,
    AttentionBlock,
    GroupNorm32,
    GroupNormAct,
    MultiHeadQKVAttention,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    fuse_norm_act,
    resolve_attention_backend,
    timestep_embedding,
)
from .unet import NUM_CLASSES, UNetModel, create_model

__all__ = [
    "ATTENTION_BACKENDS",
    "NORM_BACKENDS",
    "NUM_CLASSES",
    "AttentionBlock",
    "GroupNorm32",
    "GroupNormAct",
    "MultiHeadQKVAttention",
    "QKVAttention",
    "QKVAttentionLegacy",
    "ResBlock",
    "UNetModel",
    "create_model",
    "fuse_norm_act",
    "resolve_attention_backend",
    "timestep_embedding",
]
