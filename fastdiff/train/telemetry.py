"""What a person watching a run sees: throughput, MFU, memory, data wait, a progress bar and
TensorBoard scalars.

Every measurement here is taken from values the training step already has on the host
(the loss it turned into a float, ``time.perf_counter``), so none of it adds a device sync.
"""
import contextlib
import dataclasses
import importlib.util
import logging
import os
import re
import resource
import sys
import time

import torch

log = logging.getLogger("fastdiff")

GIB = float(2 ** 30)


# ----------------------------------------------------------------------------- FLOPs
def count_flops_per_image(model_cfg, diff_cfg=None):
    """Training FLOPs of one image: forward + backward of the model, counted from the model.

    A fresh copy of the model is built from ``model_cfg`` (and ``diff_cfg.learn_sigma``)
    with GD's plain modules (torch GroupNorm, einsum attention), so every conv, matmul and
    einsum is visible to ``torch.utils.flop_counter.FlopCounterMode``; it runs one image
    (batch 1), timestep and class embeddings included, forward then backward, on the meta
    device (no memory, no arithmetic), falling back to the CPU if a module refuses meta
    tensors. Activation checkpointing is off in the copy: model FLOPs, as in MFU, do not
    count recomputation. Normalisation and elementwise ops are not counted (the convention).
    A ``SuperResModelConfig`` counts GD's super-res UNet at ``large_size``, given a
    ``low_res`` image at ``small_size`` (its bilinear upsampling is elementwise: not counted).
    A ``ClassifierConfig`` counts GD's noisy-image classifier (``EncoderUNetModel``, its
    pooling head included) on one ``image_size`` image; ``diff_cfg`` is not needed there
    (the classifier's outputs do not depend on the diffusion).
    """
    from torch.utils.flop_counter import FlopCounterMode

    build, image_size, extra_inputs = _flops_model_builder(model_cfg, diff_cfg)

    def count_on(device):
        # A private RNG state: on the CPU, initialisation and inputs would otherwise draw from
        # the training stream.
        with torch.random.fork_rng(devices=[]), torch.device(device):
            model = build()
            extra = {name: make(device) for name, make in extra_inputs.items()}
            return _count_train_flops(model, image_size, device, FlopCounterMode, extra)

    try:
        return count_on("meta")
    except (NotImplementedError, RuntimeError):
        return count_on("cpu")


def _flops_model_builder(model_cfg, diff_cfg):
    """(a function building the plain-module model of ``model_cfg``, its image size, the
    extra model inputs as {name: function(device) -> tensor})."""
    from fastdiff.models import create_model
    from fastdiff.models.classifier import create_classifier
    from fastdiff.models.super_res import sr_create_model

    kwargs = dataclasses.asdict(model_cfg)
    plain = dict(norm_backend="torch", attention_backend="math")
    if "classifier_width" in kwargs:  # a ClassifierConfig (no checkpointing flag: GD's has none)
        kwargs.update(classifier_use_fp16=False, **plain)
        return (lambda: create_classifier(**kwargs)), kwargs["image_size"], {}
    kwargs.update(use_checkpoint=False, use_fp16=False, learn_sigma=diff_cfg.learn_sigma, **plain)
    if "large_size" in kwargs:
        small = kwargs["small_size"]
        low_res = {"low_res": lambda device: torch.randn(1, 3, small, small, device=device)}
        return (lambda: sr_create_model(**kwargs)), kwargs["large_size"], low_res
    return (lambda: create_model(**kwargs)), kwargs["image_size"], {}


