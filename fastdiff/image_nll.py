"""Bits per dimension of an image model: ``python -m fastdiff.image_nll --model_path M``.

GD's image_nll.py: the variational bound of ``calc_bpd_loop`` (one noised copy of each image
per timestep, KL terms, the decoder NLL at t = 0, the prior term) averaged over images, with
GD's progress lines ("done N samples: bpd=..."). Deterministic where GD's is not: the images
are a fixed list (the first --num_samples files of --data_dir in GD's listing order, or the
held-out digits; no random flips), and each batch's noise comes from a seed derived from
(--seed, position of its first image), so with GD's --batch_size 1 the number does not
depend on the number of ranks. Under torchrun the ranks take every world_size-th image and
sum their results. The result goes to a JSON file (bpd, per-timestep term means).
"""
import dataclasses
import json
import logging
import os
import sys

import numpy as np
import torch

from fastdiff import config as C
from fastdiff.evaluate.val_loss import load_validation_set
from fastdiff.runtime import (all_reduce_sum_, autocast, run_cli, setup_distributed,
                              setup_logging, teardown_distributed)
from fastdiff.sampling import fill_model_flags_from_run, load_model
from fastdiff.train.checkpoint import atomic_write_text

log = logging.getLogger("fastdiff")

TERMS = ("vb", "mse", "xstart_mse")  # GD's per-timestep terms


@dataclasses.dataclass
class NllConfig:
    model_path: str = C._f("", "a model*.pt or ema_*.pt file (GD format)")
    data_dir: str = C._f("", "image folder; '' = the run's (config.json), else the held-out embedded digits")
    class_from: str = C._f("", "class labels from 'filename' or 'folder'; '' = the run's, else filename")
    num_samples: int = C._f(1000, "images to evaluate (fewer when the data has fewer)")
    batch_size: int = C._f(1, "images per rank per calc_bpd_loop call")
    clip_denoised: bool = C._f(True, "clip the predicted x_0 to [-1, 1]")
    seed: int = C._f(0, "seed of the noise (per batch: derived from it and the batch's first image)")
    out: str = C._f("", "JSON output file; '' = nll_<checkpoint name>.json beside the checkpoint")
    device: str = C._f("", "cuda or cpu; '' = cuda when available")
    precision: str = C._f("fp32", "fp32, bf16 or fp16 autocast")
    norm_backend: str = C._f("auto", "fused, torch or auto")
    attention_backend: str = C._f("auto", "triton, sdpa, xformers, math or auto")


CONFIG_CLASSES = (C.ModelConfig, C.DiffusionConfig, NllConfig)


