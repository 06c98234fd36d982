"""Offline evaluation of a checkpoint: ``python -m fastdiff.evaluate --model_path CKPT``.

val_loss: the training objective at 8 fixed timesteps with fixed noise (comparable across
runs); digits_classifier + digits_metrics: class consistency, Fréchet distance and KID of
digits samples in a small classifier's feature space; fid: real FID with a local Inception
weights file; feature_stats: the Fréchet distance and KID formulas.
"""
from .feature_stats import frechet_distance, kernel_inception_distance
from .val_loss import fixed_timesteps, validation_loss

__all__ = ["fixed_timesteps", "frechet_distance", "kernel_inception_distance",
           "validation_loss"]
