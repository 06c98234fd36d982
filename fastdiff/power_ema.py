"""Per-step decay rates of every EMA the trainer keeps.

GD keeps fixed-rate EMAs (``--ema_rate 0.9999``), whose length is fixed in steps, so a run is
stuck with the lengths it started with. Karras et al. 2024 ("Analyzing and Improving the
Training Dynamics of Diffusion Models", EDM2) track *power-function* EMAs instead: the
averaging profile at step t is proportional to tau**gamma on [0, t], so its length is a fixed
fraction (the relative standard deviation sigma_rel) of the training time so far, and any other
sigma_rel can be reconstructed after training from snapshots (fastdiff.phema).

This module holds the math only, as plain host floats (no tensors), so the Trainer can compute
one decay rate per EMA from its own step counter on the host every step without a device read,
and an exact resume follows from the step alone:

* sigma_rel <-> gamma: sigma_rel**2 = (gamma+1) / ((gamma+2)**2 (gamma+3)) (EDM2 Eq. 123);
  the inverse is the largest real root of a cubic, solved here in closed form (trigonometric
  or Cardano form) instead of with a numerical polynomial root finder.
* beta_k = (1 - 1/k)**(gamma+1) for the k-th step (1-based), EDM2 Eq. 127 with
  t_delta/t_next = 1/k because every step is one batch; beta_1 = 0, so the EMA starts at the
  first step's weights.
* fixed rates r, optionally with diffusers' ``EMAModel`` warmup:
  min(r, 1 - (1 + (k-1)/inv_gamma)**-power), which is 0 at k = 1.

The convention everywhere (optimizer, fused op, torch reference) is the GD one:
``ema = rate * ema + (1 - rate) * param``, so ``rate`` is what EDM2 calls beta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "MAX_STD",
    "EmaSpec",
    "EmaWarmup",
    "ema_rates_for_step",
    "ema_specs",
    "exp_to_std",
    "fixed_rate_with_warmup",
    "power_ema_name",
    "power_function_beta",
    "std_to_exp",
    "validate_std",
]

# sigma_rel(gamma) rises from 0 at gamma = -1 to its maximum ~0.30028 (at gamma ~ -0.382) and
# falls back to 0 as gamma grows, so no power-function profile has sigma_rel above ~0.3; there
# the cubic's largest real root is < -1 and EDM2's std_to_exp silently returns it (a profile
# that is not integrable). The flag accepts the open interval (0, MAX_STD) as the issue says.
MAX_STD = 0.3


def _exp_to_std_scalar(exp: float) -> float:
    exp = float(exp)
    return math.sqrt((exp + 1.0) / ((exp + 2.0) ** 2 * (exp + 3.0)))


def _largest_real_cubic_root(b: float, c: float, d: float) -> float:
    """Largest real root of x**3 + b x**2 + c x + d (monic cubic), in closed form."""
    shift = b / 3.0
    # Depressed cubic y**3 + p y + q with x = y - b/3.
    p = c - b * b / 3.0
    q = 2.0 * b**3 / 27.0 - b * c / 3.0 + d
    discriminant = (q / 2.0) ** 2 + (p / 3.0) ** 3
    if discriminant < 0.0:
        # Three real roots: the trigonometric form's k = 0 branch is the largest.
        radius = 2.0 * math.sqrt(-p / 3.0)
        cos_arg = (3.0 * q / (p * radius)) if p != 0.0 else 0.0
        cos_arg = min(1.0, max(-1.0, cos_arg))
        angle = math.acos(cos_arg) / 3.0
        return radius * math.cos(angle) - shift
    # One real root (or a repeated one): Cardano's formula.
    sqrt_disc = math.sqrt(discriminant)
    root = _cbrt(-q / 2.0 + sqrt_disc) + _cbrt(-q / 2.0 - sqrt_disc)
    return root - shift


def _cbrt(x: float) -> float:
    return math.copysign(abs(x) ** (1.0 / 3.0), x)


def _std_to_exp_scalar(std: float) -> float:
    # sigma**2 (gamma+2)**2 (gamma+3) = gamma+1, i.e. with t = sigma**-2:
    # gamma**3 + 7 gamma**2 + (16 - t) gamma + (12 - t) = 0; gamma is its largest real root.
    t = float(std) ** -2
    gamma = _largest_real_cubic_root(7.0, 16.0 - t, 12.0 - t)
    # One Newton step cleans up the cancellation error of the closed form for small sigma
    # (large t), where the root is ~sigma**-1 and the trig form loses a few ulps.
    poly = ((gamma + 7.0) * gamma + (16.0 - t)) * gamma + (12.0 - t)
    slope = (3.0 * gamma + 14.0) * gamma + (16.0 - t)
    if slope != 0.0:
        gamma -= poly / slope
    return gamma


def _elementwise(scalar_fn, value):
    """Apply to a scalar (returns float) or an array-like (returns float64 ndarray)."""
    if np.ndim(value) == 0:
        return scalar_fn(float(value))
    array = np.asarray(value, dtype=np.float64)
    return np.vectorize(scalar_fn, otypes=[np.float64])(array)


def std_to_exp(std):
    """Power-function exponent gamma whose profile has relative std ``std`` (EDM2 Eq. 126).

    Accepts a float (returns a float) or an array-like (returns a float64 array). Only
    meaningful for std in (0, ~0.2887); callers validate with :func:`validate_std`.
    """
    return _elementwise(_std_to_exp_scalar, std)


def exp_to_std(exp):
    """Relative std of the power-function profile with exponent ``exp`` (EDM2 Eq. 123)."""
    return _elementwise(_exp_to_std_scalar, exp)


def validate_std(std: float) -> float:
    """Return std as a float, or raise ValueError with a one-line reason."""
    value = float(std)
    if not (0.0 < value < MAX_STD) or not math.isfinite(value):
        raise ValueError(
            f"sigma_rel {std!r} is outside (0, {MAX_STD}): no power-function EMA profile has "
            "that relative std (EDM2's std_to_exp would silently give gamma < -1)"
        )
    return value


def power_function_beta(std: float, step: int) -> float:
    """Decay rate beta_k = (1 - 1/k)**(gamma+1) of a power EMA at 1-based step ``k``."""
    if step < 1:
        raise ValueError(f"step must be >= 1 (1-based), got {step}")
    gamma = _std_to_exp_scalar(std)
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


@dataclass(frozen=True)
class EmaWarmup:
    """diffusers ``EMAModel`` warmup of the fixed-rate EMAs (``use_ema_warmup=True``)."""

    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0


def fixed_rate_with_warmup(rate: float, step: int, warmup: Optional[EmaWarmup]) -> float:
    """Rate of a fixed-rate EMA at 1-based ``step``; ``rate`` itself without warmup.

    diffusers counts optimisation steps from 1 and uses ``step - 1`` in the formula, so the
    first update copies the weights (rate 0) and the rate grows towards ``rate``.
    """
    if warmup is None:
        return float(rate)
    if step < 1:
        raise ValueError(f"step must be >= 1 (1-based), got {step}")
    warm = 1.0 - (1.0 + (step - 1) / warmup.inv_gamma) ** -warmup.power
    return min(float(rate), warm)


def power_ema_name(std: float) -> str:
    """Key of a power EMA everywhere (DCP state, trainer.json, metrics): e.g. 'std0.050'."""
    return f"std{float(std):.3f}"


@dataclass(frozen=True)
class EmaSpec:
    """One EMA the trainer keeps: a fixed rate (``rate``) or a power function (``std``)."""

    name: str
    rate: Optional[float] = None
    std: Optional[float] = None

    @property
    def is_power(self) -> bool:
        return self.std is not None

    @property
    def nominal_rate(self) -> float:
        """The rate the optimizer slot is constructed with (beta at step 1 for power EMAs).

        Power EMAs always get their rate per step; this only has to be a valid rate.
        """
        return 0.0 if self.is_power else float(self.rate)

    def rate_at(self, step: int, warmup: Optional[EmaWarmup] = None) -> float:
        """Decay rate at 1-based ``step``; ``warmup`` applies to fixed rates only."""
        if self.is_power:
            return power_function_beta(self.std, step)
        return fixed_rate_with_warmup(self.rate, step, warmup)


def ema_specs(rates: Sequence[float], stds: Sequence[float], rate_names: Optional[Sequence[str]] = None):
    """Slots in optimizer order: fixed rates first, then power EMAs in ``stds`` order.

    ``rate_names`` are the fixed rates' keys (the user's strings, e.g. '0.9999', as GD names
    its exports); default ``str(rate)``.
    """
    names = list(rate_names) if rate_names is not None else [str(r) for r in rates]
    specs = [EmaSpec(name=n, rate=float(r)) for n, r in zip(names, rates)]
    specs += [EmaSpec(name=power_ema_name(s), std=validate_std(s)) for s in stds]
    seen = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"duplicate EMA {spec.name!r}")
        seen.add(spec.name)
    return specs


def ema_rates_for_step(specs: Sequence[EmaSpec], step: int, warmup: Optional[EmaWarmup] = None):
    """One host-float rate per slot for 1-based ``step`` (what the optimizer step takes)."""
    return [spec.rate_at(step, warmup) for spec in specs]
