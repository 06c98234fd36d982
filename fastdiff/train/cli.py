"""Train a diffusion model: ``torchrun -m fastdiff.train [GD's image_train.py flags]``.

Also runs as ``python -m fastdiff.train`` (one process). Without --data_dir it trains a
small class-conditional model on the embedded digits dataset (the preset below; any flag
given on the command line overrides it).
"""
import dataclasses
import datetime
import json
import logging
import os
import shutil
import sys
import time

import torch.distributed as dist

from fastdiff import config as C

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

# Flags whose change alters the parameters' shapes or meaning: resuming with a different
# value is refused.
MODEL_SHAPE_FLAGS = ("image_size", "num_channels", "num_res_blocks", "num_heads",
                     "num_heads_upsample", "num_head_channels", "attention_resolutions",
                     "channel_mult", "class_cond", "use_scale_shift_norm", "resblock_updown",
                     "use_new_attention_order", "learn_sigma")


class UsageError(ValueError):
    """A bad flag combination, reported as one line."""


def parse_config(argv):
    parser = C.build_parser(description=__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    given = C.explicit_flags(argv)
    preset_applied = {}
    if not args.data_dir:
        for k, v in DIGITS_PRESET.items():
            if k not in given:
                setattr(args, k, v)
                preset_applied[k] = v
    model_cfg, diff_cfg, train_cfg = C.split_args(args)
    if not train_cfg.precision:
        train_cfg.precision = "fp16" if model_cfg.use_fp16 else "fp32"
    if train_cfg.precision not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"--precision must be fp32, bf16 or fp16, got {train_cfg.precision!r}")
    if model_cfg.use_fp16 and train_cfg.precision != "fp16":
        raise UsageError("--use_fp16 True contradicts --precision " + train_cfg.precision)
    if train_cfg.class_from not in ("filename", "folder"):
        raise UsageError(f"--class_from must be filename or folder, got {train_cfg.class_from!r}")
    if train_cfg.batch_size < 1:
        raise UsageError("--batch_size must be at least 1")
    if not [r for r in train_cfg.ema_rate.split(",") if r.strip()]:
        raise UsageError("--ema_rate needs at least one rate")
    for r in train_cfg.ema_rate.split(","):
        try:
            ok = 0.0 < float(r) < 1.0
        except ValueError:
            ok = False
        if not ok:
            raise UsageError(f"--ema_rate: {r!r} is not a rate in (0, 1)")
    _check_telemetry_flags(train_cfg, given)
    return model_cfg, diff_cfg, train_cfg, given, preset_applied


def _check_telemetry_flags(train_cfg, given):
    from fastdiff.train.telemetry import tensorboard_available
    if train_cfg.log_format not in ("table", "line"):
        raise UsageError(f"--log_format must be table or line, got {train_cfg.log_format!r}")
    if train_cfg.sample_interval < 0:
        raise UsageError(f"--sample_interval must be >= 0, got {train_cfg.sample_interval}")
    if train_cfg.sample_steps < 1:
        raise UsageError(f"--sample_steps must be >= 1, got {train_cfg.sample_steps}")
    if train_cfg.tensorboard and "tensorboard" in given and not tensorboard_available():
        raise UsageError("--tensorboard True needs the tensorboard package (pip install "
                         "tensorboard), or pass --tensorboard False")


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


def setup_logging(log_dir, is_main):
    log.handlers.clear()
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("%(message)s")
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(fmt)
    log.addHandler(out)
    if is_main and log_dir:
        fh = logging.FileHandler(os.path.join(log_dir, "log.txt"))
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(fh)


def find_resume_path(train_cfg, log_dir, given):
    """The checkpoint to resume from, or None. 'latest' needs an explicit --log_dir."""
    from fastdiff.train import checkpoint as ckpt
    spec = train_cfg.resume_checkpoint
    if not spec:
        return None
    if spec == "latest":
        if not (train_cfg.log_dir or os.environ.get("OPENAI_LOGDIR")):
            raise UsageError("--resume_checkpoint latest needs --log_dir (the run folder to resume)")
        path = ckpt.find_latest(log_dir)
        if path is None:
            log.info("--resume_checkpoint latest: no complete checkpoint in %s, starting fresh",
                     log_dir)
        return path
    if not os.path.exists(spec):
        raise ckpt.CheckpointError(f"--resume_checkpoint: {spec} does not exist")
    return spec


def check_resume_compatible(path, model_cfg, diff_cfg):
    """Refuse to resume a DCP checkpoint with flags that change the model, naming them."""
    from fastdiff.train import checkpoint as ckpt
    if not os.path.isdir(path):
        return
    saved = ckpt.read_trainer_meta(path).get("config", {})
    now = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(diff_cfg)}
    diffs = [f"--{k} {saved[k]!r} → {now[k]!r}" for k in MODEL_SHAPE_FLAGS
             if k in saved and saved[k] != now[k]]
    if diffs:
        raise UsageError(f"cannot resume {path}: flags that change the model differ: "
                         + ", ".join(diffs))


