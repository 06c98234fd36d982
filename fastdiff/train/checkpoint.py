"""Checkpoints: the full training state with torch.distributed.checkpoint (DCP), and GD-named
``.pt`` exports (``model{step:06d}.pt``, ``ema_{rate}_{step:06d}.pt``, ``opt{step:06d}.pt``).

Layout of a run folder::

    model000100.pt  ema_0.9999_000100.pt  opt000100.pt     GD's exchange format (rank 0)
    checkpoints/step_000100/                               DCP: model, optimizer, EMAs
        .metadata  __0_0.distcp ...                        (sharded under FSDP2)
        rank00000.pt ...                                   per-rank RNG, sampler, data position
        trainer.json                                       step, loss scale, config; written last

A checkpoint is written under ``step_NNNNNN.partial`` and renamed only when every rank has
finished and ``trainer.json`` is in place, so a kill -9 at any point leaves either a complete
``step_*`` folder or a ``.partial`` one that ``latest`` never picks. Every single file is
written to a temporary name and renamed (atomic on POSIX).
"""
import contextlib
import json
import os
import re
import shutil
import warnings

import torch
import torch.distributed as dist

CHECKPOINT_SUBDIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_GD_FILE = re.compile(r"^(model|opt|ema_[0-9.]+_)(\d{6,})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the model."""


def _is_dist():
    return dist.is_available() and dist.is_initialized()


def _rank():
    return dist.get_rank() if _is_dist() else 0


def _barrier():
    if _is_dist():
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it runs without a process group; in one process that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


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


def checkpoint_root(log_dir):
    return os.path.join(log_dir, CHECKPOINT_SUBDIR)


def complete_checkpoints(log_dir):
    """[(step, path)] of complete DCP checkpoints in ``log_dir``, oldest first."""
    root = checkpoint_root(log_dir)
    found = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = _STEP_DIR.match(name)
            path = os.path.join(root, name)
            if m and os.path.isfile(os.path.join(path, "trainer.json")):
                found.append((int(m.group(1)), path))
    return sorted(found)


def find_latest(log_dir):
    """Path of the newest complete checkpoint in ``log_dir``, or None."""
    found = complete_checkpoints(log_dir)
    return found[-1][1] if found else None


def save_training_state(log_dir, step, dcp_state, rank_state, trainer_meta):
    """Save a checkpoint (collective under torch.distributed).

    dcp_state: nested dict of tensors (DTensors under FSDP2) saved with DCP.
    rank_state: this rank's non-tensor state (RNG, sampler, data position).
    trainer_meta: JSON-serialisable run state (rank 0's copy is written).
    Returns the final checkpoint path.
    """
    import torch.distributed.checkpoint as dcp

    root = checkpoint_root(log_dir)
    final = os.path.join(root, f"step_{step:06d}")
    partial = final + ".partial"
    rank = _rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for stale in (partial, final):  # leftovers of a killed save, or a re-save of this step
            if os.path.isdir(stale):
                shutil.rmtree(stale)
        os.makedirs(partial)
    _barrier()
    with _single_process_quiet():
        dcp.save(dcp_state, checkpoint_id=partial, no_dist=not _is_dist())
    atomic_torch_save(rank_state, os.path.join(partial, f"rank{rank:05d}.pt"))
    _barrier()
    if rank == 0:
        atomic_write_text(json.dumps(trainer_meta, indent=2, sort_keys=True),
                          os.path.join(partial, "trainer.json"))
        os.replace(partial, final)
        _fsync_dir(root)
    _barrier()
    return final


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_trainer_meta(path):
    meta_path = os.path.join(path, "trainer.json")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no trainer.json)")
    with open(meta_path) as f:
        return json.load(f)


def load_training_state(path, dcp_state):
    """Load DCP tensors into ``dcp_state`` in place (resharding as needed). Collective."""
    import torch.distributed.checkpoint as dcp
    with _single_process_quiet():
        dcp.load(dcp_state, checkpoint_id=path, no_dist=not _is_dist())


def load_rank_state(path, rank):
    """This rank's saved non-tensor state, or None when the checkpoint had fewer ranks."""
    p = os.path.join(path, f"rank{rank:05d}.pt")
    if not os.path.isfile(p):
        return None
    return torch.load(p, map_location="cpu", weights_only=False)


def prune_checkpoints(log_dir, keep_latest, ema_rates):
    """Keep the newest ``keep_latest`` complete checkpoints and their GD exports (rank 0)."""
    if keep_latest <= 0:
        return
    found = complete_checkpoints(log_dir)
    for step, path in found[:-keep_latest]:
        shutil.rmtree(path, ignore_errors=True)
        for name in gd_filenames(step, ema_rates).values():
            p = os.path.join(log_dir, name)
            if os.path.exists(p):
                os.remove(p)


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
