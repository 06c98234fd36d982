"""Gaussian diffusion: beta schedules, the forward process, training losses and samplers.

Numerically this is guided-diffusion's gaussian_diffusion.py: schedules are float64 numpy
arrays, a per-timestep coefficient is gathered in float64 and *then* cast to float32, and every
expression keeps guided-diffusion's operation order, so fp32 results agree bit for bit.
Method names, arguments and returned dict keys are guided-diffusion's, so code written against
it ports by changing an import.
"""
import enum
import math

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, normal_kl

_LN2 = math.log(2.0)  # converts nats to bits


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """Return a named beta schedule ("linear" or "cosine") as a float64 array of length T.

    "linear" is Ho et al.'s 1e-4..0.02 ramp scaled by 1000/T, so that any T approximates the
    same continuous process; "cosine" is Nichol & Dhariwal's alpha_bar = cos^2 schedule.
    """
    _check_positive_int(num_diffusion_timesteps, "num_diffusion_timesteps")
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(
            scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64
        )
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(f"unknown noise schedule {schedule_name!r}; expected 'linear' or 'cosine'")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Discretise a continuous alpha_bar(t), t in [0, 1], into T betas.

    beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T), capped at max_beta because the cosine
    schedule's last ratio goes to zero and a beta of 1 makes the posterior singular.
    """
    _check_positive_int(num_diffusion_timesteps, "num_diffusion_timesteps")
    betas = []
    for i in range(num_diffusion_timesteps):
        t_now = i / num_diffusion_timesteps
        t_next = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t_next) / alpha_bar(t_now), max_beta))
    return np.array(betas)


class ModelMeanType(enum.Enum):
    """What the model's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # the posterior mean of x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise that was added


