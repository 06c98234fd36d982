"""Train a diffusion model: ``torchrun -m fastdiff.train [GD's image_train.py flags]``.

Also runs as ``python -m fastdiff.train`` (one process). Without --data_dir it trains a
small class-conditional model on the embedded digits dataset (the preset below; any flag
given on the command line overrides it).

The path (parse → process group → run folder → build → parallelize → Trainer → save) is
shared with GD's other diffusion trainers (``fastdiff.super_res_train``): what differs is a
:class:`Task`. ``_start`` (process group, run folder, logging, teardown) takes any run
function, for trainers with a loop of their own.
"""
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shutil
import sys
import time
import typing

import torch.distributed as dist

from fastdiff import config as C
from fastdiff.runtime import logger_restored, setup_distributed, setup_logging, teardown_distributed

log = logging.getLogger("fastdiff")

# No --data_dir: scikit-learn's 8x8 digits upscaled to 16x16, a model small enough to learn
# them in a few minutes on 2 CPU cores (~100 img/s there; clean digits by step 800).
# The EMA rate is short (GD's 0.9999 would still be mostly the random init after 800 steps).
# Flags on the command line override every entry.
# The end-of-training samples_grid.png: 50 respaced ancestral steps (GD's image_sample
# sampler). On the quickstart's 800-step model, DDIM-50 left 37% of 100 samples as colour
# noise and 70% recognisable by the digits classifier; ancestral-50: 0% and 92%.
FINAL_GRID_STEPS = 50

DIGITS_PRESET = dict(
    image_size=16, num_channels=64, num_res_blocks=1, channel_mult="1,2",
    attention_resolutions="8", num_heads=2, class_cond=True, use_scale_shift_norm=True,
    noise_schedule="cosine", batch_size=32, lr=5e-4, ema_rate="0.99", max_steps=800,
    log_interval=50, save_interval=400,
)

# A bad flag or flag combination, reported as one line (exit 2); config.py raises it too.
UsageError = C.ConfigError


@dataclasses.dataclass(frozen=True)
class Task:
    """What one diffusion trainer of GD's scripts makes of the shared training path.

    ``wrap_data(data, model, model_cfg, train_cfg, dist_info)`` returns the batch stream the
    Trainer reads (extra model inputs added on the CPU); ``grid_writer(model_cfg, diff_cfg,
    train_cfg, dist_info, log_dir, *, interval, steps, use_ddim)`` the PreviewWriter of the
    --sample_interval grids and of the end-of-run grid.
    """
    prog: str  # the command, as error lines name it
    description: str
    model_config: type  # the model's flag dataclass (GD's flags and defaults)
    digits_preset: dict  # without --data_dir; flags on the command line override it
    create_model_and_diffusion: typing.Callable
    image_size: typing.Callable  # model_cfg → side of the training images
    shape_flags: tuple  # flags a resumed checkpoint must share
    wrap_data: typing.Callable
    grid_writer: typing.Callable

    @property
    def config_classes(self):
        return (self.model_config, C.DiffusionConfig, C.TrainConfig)


def parse_with_digits_preset(argv, config_classes, preset, description):
    """``argv`` → (one dataclass per class, the flags given, the preset values applied).
    Without --data_dir the ``preset`` fills every flag not on the command line."""
    parser = C.build_parser(config_classes, description=description)
    args = parser.parse_args(argv)
    given = C.explicit_flags(argv)
    preset_applied = {}
    if not args.data_dir:
        for k, v in preset.items():
            if k not in given:
                setattr(args, k, v)
                preset_applied[k] = v
    return C.split_args(args, config_classes), given, preset_applied  # each checks its flags


