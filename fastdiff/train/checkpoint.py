"""Checkpoints: the full training state with torch.distributed.checkpoint (DCP), and GD-named
``.pt`` exports (``model{step:06d}.pt``, ``ema_{rate}_{step:06d}.pt``, ``opt{step:06d}.pt``).

Layout of a run folder::

    model000100.pt  ema_0.9999_000100.pt  opt000100.pt     GD's exchange format (rank 0)
    checkpoints/step_000100/                               DCP: model, optimizer, EMAs
        .metadata  __0_0.distcp ...                        (sharded under FSDP2)
        rank00000.pt ...                                   per-rank RNG, sampler, data position
        trainer.json                                       step, loss scale, config; written last
    ema_snapshots/phema_std0.050_000100.pt                 power EMAs (--ema_std), never pruned

A checkpoint is written under ``step_NNNNNN.partial`` and renamed only when every rank has
finished and ``trainer.json`` is in place, so a kill -9 at any point leaves either a complete
``step_*`` folder or a ``.partial`` one that ``latest`` never picks. Every single file is
written to a temporary name and renamed (atomic on POSIX).
"""
import contextlib
import json
import logging
import os
import re
import shutil
import warnings

import torch
import torch.distributed as dist

# GD's file format and the atomic writers; re-exported: callers import them from here too.
from fastdiff.runtime import full_tensor, local_tensor
from fastdiff.train.gd_format import (  # noqa: F401
    CheckpointError, adam_states_from_gd, atomic_torch_save, atomic_write_text,
    check_state_dict_fits, export_gd_files, gd_filenames, gd_optimizer_state_dict,
    load_state_dict_file, parse_gd_step)

log = logging.getLogger("fastdiff")

CHECKPOINT_SUBDIR = "checkpoints"
SNAPSHOT_SUBDIR = "ema_snapshots"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


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


def snapshot_path(log_dir, std, step):
    """Where the snapshot of the power EMA ``std`` at ``step`` lives."""
    return os.path.join(log_dir, SNAPSHOT_SUBDIR, f"phema_std{float(std):.3f}_{step:06d}.pt")


def model_flags(config):
    """The model + diffusion flags of a run's effective config (what loads its weights)."""
    from fastdiff.config import model_and_diffusion_defaults
    return {k: config[k] for k in model_and_diffusion_defaults() if k in config}


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


# -------------------------------------------------------------- finding what to resume
def find_resume_path(spec, log_dir, log_dir_given):
    """The checkpoint ``--resume_checkpoint spec`` names, or None to start fresh.

    ``latest``: the newest complete checkpoint of ``log_dir`` (None when there is none yet,
    so a preempted job's first start and its restarts share one command line); it needs an
    explicit run folder (``log_dir_given``). Anything else must exist.
    """
    if not spec:
        return None
    if spec == "latest":
        if not log_dir_given:
            raise CheckpointError("--resume_checkpoint latest needs --log_dir (the run folder "
                                  "to resume)")
        return find_latest(log_dir)
    if not os.path.exists(spec):
        raise CheckpointError(f"--resume_checkpoint: {spec} does not exist")
    return spec


def check_resume_compatible(path, config_now, shape_flags):
    """Refuse to resume a DCP checkpoint whose run had other values of ``shape_flags``
    (flags that change the parameters) than ``config_now``, naming them. A class-conditional
    model trained with ``class_dropout_prob`` > 0 has one more label row than one without
    (the null class): p may change on resume, its being > 0 may not."""
    def has_null_class(config):
        return bool(config.get("class_cond")) and float(config.get("class_dropout_prob", 0)) > 0

    if not os.path.isdir(path):
        return
    saved = read_trainer_meta(path).get("config", {})
    diffs = [f"--{k} {saved[k]!r} → {config_now[k]!r}" for k in shape_flags
             if k in saved and k in config_now and saved[k] != config_now[k]]
    if "class_dropout_prob" in config_now and has_null_class(saved) != has_null_class(config_now):
        diffs.append(f"--class_dropout_prob {saved.get('class_dropout_prob', 0.0)!r} → "
                     f"{config_now['class_dropout_prob']!r} (the null-class label row)")
    if diffs:
        raise CheckpointError(f"cannot resume {path}: flags that change the model differ: "
                              + ", ".join(diffs))


