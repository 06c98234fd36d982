"""Train a noisy-image classifier: ``torchrun -m fastdiff.classifier_train [GD's flags]``.

GD's scripts/classifier_train.py on fastdiff's trainer: the same flags and defaults
(``--noised``, ``--iterations``, ``--anneal_lr``, ``--eval_interval``, ``--val_data_dir`` and
GD's classifier + diffusion flags), the same step (cross-entropy on ``q_sample``'d images at
sampled timesteps, microbatches weighted to the batch mean, AdamW, GD's dynamic fp16 loss
scale from 2^16), GD's logged keys and files (``model{step:06d}.pt`` + ``opt{step:06d}.pt``,
no EMA), plus fastdiff's kernels, precision, torch.compile, FSDP2 under torchrun and
resumable checkpoints (``--resume_checkpoint latest``, ``--keep_latest``, SIGTERM save).
Also runs as ``python -m fastdiff.classifier_train`` (one process).

The classifier guides a diffusion model trained with the same noise schedule and
``--diffusion_steps`` (it sees x_t of that schedule). Without --data_dir it learns the
embedded digits (every 5th held out, the split fastdiff.evaluate uses) with a preset sized
for the digits quickstart's diffusion model, validated on the held-out digits.

Differences from GD, as in fastdiff.train: ``step`` counts completed steps (a file after
N steps is ``modelN.pt``; GD names it N−1); metrics and validation run every
``--log_interval`` / ``--eval_interval`` completed steps (GD: at step indices 0, k, 2k, ...);
fp16 is autocast with fp32 master weights. As in GD, --data_dir images are cropped at random
(GD's random_crop_arr; the choices replay on resume) and --val_data_dir images centre-cropped.
"""
import dataclasses
import json
import logging
import os
import sys
import time

from fastdiff import config as C
from fastdiff.runtime import logger_restored

log = logging.getLogger("fastdiff")

PROG = "fastdiff.classifier_train"


@dataclasses.dataclass
class ClassifierScriptConfig:
    """classifier_train.py's own flags (GD's defaults)."""
    data_dir: str = C._f("", "labelled image folder; '' = the embedded digits (train split) "
                             "with a small preset")
    val_data_dir: str = C._f("", "labelled validation folder; '' = none (the held-out digits "
                                 "without --data_dir)")
    noised: bool = C._f(True, "train on x_t = q_sample(x, t) at timesteps from "
                              "--schedule_sampler (else clean images, t = 0)")
    iterations: int = C._f(150000, "training steps")
    anneal_lr: bool = C._f(False, "lr·(1 − step/iterations) before each step")
    eval_interval: int = C._f(5, "steps between validation batches (with a validation set)")

    def __post_init__(self):
        C._at_least("iterations", self.iterations, 1)
        C._at_least("eval_interval", self.eval_interval, 1)


# TrainConfig's flags that mean nothing here: EMAs, the lr schedule of image_train.py (replaced
# by --iterations/--anneal_lr), classifier-free guidance and sample grids.
_NOT_APPLICABLE = ("data_dir", "lr_anneal_steps", "ema_rate", "ema_std", "ema_snapshot_interval",
                   "lr_warmup_steps", "ema_warmup", "ema_inv_gamma", "ema_power",
                   "class_dropout_prob", "sample_grid", "sample_interval", "sample_steps")
# GD's classifier_train.py defaults where image_train.py's differ.
_GD_DEFAULTS = dict(lr=3e-4, batch_size=4)

ClassifierTrainConfig = dataclasses.make_dataclass(
    "ClassifierTrainConfig",
    [(f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
     for f in dataclasses.fields(ClassifierScriptConfig)]
    + [(f.name, f.type, dataclasses.field(default=_GD_DEFAULTS.get(f.name, f.default),
                                          metadata=f.metadata))
       for f in dataclasses.fields(C.TrainConfig) if f.name not in _NOT_APPLICABLE],
    namespace={"__post_init__": lambda self: _check_train_flags(self),
               "__doc__": "classifier_train.py's flags, then fastdiff's training flags."},
)


def _check_train_flags(cfg):
    """GD's script flags, then TrainConfig's own checks of the flags shared with it."""
    ClassifierScriptConfig(**{f.name: getattr(cfg, f.name)
                              for f in dataclasses.fields(ClassifierScriptConfig)})
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(C.TrainConfig)
              if f.name not in _NOT_APPLICABLE}
    C.TrainConfig(**shared)


CONFIG_CLASSES = (C.ClassifierConfig, C.DiffusionConfig, ClassifierTrainConfig)

# Flags that change the classifier's parameters: a DCP checkpoint of another value is refused.
CLASSIFIER_SHAPE_FLAGS = ("image_size", "classifier_width", "classifier_depth",
                          "classifier_attention_resolutions", "classifier_use_scale_shift_norm",
                          "classifier_resblock_updown", "classifier_pool",
                          "classifier_channel_mult")

