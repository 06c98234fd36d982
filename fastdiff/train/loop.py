"""The training loop: ``Trainer.train()`` → ``train_step()`` → ``forward_backward()``.

Semantics are GD's TrainLoop (scripts/image_train.py), with these deliberate differences:
- ``step`` counts completed optimizer steps; ``model{step:06d}.pt`` holds the weights after
  ``step`` steps (GD saves after its first step under the name 000000).
- Resuming continues at ``step + 1`` without re-running a step, overwriting nothing and
  appending to the logs (GD re-runs one step, overwrites its checkpoint, truncates logs).
- Mixed precision is autocast with fp32 master weights (GD converts conv weights to fp16).
Kept exactly: gradients summed over microbatches (each microbatch's loss is its own mean,
so the gradient of a batch split in k microbatches is k times the unsplit mean — GD's
behaviour, which the lr was tuned with), dynamic fp16 loss scaling (lg_loss_scale from 20,
+fp16_scale_growth per good step, −1 and the step and the EMA skipped on overflow), the
lr annealing schedule, EMA after every taken step, GD's logged keys.
"""
import contextlib
import logging
import math
import os
import signal
import time

import numpy as np
import torch

from fastdiff.train import checkpoint as ckpt
from fastdiff.train.metrics import MetricLogger, log_loss_dict
from fastdiff.train.optimizer import (adam_states_from_gd, build_optimizer,
                                      gd_optimizer_state_dict)
from fastdiff.train.parallel import all_reduce_sum_, any_rank
from fastdiff.train.telemetry import Telemetry

log = logging.getLogger("fastdiff")

INITIAL_LG_LOSS_SCALE = 20.0


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the message names the step."""


def _full(t):
    """The whole tensor of a DTensor shard (collective), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


class Trainer:
    """One training run. ``telemetry`` (progress bar, MFU, TensorBoard: see
    fastdiff/train/telemetry.py) and ``preview`` (a PreviewWriter for --sample_interval) are
    optional; ``metrics_table`` False leaves GD's table off stdout (the summary line stays)."""

    def __init__(self, *, model, diffusion, data, schedule_sampler, cfg, dist_info, log_dir,
                 run_meta=None, telemetry=None, preview=None, metrics_table=True):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.sampler = schedule_sampler
        self.cfg = cfg
        self.dist = dist_info
        self.device = dist_info.device
        self.log_dir = log_dir
        self.run_meta = run_meta or {}

        self.batch_size = cfg.batch_size
        self.microbatch = cfg.microbatch if cfg.microbatch > 0 else cfg.batch_size
        self.global_batch = cfg.batch_size * dist_info.world_size
        self.ema_rates = [float(r) for r in cfg.ema_rate.split(",") if r.strip()]
        self.precision = cfg.precision
        self.use_loss_scale = self.precision == "fp16"
        self.lg_loss_scale = INITIAL_LG_LOSS_SCALE if self.use_loss_scale else 0.0
        self.step = 0

        self.param_names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.optimizer = build_optimizer(cfg.optimizer, self.params, cfg.lr, cfg.weight_decay,
                                         self.ema_rates)
        self.metrics = MetricLogger(log_dir if dist_info.is_main else None, dist_info.rank,
                                    table_writer=self._write_text if metrics_table else None)
        self.telemetry = telemetry or Telemetry(self.device, dist_info.world_size,
                                                is_main=dist_info.is_main)
        self.preview = preview
        self._stop_signal = None
        self.last_loss = None  # the last step's loss (mean over microbatches), a host float
        self._last_lr = None

    # ------------------------------------------------------------------ loop
    def train(self):
        """Run until lr_anneal_steps / max_steps, or a SIGTERM/SIGINT (then checkpoint, exit)."""
        previous = self._install_signal_handlers()
        self.telemetry.start(self.step, self._total_steps())
        try:
            with self.telemetry.bar.redirect_logging(log):
                return self._train_until_done()
        finally:
            self.telemetry.close()
            self._restore_signal_handlers(previous)

    def _train_until_done(self):
        telemetry = self.telemetry
        last_saved = None
        while not self._done():
            batch, cond = telemetry.next_batch(self.data)
            self.train_step(batch, cond)
            self.step += 1
            telemetry.step_done(self.global_batch, self.last_loss)
            if self.step % self.cfg.log_interval == 0:
                self._dump_metrics()
            if self.preview is not None and self.preview.due(self.step):
                with telemetry.paused():
                    self.write_ema_grid(self.preview)
            if self.step % self.cfg.save_interval == 0:
                with telemetry.paused():
                    self.save()
                last_saved = self.step
            if any_rank(self._stop_signal is not None, self.device):
                log.info("received %s: saving a checkpoint at step %d and exiting",
                         self._stop_signal or "a stop signal on another rank", self.step)
                if last_saved != self.step:
                    self.save()
                return "stopped"
        if last_saved != self.step:
            self.save()
        return "finished"

    def _total_steps(self):
        """Where the run stops (the progress bar's end), or None when open-ended."""
        limits = [n for n in (self.cfg.lr_anneal_steps, self.cfg.max_steps) if n]
        return min(limits) if limits else None

    def _done(self):
        if self.cfg.lr_anneal_steps and self.step >= self.cfg.lr_anneal_steps:
            return True
        return bool(self.cfg.max_steps) and self.step >= self.cfg.max_steps

    def train_step(self, batch, cond):
        self._last_lr = self._lr_for_step(self.step)
        self.optimizer.set_lr(self._last_lr)
        self.optimizer.zero_grad()
        loss_total = self.forward_backward(batch, cond)
        self.last_loss = loss_total / -(-batch.shape[0] // self.microbatch)
        if not self.use_loss_scale and not math.isfinite(loss_total):
            if self.cfg.skip_nonfinite:
                log.warning("non-finite loss at step %d: step skipped (--skip_nonfinite)",
                            self.step + 1)
                self.metrics.logkv_mean("skipped_nonfinite", 1.0)
                return False
            raise TrainingError(f"non-finite loss ({loss_total}) at step {self.step + 1}; the last "
                                "checkpoint is kept. Lower --lr, try --precision fp32, or pass "
                                "--skip_nonfinite to skip such steps")
        return self.optimizer_step()

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def forward_backward(self, batch, cond):
        """Losses and gradients over the microbatches of one batch; returns the summed loss."""
        loss_scale = 2.0 ** self.lg_loss_scale if self.use_loss_scale else 1.0
        n = batch.shape[0]
        starts = list(range(0, n, self.microbatch))
        total = torch.zeros((), device=self.device)
        for i in starts:
            micro = batch[i:i + self.microbatch].to(self.device, non_blocking=True)
            micro_cond = {k: v[i:i + self.microbatch].to(self.device, non_blocking=True)
                          for k, v in cond.items()}
            last = i == starts[-1]
            if hasattr(self.model, "set_requires_gradient_sync"):
                # FSDP2: reduce-scatter gradients only after the last microbatch.
                self.model.set_requires_gradient_sync(last)
            t, weights = self.sampler.sample(micro.shape[0], self.device)
            with self._autocast():
                losses = self.diffusion.training_losses(self.model, micro, t,
                                                        model_kwargs=micro_cond)
            if hasattr(self.sampler, "update_with_local_losses"):
                self.sampler.update_with_local_losses(t, losses["loss"].detach())
            loss = (losses["loss"] * weights).mean()
            log_loss_dict(self.metrics, self.diffusion.num_timesteps, t,
                          {k: v * weights for k, v in losses.items()})
            (loss * loss_scale).backward()
            total += loss.detach().float()
        return float(total)

    def optimizer_step(self):
        """Unscale, check, clip, AdamW + EMA. Returns False when an fp16 overflow skips it."""
        loss_scale = 2.0 ** self.lg_loss_scale if self.use_loss_scale else 1.0
        if self.use_loss_scale:
            self.metrics.logkv_mean("lg_loss_scale", self.lg_loss_scale)
        grad_norm, param_norm = self._global_norms()
        grad_norm /= loss_scale
        if self.use_loss_scale and not math.isfinite(grad_norm):
            self.lg_loss_scale -= 1
            log.info("found a non-finite gradient: step skipped, lg_loss_scale lowered to %g",
                     self.lg_loss_scale)
            self.optimizer.zero_grad()
            return False
        self.metrics.logkv_mean("grad_norm", grad_norm)
        self.metrics.logkv_mean("param_norm", param_norm)
        clip = 1.0
        if self.cfg.grad_clip > 0:
            clip = min(1.0, self.cfg.grad_clip / (grad_norm + 1e-6))
        self.optimizer.step(inv_scale=1.0 / loss_scale, clip=clip)
        if self.use_loss_scale:
            self.lg_loss_scale += self.cfg.fp16_scale_growth
        return True

    def _global_norms(self):
        """(grad L2 norm, param L2 norm) over all parameters and all ranks, one host sync."""
        grads = [_local(p.grad) for p in self.params if p.grad is not None]
        params = [_local(p.detach()) for p in self.params]
        sq = torch.zeros(2, dtype=torch.float64, device=self.device)
        if grads:
            sq[0] = torch.stack([g.float().norm() for g in grads]).double().square().sum()
        sq[1] = torch.stack([q.float().norm() for q in params]).double().square().sum()
        if self.dist.distributed:
            all_reduce_sum_(sq)
        g2, p2 = sq.tolist()
        return math.sqrt(g2), math.sqrt(p2)

    def _lr_for_step(self, k):
        """GD's annealing: step 0 and 1 use lr, step k ≥ 1 uses lr·(1 − (k−1)/lr_anneal_steps).

        (GD updates the lr after each step from the index of the step just taken.)
        """
        if not self.cfg.lr_anneal_steps or k == 0:
            return self.cfg.lr
        return self.cfg.lr * (1 - (k - 1) / self.cfg.lr_anneal_steps)

    def _dump_metrics(self):
        """GD's interval means plus step, samples, lr and the telemetry of this interval
        (images/s, step time, data wait, peak memory, FLOPs and MFU; rank 0's)."""
        self.metrics.logkv("step", self.step)
        self.metrics.logkv("samples", self.step * self.global_batch)
        if self._last_lr is not None:
            self.metrics.logkv("lr", self._last_lr)
        for key, value in self.telemetry.interval_metrics().items():
            self.metrics.logkv(key, value)
        kvs = self.metrics.dumpkvs()
        self.telemetry.dumped(kvs, self.step)

    def _write_text(self, text):
        self.telemetry.bar.write(text)

    def write_ema_grid(self, writer, path=None):
        """A sample grid (``writer``: a PreviewWriter) from the first EMA rate's weights,
        gathered in full: a collective under FSDP2, so every rank runs this."""
        ema = self.optimizer.get_ema(self.ema_rates[0])
        weights = {name: _full(t).detach() for name, t in zip(self.param_names, ema)}
        path = writer.write(self.step, weights, path)
        if path:
            log.info("sample grid: %s", path)

    # ------------------------------------------------------------ signals
    def _install_signal_handlers(self):
        def handler(signum, _frame):
            self._stop_signal = signal.Signals(signum).name

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return previous

    @staticmethod
    def _restore_signal_handlers(previous):
        for sig, h in previous.items():
            signal.signal(sig, h)

    # -------------------------------------------------------- checkpoints
    def _dcp_state(self):
        emas = {str(rate): dict(zip(self.param_names, self.optimizer.get_ema(rate)))
                for rate in self.ema_rates}
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
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def _trainer_meta(self):
        return {"step": self.step, "lg_loss_scale": self.lg_loss_scale,
                "world_size": self.dist.world_size, "ema_rates": [str(r) for r in self.ema_rates],
                **self.run_meta}

    def save(self):
        """Full training state (DCP, sharded) + GD-format exports from rank 0."""
        t0 = time.perf_counter()
        path = ckpt.save_training_state(self.log_dir, self.step, self._dcp_state(),
                                        self._rank_state(), self._trainer_meta())
        self._export_gd_files()
        if self.dist.is_main:
            ckpt.prune_checkpoints(self.log_dir, self.cfg.keep_latest,
                                   [str(r) for r in self.ema_rates])
        log.info("saved checkpoint %s (%.1f s)", path, time.perf_counter() - t0)
        return path

    def _export_gd_files(self):
        # full_tensor() is collective under FSDP2: every rank runs it, rank 0 writes.
        model_sd = {k: _full(v).detach().cpu() for k, v in self.model.state_dict().items()}
        ema_sds = {str(rate): {n: _full(t).detach().cpu()
                               for n, t in zip(self.param_names, self.optimizer.get_ema(rate))}
                   for rate in self.ema_rates}
        states = [{k: (_full(v).detach().cpu() if torch.is_tensor(v) else v) for k, v in st.items()}
                  for st in self.optimizer.state_tensors()]
        if self.dist.is_main:
            opt_sd = gd_optimizer_state_dict(states, self._lr_for_step(self.step),
                                             self.cfg.weight_decay)
            ckpt.export_gd_files(self.log_dir, self.step, model_sd, ema_sds, opt_sd)

    def resume(self, path):
        """Resume from a complete DCP checkpoint folder (exact) or a GD model*.pt file."""
        if os.path.isdir(path):
            self._resume_dcp(path)
        else:
            self._resume_gd(path)

    def _resume_dcp(self, path):
        meta = ckpt.read_trainer_meta(path)
        saved_rates = meta.get("ema_rates", [])
        state = self._dcp_state()
        missing = [r for r in state["ema"] if r not in saved_rates]
        for r in missing:  # a new EMA rate starts from the resumed weights
            del state["ema"][r]
        ckpt.load_training_state(path, state)
        if missing:
            for r in missing:
                for e, p in zip(self.optimizer.get_ema(float(r)), self.params):
                    _local(e).copy_(_local(p.detach()))
            log.info("EMA rates %s not in the checkpoint: started from the model weights", missing)
        self.step = int(meta["step"])
        self.lg_loss_scale = float(meta.get("lg_loss_scale", self.lg_loss_scale))
        rank_state = ckpt.load_rank_state(path, self.dist.rank)
        same_world = int(meta.get("world_size", 1)) == self.dist.world_size
        if rank_state is not None and same_world:
            torch.set_rng_state(rank_state["torch_rng"])
            if "cuda_rng" in rank_state and self.device.type == "cuda":
                torch.cuda.set_rng_state(rank_state["cuda_rng"], self.device)
            if rank_state.get("sampler") is not None and hasattr(self.sampler, "load_state_dict"):
                self.sampler.load_state_dict(rank_state["sampler"])
            if rank_state.get("data") is not None and hasattr(self.data, "load_state_dict"):
                self.data.load_state_dict(rank_state["data"])
        else:
            # Another world size: weights, optimizer, EMAs, step and loss scale are exact;
            # the per-rank streams (noise, timesteps, data order) restart from the seed.
            rank0 = ckpt.load_rank_state(path, 0)
            if rank0 and rank0.get("sampler") is not None and hasattr(self.sampler, "load_state_dict"):
                # The loss history is the same on every rank; keep this rank's own RNG stream.
                state = dict(rank0["sampler"], rng_state=self.sampler.state_dict()["rng_state"])
                self.sampler.load_state_dict(state)
            log.info("resumed onto %d ranks from a %s-rank checkpoint: per-rank random streams "
                     "and data order restart from the seed", self.dist.world_size,
                     meta.get("world_size"))
        log.info("resumed from %s at step %d", path, self.step)

    def _resume_gd(self, path):
        """Start from a GD model*.pt (fine-tuning): EMA/opt files beside it when present."""
        model_sd = ckpt.load_state_dict_file(path)
        reference = {k: _full(v) for k, v in self.model.state_dict().items()}
        ckpt.check_state_dict_fits(model_sd, reference, path)
        self._load_full_into(dict(zip(self.param_names, self.params)), model_sd)
        self.step = ckpt.parse_gd_step(path)
        folder = os.path.dirname(os.path.abspath(path))
        for rate in self.ema_rates:
            ema_path = os.path.join(folder, f"ema_{rate}_{self.step:06d}.pt")
            source = model_sd
            if os.path.isfile(ema_path):
                source = ckpt.load_state_dict_file(ema_path)
                ckpt.check_state_dict_fits(source, reference, ema_path)
                log.info("loaded EMA %s from %s", rate, ema_path)
            self._load_full_into(dict(zip(self.param_names, self.optimizer.get_ema(rate))), source)
        opt_path = os.path.join(folder, f"opt{self.step:06d}.pt")
        if os.path.isfile(opt_path):
            states = adam_states_from_gd(ckpt.load_state_dict_file(opt_path), self.params)
            if states is None:
                log.warning("optimizer state %s does not fit this model's parameters (GD fp16 "
                            "runs store flattened master tensors): starting the optimizer fresh",
                            opt_path)
            else:
                for live, st in zip(self.optimizer.state_tensors(), states):
                    if st is None:
                        continue
                    exp_avg, exp_avg_sq, step = st
                    self._copy_full_into(live["exp_avg"], exp_avg)
                    self._copy_full_into(live["exp_avg_sq"], exp_avg_sq)
                    live["step"].fill_(step)
                log.info("loaded optimizer state from %s", opt_path)
        log.info("started from GD checkpoint %s at step %d", path, self.step)

    def _load_full_into(self, named_targets, full_sd):
        with torch.no_grad():
            for name, target in named_targets.items():
                self._copy_full_into(target, full_sd[name])

    @staticmethod
    @torch.no_grad()
    def _copy_full_into(target, full):
        """Copy a full (unsharded) tensor into a parameter, EMA or state that may be a DTensor."""
        if hasattr(target, "to_local"):
            from torch.distributed.tensor import distribute_tensor
            shard = distribute_tensor(full.to(target.device_mesh.device_type), target.device_mesh,
                                      target.placements)
            target.to_local().copy_(shard.to_local())
        else:
            target.detach().copy_(full)


def seed_everything(seed, rank):
    """Each rank draws its own noise, timesteps and dropout: seed + rank."""
    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
