"""Choose the EMA length after training: post-hoc reconstruction of power-function EMAs.

``python -m fastdiff.phema --run RUN --ema_std 0.03,0.07,0.12 [--step N]``

A run trained with ``--ema_std`` keeps power-function EMAs (fastdiff/power_ema.py) and writes
snapshots of them, ``RUN/ema_snapshots/phema_std{sigma:.3f}_{step:06d}.pt``. The averaging
profile of a power EMA at step t is proportional to tau**gamma on [0, t]; any other profile
is approximated by the linear combination of the snapshots' profiles that is closest to it in
L2 (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
Algorithm 3). The EMA weights are linear in the profile, so the same combination of the
snapshot weights gives the reconstructed EMA, without retraining and without any data.

Each result is written into RUN, beside the run's ``config.json`` (which gives its model
flags), as ``ema_phema{sigma:.3f}_{N:06d}.pt``: a plain GD state_dict that GD's
``image_sample.py``, ``python -m fastdiff.sample --model_path`` and ``fastdiff.evaluate``
load. Offsets are in optimizer steps (EDM2 counts images; only their ratios matter, and every
step is one batch).

Bad input (a sigma_rel outside (0, 0.3), no snapshot at --step, snapshots of different
models, a missing RUN) is refused with one line on stderr and exit status 2, before anything
is written.
"""
import argparse
import dataclasses
import os
import re
import sys
import time

import numpy as np
import torch

from fastdiff.power_ema import MAX_STD, std_to_exp, validate_std
from fastdiff.sampling import read_run_config
from fastdiff.train.checkpoint import SNAPSHOT_SUBDIR, CheckpointError, atomic_torch_save

_SNAPSHOT_FILE = re.compile(r"^phema_std(\d+\.\d+)_(\d{6,})\.pt$")
# The snapshot file name rounds sigma_rel to 3 decimals; the file's own "std" is exact.
_NAME_STD_ROUNDING = 5e-4 + 1e-9


class PhemaError(ValueError):
    """Input that cannot be reconstructed from (one line, for the command line)."""


# ------------------------------------------------------------------ the math (float64)
def _float64(x):
    return np.asarray(x, dtype=np.float64)


def power_function_correlation(a_ofs, a_std, b_ofs, b_std):
    """Inner product <p_a, p_b> of two power-function EMA profiles (arrays broadcast).

    A profile with offset T (its training time) and exponent gamma is
    p(tau) = (gamma + 1) tau**gamma / T**(gamma + 1) on [0, T] (unit mass). Two of them
    overlap on [0, min(T_a, T_b)], where the product integrates to
    (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * min**(gamma_a + gamma_b + 1)
    / (T_a**(gamma_a + 1) T_b**(gamma_b + 1)); written with the ratio min/max so that large
    offsets never overflow the powers.
    """
    a_ofs, b_ofs = _float64(a_ofs), _float64(b_ofs)
    gamma_a, gamma_b = std_to_exp(_float64(a_std)), std_to_exp(_float64(b_std))
    shorter_first = a_ofs < b_ofs
    ratio = np.minimum(a_ofs, b_ofs) / np.maximum(a_ofs, b_ofs)
    # The longer profile's exponent is the one evaluated at the shorter one's end.
    longer_gamma = np.where(shorter_first, gamma_b, gamma_a)
    scale = (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
    return scale * ratio ** longer_gamma / np.maximum(a_ofs, b_ofs)


def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std):
    """Coefficients [len(in), len(out)] that combine the input snapshots into each output.

    Least squares in the space of profiles: the Gram matrix of the inputs against the
    inputs' inner products with each target; each column is then scaled to sum to 1, so a
    reconstruction is an average of the snapshots (its weights keep their scale even where the
    fit is not exact). Arguments broadcast like EDM2's (offsets against stds).
    """
    in_ofs, in_std = (np.ravel(x) for x in np.broadcast_arrays(_float64(in_ofs),
                                                              _float64(in_std)))
    out_ofs, out_std = (np.ravel(x) for x in np.broadcast_arrays(_float64(out_ofs),
                                                                _float64(out_std)))
    gram = power_function_correlation(in_ofs[:, None], in_std[:, None],
                                      in_ofs[None, :], in_std[None, :])
    targets = power_function_correlation(in_ofs[:, None], in_std[:, None],
                                         out_ofs[None, :], out_std[None, :])
    coefficients = np.linalg.solve(gram, targets)
    return coefficients / coefficients.sum(axis=0, keepdims=True)


