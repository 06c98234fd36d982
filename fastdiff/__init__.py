"""fastdiff: guided-diffusion's trainer, numerically the same, with fused kernels.

GD code ports by changing an import::

    from fastdiff import model_and_diffusion_defaults, create_model_and_diffusion
"""
from fastdiff.config import create_model_and_diffusion, model_and_diffusion_defaults

__version__ = "0.1.0"
__all__ = ["create_model_and_diffusion", "model_and_diffusion_defaults"]
