"""guided-diffusion's file format, and files written so that a crash never leaves half of one.

GD's exchange files are plain ``torch.save``'d state_dicts: ``model{step:06d}.pt``,
``ema_{rate}_{step:06d}.pt`` and ``opt{step:06d}.pt`` (an AdamW state_dict). This module reads
and writes them (fastdiff/train/checkpoint.py decides when), checks that one fits a model, and
converts GD's optimizer file to and from fastdiff's per-parameter Adam state. Every file goes
through a temporary name + fsync + rename.
"""
import os
import re

import torch


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the model."""


def atomic_torch_save(obj, path):
    """torch.save to ``path`` through a temporary file + fsync + rename."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(text, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def gd_filenames(step, ema_rates):
    """GD's export names for ``step``: {'model': ..., 'opt': ..., rate: ...}."""
    names = {"model": f"model{step:06d}.pt", "opt": f"opt{step:06d}.pt"}
    for rate in ema_rates:
        names[rate] = f"ema_{rate}_{step:06d}.pt"
    return names


def export_gd_files(log_dir, step, model_state, ema_states, opt_state):
    """Write GD-format files (call on rank 0 only). ``ema_states``: {rate string: state_dict}."""
    names = gd_filenames(step, list(ema_states))
    atomic_torch_save(model_state, os.path.join(log_dir, names["model"]))
    for rate, sd in ema_states.items():
        atomic_torch_save(sd, os.path.join(log_dir, names[rate]))
    if opt_state is not None:
        atomic_torch_save(opt_state, os.path.join(log_dir, names["opt"]))


def parse_gd_step(path):
    """Step number of a GD file name like .../model012345.pt (0 when absent)."""
    m = re.search(r"model(\d+)\.pt$", os.path.basename(path))
    return int(m.group(1)) if m else 0


def load_state_dict_file(path):
    """torch.load a GD-format file safely, with a one-line error when it cannot be read."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def check_state_dict_fits(model_state, reference_state, source):
    """Raise CheckpointError naming the first key that is missing, unexpected or mis-shaped."""
    for key, ref in reference_state.items():
        if key not in model_state:
            raise CheckpointError(f"{source} does not fit the model: missing key {key!r}")
        got = model_state[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(f"{source} does not fit the model: {key!r} has shape "
                                  f"{tuple(got.shape)}, the model expects {tuple(ref.shape)}")
    for key in model_state:
        if key not in reference_state:
            raise CheckpointError(f"{source} does not fit the model: unexpected key {key!r}")


# ------------------------------------------------------------------ GD's optimizer file
def gd_optimizer_state_dict(states, lr, weight_decay):
    """An AdamW-format state dict (GD's opt*.pt) from full per-param {exp_avg, exp_avg_sq, step}."""
    state = {}
    for i, st in enumerate(states):
        state[i] = {"step": torch.as_tensor(float(st["step"])), "exp_avg": st["exp_avg"],
                    "exp_avg_sq": st["exp_avg_sq"]}
    group = {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": weight_decay,
             "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
             "differentiable": False, "fused": None, "params": list(range(len(states)))}
    return {"state": state, "param_groups": [group]}


def adam_states_from_gd(opt_state, params):
    """[(exp_avg, exp_avg_sq, step) or None] from a GD opt*.pt, or None when it does not fit
    ``params`` (GD's fp16 runs store state for flattened master tensors)."""
    try:
        state = opt_state["state"]
        ids = opt_state["param_groups"][0]["params"]
    except (KeyError, IndexError, TypeError):
        return None
    if len(ids) != len(params):
        return None
    out = []
    for pid, p in zip(ids, params):
        st = state.get(pid)
        if st is None:
            out.append(None)
            continue
        if tuple(st["exp_avg"].shape) != tuple(p.shape):
            return None
        out.append((st["exp_avg"], st["exp_avg_sq"], float(st["step"])))
    return out