# ------------------------------------------------------------------ snapshots on disk
@dataclasses.dataclass(frozen=True)
class Snapshot:
    path: str
    step: int
    std: float  # from the file name until the file is read (then its exact value)


def snapshot_dir(run):
    return os.path.join(run, SNAPSHOT_SUBDIR)


def list_snapshots(run):
    """Every snapshot file of ``run``, ordered by (step, std)."""
    folder = snapshot_dir(run)
    found = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            m = _SNAPSHOT_FILE.match(name)
            if m:
                found.append(Snapshot(os.path.join(folder, name), int(m.group(2)),
                                      float(m.group(1))))
    return sorted(found, key=lambda s: (s.step, s.std))


def select_snapshots(snapshots, step=None):
    """(reconstruction step, the snapshots at steps 1..step); ``None`` = the latest step.

    The reconstruction step must itself have snapshots: past the last one the EMA's weights
    are unknown, and extrapolating them is not what the user asked for. Step 0 snapshots
    hold the initial weights, whose profile (zero length) has no inner product.
    """
    usable = [s for s in snapshots if s.step > 0]
    if not usable:
        raise PhemaError("no EMA snapshots (ema_snapshots/phema_std*_*.pt) after step 0 "
                         "in the run; train with --ema_std")
    steps = sorted({s.step for s in usable})
    if step is None:
        step = steps[-1]
    if step not in steps:
        before = [s for s in steps if s <= step]
        hint = f"the latest at or before it is {before[-1]}" if before else \
            f"the first is {steps[0]}"
        raise PhemaError(f"no EMA snapshot at step {step} ({hint}); --step must be a step "
                         f"with snapshots")
    return step, [s for s in usable if s.step <= step]


def _load(path):
    try:
        # mmap: reading the metadata and shapes of every snapshot costs no memory.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise PhemaError(f"cannot read snapshot {path}: {type(e).__name__}: {e}") from None


def _unpack(snapshot, obj):
    """(state_dict, model_config or None, exact std) of a loaded snapshot file.

    Hand-made snapshots may be a bare state_dict; the file name then gives step and std.
    """
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state, meta = obj["state_dict"], obj
    elif isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        state, meta = obj, {}
    else:
        raise PhemaError(f"{snapshot.path} is not an EMA snapshot (no state_dict)")
    if "step" in meta and int(meta["step"]) != snapshot.step:
        raise PhemaError(f"{snapshot.path} holds step {meta['step']}, its name says "
                         f"{snapshot.step}")
    std = snapshot.std
    if "std" in meta:
        if abs(float(meta["std"]) - snapshot.std) > _NAME_STD_ROUNDING:
            raise PhemaError(f"{snapshot.path} holds sigma_rel {meta['std']}, its name says "
                             f"{snapshot.std}")
        std = float(meta["std"])
    return state, meta.get("model_config"), std


def _signature(state):
    return {k: (tuple(v.shape), v.is_floating_point()) for k, v in state.items()}


def _first_difference(sig, ref):
    for key in sorted(set(sig) | set(ref)):
        if key not in ref:
            return f"unexpected key {key!r}"
        if key not in sig:
            return f"missing key {key!r}"
        if sig[key] != ref[key]:
            return f"{key!r} is {sig[key]}, not {ref[key]}"
    return None


def _config_difference(config, reference):
    """The first flag both configs hold with different values, as text; None if none."""
    for key in sorted(set(config) & set(reference)):
        if config[key] != reference[key]:
            return f"{key}={config[key]!r}, not {reference[key]!r}"
    return None


def check_snapshots(snapshots, run_config):
    """The snapshots with their exact stds, after checking that they are of one model:
    same keys, shapes and dtypes kind, same model_config, and that config agrees with the
    run's config.json (which the output will be loaded with)."""
    checked, ref_sig, ref_cfg, ref_path = [], None, None, None
    for snap in snapshots:
        state, model_config, std = _unpack(snap, _load(snap.path))
        try:
            validate_std(std)
        except ValueError as e:
            raise PhemaError(f"snapshot {snap.path}: {e}") from None
        sig = _signature(state)
        if ref_sig is None:
            ref_sig, ref_path = sig, snap.path
        elif (diff := _first_difference(sig, ref_sig)) is not None:
            raise PhemaError(f"snapshots of different models: {snap.path}: {diff} "
                             f"(as in {ref_path})")
        if model_config is not None:
            if ref_cfg is None:
                ref_cfg = (model_config, snap.path)
            elif (diff := _config_difference(model_config, ref_cfg[0])) is not None:
                raise PhemaError(f"snapshots of different models: {snap.path} has {diff} "
                                 f"(as in {ref_cfg[1]})")
            if (diff := _config_difference(model_config, run_config)) is not None:
                raise PhemaError(f"snapshot {snap.path} is of another model than the run's "
                                 f"config.json: {diff}")
        checked.append(dataclasses.replace(snap, std=std))
    return checked