# No --data_dir: the digits at 16x16 with the quickstart diffusion's schedule (cosine, GD's 1000
# steps: fastdiff.train's digits preset), so the classifier can guide that model. A small
# attention-pooled encoder; see the README for its held-out accuracy and CPU time.
DIGITS_PRESET = dict(
    image_size=16, classifier_width=32, classifier_depth=1, classifier_channel_mult="1,2",
    classifier_attention_resolutions="8", noise_schedule="cosine", batch_size=32,
    iterations=300, lr=1e-3, log_interval=50, eval_interval=10, save_interval=300,
)


class UsageError(C.ConfigError):
    """A flag or combination that cannot run (one line, exit 2)."""


def parse_config(argv):
    from fastdiff.train.cli import parse_with_digits_preset
    (classifier_cfg, diff_cfg, train_cfg), given, preset_applied = parse_with_digits_preset(
        argv, CONFIG_CLASSES, DIGITS_PRESET, __doc__.splitlines()[0])
    if not train_cfg.precision:
        train_cfg.precision = "fp16" if classifier_cfg.classifier_use_fp16 else "fp32"
    if classifier_cfg.classifier_use_fp16 and train_cfg.precision != "fp16":
        raise UsageError("--classifier_use_fp16 True contradicts --precision " + train_cfg.precision)
    if train_cfg.val_data_dir and not train_cfg.data_dir:
        raise UsageError("--val_data_dir needs --data_dir (the digits validate on their "
                         "held-out split)")
    return classifier_cfg, diff_cfg, train_cfg, given, preset_applied


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    from fastdiff.data import DataError
    from fastdiff.train.checkpoint import CheckpointError
    from fastdiff.train.cli import deterministic_mode
    from fastdiff.train.loop import TrainingError

    with logger_restored():
        try:
            classifier_cfg, diff_cfg, train_cfg, given, preset_applied = parse_config(argv)
            with deterministic_mode(train_cfg.deterministic):
                return _start(classifier_cfg, diff_cfg, train_cfg, given, preset_applied)
        except (C.ConfigError, DataError, CheckpointError) as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        except TrainingError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1


def _start(classifier_cfg, diff_cfg, train_cfg, given, preset_applied):
    """fastdiff.train's process group, run folder and logging around this script's run."""
    from fastdiff.train import cli

    def run(dist_info, log_dir):
        return _run(classifier_cfg, diff_cfg, train_cfg, preset_applied, dist_info, log_dir)

    return cli._start(train_cfg, given, run)


# ------------------------------------------------------------------------------ data
class _DigitsSubset:
    """The embedded digits ``indices`` (this rank's share: GD's ``[rank::world_size]``),
    with DigitsDataset's interface."""

    def __init__(self, image_size, indices, name, rank, world_size):
        from fastdiff.data import DigitsDataset
        self._digits = DigitsDataset(image_size, class_cond=True)
        self._indices = [int(i) for i in indices][rank::world_size]
        self.source = f"scikit-learn digits, {name}"
        self.image_size = image_size
        self.num_images = len(indices)
        self.num_classes = self._digits.num_classes
        self.labels = [self._digits.labels[i] for i in self._indices]

    def __len__(self):
        return len(self._indices)

    def load(self, index):
        return self._digits.load(self._indices[index])


def digits_streams(image_size, batch_size, seed, rank, world_size):
    """(train, validation) streams of the digits: fastdiff.evaluate's split (every 5th image
    held out), shuffled, without flips (a mirrored digit is not a digit)."""
    from fastdiff.data import DataError
    from fastdiff.data.loader import DataStream, _EpochOrder
    from fastdiff.evaluate.digits_classifier import digits_split, load_digits_arrays

    train_idx, held_out_idx = digits_split(len(load_digits_arrays()[1]))
    streams = []
    for indices, name in ((train_idx, "train split"), (held_out_idx, "held-out split")):
        dataset = _DigitsSubset(image_size, indices, name, rank, world_size)
        if len(dataset) < batch_size:
            raise DataError(f"{dataset.source} gives rank {rank} of {world_size} "
                            f"{len(dataset)} images, fewer than batch_size={batch_size}")
        order = _EpochOrder(len(dataset), seed=seed, rank=rank, shuffle=True, random_flip=False)
        streams.append(DataStream(dataset, order, batch_size=batch_size, rank=rank,
                                  world_size=world_size, num_workers=0))
    return tuple(streams)


def build_data(classifier_cfg, train_cfg, dist_info):
    """(train stream, validation stream or None)."""
    from fastdiff.data import load_data
    if not train_cfg.data_dir:
        return digits_streams(classifier_cfg.image_size, train_cfg.batch_size, train_cfg.seed,
                              dist_info.rank, dist_info.world_size)
    common = dict(batch_size=train_cfg.batch_size, image_size=classifier_cfg.image_size,
                  class_cond=True, class_from=train_cfg.class_from, rank=dist_info.rank,
                  world_size=dist_info.world_size, seed=train_cfg.seed,
                  num_workers=None if train_cfg.num_workers < 0 else train_cfg.num_workers,
                  pin_memory=dist_info.device.type == "cuda")
    # GD's script crops its training data at random and its validation data in the centre.
    train = load_data(data_dir=train_cfg.data_dir, random_crop=True, **common)
    val = load_data(data_dir=train_cfg.val_data_dir, **common) if train_cfg.val_data_dir else None
    return train, val