def parse_config(argv, task=None):
    task = task or IMAGE_TASK
    (model_cfg, diff_cfg, train_cfg), given, preset_applied = parse_with_digits_preset(
        argv, task.config_classes, task.digits_preset, task.description)
    C.resolve_precision(model_cfg, train_cfg)
    if train_cfg.class_dropout_prob > 0 and not model_cfg.class_cond:
        raise UsageError("--class_dropout_prob needs --class_cond True (a dropped label becomes "
                         "the null class)")
    if train_cfg.tensorboard and "tensorboard" in given:
        from fastdiff.train.telemetry import tensorboard_available
        if not tensorboard_available():  # the environment, not the flags: checked here
            raise UsageError("--tensorboard True needs the tensorboard package (pip install "
                             "tensorboard), or pass --tensorboard False")
    return model_cfg, diff_cfg, train_cfg, given, preset_applied


def find_resume_path(train_cfg, log_dir):
    """The checkpoint --resume_checkpoint names (``latest``: the newest complete one in the
    run folder, None when there is none yet: the run starts fresh and says so)."""
    from fastdiff.train import checkpoint as ckpt
    path = ckpt.find_resume_path(
        train_cfg.resume_checkpoint, log_dir,
        log_dir_given=bool(train_cfg.log_dir or os.environ.get("OPENAI_LOGDIR")))
    if train_cfg.resume_checkpoint == "latest" and path is None:
        log.info("--resume_checkpoint latest: no complete checkpoint in %s, starting fresh",
                 log_dir)
    return path


def resolve_log_dir(train_cfg, dist_info):
    """--log_dir, else $OPENAI_LOGDIR, else ./runs/<timestamp> (agreed on by every rank)."""
    path = train_cfg.log_dir or os.environ.get("OPENAI_LOGDIR", "")
    if not path:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        path = os.path.join("runs", stamp)
    if dist_info.distributed:
        box = [path]
        dist.broadcast_object_list(box, src=0)
        path = box[0]
    created = not os.path.exists(path)
    if dist_info.is_main:
        os.makedirs(path, exist_ok=True)
    if dist_info.distributed:
        dist.barrier()
    return os.path.abspath(path), created


def _remove_if_only_startup_files(log_dir):
    """A run that fails during setup leaves no empty run folder behind (only a folder this
    run created, holding nothing but its own log)."""
    try:
        if set(os.listdir(log_dir)) <= {"log.txt"}:
            shutil.rmtree(log_dir)
    except OSError:
        pass


def build_components(model_cfg, diff_cfg, train_cfg, dist_info, task=None):
    from fastdiff.data import load_data
    from fastdiff.diffusion import create_named_schedule_sampler

    task = task or IMAGE_TASK
    norm_backend, attention_backend = C.resolve_backends(
        train_cfg.norm_backend, train_cfg.attention_backend, dist_info.device.type,
        train_cfg.precision)
    model, diffusion = task.create_model_and_diffusion(
        **dataclasses.asdict(model_cfg), **dataclasses.asdict(diff_cfg),
        class_dropout_prob=train_cfg.class_dropout_prob,
        norm_backend=norm_backend, attention_backend=attention_backend)
    model.to(dist_info.device)
    sampler = create_named_schedule_sampler(train_cfg.schedule_sampler, diffusion,
                                            seed=train_cfg.seed + dist_info.rank)
    data = load_data(
        data_dir=train_cfg.data_dir or None, batch_size=train_cfg.batch_size,
        image_size=task.image_size(model_cfg), class_cond=model_cfg.class_cond,
        class_from=train_cfg.class_from, rank=dist_info.rank,
        # Mirrored digits are not digits: the embedded dataset trains without GD's flip.
        random_flip=bool(train_cfg.data_dir), world_size=dist_info.world_size,
        seed=train_cfg.seed, num_workers=None if train_cfg.num_workers < 0 else train_cfg.num_workers,
        pin_memory=dist_info.device.type == "cuda")
    return model, diffusion, sampler, task.wrap_data(data, model, model_cfg, train_cfg, dist_info)