class ModelVarType(enum.Enum):
    """Where the reverse-process variance comes from.

    LEARNED_RANGE: the model's extra C channels, v in [-1, 1], interpolate the log-variance
    between the posterior variance (FIXED_SMALL) and beta (FIXED_LARGE).
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    """Training objective."""

    MSE = enum.auto()  # MSE on the mean (+ the VB term for learned variances)
    RESCALED_MSE = enum.auto()  # as MSE, with the VB term scaled by T/1000
    KL = enum.auto()  # one term of the variational bound
    RESCALED_KL = enum.auto()  # that term times T: an estimate of the full bound

    def is_vb(self):
        """True for the variational-bound objectives."""
        return self in (LossType.KL, LossType.RESCALED_KL)


# Per-timestep float64 schedules that _extract gathers from (attribute names of the diffusion).
_TABLE_NAMES = (
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "alphas_cumprod_next",
    "sqrt_alphas_cumprod",
    "one_minus_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "recip_posterior_mean_coef1",
    "posterior_mean_coef2_over_coef1",
    "log_betas",
    "fixed_large_variance",
    "fixed_large_log_variance",
)


class GaussianDiffusion:
    """Training and sampling utilities for a diffusion with the given betas.

    :param betas: 1-D sequence of betas in (0, 1], one per timestep (t = 0 is the first step).
    :param model_mean_type: a ModelMeanType.
    :param model_var_type: a ModelVarType.
    :param loss_type: a LossType.
    :param rescale_timesteps: if True the model sees float timesteps t * 1000 / T, so it is
        conditioned on the same 0..1000 range whatever T is.
    """

    def __init__(self, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False):
        for value, enum_type, name in (
            (model_mean_type, ModelMeanType, "model_mean_type"),
            (model_var_type, ModelVarType, "model_var_type"),
            (loss_type, LossType, "loss_type"),
        ):
            if not isinstance(value, enum_type):
                raise TypeError(f"{name} must be a {enum_type.__name__}, got {value!r}")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.array(betas, dtype=np.float64)  # float64 keeps cumprod accurate at large T
        if betas.ndim != 1 or betas.shape[0] < 2:
            # t = 0 borrows t = 1's posterior variance, so one step is not a usable process.
            raise ValueError(
                f"betas must be a 1-D array of at least 2 steps, got shape {betas.shape}"
            )
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must all lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # The posterior variance is 0 at t = 0; its log takes t = 1's value there instead.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        # Inverting the posterior mean for x_0 (PREVIOUS_X models).
        self.recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self.posterior_mean_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1

        # Variance choices of p(x_{t-1} | x_t). FIXED_LARGE uses beta_t, except at t = 0 where
        # the posterior variance of t = 1 gives a better decoder likelihood.
        self.log_betas = np.log(self.betas)
        self.fixed_large_variance = np.append(self.posterior_variance[1], self.betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

        self._device_tables = {}

    # -- plumbing -------------------------------------------------------------------------

    def __getstate__(self):
        # Device copies of the schedules are a cache: don't pickle CUDA tensors.
        state = self.__dict__.copy()
        state["_device_tables"] = {}
        return state

    def _tables_on(self, device):
        """float64 copies of the schedules on `device`, made once (no host copy per call)."""
        tables = self._device_tables.get(device)
        if tables is None:
            tables = {
                name: torch.from_numpy(getattr(self, name)).to(device) for name in _TABLE_NAMES
            }
            self._device_tables[device] = tables
        return tables

    def _extract(self, name, t, shape):
        """Schedule `name` at timesteps t, cast to fp32, broadcast to `shape` ([B, 1, ...])."""
        values = self._tables_on(t.device)[name][t].float()
        return values.reshape(*values.shape, *([1] * (len(shape) - values.dim()))).expand(shape)

    def _scale_timesteps(self, t):
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # -- forward process ------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0), each shaped like x_start."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(
                f"q_sample: noise shape {tuple(noise.shape)} != x_start shape "
                f"{tuple(x_start.shape)}"
            )
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(
                f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}"
            )
        mean = (
            self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t.shape)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t.shape)
        return mean, variance, log_variance

    # -- reverse process ------------------------------------------------------------------

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the model and return p(x_{t-1} | x_t) and the x_0 prediction.

        :param model: called as model(x, timesteps, **model_kwargs).
        :param x: [N, C, ...] batch at time t.
        :param t: [N] integer timesteps.
        :param clip_denoised: clamp the x_0 prediction to [-1, 1].
        :param denoised_fn: applied to the x_0 prediction before clipping.
        :return: dict with "mean", "variance", "log_variance", "pred_xstart".
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        batch, channels = x.shape[:2]
        if t.shape != (batch,):
            raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            _check_learned_sigma_output(model_output, x)
            model_output, var_values = torch.split(model_output, channels, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = var_values
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
                max_log = self._extract("log_betas", t, x.shape)
                frac = (var_values + 1) / 2  # [-1, 1] -> [0, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            model_variance = self._extract("fixed_large_variance", t, x.shape)
            model_log_variance = self._extract("fixed_large_log_variance", t, x.shape)
        else:
            model_variance = self._extract("posterior_variance", t, x.shape)
            model_log_variance = self._extract("posterior_log_variance_clipped", t, x.shape)

        def process_xstart(pred):
            if denoised_fn is not None:
                pred = denoised_fn(pred)
            return pred.clamp(-1, 1) if clip_denoised else pred

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x, t, model_output))
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)

        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        # Inverts mean = coef1 * x_0 + coef2 * x_t.
        return (
            self._extract("recip_posterior_mean_coef1", t, x_t.shape) * xprev
            - self._extract("posterior_mean_coef2_over_coef1", t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape)

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by variance * grad log p(y | x_t) (Sohl-Dickstein et al. guidance)."""
        model_kwargs = {} if model_kwargs is None else model_kwargs
        gradient = cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """p_mean_var with the score shifted by grad log p(y | x_t) (Song et al. guidance)."""
        model_kwargs = {} if model_kwargs is None else model_kwargs
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                 model_kwargs=None):
        """Draw x_{t-1} ~ p(x_{t-1} | x_t) (no noise at t = 0).

        :return: dict with "sample" and "pred_xstart".
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised,
                                   denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        noise = torch.randn_like(x)  # drawn before guidance: keeps guided-diffusion's RNG order
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + _nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                      cond_fn=None, model_kwargs=None, device=None, progress=False):
        """Run the ancestral sampler from T-1 down to 0 and return the final samples.

        :param shape: (N, C, H, W) of the samples.
        :param noise: optional x_{T-1} to start from; otherwise drawn with torch.randn.
        :param device: where to sample; default: noise's device, else the model's.
        :param progress: show a tqdm progress bar.
        """
        final = None
        for final in self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
        ):
            pass
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True,
                                  denoised_fn=None, cond_fn=None, model_kwargs=None, device=None,
                                  progress=False):
        """Like p_sample_loop, but yield p_sample's dict after every step."""
        yield from self._reverse_loop(
            self.p_sample, model, shape, noise, device, progress, clip_denoised=clip_denoised,
            denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs,
        )

    def _reverse_loop(self, step, model, shape, noise, device, progress, **step_kwargs):
        """Apply `step` for t = T-1 .. 0 starting from noise, yielding each step's output."""
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
        device = _sampling_device(model, noise, device)
        x = noise if noise is not None else torch.randn(*shape, device=device)
        timesteps = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm  # optional dependency, only for the progress bar

            timesteps = tqdm(timesteps)
        for i in timesteps:
            t = torch.full((shape[0],), i, dtype=torch.long, device=device)
            with torch.no_grad():
                out = step(model, x, t, **step_kwargs)
            yield out
            x = out["sample"]

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                    model_kwargs=None, eta=0.0):
        """Draw x_{t-1} with the DDIM update (deterministic for eta = 0).

        :return: dict with "sample" and "pred_xstart".
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised,
                                   denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # Recover eps from x_0 whatever the model predicts.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        noise = torch.randn_like(x)  # drawn even for eta = 0: same RNG stream as guided-diffusion
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
            + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        )
        sample = mean_pred + _nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None,
                            model_kwargs=None, eta=0.0):
        """Deterministic DDIM step from x_t to x_{t+1} (encoding); only eta = 0 is defined."""
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample is the deterministic ODE: eta must be 0.0")
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised,
                                   denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape)
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        )
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                         cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0):
        """Run DDIM from T-1 down to 0 and return the final samples (args as p_sample_loop)."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress, eta=eta,
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True,
                                     denoised_fn=None, cond_fn=None, model_kwargs=None,
                                     device=None, progress=False, eta=0.0):
        """Like ddim_sample_loop, but yield ddim_sample's dict after every step."""
        yield from self._reverse_loop(
            self.ddim_sample, model, shape, noise, device, progress, clip_denoised=clip_denoised,
            denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta,
        )

    # -- losses ---------------------------------------------------------------------------

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound, in bits per dimension.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the discretised decoder
        NLL -log p(x_0 | x_1) at t = 0.

        :return: dict with "output" ([N]) and "pred_xstart".
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised,
                                   model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / _LN2
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / _LN2
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-example training losses at timesteps t.

        :param model: called as model(x_t, timesteps, **model_kwargs).
        :param x_start: [N, C, ...] clean data in [-1, 1].
        :param t: [N] integer timesteps.
        :param noise: the Gaussian noise of q_sample; drawn with torch.randn_like if None.
        :return: dict of [N] tensors: "loss" always; "mse" for the MSE losses; "vb" (the
            variational-bound term trained through the variance channels only) when the variance
            is learned.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            _check_learned_sigma_output(model_output, x_t)
            model_output, var_values = torch.split(model_output, x_t.shape[1], dim=1)
            # The bound trains only the variance: the mean enters it detached, so the mean is
            # learned from the MSE alone.
            frozen_output = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(_ConstantModel(frozen_output), x_start, x_t, t,
                                             clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # T/1000 keeps the vb term's weight what it was at T = 1000 (where it is 1).
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        if self.model_mean_type == ModelMeanType.EPSILON:
            target = noise
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        if model_output.shape != target.shape:
            raise ValueError(
                f"model output shape {tuple(model_output.shape)} != target shape "
                f"{tuple(target.shape)}"
            )
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start):
        """KL(q(x_{T-1} | x_0) || N(0, I)) in bits per dimension, shape [N] (not trainable)."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long,
                       device=x_start.device)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / _LN2

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """The full variational bound in bits per dimension, one q_sample per timestep.

        :return: dict with "total_bpd" and "prior_bpd" ([N]) and "vb", "xstart_mse", "mse"
            ([N, T], column j is timestep T-1-j).
        """
        batch = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in range(self.num_timesteps - 1, -1, -1):
            t = torch.full((batch,), i, dtype=torch.long, device=x_start.device)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=clip_denoised,
                                         model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb, xstart_mse, mse = (torch.stack(v, dim=1) for v in (vb, xstart_mse, mse))
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }


class _ConstantModel:
    """A 'model' returning a fixed output: feeds the detached-mean output back to the VB term."""

    def __init__(self, output):
        self.output = output

    def __call__(self, x, t, **kwargs):
        return self.output


def mean_flat(tensor):
    """Mean over every dimension but the first (batch)."""
    return tensor.mean(dim=list(range(1, tensor.dim())))


def _nonzero_mask(t, x):
    """[N, 1, ...] float mask that is 0 where t == 0 (the last reverse step adds no noise)."""
    return (t != 0).float().view(-1, *([1] * (x.dim() - 1)))


def _check_learned_sigma_output(model_output, x):
    expected = (x.shape[0], x.shape[1] * 2, *x.shape[2:])
    if tuple(model_output.shape) != expected:
        raise ValueError(
            f"with a learned variance the model must output {expected} (mean and variance "
            f"channels), got {tuple(model_output.shape)}"
        )


def _sampling_device(model, noise, device):
    """Explicit device, else the starting noise's, else the model's first parameter's, else CPU."""
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
