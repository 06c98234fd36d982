"""Super-resolution sampling, GD's super_res_sample.py: ``python -m fastdiff.super_res_sample``.

GD's super_res_sample.py, the second stage of a cascade: each image of a base model's sample
file (GD's format, as ``fastdiff.sample`` writes it: uint8 NHWC ``arr_0`` at small_size, the
labels ``arr_1`` of a class-conditional run) conditions the super-resolution model as
``low_res`` = image / 127.5 - 1, and its labels as ``y``. Output i upsamples base image
i mod N (GD cycles through the file too, so --num_samples may exceed it), written as GD's
``samples_{N}x{L}x{L}x3.npz`` (images only: GD stores no labels here) and
``samples_grid.png``. Model flags not given come from the config.json beside --model_path.
"""
import dataclasses
import logging
import os
import sys
import zipfile

import numpy as np
import torch

from fastdiff import config as C
from fastdiff.data import DataError
from fastdiff.models.unet import NUM_CLASSES
from fastdiff.runtime import run_cli, setup_distributed, setup_logging, teardown_distributed
from fastdiff.sampling import (fill_model_flags_from_run, gather_and_write, generate,
                               load_gd_file, output_dir)

log = logging.getLogger("fastdiff")


@dataclasses.dataclass
class SuperResSampleConfig:
    base_samples: str = C._f("", "npz of low-resolution images in GD's format (fastdiff.sample's samples_*.npz)")
    model_path: str = C._f("", "the super-resolution model: a model*.pt or ema_*.pt file (GD format)")
    num_samples: int = C._f(10000, "number of images to generate (base image i mod N for output i)")
    batch_size: int = C._f(16, "images per rank per sampling batch")
    use_ddim: bool = C._f(False, "DDIM (eta 0) instead of ancestral sampling (GD's script has the flag but "
                                 "always samples ancestrally)")
    clip_denoised: bool = C._f(True, "clip the predicted x_0 to [-1, 1]")
    log_dir: str = C._f("", "output folder; '' = $OPENAI_LOGDIR or the model's folder")
    seed: int = C._f(0, "random seed (each rank offsets it)")
    grid_size: int = C._f(64, "images in the PNG grid")
    device: str = C._f("", "cuda or cpu; '' = cuda when available")
    precision: str = C._f("fp32", "fp32, bf16 or fp16 autocast")
    norm_backend: str = C._f("auto", "fused, torch or auto")
    attention_backend: str = C._f("auto", "triton, sdpa, xformers, math or auto")
    no_progress: bool = C._f(False, "no progress bar (it is shown only when stderr is a terminal)")


CONFIG_CLASSES = (C.SuperResModelConfig, C.DiffusionConfig, SuperResSampleConfig)