def build_components(model_cfg, diff_cfg, train_cfg, dist_info):
    from fastdiff.data import load_data
    from fastdiff.diffusion import create_named_schedule_sampler

    norm_backend, attention_backend = C.resolve_backends(
        train_cfg.norm_backend, train_cfg.attention_backend, dist_info.device.type)
    model, diffusion = C.create_model_and_diffusion(
        **dataclasses.asdict(model_cfg), **dataclasses.asdict(diff_cfg),
        norm_backend=norm_backend, attention_backend=attention_backend)
    model.to(dist_info.device)
    sampler = create_named_schedule_sampler(train_cfg.schedule_sampler, diffusion,
                                            seed=train_cfg.seed + dist_info.rank)
    data = load_data(
        data_dir=train_cfg.data_dir or None, batch_size=train_cfg.batch_size,
        image_size=model_cfg.image_size, class_cond=model_cfg.class_cond,
        class_from=train_cfg.class_from, rank=dist_info.rank,
        # Mirrored digits are not digits: the embedded dataset trains without GD's flip.
        random_flip=bool(train_cfg.data_dir), world_size=dist_info.world_size,
        seed=train_cfg.seed, num_workers=None if train_cfg.num_workers < 0 else train_cfg.num_workers)
    return model, diffusion, sampler, data


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
    norm_backend, attention_backend = C.resolve_backends(
        train_cfg.norm_backend, train_cfg.attention_backend, dist_info.device.type)
    return PreviewWriter(model_cfg, diff_cfg, interval=interval, log_dir=log_dir,
                         device=dist_info.device, precision=train_cfg.precision,
                         seed=train_cfg.seed, steps=steps, use_ddim=use_ddim,
                         is_main=dist_info.is_main, norm_backend=norm_backend,
                         attention_backend=attention_backend)


def startup_report(dist_info, wrapping, train_cfg, model, data, optimizer_name, preset_applied):
    backends = model.kernel_backends() if hasattr(model, "kernel_backends") else {}
    nparams = sum(p.numel() for p in model.parameters())
    log.info("fastdiff training: world size %d, device %s", dist_info.world_size,
             dist_info.device.type)
    log.info("model wrapping: %s", wrapping)
    log.info("precision: %s%s | compile: %s | optimizer: %s", train_cfg.precision,
             " (dynamic loss scaling)" if train_cfg.precision == "fp16" else "",
             "on" if train_cfg.compile else "off", optimizer_name)
    norm, attention = backends.get("norm", "?"), backends.get("attention", "?")
    if dist_info.device.type != "cuda":
        # The custom ops run their torch fallbacks off CUDA (Triton only under TRITON_INTERPRET=1).
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        if norm == "fused":
            norm += " op (Triton interpreter)" if interp else " op (CPU torch fallback)"
        if attention == "triton":
            attention += " op (Triton interpreter)" if interp else " op (CPU math fallback)"
    log.info("kernels: GroupNorm+SiLU %s, attention %s", norm, attention)
    log.info("parameters: %.2f M", nparams / 1e6)
    if hasattr(data, "dataset_summary"):
        log.info("data: %s", data.dataset_summary())
    if preset_applied:
        log.info("no --data_dir: embedded digits preset applied: %s",
                 " ".join(f"--{k} {v}" for k, v in preset_applied.items()))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    from fastdiff.data import DataError
    from fastdiff.train.checkpoint import CheckpointError
    from fastdiff.train.loop import TrainingError

    saved = (list(log.handlers), log.level, log.propagate)
    try:
        return _main(argv)
    except (UsageError, DataError, CheckpointError) as e:
        print(f"fastdiff.train: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"fastdiff.train: error: {e}", file=sys.stderr)
        return 1
    finally:  # leave the "fastdiff" logger as found (main() may be called in-process)
        for h in log.handlers:
            if h not in saved[0]:
                h.close()
        log.handlers[:], log.level, log.propagate = saved


def _main(argv):
    from fastdiff.data import DataError
    from fastdiff.train.checkpoint import CheckpointError
    from fastdiff.train.parallel import setup_distributed, teardown_distributed

    model_cfg, diff_cfg, train_cfg, given, preset_applied = parse_config(argv)
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
            return _run(model_cfg, diff_cfg, train_cfg, given, preset_applied, dist_info,
                        log_dir)
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


def _run(model_cfg, diff_cfg, train_cfg, given, preset_applied, dist_info, log_dir):
    """Build everything, resume if asked, train, write the sample grid."""
    from fastdiff.data import DataError
    from fastdiff.train.loop import Trainer, seed_everything
    from fastdiff.train.parallel import parallelize
    resume_path = find_resume_path(train_cfg, log_dir, given)
    if resume_path:
        check_resume_compatible(resume_path, model_cfg, diff_cfg)
    seed_everything(train_cfg.seed, dist_info.rank)
    try:
        model, diffusion, sampler, data = build_components(model_cfg, diff_cfg, train_cfg,
                                                           dist_info)
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
        preview = build_grid_writer(model_cfg, diff_cfg, train_cfg, dist_info, log_dir,
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
        final = build_grid_writer(model_cfg, diff_cfg, train_cfg, dist_info, log_dir,
                                  interval=0, steps=FINAL_GRID_STEPS, use_ddim=False)
        trainer.write_ema_grid(final, os.path.join(log_dir, "samples_grid.png"))
    return 0


def _use_persistent_compile_cache(log_dir):
    """Keep inductor's cache across restarts, so a resumed job does not pay the cold compile."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
            os.path.expanduser("~"), ".cache", "fastdiff", "inductor")
    log.info("inductor cache: %s", os.environ["TORCHINDUCTOR_CACHE_DIR"])


if __name__ == "__main__":
    sys.exit(main())