# ------------------------------------------------------------------- the manager
@torch.no_grad()
def copy_full_into(target, full):
    """Copy a full (unsharded) tensor into a parameter, EMA or state that may be a DTensor."""
    if hasattr(target, "to_local"):
        from torch.distributed.tensor import distribute_tensor
        shard = distribute_tensor(full.to(target.device_mesh.device_type), target.device_mesh,
                                  target.placements)
        target.to_local().copy_(shard.to_local())
    else:
        target.detach().copy_(full)


class Checkpointer:
    """A run's checkpoints: the Trainer hands over its state once and calls ``save(step)`` /
    ``load(path)``.

    State handed over (live objects; loading writes into them in place):
    ``model`` (its state_dict), ``optimizer`` (the train.optimizer path: ``get_ema(rate)``,
    ``state_tensors()``), ``params``/``param_names`` (the order EMAs and Adam state follow),
    ``sampler`` and ``data`` (their ``state_dict``/``load_state_dict`` when they have one),
    ``trainer`` (a Stateful: ``state_dict()`` → {"step", "lg_loss_scale"}), ``lr_at(step)``
    (the lr GD's opt file records) and ``run_meta`` (the effective config, for
    :func:`check_resume_compatible`).

    A save is a DCP checkpoint (sharded under FSDP2; every rank) + the GD exports, which are
    gathered to rank 0 only, tensor by tensor, and written there; then ``--keep_latest``
    pruning. A load takes a DCP folder (exact; onto any world size) or a GD ``model*.pt``
    (fine-tuning: the ``ema_*``/``opt*`` files of the same step beside it when present).
    """

    def __init__(self, log_dir, *, dist_info, keep_latest, ema_rates, model, optimizer,
                 params, param_names, sampler, data, trainer, lr_at, weight_decay,
                 run_meta=None, ema_specs=None):
        self.log_dir = log_dir
        self.dist = dist_info
        self.keep_latest = keep_latest
        self.ema_rates = list(ema_rates)
        # Every EMA slot in optimizer order (fixed rates, then power EMAs): the DCP keys.
        if ema_specs is None:
            from fastdiff.power_ema import ema_specs as make_specs
            ema_specs = make_specs(self.ema_rates, [])
        self.ema_specs = list(ema_specs)
        self.model = model
        self.optimizer = optimizer
        self.params = params
        self.param_names = param_names
        self.sampler = sampler
        self.data = data
        self.trainer = trainer
        self.lr_at = lr_at
        self.weight_decay = weight_decay
        self.run_meta = run_meta or {}

    # ------------------------------------------------------------------ save
    def save(self, step):
        """Full training state (DCP) + GD-format exports; returns the checkpoint's path."""
        path = save_training_state(self.log_dir, step, self._dcp_state(), self._rank_state(),
                                   self._meta())
        self._export_gd_files(step)
        if self.dist.is_main:
            prune_checkpoints(self.log_dir, self.keep_latest, [str(r) for r in self.ema_rates])
        return path

    def _dcp_state(self):
        emas = {spec.name: dict(zip(self.param_names, self.optimizer.get_ema_slot(k)))
                for k, spec in enumerate(self.ema_specs)}
        return {
            "model": self.model.state_dict(),
            "ema": emas,
            "adam": dict(zip(self.param_names, self.optimizer.state_tensors())),
        }

    def _rank_state(self):
        state = {
            "torch_rng": torch.get_rng_state(),
            "sampler": self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else None,
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
            # The objective's own streams (the classifier's validation data position).
            "objective": self._objective_state(),
        }
        if self.dist.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.dist.device)
        return state

    def _objective_state(self):
        objective = getattr(self.trainer, "objective", None)
        return objective.state_dict() if hasattr(objective, "state_dict") else None

    def _meta(self):
        return {**self.trainer.state_dict(), "world_size": self.dist.world_size,
                "ema_rates": [str(r) for r in self.ema_rates],
                "ema_names": [spec.name for spec in self.ema_specs], **self.run_meta}

    def _on_rank0(self, tensor):
        """The full tensor on the CPU on rank 0, None elsewhere. ``full_tensor`` is a
        collective, so every rank calls this; only rank 0 keeps (and copies) the result."""
        full = full_tensor(tensor).detach()
        return full.cpu() if self.dist.is_main else None

    def _export_gd_files(self, step):
        model_sd = {k: self._on_rank0(v) for k, v in self.model.state_dict().items()}
        ema_sds = {str(rate): {n: self._on_rank0(t)
                               for n, t in zip(self.param_names, self.optimizer.get_ema(rate))}
                   for rate in self.ema_rates}
        states = [{k: (self._on_rank0(v) if torch.is_tensor(v) else v) for k, v in st.items()}
                  for st in self.optimizer.state_tensors()]
        if self.dist.is_main:
            opt_sd = gd_optimizer_state_dict(states, self.lr_at(step), self.weight_decay)
            export_gd_files(self.log_dir, step, model_sd, ema_sds, opt_sd)

    def write_ema_snapshots(self, step):
        """Each power EMA's full weights at ``step`` as a GD-keyed .pt with its metadata
        (rank 0 writes, atomically; collective under FSDP2). Returns the paths written."""
        paths = []
        model_config = model_flags(self.run_meta.get("config", {}))
        for k, spec in enumerate(self.ema_specs):
            if not spec.is_power:
                continue
            weights = {n: self._on_rank0(t)
                       for n, t in zip(self.param_names, self.optimizer.get_ema_slot(k))}
            if not self.dist.is_main:
                continue
            path = snapshot_path(self.log_dir, spec.std, step)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_torch_save({"state_dict": weights, "step": step, "std": spec.std,
                               "model_config": model_config}, path)
            paths.append(path)
        return paths

    # ------------------------------------------------------------------ load
    def load(self, path):
        """Resume from a complete DCP checkpoint folder (exact) or a GD model*.pt file."""
        if os.path.isdir(path):
            self._load_dcp(path)
        else:
            self._load_gd(path)

    def _load_dcp(self, path):
        meta = read_trainer_meta(path)
        saved_names = meta.get("ema_names", meta.get("ema_rates", []))
        state = self._dcp_state()
        missing = [name for name in state["ema"] if name not in saved_names]
        for name in missing:  # a new EMA starts from the resumed weights
            del state["ema"][name]
        load_training_state(path, state)
        if missing:
            for k, spec in enumerate(self.ema_specs):
                if spec.name in missing:
                    for e, p in zip(self.optimizer.get_ema_slot(k), self.params):
                        local_tensor(e).copy_(local_tensor(p.detach()))
            log.info("EMAs %s not in the checkpoint: started from the model weights", missing)
        self.trainer.load_state_dict(meta)
        rank_state = load_rank_state(path, self.dist.rank)
        same_world = int(meta.get("world_size", 1)) == self.dist.world_size
        if rank_state is not None and same_world:
            torch.set_rng_state(rank_state["torch_rng"])
            if "cuda_rng" in rank_state and self.dist.device.type == "cuda":
                torch.cuda.set_rng_state(rank_state["cuda_rng"], self.dist.device)
            if rank_state.get("sampler") is not None and hasattr(self.sampler, "load_state_dict"):
                self.sampler.load_state_dict(rank_state["sampler"])
            if rank_state.get("data") is not None and hasattr(self.data, "load_state_dict"):
                self.data.load_state_dict(rank_state["data"])
            objective = getattr(self.trainer, "objective", None)
            if rank_state.get("objective") is not None and hasattr(objective, "load_state_dict"):
                objective.load_state_dict(rank_state["objective"])
        else:
            # Another world size: weights, optimizer, EMAs, step and loss scale are exact;
            # the per-rank streams (noise, timesteps, data order) restart from the seed.
            rank0 = load_rank_state(path, 0)
            if rank0 and rank0.get("sampler") is not None and hasattr(self.sampler,
                                                                      "load_state_dict"):
                # The loss history is the same on every rank; keep this rank's own RNG stream.
                state = dict(rank0["sampler"], rng_state=self.sampler.state_dict()["rng_state"])
                self.sampler.load_state_dict(state)
            log.info("resumed onto %d ranks from a %s-rank checkpoint: per-rank random streams "
                     "and data order restart from the seed", self.dist.world_size,
                     meta.get("world_size"))
        log.info("resumed from %s at step %d", path, int(meta["step"]))

    def _load_gd(self, path):
        """Start from a GD model*.pt (fine-tuning): EMA/opt files beside it when present."""
        model_sd = load_state_dict_file(path)
        reference = {k: full_tensor(v) for k, v in self.model.state_dict().items()}
        check_state_dict_fits(model_sd, reference, path)
        self._load_full_into(self.params, model_sd)
        named = parse_gd_step(path)
        folder = os.path.dirname(os.path.abspath(path))
        for rate in self.ema_rates:
            ema_path = os.path.join(folder, f"ema_{rate}_{named:06d}.pt")
            source = model_sd
            if os.path.isfile(ema_path):
                source = load_state_dict_file(ema_path)
                check_state_dict_fits(source, reference, ema_path)
                log.info("loaded EMA %s from %s", rate, ema_path)
            self._load_full_into(self.optimizer.get_ema(rate), source)
        for k, spec in enumerate(self.ema_specs):  # GD has no power EMAs: start at the weights
            if spec.is_power:
                self._load_full_into(self.optimizer.get_ema_slot(k), model_sd)
        opt_path = os.path.join(folder, f"opt{named:06d}.pt")
        adam_steps = self._load_gd_optimizer(opt_path) if os.path.isfile(opt_path) else None
        step = named
        if adam_steps == named + 1:
            # GD names a file by the index of the step it saved after (its modelN.pt holds
            # N + 1 steps; fastdiff's, N): AdamW's step count tells the two apart.
            step = named + 1
            log.info("%s was written by guided-diffusion (AdamW has taken %d steps): "
                     "resuming after step %d", path, adam_steps, step)
        self.trainer.load_state_dict({"step": step})
        log.info("started from GD checkpoint %s at step %d", path, step)

    def _load_gd_optimizer(self, opt_path):
        """Load a GD opt*.pt into the live Adam state; returns AdamW's step count (None when
        the file does not fit these parameters)."""
        states = adam_states_from_gd(load_state_dict_file(opt_path), self.params)
        if states is None:
            log.warning("optimizer state %s does not fit this model's parameters (GD fp16 "
                        "runs store flattened master tensors): starting the optimizer fresh",
                        opt_path)
            return None
        steps = 0
        for live, st in zip(self.optimizer.state_tensors(), states):
            if st is None:
                continue
            exp_avg, exp_avg_sq, step = st
            copy_full_into(live["exp_avg"], exp_avg)
            copy_full_into(live["exp_avg_sq"], exp_avg_sq)
            live["step"].fill_(step)
            steps = max(steps, int(step))
        log.info("loaded optimizer state from %s", opt_path)
        return steps

    def _load_full_into(self, targets, full_sd):
        """Copy ``full_sd``'s tensors into ``targets`` (parallel to ``param_names``)."""
        with torch.no_grad():
            for name, target in zip(self.param_names, targets):
                copy_full_into(target, full_sd[name])