def load_base_samples(path, small_size, class_cond):
    """(uint8 images [N, small, small, 3], int64 labels [N] or None) of a GD sample file;
    DataError with one line for anything the model could not take."""
    if not os.path.isfile(path):
        raise DataError(f"--base_samples: {path} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"--base_samples: {path} is not an npz file ({type(e).__name__})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"--base_samples: {path} is a single array, not an npz file with arr_0")
    with archive:
        if "arr_0" not in archive.files:
            raise DataError(f"--base_samples: {path} has no arr_0 (the images)")
        try:
            images = archive["arr_0"]
            labels = archive["arr_1"] if class_cond and "arr_1" in archive.files else None
        except (OSError, ValueError, zipfile.BadZipFile) as e:  # object arrays, corrupt members
            raise DataError(f"--base_samples: cannot read {path}: {type(e).__name__}") from None
    expected = (small_size, small_size, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected \
            or len(images) == 0:
        raise DataError(f"--base_samples: arr_0 must be uint8 [N, {small_size}, {small_size}, 3] "
                        f"(small_size {small_size}), got {images.dtype} {list(images.shape)}")
    if class_cond:
        labels = _checked_labels(labels, len(images), path)
    return images, labels


def _checked_labels(labels, count, path):
    if labels is None:
        raise DataError(f"--base_samples: {path} has no arr_1 (labels): the model is "
                        "class-conditional")
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"--base_samples: arr_1 must be {count} integer labels, got "
                        f"{labels.dtype} {list(labels.shape)}")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(f"--base_samples: labels must be in [0, {NUM_CLASSES}), got "
                        f"{labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def to_low_res(images, device):
    """uint8 NHWC → GD's low_res: float NCHW in [-1, 1] on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1.0
    return x.permute(0, 3, 1, 2).to(device)


def fill_sr_flags_from_run(args, given, model_path):
    """The super-resolution model and diffusion flags not on the command line, from the
    config.json beside ``model_path`` (not the respacing: the caller's choice); returns it."""
    return fill_model_flags_from_run(args, given, model_path,
                                     classes=(C.SuperResModelConfig, C.DiffusionConfig))


def load_sr_model(model_path, sr_cfg, diff_cfg, backends, device):
    """(super-resolution model in eval mode on ``device``, diffusion) with the weights of a
    GD-format file; CheckpointError when missing or not fitting the flags. A run with label
    dropout gets its null-class row by itself, as in :func:`fastdiff.sampling.load_model`."""
    return load_gd_file(model_path, C.sr_create_model_and_diffusion, (sr_cfg, diff_cfg), device,
                        null_row=True, norm_backend=backends[0], attention_backend=backends[1])


def main(argv=None):
    return run_cli("fastdiff.super_res_sample", _main, argv)  # ConfigError, CheckpointError, DataError


def _main(argv):
    from fastdiff.train.telemetry import progress_enabled

    parser = C.build_parser(CONFIG_CLASSES, description=__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    given = C.explicit_flags(argv)
    for flag in ("model_path", "base_samples"):
        if not getattr(args, flag):
            raise ValueError(f"--{flag} is required")
    fill_sr_flags_from_run(args, given, args.model_path)
    sr_cfg, diff_cfg, scfg = C.split_args(args, CONFIG_CLASSES)
    base_images, base_labels = load_base_samples(scfg.base_samples, sr_cfg.small_size,
                                                 sr_cfg.class_cond)
    dist_info = setup_distributed(scfg.device)
    try:
        setup_logging(None, dist_info.is_main)
        device = dist_info.device
        backends = C.resolve_backends(scfg.norm_backend, scfg.attention_backend, device.type,
                                      scfg.precision)
        model, diffusion = load_sr_model(scfg.model_path, sr_cfg, diff_cfg, backends, device)
        out_dir = output_dir(scfg.log_dir, scfg.model_path)
        if dist_info.is_main:
            os.makedirs(out_dir, exist_ok=True)  # only once the inputs have loaded

        torch.manual_seed(scfg.seed + dist_info.rank)
        per_rank = -(-scfg.num_samples // dist_info.world_size)
        # This rank's outputs are the global ones [first, first + per_rank).
        base_index = (dist_info.rank * per_rank + np.arange(per_rank)) % len(base_images)
        if scfg.num_samples > len(base_images):
            log.info("%d outputs from %d base samples: each is used again (as GD)",
                     scfg.num_samples, len(base_images))
        log.info("upsampling %d images %d → %d (%s, %s steps) on %d rank(s)", scfg.num_samples,
                 sr_cfg.small_size, sr_cfg.large_size, "DDIM" if scfg.use_ddim else "ancestral",
                 diffusion.num_timesteps, dist_info.world_size)

        def low_res_batch(start, stop):
            return {"low_res": to_low_res(base_images[base_index[start:stop]], device)}

        images, _ = generate(model, diffusion, per_rank, scfg.batch_size, sr_cfg.large_size,
                             device, class_cond=sr_cfg.class_cond, num_classes=NUM_CLASSES,
                             labels=None if base_labels is None else base_labels[base_index],
                             use_ddim=scfg.use_ddim, clip_denoised=scfg.clip_denoised,
                             precision=scfg.precision, model_kwargs_fn=low_res_batch,
                             progress=progress_enabled(scfg.no_progress, dist_info.is_main))
        # GD's super_res_sample.py writes the images only (arr_0).
        written = gather_and_write(images, None, dist_info, scfg.num_samples, out_dir,
                                   scfg.grid_size)
        if written:
            log.info("wrote %s and %s", *written)
        return 0
    finally:
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