def _count_train_flops(model, image_size, device, counter_cls, extra_inputs=None):
    """FLOPs counted by ``counter_cls`` over one forward + backward of ``model`` on one image
    (``extra_inputs``: more model kwargs, e.g. the super-res model's ``low_res``; its own input
    channels then hold them too, so the image has 3). A class-conditional UNet gets label 0;
    a classifier (no ``num_classes``: the labels are its outputs) none."""
    channels = 3 if extra_inputs else model.in_channels
    x = torch.randn(1, channels, image_size, image_size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    kwargs = dict(extra_inputs or {})
    if getattr(model, "num_classes", None) is not None:
        kwargs["y"] = torch.zeros(1, dtype=torch.long, device=device)
    with torch.enable_grad(), counter_cls(display=False) as counter:
        model(x, t, **kwargs).sum().backward()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------ peak FLOP/s
# Dense peak TFLOP/s (no 2:4 sparsity) per GPU, from the vendors' datasheets / whitepapers:
# NVIDIA H100 datasheet (SXM5, PCIe, NVL columns), H200 datasheet (SXM, NVL), A100 datasheet,
# L40S, L40, L4 and A10 datasheets, NVIDIA Ada GPU architecture whitepaper (RTX 4090,
# FP16/BF16 tensor with FP32 accumulate), NVIDIA Ampere GA102 whitepaper (RTX 3090, FP16/BF16
# tensor with FP32 accumulate), Tesla V100 datasheet. Where a datasheet gives tensor-core
# figures only "with sparsity", the number here is half of it.
# Keys: bf16 / fp16 tensor core, tf32 tensor core, fp32 (CUDA cores, no tensor cores).
# Order matters: the first pattern that matches the device name wins.
_PEAK_TFLOPS = (
    (r"H100.*NVL", dict(bf16=835.5, fp16=835.5, tf32=417.5, fp32=60.0)),
    (r"H100.*PCIe", dict(bf16=756.5, fp16=756.5, tf32=378.0, fp32=51.0)),
    (r"H100", dict(bf16=989.5, fp16=989.5, tf32=494.5, fp32=67.0)),  # SXM5 (HBM3)
    (r"H200.*NVL", dict(bf16=835.5, fp16=835.5, tf32=417.5, fp32=60.0)),
    (r"H200", dict(bf16=989.5, fp16=989.5, tf32=494.5, fp32=67.0)),  # SXM
    (r"A100", dict(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5)),  # SXM4 and PCIe
    (r"L40S", dict(bf16=362.05, fp16=362.05, tf32=183.0, fp32=91.6)),
    (r"L40\b", dict(bf16=181.05, fp16=181.05, tf32=90.5, fp32=90.5)),
    (r"\bL4\b", dict(bf16=121.0, fp16=121.0, tf32=60.0, fp32=30.3)),
    (r"\bA10\b", dict(bf16=125.0, fp16=125.0, tf32=62.5, fp32=31.2)),
    (r"RTX 4090(?! ?D)", dict(bf16=165.2, fp16=165.2, tf32=82.6, fp32=82.6)),
    (r"RTX 3090(?! ?Ti)", dict(bf16=71.0, fp16=71.0, tf32=35.6, fp32=35.6)),
    # V100 has no bf16 or TF32 tensor cores: bf16 has no meaningful peak, fp32 runs on CUDA cores.
    (r"V100S", dict(fp16=130.0, tf32=16.4, fp32=16.4)),
    (r"V100.*PCIE", dict(fp16=112.0, tf32=14.0, fp32=14.0)),
    (r"V100", dict(fp16=125.0, tf32=15.7, fp32=15.7)),  # SXM2
)


def peak_flops_for_name(name, precision, tf32=False):
    """Dense peak FLOP/s of the GPU called ``name`` (as ``torch.cuda.get_device_name`` spells
    it) for ``precision`` ("bf16", "fp16" or "fp32"; fp32 uses the TF32 tensor-core peak when
    ``tf32``), or None when the GPU or the combination is not in the table."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be bf16, fp16 or fp32, got {precision!r}")
    key = "tf32" if precision == "fp32" and tf32 else precision
    for pattern, peaks in _PEAK_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            tflops = peaks.get(key)
            return None if tflops is None else tflops * 1e12
    return None


def tf32_enabled():
    """Whether fp32 convolutions or matmuls may run on TF32 tensor cores.

    The UNet's FLOPs are mostly convolutions, which cuDNN runs in TF32 by default
    (``torch.backends.cudnn.allow_tf32``); matmuls follow ``cuda.matmul.allow_tf32``.
    """
    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


def device_peak_flops(device, precision):
    """Dense peak FLOP/s of ``device`` for the run's ``precision``, or None (CPU, or a GPU
    missing from the table): MFU is then not reported."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device), precision, tf32_enabled())


def model_flops_utilization(flops_per_image, images_per_sec, world_size, peak_flops):
    """MFU: the model FLOP/s one device achieves over its peak (``images_per_sec`` is global)."""
    return flops_per_image * (images_per_sec / world_size) / peak_flops


# ----------------------------------------------------------------------------- memory
def reset_peak_memory(device):
    """Start a new peak-memory window (CUDA only: a process's peak RSS cannot be reset)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    """Peak memory in GiB: CUDA's max allocated since the last reset, else the process's
    peak resident set size since it started."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024 / GIB