def add_label_dropout(data, model, model_cfg, train_cfg, dist_info):
    """The image trainer's stream: GD's batches, with classifier-free guidance's label
    dropout when --class_dropout_prob > 0 (else the stream itself)."""
    from fastdiff.data import add_conditioning
    return add_conditioning(data, class_dropout_prob=train_cfg.class_dropout_prob,
                            null_class=getattr(model, "null_class", None),
                            seed=train_cfg.seed, rank=dist_info.rank)


def build_telemetry(model_cfg, diff_cfg, train_cfg, dist_info, log_dir):
    """The run's instruments: FLOPs per image (counted once from the model), the device's
    peak for MFU, TensorBoard (rank 0, when installed) and the progress bar's switch."""
    from fastdiff.train import telemetry as T
    tensorboard = None
    if dist_info.is_main and train_cfg.tensorboard:
        if T.tensorboard_available():
            tensorboard = T.TensorBoardLogger(log_dir)
        else:  # an explicit --tensorboard True was refused in parse_config
            log.warning("tensorboard is not installed: no TensorBoard logs (pip install "
                        "tensorboard, or pass --tensorboard False to silence this)")
    return T.Telemetry(
        dist_info.device, dist_info.world_size,
        flops_per_image=T.count_flops_per_image(model_cfg, diff_cfg),
        peak_flops=T.device_peak_flops(dist_info.device, train_cfg.precision),
        tensorboard=tensorboard, is_main=dist_info.is_main,
        progress=T.progress_enabled(train_cfg.no_progress, dist_info.is_main))


def build_grid_writer(model_cfg, diff_cfg, train_cfg, dist_info, log_dir, *, interval, steps,
                      use_ddim):
    """A sample-grid writer from the EMA weights: every ``interval`` steps (0: only when
    called), ``steps`` respaced sampling steps, DDIM or ancestral."""
    from fastdiff.train.preview import PreviewWriter
    return PreviewWriter(model_cfg, diff_cfg, **grid_writer_kwargs(
        train_cfg, dist_info, log_dir, interval=interval, steps=steps, use_ddim=use_ddim))


def grid_writer_kwargs(train_cfg, dist_info, log_dir, *, interval, steps, use_ddim):
    """The keywords every PreviewWriter of a run shares."""
    norm_backend, attention_backend = C.resolve_backends(
        train_cfg.norm_backend, train_cfg.attention_backend, dist_info.device.type,
        train_cfg.precision)
    return dict(interval=interval, log_dir=log_dir, device=dist_info.device,
                precision=train_cfg.precision, seed=train_cfg.seed, steps=steps,
                use_ddim=use_ddim, is_main=dist_info.is_main, norm_backend=norm_backend,
                attention_backend=attention_backend,
                class_dropout_prob=train_cfg.class_dropout_prob)


def startup_report(dist_info, wrapping, train_cfg, model, data, optimizer_name, preset_applied):
    backends = model.kernel_backends() if hasattr(model, "kernel_backends") else {}
    nparams = sum(p.numel() for p in model.parameters())
    log.info("fastdiff training: world size %d, device %s", dist_info.world_size,
             dist_info.device.type)
    log.info("model wrapping: %s", wrapping)
    log.info("precision: %s%s | compile: %s | optimizer: %s", train_cfg.precision,
             " (dynamic loss scaling)" if train_cfg.precision == "fp16" else "",
             "on" if train_cfg.compile else "off", optimizer_name)
    if train_cfg.deterministic:
        log.info("deterministic: one pinned config per shape for autotuned kernels, torch "
                 "deterministic algorithms (warn only), cuDNN benchmark off")
    norm, attention = backends.get("norm", "?"), backends.get("attention", "?")
    if dist_info.device.type != "cuda":
        # The custom ops run their torch fallbacks off CUDA (Triton only under TRITON_INTERPRET=1).
        from fastdiff.kernels.inputs import interpreting
        interp = interpreting()
        if norm == "fused":
            norm += " op (Triton interpreter)" if interp else " op (CPU torch fallback)"
        if "triton" in attention.split(", "):
            attention = attention.replace(
                "triton", "triton op (Triton interpreter)" if interp else "triton op (CPU math fallback)")
    log.info("kernels: GroupNorm+SiLU %s, attention %s", norm, attention)
    log.info("parameters: %.2f M", nparams / 1e6)
    if hasattr(data, "dataset_summary"):
        log.info("data: %s", data.dataset_summary())
    if preset_applied:
        log.info("no --data_dir: embedded digits preset applied: %s",
                 " ".join(f"--{k} {v}" for k, v in preset_applied.items()))


