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
The loss is pluggable (fastdiff/train/objectives.py): the diffusion objective by default,
GD's classifier_train.py's with ``objective=ClassifierObjective(...)`` and its schedule;
a run may keep zero EMAs (the classifier: no EMA files, no EMA memory).
Additions, off by default: power-function EMAs (``--ema_std``, EDM2) with snapshots, an lr
warmup and diffusers' EMA warmup. Every EMA's rate for step k is a host float computed from
the step counter (fastdiff/power_ema.py), so a resumed run continues them exactly and the
step stays free of device reads.
"""
import logging
import signal
import time

import numpy as np
import torch

from fastdiff import config as C
from fastdiff import power_ema
from fastdiff.optim.fused_adam_ema import clip_factor_from_norm
from fastdiff.runtime import (all_reduce_sum_, any_rank, autocast, full_tensor,
                              local_tensor)
from fastdiff.train import checkpoint as ckpt
from fastdiff.train.metrics import DeviceMeans, MetricLogger
from fastdiff.train.objectives import DiffusionObjective, ImageTrainSchedule
from fastdiff.train.optimizer import build_optimizer
from fastdiff.train.telemetry import Telemetry

log = logging.getLogger("fastdiff")


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the message names the step."""


class Trainer:
    """One training run. ``telemetry`` (progress bar, MFU, TensorBoard: see
    fastdiff/train/telemetry.py) and ``preview`` (a PreviewWriter for --sample_interval) are
    optional; ``metrics_table`` False leaves GD's table off stdout (the summary line stays).
    ``objective`` (default: GD's diffusion loss) and ``schedule`` (default: GD's TrainLoop
    lr and run length from ``cfg``) are the parts fastdiff/train/objectives.py describes."""

    def __init__(self, *, model, diffusion, data, schedule_sampler, cfg, dist_info, log_dir,
                 run_meta=None, telemetry=None, preview=None, metrics_table=True,
                 objective=None, schedule=None):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.sampler = schedule_sampler
        self.cfg = cfg
        self.dist = dist_info
        self.device = dist_info.device
        self.log_dir = log_dir
        self.run_meta = run_meta or {}
        self.objective = objective or DiffusionObjective(diffusion, schedule_sampler)
        self.schedule = schedule or ImageTrainSchedule(cfg)

        self.batch_size = cfg.batch_size
        self.microbatch = cfg.microbatch if cfg.microbatch > 0 else cfg.batch_size
        self.global_batch = cfg.batch_size * dist_info.world_size
        self.ema_rates = C.parse_ema_rates(getattr(cfg, "ema_rate", ""))
        self.ema_stds = C.parse_ema_stds(getattr(cfg, "ema_std", ""))
        # Optimizer slots: fixed rates first, then power EMAs in --ema_std order.
        self.ema_specs = power_ema.ema_specs(self.ema_rates, self.ema_stds)
        self.ema_warmup = (power_ema.EmaWarmup(cfg.ema_inv_gamma, cfg.ema_power)
                           if getattr(cfg, "ema_warmup", False) else None)
        # Constant rates need no per-step list (the optimizer's own are the same).
        self._ema_rates_vary = bool(self.ema_stds) or self.ema_warmup is not None
        self.lr_warmup_steps = int(getattr(cfg, "lr_warmup_steps", 0))
        self.snapshot_interval = int(getattr(cfg, "ema_snapshot_interval", 0)) or cfg.save_interval
        self._last_snapshot_step = None
        self.precision = cfg.precision
        self.use_loss_scale = self.precision == "fp16"
        # Device state of the step (read back only on logging/saving steps): GD's log2 loss
        # scale (float64, as GD's Python float), and the first step whose loss or gradients
        # were not finite (-1: none yet).
        initial = self.objective.initial_lg_loss_scale if self.use_loss_scale else 0.0
        self._lg_loss_scale = torch.tensor(initial, dtype=torch.float64, device=self.device)
        self._first_nonfinite_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.step = 0

        self.param_names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.optimizer = build_optimizer(cfg.optimizer, self.params, cfg.lr, cfg.weight_decay,
                                         [spec.nominal_rate for spec in self.ema_specs],
                                         [spec.name for spec in self.ema_specs])
        self.metrics = MetricLogger(log_dir if dist_info.is_main else None, dist_info.rank,
                                    table_writer=self._write_text if metrics_table else None)
        self.device_metrics = DeviceMeans(self.device)
        self.telemetry = telemetry or Telemetry(self.device, dist_info.world_size,
                                                is_main=dist_info.is_main)
        self.preview = preview
        self.checkpointer = ckpt.Checkpointer(
            log_dir, dist_info=dist_info, keep_latest=cfg.keep_latest, ema_rates=self.ema_rates,
            ema_specs=self.ema_specs,
            model=model, optimizer=self.optimizer, params=self.params,
            param_names=self.param_names, sampler=schedule_sampler, data=data, trainer=self,
            lr_at=self.schedule.recorded_lr, weight_decay=cfg.weight_decay, run_meta=self.run_meta)
        self._stop_signal = None
        self.last_loss = None  # the last step's loss (the objective's batch loss), a device tensor
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
            telemetry.step_done(self.global_batch)
            if self.objective.evaluation_due(self.step):
                with telemetry.paused():
                    self.evaluate()
            logging_step = self.step % self.cfg.log_interval == 0
            saving_step = self.step % self.cfg.save_interval == 0
            if logging_step or saving_step:
                self.check_finite()  # before anything is written: a NaN step never reaches disk
            if logging_step:
                self._dump_metrics()
            if self.preview is not None and self.preview.due(self.step):
                with telemetry.paused():
                    self.write_ema_grid(self.preview)
            if saving_step:
                with telemetry.paused():
                    self.save()
                last_saved = self.step
            elif self._snapshot_due():
                with telemetry.paused():
                    self.write_ema_snapshots()
            # Under torchrun the ranks agree on a SIGTERM/SIGINT with a collective, which
            # waits for the GPU: only on logging steps (a stop lands within --log_interval
            # steps). One process reads its own flag every step (no device involved).
            if (logging_step or not self.dist.distributed) and \
                    any_rank(self._stop_signal is not None, self.device):
                log.info("received %s: saving a checkpoint at step %d and exiting",
                         self._stop_signal or "a stop signal on another rank", self.step)
                if last_saved != self.step:
                    self.save()
                return "stopped"
        if last_saved != self.step:
            self.check_finite()
            self.save()
        return "finished"

    def _total_steps(self):
        """Where the run stops (the progress bar's end), or None when open-ended."""
        return self.schedule.total_steps()

    def _done(self):
        return self.schedule.done(self.step)

    def train_step(self, batch, cond):
        """One optimizer step over ``batch`` (split into microbatches). Reads nothing back
        from the device: returns a 0-dim bool tensor, True when the step was taken (False:
        an fp16 overflow or a non-finite loss/gradient skipped it on the device)."""
        self._last_lr = self._lr_for_step(self.step)
        self.optimizer.set_lr(self._last_lr)
        self.optimizer.zero_grad()
        loss_total = self.forward_backward(batch, cond)
        self.last_loss = self.objective.batch_loss(loss_total,
                                                   -(-batch.shape[0] // self.microbatch))
        return self.optimizer_step(loss_total)

    def _autocast(self):
        return autocast(self.precision, self.device.type)

    def _loss_scale(self):
        """2 ** lg_loss_scale as a float32 device tensor (fp16), else None."""
        return torch.exp2(self._lg_loss_scale).float() if self.use_loss_scale else None

    def forward_backward(self, batch, cond):
        """Losses and gradients over the microbatches of one batch; returns the sum of the
        objective's microbatch losses (a device tensor)."""
        loss_scale = self._loss_scale()
        batch, per_sample = self.objective.begin_batch(batch, cond, self.device)
        n = batch.shape[0]
        starts = list(range(0, n, self.microbatch))
        total = torch.zeros((), device=self.device)
        for i in starts:
            micro = batch[i:i + self.microbatch].to(self.device, non_blocking=True)
            micro_per_sample = {k: v[i:i + self.microbatch].to(self.device, non_blocking=True)
                                for k, v in per_sample.items()}
            last = i == starts[-1]
            if hasattr(self.model, "set_requires_gradient_sync"):
                # FSDP2: reduce-scatter gradients only after the last microbatch.
                self.model.set_requires_gradient_sync(last)
            loss = self.objective.microbatch_loss(self.model, micro, micro_per_sample, n,
                                                  autocast=self._autocast,
                                                  metrics=self.device_metrics)
            (loss if loss_scale is None else loss * loss_scale).backward()
            total += loss.detach().float()
        return total

    def evaluate(self):
        """The objective's validation pass (a forward on every rank; no gradients)."""
        self.objective.evaluate(self.model, self.device, self.microbatch,
                                autocast=self._autocast, metrics=self.device_metrics)

    def optimizer_step(self, loss_total=None):
        """Unscale, check, clip, AdamW + EMA, all decided on the device; returns the 0-dim
        bool tensor "taken". A non-finite gradient (or ``loss_total``) skips the step for
        every weight, moment and EMA; under fp16 it also lowers the loss scale (GD), else
        it is remembered for :meth:`check_finite`."""
        metrics = self.device_metrics
        loss_scale = self._loss_scale()
        sum_sq, found_inf = self.optimizer.grad_stats(loss_scale)
        if loss_total is not None:
            found_inf = torch.maximum(found_inf, (~torch.isfinite(loss_total)).float())
        grad_norm = sum_sq.sqrt()
        clip = clip_factor_from_norm(grad_norm, self.cfg.grad_clip) if self.cfg.grad_clip > 0 \
            else None
        self.optimizer.step(loss_scale=loss_scale, found_inf=found_inf, clip_factor=clip,
                            ema_rates=self.ema_rates_for_step(self.step + 1))
        taken = found_inf == 0
        # A loss-aware sampler learns from this step's losses once the step is judged, and
        # only from a taken step's finite ones: a NaN would poison its history for good.
        self.objective.step_judged(taken)
        # GD logs the norms of taken steps only (its fp16 path returns before logging them).
        metrics.add("grad_norm", torch.where(taken, grad_norm, 0.0), taken.float())
        if self.use_loss_scale:
            metrics.add("lg_loss_scale", self._lg_loss_scale)
            self._lg_loss_scale = torch.where(taken, self._lg_loss_scale + self.cfg.fp16_scale_growth,
                                              self._lg_loss_scale - 1)
        else:
            metrics.add("skipped_nonfinite", (~taken).float())
            self._first_nonfinite_step = torch.where(
                (self._first_nonfinite_step < 0) & ~taken,
                torch.full_like(self._first_nonfinite_step, self.step + 1),
                self._first_nonfinite_step)
        if (self.step + 1) % self.cfg.log_interval == 0:
            # GD logs the mean of every step's parameter norm; the parameters move little in
            # an interval, so the norm after its last step stands for it (one pass, not N).
            metrics.add("param_norm", self._param_norm())
        return taken

    def _param_norm(self):
        params = [local_tensor(p.detach()) for p in self.params]
        sq = torch.stack(torch._foreach_norm(params, 2, dtype=torch.float64)).square().sum()
        return all_reduce_sum_(sq).sqrt()

    def check_finite(self):
        """Stop the run (TrainingError) if a step since the start had a non-finite loss or
        gradient and --skip_nonfinite is off. Reads the device: called on logging and saving
        steps only, before anything is written."""
        if self.use_loss_scale or self.cfg.skip_nonfinite:
            return
        first = int(self._first_nonfinite_step)
        if first >= 0:
            raise TrainingError(
                f"non-finite loss or gradient at step {first}; the step was not applied and "
                "nothing after it was saved (the last checkpoint is kept). Lower --lr, try "
                "--precision fp32, or pass --skip_nonfinite to skip such steps")

    @property
    def lg_loss_scale(self):
        """GD's log2 loss scale (a host float: reads the device; not for the hot path)."""
        return float(self._lg_loss_scale)

    @lg_loss_scale.setter
    def lg_loss_scale(self, value):
        self._lg_loss_scale.fill_(float(value))

    def ema_rates_for_step(self, step):
        """Every EMA slot's rate for 1-based ``step`` (host floats), or None when the rates
        are the constant ones the optimizer was built with."""
        if not self._ema_rates_vary:
            return None
        return power_ema.ema_rates_for_step(self.ema_specs, step, self.ema_warmup)

    def _lr_for_step(self, k):
        """The lr of the step after ``k`` completed ones (the schedule's)."""
        return self.schedule.lr(k)

    def _dump_metrics(self):
        """GD's interval means plus step, samples, lr and the telemetry of this interval
        (images/s, step time, data wait, peak memory, FLOPs and MFU; rank 0's)."""
        self.device_metrics.drain_into(self.metrics)  # the interval's one device read
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
        gathered in full: a collective under FSDP2, so every rank runs this. Without fixed
        rates, the first power EMA's."""
        ema = self.optimizer.get_ema_slot(0)
        weights = {name: full_tensor(t).detach() for name, t in zip(self.param_names, ema)}
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
        self.write_ema_snapshots()
        return path

    def _snapshot_due(self):
        return bool(self.ema_stds) and self.step % self.snapshot_interval == 0

    def write_ema_snapshots(self):
        """Snapshots of the power EMAs at this step (collective; once per step)."""
        if not self.ema_stds or self._last_snapshot_step == self.step:
            return
        paths = self.checkpointer.write_ema_snapshots(self.step)
        self._last_snapshot_step = self.step
        if paths:
            log.info("power-EMA snapshots: %s", ", ".join(paths))

    def resume(self, path):
        """Resume from a complete DCP checkpoint folder (exact) or a GD model*.pt file."""
        self.checkpointer.load(path)


def seed_everything(seed, rank):
    """Each rank draws its own noise, timesteps and dropout: seed + rank."""
    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