# ------------------------------------------------------------------ reconstruction
def reconstruct(snapshots, step, out_stds):
    """{sigma_rel: fp32 state_dict} for each of ``out_stds`` at ``step``.

    Streams the snapshots once: each is added to every output with its coefficient, in
    float64 (a sum of many large coefficients of both signs loses digits in fp32). Tensors
    that are not floating point (none in GD's UNet) are taken from the latest snapshot.
    """
    try:
        coefficients = solve_posthoc_coefficients([s.step for s in snapshots],
                                                  [s.std for s in snapshots], step, out_stds)
    except np.linalg.LinAlgError:
        raise PhemaError("the snapshots' profiles are linearly dependent (duplicate "
                         "snapshots?): cannot solve for the coefficients") from None
    sums = [None] * len(out_stds)
    for i, snap in enumerate(snapshots):
        state, _, _ = _unpack(snap, _load(snap.path))
        for j in range(len(out_stds)):
            if sums[j] is None:
                sums[j] = {k: torch.zeros(v.shape, dtype=torch.float64) if v.is_floating_point()
                           else None for k, v in state.items()}
            for key, value in state.items():
                if value.is_floating_point():
                    sums[j][key].add_(value.to(torch.float64), alpha=float(coefficients[i, j]))
                else:
                    sums[j][key] = value.clone()
    return {std: {k: v.to(torch.float32) if v.is_floating_point() else v
                  for k, v in total.items()}
            for std, total in zip(out_stds, sums)}


def output_name(std, step):
    return f"ema_phema{std:.3f}_{step:06d}.pt"


def parse_stds(text):
    """Sorted distinct sigma_rel values of '0.03,0.07,0.12', each checked to be in range."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PhemaError(f"--ema_std {text!r} is not a comma-separated list of numbers") \
            from None
    if not values:
        raise PhemaError("--ema_std is empty: give the sigma_rel values to reconstruct")
    for v in values:
        try:
            validate_std(v)
        except ValueError as e:
            raise PhemaError(f"--ema_std: {e}") from None
    if len({f"{v:.3f}" for v in values}) != len(set(values)):
        raise PhemaError(f"--ema_std {text!r}: two values share the output name "
                         f"(sigma_rel is named to 3 decimals)")
    return sorted(set(values))


# ------------------------------------------------------------------ command line
def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m fastdiff.phema",
        description="Reconstruct power-function EMAs of any sigma_rel from a run's EMA "
                    "snapshots (EDM2's post-hoc EMA) and write them as GD model files.")
    parser.add_argument("--run", required=True, help="the run folder (holds ema_snapshots/)")
    parser.add_argument("--ema_std", required=True,
                        help=f"comma-separated sigma_rel values in (0, {MAX_STD}) to reconstruct")
    parser.add_argument("--step", type=int, default=None,
                        help="reconstruct the EMA at this step (it must have snapshots); "
                             "default: the latest step with snapshots")
    return parser


def run_phema(run, ema_std, step=None):
    """Reconstruct and write; returns [(sigma_rel, path)] written. Raises PhemaError."""
    if not os.path.isdir(run):
        raise PhemaError(f"run folder not found: {run}")
    out_stds = parse_stds(ema_std)
    out_step, chosen = select_snapshots(list_snapshots(run), step)
    chosen = check_snapshots(chosen, read_run_config(os.path.join(run, "config.json")))
    if len({(s.step, s.std) for s in chosen}) != len(chosen):
        raise PhemaError("two snapshots hold the same step and sigma_rel")
    start = time.perf_counter()
    results = reconstruct(chosen, out_step, out_stds)
    written = []
    for std, state in results.items():
        path = os.path.join(run, output_name(std, out_step))
        atomic_torch_save(state, path)
        written.append((std, path))
    elapsed = time.perf_counter() - start
    print(f"reconstructed {len(written)} EMA(s) at step {out_step} from {len(chosen)} "
          f"snapshots in {elapsed:.2f} s")
    for std, path in written:
        print(f"  sigma_rel {std:.3f}: {path}")
    return written


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run_phema(args.run, args.ema_std, args.step)
    except (PhemaError, CheckpointError) as e:
        print(f"fastdiff.phema: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