# ------------------------------------------------------------------- interval timing
class IntervalMeter:
    """Wall time, steps, images and time spent waiting for data over one log interval.

    Time inside :meth:`paused` (checkpoints, preview grids) is left out, so images/s and
    the step time describe training alone. ``clock`` returns seconds (``time.perf_counter``;
    tests pass a fake clock that advances exactly, instead of sleeping).
    """

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.reset()

    def reset(self):
        self.start = self.clock()
        self.paused_s = 0.0
        self.data_wait_s = 0.0
        self.steps = 0
        self.images = 0

    def next_batch(self, data):
        """``next(data)``, timed as data wait."""
        t0 = self.clock()
        batch = next(data)
        self.data_wait_s += self.clock() - t0
        return batch

    def step_done(self, images):
        """Count one finished step of ``images`` images (global)."""
        self.steps += 1
        self.images += images

    @contextlib.contextmanager
    def paused(self):
        t0 = self.clock()
        try:
            yield
        finally:
            self.paused_s += self.clock() - t0

    def busy_seconds(self):
        """Seconds since the interval began, paused time left out."""
        return self.clock() - self.start - self.paused_s

    def images_per_sec(self):
        busy = self.busy_seconds()
        return self.images / busy if busy > 0 and self.images else None

    def summary(self):
        """This interval's {images_per_sec, step_time_ms, data_wait_frac} (those known)."""
        busy = self.busy_seconds()
        out = {}
        if busy <= 0:
            return out
        if self.images:
            out["images_per_sec"] = self.images / busy
        if self.steps:
            out["step_time_ms"] = 1000.0 * busy / self.steps
        out["data_wait_frac"] = min(1.0, self.data_wait_s / busy)
        return out


# ------------------------------------------------------------------------ log line
def metrics_line(kvs):
    """One human-readable line from a metrics dump; fields that were not logged are left out."""
    parts = []
    if "step" in kvs:
        parts.append(f"step {int(kvs['step'])}")
    if "loss" in kvs:
        parts.append(f"loss {kvs['loss']:.4g}")
    if "images_per_sec" in kvs:
        parts.append(f"{kvs['images_per_sec']:.1f} img/s")
    if "mfu" in kvs:
        parts.append(f"MFU {100 * kvs['mfu']:.1f}%")
    if "peak_mem_gib" in kvs:
        parts.append(f"mem {kvs['peak_mem_gib']:.2f} GiB")
    if "data_wait_frac" in kvs:
        parts.append(f"data {100 * kvs['data_wait_frac']:.0f}%")
    if "lg_loss_scale" in kvs:
        parts.append(f"lg_loss_scale {kvs['lg_loss_scale']:.3g}")
    if "lr" in kvs:
        parts.append(f"lr {kvs['lr']:.3g}")
    return " | ".join(parts)


# ---------------------------------------------------------------------- progress bar
def progress_enabled(no_progress, is_main, stream=None):
    """A bar only on rank 0, not with --no_progress, and only when ``stream`` (stderr) is a
    terminal: a bar in a log file or a pipe is noise."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(is_main and not no_progress and isatty is not None and isatty())


def _terminal_columns(stream):
    """The terminal's width, or 0 when it reports none: a pseudo-terminal opened without a
    size (`script`, some schedulers, `docker -t`) says 0 columns and 0 rows, and tqdm then
    draws nothing (no width, and every bar "hidden" below a 0-row screen)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class ProgressBar:
    """tqdm over training steps (``total`` None: open-ended), with loss and img/s.

    Disabled, it draws nothing and :meth:`write` is a plain print, so callers need no
    conditions.
    """

    def __init__(self, total, initial=0, enabled=True, stream=None, unit="step"):
        self._bar = None
        if enabled:
            from tqdm import tqdm
            stream = sys.stderr if stream is None else stream
            # tqdm hides every bar on a terminal that reports no size: give it one.
            size = {"dynamic_ncols": True} if _terminal_columns(stream) else \
                {"ncols": 100, "nrows": 40}
            self._bar = tqdm(total=total, initial=initial, unit=unit, file=stream, **size)

    def update(self, loss=None, images_per_sec=None):
        """Advance one step. ``loss`` must already be a host float (no sync here)."""
        if self._bar is None:
            return
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{loss:.4g}"
        if images_per_sec is not None:
            postfix["img/s"] = f"{images_per_sec:.1f}"
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def redirect_logging(self, logger):
        """A context in which ``logger``'s console output is printed above the bar."""
        if self._bar is None:
            return contextlib.nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm
        return logging_redirect_tqdm(loggers=[logger], tqdm_class=type(self._bar))

    def write(self, text, file=None):
        """Print ``text`` (stdout by default) without tearing the bar."""
        if self._bar is None:
            print(text, file=file, flush=True)
        else:
            type(self._bar).write(text, file=file or sys.stdout)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ------------------------------------------------------------------------ TensorBoard
