"""Classifier-guided sampling, GD's classifier_sample.py: ``python -m fastdiff.classifier_sample``.

GD's classifier_sample.py ("Diffusion Models Beat GANs"): at every reverse step the gradient
of a noisy-image classifier's log p(y | x_t, t), times ``--classifier_scale``, shifts the
sampler's mean (ancestral) or its noise estimate (DDIM). The labels y are drawn at random per
batch and serve both the classifier and, when it is class-conditional, the diffusion model.
Output as ``fastdiff.sample``: GD's ``samples_{N}x{H}x{W}x3.npz`` (images, labels) and
``samples_grid.png``. Model flags not given come from the config.json beside --model_path,
classifier flags from the one beside --classifier_path (classifier_train writes it), else
GD's defaults. :func:`classifier_cond_fn` and :func:`load_classifier` are the library half.
"""
import dataclasses
import logging
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from fastdiff import config as C
from fastdiff.runtime import run_cli, setup_distributed, setup_logging, teardown_distributed
from fastdiff.sampling import (fill_model_flags_from_run, gather_and_write, generate, label_count,
                               load_gd_file, load_model, output_dir, read_run_config)

log = logging.getLogger("fastdiff")


@dataclasses.dataclass
class ClassifierSampleConfig:
    model_path: str = C._f("", "the diffusion model: a model*.pt or ema_*.pt file (GD format)")
    classifier_path: str = C._f("", "the noisy-image classifier: a model*.pt file of classifier_train (GD format)")
    classifier_scale: float = C._f(1.0, "guidance scale: the classifier's gradient is multiplied by it (0 = unguided)")
    num_samples: int = C._f(10000, "number of images to generate")
    batch_size: int = C._f(16, "images per rank per sampling batch")
    use_ddim: bool = C._f(False, "DDIM (eta 0) instead of ancestral sampling")
    clip_denoised: bool = C._f(True, "clip the predicted x_0 to [-1, 1]")
    num_classes: int = C._f(0, "labels are drawn from [0, N); 0 = from the run's config.json (10 for a digits run), else 1000")
    log_dir: str = C._f("", "output folder; '' = $OPENAI_LOGDIR or the model's folder")
    seed: int = C._f(0, "random seed (each rank offsets it)")
    grid_size: int = C._f(64, "images in the PNG grid")
    device: str = C._f("", "cuda or cpu; '' = cuda when available")
    precision: str = C._f("fp32", "fp32, bf16 or fp16 autocast (model and classifier)")
    norm_backend: str = C._f("auto", "fused, torch or auto")
    attention_backend: str = C._f("auto", "triton, sdpa, xformers, math or auto")
    no_progress: bool = C._f(False, "no progress bar (it is shown only when stderr is a terminal)")


CONFIG_CLASSES = (C.ModelConfig, C.DiffusionConfig, C.ClassifierConfig, ClassifierSampleConfig)


