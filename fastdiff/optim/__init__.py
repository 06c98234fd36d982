"""Optimizers: FusedAdamEMA, AdamW and parameter EMAs fused over a C++/CUDA op."""
from fastdiff.optim._ext import extension_available
from fastdiff.optim.fused_adam_ema import FusedAdamEMA, clip_factor_from_norm

__all__ = ["FusedAdamEMA", "clip_factor_from_norm", "extension_available"]