def tensorboard_available():
    """Whether the ``tensorboard`` package (needed by torch.utils.tensorboard) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLogger:
    """Every dumped metric as a TensorBoard scalar under ``<log_dir>/tb``, flushed per dump.

    The event file is opened at the first dump, so a run that fails during setup leaves no
    tb/ folder behind.
    """

    def __init__(self, log_dir):
        self.path = os.path.join(log_dir, "tb")
        self._writer = None

    def log(self, kvs, step):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=self.path)
        for key, value in kvs.items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# --------------------------------------------------------------------- the bundle
class Telemetry:
    """The trainer's instruments: interval meter, FLOPs/peak for MFU, memory, progress bar,
    TensorBoard and the one-line summary. Built by the CLI; the defaults (no FLOPs count,
    no bar, no TensorBoard) are what a Trainer made in code gets. ``clock``: the interval
    meter's clock (seconds)."""

    def __init__(self, device, world_size=1, *, flops_per_image=None, peak_flops=None,
                 tensorboard=None, progress=False, is_main=True, clock=time.perf_counter):
        self.device = torch.device(device)
        self.world_size = world_size
        self.flops_per_image = flops_per_image
        self.peak_flops = peak_flops
        self.tensorboard = tensorboard
        self.progress = progress
        self.is_main = is_main
        self.meter = IntervalMeter(clock)
        self.bar = ProgressBar(None, enabled=False)
        self._last_dumped_loss = None

    def start(self, step, total_steps):
        """Training (re)starts at ``step``: a new interval, and the bar (``total_steps`` 0 or
        None: open-ended)."""
        self.bar.close()
        self.bar = ProgressBar(total_steps or None, initial=step, enabled=self.progress)
        self.meter.reset()
        reset_peak_memory(self.device)

    def next_batch(self, data):
        """``next(data)``, its time counted as data wait."""
        return self.meter.next_batch(data)

    def step_done(self, images, loss=None):
        """One step finished: count its images and advance the bar. ``loss`` (a host float)
        defaults to the last dumped interval's: the bar never reads the device."""
        self.meter.step_done(images)
        self.bar.update(self._last_dumped_loss if loss is None else loss,
                        self.meter.images_per_sec())

    def paused(self):
        """A context whose time (checkpoint, preview grid) is not training time."""
        return self.meter.paused()

    def interval_metrics(self):
        """The telemetry keys of the interval that just ended (then a new interval starts)."""
        kvs = self.meter.summary()
        kvs["peak_mem_gib"] = peak_memory_gib(self.device)
        if self.flops_per_image:
            kvs["flops_per_image"] = float(self.flops_per_image)
            if self.peak_flops and "images_per_sec" in kvs:
                kvs["mfu"] = model_flops_utilization(self.flops_per_image, kvs["images_per_sec"],
                                                     self.world_size, self.peak_flops)
        self.meter.reset()
        reset_peak_memory(self.device)
        return kvs

    def dumped(self, kvs, step):
        """After a metrics dump (rank 0 holds ``kvs``): the log line and TensorBoard."""
        if not self.is_main or not kvs:
            return
        self._last_dumped_loss = kvs.get("loss", self._last_dumped_loss)
        log.info("%s", metrics_line(kvs))
        if self.tensorboard is not None:
            self.tensorboard.log(kvs, step)

    def close(self):
        self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def describe(self):
        """Startup log lines: FLOPs per image and the peak the MFU is measured against."""
        lines = []
        if self.flops_per_image:
            lines.append(f"model FLOPs per training image (forward + backward): "
                         f"{self.flops_per_image / 1e9:.3g} GFLOP")
        if self.peak_flops:
            lines.append(f"MFU against a dense peak of {self.peak_flops / 1e12:.1f} TFLOP/s "
                         "per device")
        else:
            name = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                    else self.device.type.upper())
            lines.append(f"MFU not reported: no peak FLOP/s known for {name}")
        return lines