# ------------------------------------------------------------------------------- run
def build_classifier(classifier_cfg, diff_cfg, train_cfg, dist_info):
    norm_backend, attention_backend = C.resolve_backends(
        train_cfg.norm_backend, train_cfg.attention_backend, dist_info.device.type,
        train_cfg.precision)
    try:
        model, diffusion = C.create_classifier_and_diffusion(
            **dataclasses.asdict(classifier_cfg), **dataclasses.asdict(diff_cfg),
            norm_backend=norm_backend, attention_backend=attention_backend)
    except (ValueError, TypeError) as e:  # a flag the model or diffusion rejects
        raise UsageError(str(e)) from None
    return model.to(dist_info.device), diffusion


def _check_resume_source(path, model, flags_now):
    """Refuse a checkpoint of another classifier before anything is written: a DCP run by
    its flags, a GD model*.pt by its keys and shapes."""
    from fastdiff.train import checkpoint as ckpt
    if os.path.isdir(path):
        ckpt.check_resume_compatible(path, flags_now, CLASSIFIER_SHAPE_FLAGS)
    else:
        ckpt.check_state_dict_fits(ckpt.load_state_dict_file(path), model.state_dict(), path)


def _run(classifier_cfg, diff_cfg, train_cfg, preset_applied, dist_info, log_dir):
    """Build, resume if asked, train."""
    from fastdiff.diffusion import create_named_schedule_sampler
    from fastdiff.train import checkpoint as ckpt
    from fastdiff.train import cli
    from fastdiff.train.loop import Trainer, seed_everything
    from fastdiff.train.objectives import ClassifierObjective, ClassifierSchedule
    from fastdiff.train.parallel import parallelize

    effective = {**dataclasses.asdict(classifier_cfg), **dataclasses.asdict(diff_cfg),
                 **dataclasses.asdict(train_cfg)}
    resume_path = cli.find_resume_path(train_cfg, log_dir)
    seed_everything(train_cfg.seed, dist_info.rank)
    model, diffusion = build_classifier(classifier_cfg, diff_cfg, train_cfg, dist_info)
    if resume_path:
        _check_resume_source(resume_path, model, effective)
    sampler = create_named_schedule_sampler(train_cfg.schedule_sampler, diffusion,
                                            seed=train_cfg.seed + dist_info.rank)
    data, val_data = build_data(classifier_cfg, train_cfg, dist_info)
    if train_cfg.compile:
        cli._use_persistent_compile_cache(log_dir)
    wrapping = parallelize(model, dist_info, train_cfg.precision, train_cfg.compile)
    objective = ClassifierObjective(diffusion, sampler, noised=train_cfg.noised,
                                    val_data=val_data, eval_interval=train_cfg.eval_interval)
    schedule = ClassifierSchedule(train_cfg.lr, train_cfg.iterations, train_cfg.anneal_lr,
                                  train_cfg.max_steps)
    # fastdiff.train's instruments; the FLOPs per image (for MFU) are the classifier's own.
    telemetry = cli.build_telemetry(classifier_cfg, diff_cfg, train_cfg, dist_info, log_dir)
    trainer = Trainer(model=model, diffusion=diffusion, data=data,
                      schedule_sampler=objective.sampler, cfg=train_cfg, dist_info=dist_info,
                      log_dir=log_dir, run_meta={"config": effective}, telemetry=telemetry,
                      metrics_table=train_cfg.log_format == "table", objective=objective,
                      schedule=schedule)
    cli.startup_report(dist_info, wrapping, train_cfg, model, data, trainer.optimizer.name,
                       preset_applied)
    for line in telemetry.describe():
        log.info("%s", line)
    log.info("classifier: %s, %s; validation: %s", "noised" if train_cfg.noised else "clean",
             f"{train_cfg.iterations} iterations" + (" (annealed lr)" if train_cfg.anneal_lr else ""),
             val_data.source if val_data is not None else "none")
    log.info("log dir: %s", log_dir)
    log.info("configuration in effect:\n%s", json.dumps(effective, indent=1, sort_keys=True))
    if resume_path:
        trainer.resume(resume_path)
    if dist_info.is_main:
        ckpt.atomic_write_text(json.dumps(effective, indent=1, sort_keys=True),
                               os.path.join(log_dir, "config.json"))
    t0 = time.perf_counter()
    outcome = trainer.train()
    log.info("training %s at step %d after %.1f s", outcome, trainer.step,
             time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