def classifier_cond_fn(classifier, scale):
    """GD's guidance gradient ``cond_fn(x, t, y)``:
    scale · ∇_x Σ_i log softmax(classifier(x, t))[i, y_i].

    ``x`` is detached (the sampler runs under no_grad); the gradient is taken with grad
    enabled, for the classifier as it is (put it in eval mode: GD's classifier_sample does).
    """
    def cond_fn(x, t, y=None):
        if y is None:
            raise ValueError("classifier guidance needs the labels y in the model kwargs")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[torch.arange(len(log_probs), device=log_probs.device), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale
    return cond_fn


def load_classifier(path, classifier_cfg, diff_cfg, backends, device):
    """(classifier in eval mode on ``device``, diffusion) with the weights of a GD-format
    file; ``backends`` = (norm_backend, attention_backend), resolved. A missing file or one
    that does not fit the flags fails with CheckpointError before anything is built on the
    device."""
    return load_gd_file(path, C.create_classifier_and_diffusion, (classifier_cfg, diff_cfg),
                        device, norm_backend=backends[0], attention_backend=backends[1])


def fill_classifier_flags_from_run(args, given, classifier_path):
    """Set the classifier flags not on the command line to the values of the classifier_train
    run beside ``classifier_path``; returns that run's config ({} if none). Its image size
    must be the model's (one flag in GD)."""
    run_cfg = read_run_config(classifier_path)
    for f in dataclasses.fields(C.ClassifierConfig):
        if f.name != "image_size" and f.name not in given and f.name in run_cfg:
            setattr(args, f.name, run_cfg[f.name])
    trained_size = run_cfg.get("image_size")
    if trained_size is not None and trained_size != args.image_size:
        raise C.ConfigError(f"the classifier was trained at image_size {trained_size} (config.json "
                            f"beside --classifier_path), the model samples {args.image_size}")
    return run_cfg


def warn_if_other_diffusion(classifier_run, diff_cfg):
    """A noised classifier learned one diffusion's noise levels; GD feeds it the model's."""
    steps = classifier_run.get("diffusion_steps", diff_cfg.diffusion_steps)
    if steps != diff_cfg.diffusion_steps:
        log.warning("the classifier was trained on %s diffusion steps, the model has %s: it sees "
                    "the model's timesteps", steps, diff_cfg.diffusion_steps)


def unconditional_model_fn(model):
    """GD's model_fn for an unconditional model: the labels go to the classifier only."""
    def model_fn(x, t, y=None, **kwargs):
        return model(x, t, **kwargs)
    return model_fn


def main(argv=None):
    return run_cli("fastdiff.classifier_sample", _main, argv)  # ConfigError, CheckpointError


def _main(argv):
    from fastdiff.train.telemetry import progress_enabled

    parser = C.build_parser(CONFIG_CLASSES, description=__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    given = C.explicit_flags(argv)
    for flag in ("model_path", "classifier_path"):
        if not getattr(args, flag):
            raise ValueError(f"--{flag} is required")
    run_cfg = fill_model_flags_from_run(args, given, args.model_path)
    classifier_run = fill_classifier_flags_from_run(args, given, args.classifier_path)
    model_cfg, diff_cfg, classifier_cfg, scfg = C.split_args(args, CONFIG_CLASSES)
    dist_info = setup_distributed(scfg.device)
    try:
        setup_logging(None, dist_info.is_main)
        warn_if_other_diffusion(classifier_run, diff_cfg)
        device = dist_info.device
        model, diffusion = load_model(scfg.model_path, model_cfg, diff_cfg, scfg.norm_backend,
                                      scfg.attention_backend, device, scfg.precision)
        backends = C.resolve_backends(scfg.norm_backend, scfg.attention_backend, device.type,
                                      scfg.precision)
        classifier, _ = load_classifier(scfg.classifier_path, classifier_cfg, diff_cfg, backends,
                                        device)
        num_classes = label_count(scfg.num_classes, run_cfg)
        out_dir = output_dir(scfg.log_dir, scfg.model_path)
        if dist_info.is_main:
            os.makedirs(out_dir, exist_ok=True)  # only once both checkpoints have loaded

        torch.manual_seed(scfg.seed + dist_info.rank)
        per_rank = -(-scfg.num_samples // dist_info.world_size)
        log.info("sampling %d images (%s, %s steps, classifier scale %g) on %d rank(s)",
                 scfg.num_samples, "DDIM" if scfg.use_ddim else "ancestral",
                 diffusion.num_timesteps, scfg.classifier_scale, dist_info.world_size)
        drawn = []

        def draw_labels(start, stop):
            # GD draws y for every batch, conditional model or not, right before the noise
            # (the same draw fastdiff.sample makes for a class-conditional model).
            y = torch.randint(0, num_classes, (stop - start,), device=device)
            drawn.append(y.cpu().numpy())
            return {"y": y}

        model_fn = model if model_cfg.class_cond else unconditional_model_fn(model)
        images, _ = generate(model_fn, diffusion, per_rank, scfg.batch_size, model_cfg.image_size,
                             device, class_cond=False, num_classes=num_classes,
                             use_ddim=scfg.use_ddim, clip_denoised=scfg.clip_denoised,
                             precision=scfg.precision,
                             progress=progress_enabled(scfg.no_progress, dist_info.is_main),
                             cond_fn=classifier_cond_fn(classifier, scfg.classifier_scale),
                             model_kwargs_fn=draw_labels)
        written = gather_and_write(images, np.concatenate(drawn), dist_info, scfg.num_samples,
                                   out_dir, scfg.grid_size)
        if written:
            log.info("wrote %s and %s", *written)
        return 0
    finally:
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
