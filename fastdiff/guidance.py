"""Classifier-free guidance (CFG) at sampling time: a wrapper that makes a class-conditional
model with a null-class row behave like a model whose output is the guided one.

A model trained with label dropout (``--class_dropout_prob p``; label ``model.null_class``
means "no label") predicts both ε(x, t, y) and the unconditional ε(x, t, ∅). Sampling with
scale s uses ``ε = ε_u + s·(ε_c − ε_u)`` (Ho & Salimans; GLIDE, DiT). The wrapper is a plain
callable like the respaced diffusion's ``_WrappedModel``: that wrapper maps the timesteps and
then calls this one, and the model inside may be compiled or FSDP-sharded (only called here).
"""
import math

import torch


class GuidanceError(ValueError):
    """Guidance asked of a model that cannot give it (no labels or no null-class row)."""


def _innermost(model):
    """The model inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers; an
    FSDP2-sharded model keeps its class and attributes, so it is its own innermost."""
    for _ in range(4):  # a compiled DDP model is two wrappers deep
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            return model
        model = inner
    return model


def find_null_class(model):
    """``model``'s null label; None when it has no null-class row or is not
    class-conditional."""
    return getattr(_innermost(model), "null_class", None)


def require_null_class(model):
    """The null label of ``model``, or one clear GuidanceError saying why there is none."""
    null_class = find_null_class(model)
    if null_class is not None:
        return null_class
    if getattr(_innermost(model), "num_classes", None) is None:
        raise GuidanceError("classifier-free guidance (guidance scale != 1) needs a "
                            "class-conditional model (class_cond True)")
    raise GuidanceError("classifier-free guidance (guidance scale != 1) needs a model trained "
                        "with --class_dropout_prob > 0: this one's label embedding has no "
                        "null-class row")


def guided_output(cond, uncond, scale, channels):
    """``uncond + scale·(cond − uncond)`` over the first ``channels`` output channels; with
    a learned variance (2·channels outputs) the variance half is the conditional one, as in
    GLIDE and DiT (guiding the variance has no meaning: it is not a score)."""
    if cond.shape[1] == 2 * channels:
        cond_mean, cond_var = torch.split(cond, channels, dim=1)
        uncond_mean = uncond[:, :channels]
        return torch.cat([uncond_mean + scale * (cond_mean - uncond_mean), cond_var], dim=1)
    return uncond + scale * (cond - uncond)


class ClassifierFreeGuidance:
    """``model`` (class-conditional, with the null-class row) guided with scale ``scale``.

    Called as the model is, ``(x, t, y=labels, **kwargs)``. For s ≠ 1 it makes ONE forward
    of a doubled batch: conditional half (labels ``y``) then unconditional half (the null
    label), x, t and every per-example keyword (e.g. a super-resolution ``low_res``)
    repeated, and combines the halves with :func:`guided_output`. s = 1 calls the model once
    with exactly the caller's inputs, so it is bitwise plain conditional sampling.

    The combination applies to whatever the model predicts: ε by default, x_0 for a
    ``predict_xstart`` model (x_0 is affine in ε for fixed x_t, so guiding x_0 with s is the
    same as guiding ε with s up to rounding), x_{t-1}'s mean for a ``previous_x`` model.
    """

    def __init__(self, model, scale):
        if not math.isfinite(scale):
            raise GuidanceError(f"the guidance scale must be a finite number, got {scale}")
        self.model = model
        self.scale = float(scale)
        self.null_class = require_null_class(model)

    def __call__(self, x, t, y=None, **kwargs):
        if y is None:
            raise GuidanceError("classifier-free guidance needs the class labels y")
        if self.scale == 1.0:
            return self.model(x, t, y=y, **kwargs)
        n = x.shape[0]
        null = torch.full_like(y, self.null_class)
        doubled = {k: _doubled(v, n) for k, v in kwargs.items()}
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]), **doubled)
        return guided_output(out[:n], out[n:], self.scale, x.shape[1])


def _doubled(value, n):
    """A per-example tensor (leading dimension ``n``) repeated for both halves; anything
    else (a scalar, a shared tensor) passed as it is."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n:
        return torch.cat([value, value])
    return value


def parse_guidance_scales(text):
    """``"1,2,4"`` → [1.0, 2.0, 4.0]: finite, distinct, at least one (a ValueError otherwise)."""
    try:
        scales = [float(part) for part in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--guidance_scale must be a comma-separated list of numbers, "
                         f"got {text!r}") from None
    if not all(math.isfinite(s) for s in scales):
        raise ValueError(f"--guidance_scale values must be finite, got {text!r}")
    if len(set(scales)) != len(scales):
        raise ValueError(f"--guidance_scale lists a scale twice: {text!r}")
    return scales