def noise_seed(seed, position):
    """The torch seed for the noise of the batch whose first image is at ``position``."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1)[0])


def rank_batches(num_images, batch_size, rank, world_size):
    """This rank's batches as lists of positions: images rank, rank + W, ... cut into
    batch_size pieces; every rank gets the same number of batches (the last may be empty),
    since each batch ends in a collective."""
    mine = list(range(rank, num_images, world_size))
    count = _ceil_div(_ceil_div(num_images, world_size), batch_size)
    return [mine[i * batch_size:(i + 1) * batch_size] for i in range(count)]


def _ceil_div(a, b):
    return -(-a // b)


@torch.no_grad()
def bpd_sums(model, diffusion, images, labels, positions, *, seed, clip_denoised, device,
             precision="fp32"):
    """calc_bpd_loop on ``images[positions]``, with the global RNG seeded by
    :func:`noise_seed`: sums over the batch as float64 tensors on ``device`` —
    {"total_bpd": [], "prior_bpd": [], "count": [], term: [T] in timestep order}."""
    num_timesteps = diffusion.num_timesteps
    sums = {"total_bpd": torch.zeros((), dtype=torch.float64, device=device),
            "prior_bpd": torch.zeros((), dtype=torch.float64, device=device),
            "count": torch.zeros((), dtype=torch.float64, device=device)}
    sums.update({term: torch.zeros(num_timesteps, dtype=torch.float64, device=device)
                 for term in TERMS})
    if not positions:
        return sums
    x = images[positions].to(device)
    kwargs = {} if labels is None else {"y": labels[positions].to(device)}
    torch.manual_seed(noise_seed(seed, positions[0]))
    with autocast(precision, device.type):
        out = diffusion.calc_bpd_loop(model, x, clip_denoised=clip_denoised, model_kwargs=kwargs)
    for key in ("total_bpd", "prior_bpd"):
        sums[key] += out[key].double().sum()
    sums["count"] += len(positions)
    for term in TERMS:
        # calc_bpd_loop's column j is timestep T-1-j.
        sums[term] += out[term].double().sum(dim=0).flip(0)
    return sums


def main(argv=None):
    return run_cli("fastdiff.image_nll", _main, argv)  # ConfigError, CheckpointError, DataError


def _check_flags(cfg):
    for flag in ("num_samples", "batch_size"):
        if getattr(cfg, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(cfg, flag)}")
    if cfg.seed < 0:
        raise ValueError(f"--seed must not be negative, got {cfg.seed}")
    if cfg.class_from not in ("", "filename", "folder"):
        raise ValueError(f"--class_from must be filename or folder, got {cfg.class_from!r}")


def default_output_path(model_path):
    folder, name = os.path.split(os.path.abspath(model_path))
    return os.path.join(folder, f"nll_{os.path.splitext(name)[0]}.json")


def _main(argv):
    parser = C.build_parser(CONFIG_CLASSES, description=__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    given = C.explicit_flags(argv)
    if not args.model_path:
        raise ValueError("--model_path is required")
    run_cfg = fill_model_flags_from_run(args, given, args.model_path)
    model_cfg, diff_cfg, cfg = C.split_args(args, CONFIG_CLASSES)
    _check_flags(cfg)
    data_dir = cfg.data_dir or run_cfg.get("data_dir", "")
    class_from = cfg.class_from or run_cfg.get("class_from", "filename")
    dist_info = setup_distributed(cfg.device)
    try:
        setup_logging(None, dist_info.is_main)
        device = dist_info.device
        log.info("creating model and diffusion...")
        model, diffusion = load_model(cfg.model_path, model_cfg, diff_cfg, cfg.norm_backend,
                                      cfg.attention_backend, device, cfg.precision)
        log.info("loading data...")
        images, labels, source = load_validation_set(
            cfg.num_samples, model_cfg.image_size, data_dir=data_dir,
            class_cond=model_cfg.class_cond, class_from=class_from)
        log.info("evaluating %s, %d timesteps...", source, diffusion.num_timesteps)
        totals = None
        for positions in rank_batches(len(images), cfg.batch_size, dist_info.rank,
                                      dist_info.world_size):
            sums = bpd_sums(model, diffusion, images, labels, positions, seed=cfg.seed,
                            clip_denoised=cfg.clip_denoised, device=device,
                            precision=cfg.precision)
            for value in sums.values():
                all_reduce_sum_(value)
            totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
            done = int(totals["count"].item())
            log.info(f"done {done} samples: bpd={(totals['total_bpd'] / done).item()}")
        settings = {**dataclasses.asdict(cfg), "data_dir": data_dir, "class_from": class_from,
                    "model": dataclasses.asdict(model_cfg),
                    "diffusion": dataclasses.asdict(diff_cfg)}
        result = summary(totals, diffusion, cfg.model_path, source, settings)
        if dist_info.is_main:
            out = cfg.out or default_output_path(cfg.model_path)
            atomic_write_text(json.dumps(result, indent=1) + "\n", out)
            log.info("bits/dim %.6f over %d images; wrote %s", result["bpd"],
                     result["num_samples"], out)
        return 0
    finally:
        teardown_distributed()


def summary(totals, diffusion, model_path, source, settings):
    """The JSON result: means over the images of the all-reduced sums."""
    count = totals["count"].item()
    mean = {k: (v / count).cpu() for k, v in totals.items() if k != "count"}
    return {
        "checkpoint": os.path.abspath(model_path),
        "bpd": mean["total_bpd"].item(),
        "num_samples": int(count),
        "data": source,
        # Entry t is timestep t of the (respaced) diffusion, base timestep timestep_map[t].
        "timestep_map": [int(t) for t in diffusion.timestep_map],
        "terms": {"prior_bpd": mean["prior_bpd"].item(),
                  **{term: mean[term].tolist() for term in TERMS}},
        "settings": settings,
    }


if __name__ == "__main__":
    sys.exit(main())
