"""fastdiff: guided-diffusion's trainer, numerically the same, with fused kernels.

GD code ports by changing an import::

    from fastdiff import model_and_diffusion_defaults, create_model_and_diffusion

(likewise GD's classifier and super-resolution factories), and fastdiff's kernels go into
other models (guided-diffusion, diffusers) with
``fastdiff.patch(model)`` / ``fastdiff.unpatch(model)``.
"""
from fastdiff.config import (classifier_and_diffusion_defaults, create_classifier_and_diffusion,
                             create_model_and_diffusion, model_and_diffusion_defaults,
                             sr_create_model_and_diffusion, sr_model_and_diffusion_defaults)
from fastdiff.patch import patch, unpatch

__version__ = "0.1.0"
__all__ = ["classifier_and_diffusion_defaults", "create_classifier_and_diffusion",
           "create_model_and_diffusion", "model_and_diffusion_defaults", "patch",
           "sr_create_model_and_diffusion", "sr_model_and_diffusion_defaults", "unpatch"]