def main(argv=None, task=None):
    argv = sys.argv[1:] if argv is None else argv
    task = task or IMAGE_TASK
    from fastdiff.data import DataError
    from fastdiff.train.checkpoint import CheckpointError
    from fastdiff.train.loop import TrainingError

    with logger_restored():
        try:
            return _main(argv, task)
        except (UsageError, DataError, CheckpointError) as e:
            print(f"{task.prog}: error: {e}", file=sys.stderr)
            return 2
        except TrainingError as e:
            print(f"{task.prog}: error: {e}", file=sys.stderr)
            return 1


@contextlib.contextmanager
def deterministic_mode(enabled):
    """--deterministic: bitwise-reproducible kernels across processes, for the run.

    Every autotuned Triton kernel launches one pinned config per shape
    (fastdiff.kernels.set_deterministic: autotuners time their configs, and a config
    picked by timing changes the summation order from one process to the next); torch
    uses its deterministic algorithms where it has them (warn only: an op without one
    warns instead of stopping the run), cuDNN does not benchmark, inductor does not time
    configs that change numerics, and cuBLAS gets the fixed workspace its deterministic
    mode needs (set before CUDA starts). The previous settings come back afterwards, since
    main() may run in-process.
    """
    if not enabled:
        yield
        return
    import torch
    import torch._inductor.config as inductor

    from fastdiff import kernels
    saved = (kernels.is_deterministic(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, getattr(inductor, "deterministic", None),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    kernels.set_deterministic(True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if hasattr(inductor, "deterministic"):  # torch >= 2.9
        inductor.deterministic = True
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        yield
    finally:
        kernels.set_deterministic(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[3], saved[4]
        if saved[5] is not None:
            inductor.deterministic = saved[5]
        if saved[6] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _main(argv, task):
    model_cfg, diff_cfg, train_cfg, given, preset_applied = parse_config(argv, task)

    def run(dist_info, log_dir):
        return _run(task, model_cfg, diff_cfg, train_cfg, preset_applied, dist_info, log_dir)

    with deterministic_mode(train_cfg.deterministic):
        return _start(train_cfg, given, run)


def _start(train_cfg, given, run):
    """Join the process group, open the run folder and its log, ``run(dist_info, log_dir)``;
    leave the group. A run that fails on bad input during setup leaves no folder behind."""
    from fastdiff.data import DataError
    from fastdiff.train.checkpoint import CheckpointError

    try:
        dist_info = setup_distributed(train_cfg.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if "compile" not in given:
        train_cfg.compile = dist_info.device.type == "cuda"
    try:
        log_dir, created = resolve_log_dir(train_cfg, dist_info)
        setup_logging(log_dir, dist_info.is_main)
        try:
            return run(dist_info, log_dir)
        except (UsageError, DataError, CheckpointError):
            if created and dist_info.is_main:
                for h in list(log.handlers):
                    if isinstance(h, logging.FileHandler):
                        h.close()
                        log.removeHandler(h)
                _remove_if_only_startup_files(log_dir)
            raise
    finally:
        teardown_distributed()


def _run(task, model_cfg, diff_cfg, train_cfg, preset_applied, dist_info, log_dir):
    """Build everything, resume if asked, train, write the sample grid."""
    from fastdiff.data import DataError
    from fastdiff.train import checkpoint as ckpt
    from fastdiff.train.loop import Trainer, seed_everything
    from fastdiff.train.parallel import parallelize
    resume_path = find_resume_path(train_cfg, log_dir)
    if resume_path:
        ckpt.check_resume_compatible(
            resume_path, {**dataclasses.asdict(model_cfg), **dataclasses.asdict(diff_cfg),
                          "class_dropout_prob": train_cfg.class_dropout_prob},
            task.shape_flags)
    seed_everything(train_cfg.seed, dist_info.rank)
    try:
        model, diffusion, sampler, data = build_components(model_cfg, diff_cfg, train_cfg,
                                                           dist_info, task)
    except DataError:
        raise
    except (ValueError, TypeError) as e:  # a flag the model or diffusion rejects
        raise UsageError(str(e)) from None
    if train_cfg.compile:
        _use_persistent_compile_cache(log_dir)
    wrapping = parallelize(model, dist_info, train_cfg.precision, train_cfg.compile)
    effective = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(diff_cfg),
                 **dataclasses.asdict(train_cfg)}
    telemetry = build_telemetry(model_cfg, diff_cfg, train_cfg, dist_info, log_dir)
    preview = None
    if train_cfg.sample_interval:  # the --sample_interval grids: DDIM, as the flag says
        preview = task.grid_writer(model_cfg, diff_cfg, train_cfg, dist_info, log_dir,
                                   interval=train_cfg.sample_interval,
                                   steps=train_cfg.sample_steps, use_ddim=True)
    trainer = Trainer(model=model, diffusion=diffusion, data=data, schedule_sampler=sampler,
                      cfg=train_cfg, dist_info=dist_info, log_dir=log_dir,
                      run_meta={"config": effective}, telemetry=telemetry,
                      preview=preview,
                      metrics_table=train_cfg.log_format == "table")
    startup_report(dist_info, wrapping, train_cfg, model, data, trainer.optimizer.name,
                   preset_applied)
    for line in telemetry.describe():
        log.info("%s", line)
    log.info("log dir: %s", log_dir)
    log.info("configuration in effect:\n%s", json.dumps(effective, indent=1, sort_keys=True))
    if dist_info.is_main:
        with open(os.path.join(log_dir, "config.json"), "w") as f:
            json.dump(effective, f, indent=1, sort_keys=True)
    if resume_path:
        trainer.resume(resume_path)
    t0 = time.perf_counter()
    outcome = trainer.train()
    log.info("training %s at step %d after %.1f s", outcome, trainer.step,
             time.perf_counter() - t0)
    if outcome == "finished" and train_cfg.sample_grid:
        # From the first EMA rate's weights, the ones people sample from.
        final = task.grid_writer(model_cfg, diff_cfg, train_cfg, dist_info, log_dir,
                                 interval=0, steps=FINAL_GRID_STEPS, use_ddim=False)
        trainer.write_ema_grid(final, os.path.join(log_dir, "samples_grid.png"))
    return 0


def _use_persistent_compile_cache(log_dir):
    """Keep inductor's cache across restarts, so a resumed job does not pay the cold compile."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
            os.path.expanduser("~"), ".cache", "fastdiff", "inductor")
    log.info("inductor cache: %s", os.environ["TORCHINDUCTOR_CACHE_DIR"])


IMAGE_TASK = Task(
    prog="fastdiff.train", description=__doc__.splitlines()[0], model_config=C.ModelConfig,
    digits_preset=DIGITS_PRESET, create_model_and_diffusion=C.create_model_and_diffusion,
    image_size=lambda model_cfg: model_cfg.image_size, shape_flags=C.MODEL_SHAPE_FLAGS,
    wrap_data=add_label_dropout, grid_writer=build_grid_writer)


if __name__ == "__main__":
    sys.exit(main())
