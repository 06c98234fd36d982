"""Sample from a trained model: ``python -m fastdiff.sample --model_path model000400.pt ...``.

GD's image_sample.py flags (the model flags, --model_path, --num_samples, --batch_size,
--use_ddim, --timestep_respacing, --clip_denoised) → ``samples_{N}x{H}x{W}x3.npz`` (uint8
NHWC, plus the labels when class-conditional: GD's format) and ``samples_grid.png``.
Under torchrun the ranks split the work and rank 0 gathers and writes. Model flags that are
not given are read from the config.json that training leaves beside the checkpoints.
``--guidance_scale s`` (fastdiff's) samples a model trained with ``--class_dropout_prob``
with classifier-free guidance (fastdiff/guidance.py); the files are the same.
"""
import dataclasses
import logging
import os
import sys

import torch

from fastdiff import config as C
from fastdiff.runtime import run_cli, setup_distributed, setup_logging, teardown_distributed
from fastdiff.sampling import (fill_model_flags_from_run, gather_and_write, generate, label_count,
                               load_model, output_dir)

log = logging.getLogger("fastdiff")


@dataclasses.dataclass
class SampleConfig:
    model_path: str = C._f("", "a model*.pt or ema_*.pt file (GD format)")
    num_samples: int = C._f(10000, "number of images to generate")
    batch_size: int = C._f(16, "images per rank per sampling batch")
    use_ddim: bool = C._f(False, "DDIM (eta 0) instead of ancestral sampling")
    clip_denoised: bool = C._f(True, "clip the predicted x_0 to [-1, 1]")
    guidance_scale: float = C._f(1.0, "classifier-free guidance scale s: eps_u + s*(eps_c - eps_u); "
                                      "1 = plain conditional sampling; != 1 needs a model trained "
                                      "with --class_dropout_prob > 0")
    num_classes: int = C._f(0, "class labels are drawn from [0, N); 0 = from the run's config.json, else 1000")
    log_dir: str = C._f("", "output folder; '' = $OPENAI_LOGDIR or the model's folder")
    seed: int = C._f(0, "random seed (each rank offsets it)")
    grid_size: int = C._f(64, "images in the PNG grid")
    device: str = C._f("", "cuda or cpu; '' = cuda when available")
    precision: str = C._f("fp32", "fp32, bf16 or fp16 autocast")
    norm_backend: str = C._f("auto", "fused, torch or auto")
    attention_backend: str = C._f("auto", "triton, sdpa, xformers, math or auto")
    no_progress: bool = C._f(False, "no progress bar (it is shown only when stderr is a terminal)")


def main(argv=None):
    return run_cli("fastdiff.sample", _main, argv)  # CheckpointError is a ValueError


def _main(argv):
    from fastdiff.train.telemetry import progress_enabled

    parser = C.build_parser((C.ModelConfig, C.DiffusionConfig, SampleConfig),
                            description="Sample from a trained fastdiff / guided-diffusion model")
    args = parser.parse_args(argv)
    given = C.explicit_flags(argv)
    if not args.model_path:
        raise ValueError("--model_path is required")
    run_cfg = fill_model_flags_from_run(args, given, args.model_path)
    model_cfg, diff_cfg, scfg = C.split_args(args, (C.ModelConfig, C.DiffusionConfig, SampleConfig))
    dist_info = setup_distributed(scfg.device)
    try:
        out_dir = output_dir(scfg.log_dir, scfg.model_path)
        if dist_info.is_main:
            os.makedirs(out_dir, exist_ok=True)
        setup_logging(None, dist_info.is_main)
        model, diffusion = load_model(scfg.model_path, model_cfg, diff_cfg, scfg.norm_backend,
                                      scfg.attention_backend, dist_info.device, scfg.precision)
        num_classes = label_count(scfg.num_classes, run_cfg)
        torch.manual_seed(scfg.seed + dist_info.rank)
        per_rank = -(-scfg.num_samples // dist_info.world_size)
        log.info("sampling %d images (%s, %s steps, guidance scale %g) on %d rank(s)",
                 scfg.num_samples, "DDIM" if scfg.use_ddim else "ancestral",
                 diffusion.num_timesteps, scfg.guidance_scale, dist_info.world_size)
        images, labels = generate(model, diffusion, per_rank, scfg.batch_size,
                                  model_cfg.image_size, dist_info.device,
                                  class_cond=model_cfg.class_cond, num_classes=num_classes,
                                  use_ddim=scfg.use_ddim, clip_denoised=scfg.clip_denoised,
                                  precision=scfg.precision, guidance_scale=scfg.guidance_scale,
                                  progress=progress_enabled(scfg.no_progress, dist_info.is_main))
        written = gather_and_write(images, labels, dist_info, scfg.num_samples, out_dir,
                                   scfg.grid_size)
        if written:
            log.info("wrote %s and %s", *written)
        return 0
    finally:
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
