"""Respaced diffusion: sample or train on a subset of a base process's timesteps.

guided-diffusion's respace.py semantics: the kept steps get new betas that reproduce the base
process's alphas_cumprod exactly at those steps, and the model is wrapped so that it always sees
the *original* timestep indices (optionally rescaled to 0..1000).
"""
import numpy as np
import torch

from .gaussian import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)


def space_timesteps(num_timesteps, section_counts):
    """Choose which of `num_timesteps` base steps to keep.

    :param section_counts: "ddimN" (the DDIM paper's integer stride giving exactly N steps),
        or "a,b,c" / a list of ints: split the base steps into len(section_counts) equal
        sections and take section_counts[i] evenly spaced steps (rounded) from section i.
        "N" is the one-section case.
    :return: a set of base timestep indices.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = _parse_count(section_counts[len("ddim"):], section_counts)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"timestep_respacing {section_counts!r}: no integer stride gives exactly "
                f"{desired} steps out of {num_timesteps}"
            )
        section_counts = [_parse_count(part, section_counts) for part in section_counts.split(",")]
    counts = list(section_counts)
    if not counts or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1
                         for c in counts):
        raise ValueError(f"section counts must be positive integers, got {section_counts!r}")

    base_size, extra = divmod(num_timesteps, len(counts))
    start = 0
    kept = []
    for i, count in enumerate(counts):
        size = base_size + (1 if i < extra else 0)  # the first `extra` sections get one more
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the float stride and round (half to even), exactly as guided-diffusion,
        # so the same respacing string selects the same steps.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


def _parse_count(text, whole):
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"timestep_respacing {whole!r}: expected 'N', 'a,b,c' or 'ddimN' with integers"
        ) from None


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the base steps in `use_timesteps`.

    :param use_timesteps: base timestep indices to keep (any iterable).
    :param kwargs: GaussianDiffusion's arguments for the *base* process.
    """

    def __init__(self, use_timesteps, **kwargs):
        base = GaussianDiffusion(**kwargs)
        self.original_num_steps = base.num_timesteps
        self.use_timesteps = set(int(t) for t in use_timesteps)
        outside = sorted(t for t in self.use_timesteps if not 0 <= t < self.original_num_steps)
        if outside:
            raise ValueError(
                f"use_timesteps {outside[:5]} outside [0, {self.original_num_steps})"
            )
        # beta for a kept step = 1 - abar(kept) / abar(previous kept): the cumulative products
        # at the kept steps are then the base process's.
        self.timestep_map = []
        new_betas = []
        previous_alpha_cumprod = 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / previous_alpha_cumprod)
                previous_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        # Shared by every wrapper this diffusion makes (one per training_losses call), so the
        # map goes to the device once, not once per call.
        self._timestep_maps = _TimestepMaps(self.timestep_map)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.rescale_timesteps,
                             self.original_num_steps, maps=self._timestep_maps)

    def _scale_timesteps(self, t):
        # The wrapped model maps and rescales; scaling here too would do it twice.
        return t


class _TimestepMaps:
    """The spaced → base timestep map as an int64 tensor, made once per device.

    A host → device copy per call would wait for the device on a GPU (pageable memory), as a
    read does. Pickles without its device copies.
    """

    def __init__(self, timestep_map):
        self.timestep_map = list(timestep_map)
        self._on_device = {}

    def __getstate__(self):
        return {"timestep_map": self.timestep_map, "_on_device": {}}

    def on(self, device):
        table = self._on_device.get(device)
        if table is None:
            table = torch.tensor(self.timestep_map, dtype=torch.long, device=device)
            self._on_device[device] = table
        return table


class _WrappedModel:
    """Calls `model` with spaced timesteps mapped back to base indices (and rescaled).

    A plain picklable callable (no nn.Module) so it can wrap a compiled or FSDP model as is.
    """

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps, maps=None):
        self.model = model
        self.timestep_map = list(timestep_map)
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps
        self._maps = maps if maps is not None else _TimestepMaps(self.timestep_map)

    def __call__(self, x, ts, **kwargs):
        new_ts = self._maps.on(ts.device)[ts].to(ts.dtype)
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
):
    """Build the diffusion from guided-diffusion's flags (script_util semantics).

    use_kl → RESCALED_KL, else rescale_learned_sigmas → RESCALED_MSE, else MSE; predict_xstart
    → START_X means, else EPSILON; learn_sigma → LEARNED_RANGE variances, else FIXED_SMALL if
    sigma_small else FIXED_LARGE. Always a SpacedDiffusion (all steps when timestep_respacing
    is empty).
    """
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing or [steps]),
        betas=get_named_beta_schedule(noise_schedule, steps),
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )
