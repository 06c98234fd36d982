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
import logging
import math
import signal
import time

import numpy as np
import torch

from fastdiff.train import checkpoint as ckpt
from fastdiff.train.metrics import MetricLogger, log_loss_dict
from fastdiff.train.optimizer import build_optimizer
from fastdiff.runtime import all_reduce_sum_, any_rank, autocast
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
        self.checkpointer = ckpt.Checkpointer(
            log_dir, dist_info=dist_info, keep_latest=cfg.keep_latest, ema_rates=self.ema_rates,
            model=model, optimizer=self.optimizer, params=self.params,
            param_names=self.param_names, sampler=schedule_sampler, data=data, trainer=self,
            lr_at=self._lr_for_step, weight_decay=cfg.weight_decay, run_meta=self.run_meta)
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
        return autocast(self.precision, self.device.type)

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
    def state_dict(self):
        """The trainer's own scalars, for the checkpoint (the Stateful the Checkpointer saves)."""
        return {"step": self.step, "lg_loss_scale": self.lg_loss_scale}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        self.lg_loss_scale = float(state.get("lg_loss_scale", self.lg_loss_scale))

    def save(self):
        """Checkpoint the run at the current step (collective: every rank calls it)."""
        t0 = time.perf_counter()
        path = self.checkpointer.save(self.step)
        log.info("saved checkpoint %s (%.1f s)", path, time.perf_counter() - t0)
        return path

    def resume(self, path):
        """Resume from a complete DCP checkpoint folder (exact) or a GD model*.pt file."""
        self.checkpointer.load(path)


def seed_everything(seed, rank):
    """Each rank draws its own noise, timesteps and dropout: seed + rank."""
    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
