"""``python -m fastdiff.evaluate --model_path CKPT``: offline quality numbers as JSON.

(1) validation loss at 8 fixed timesteps with fixed noise on fixed images; (2) for a run on
the embedded digits: class-consistency accuracy, Fréchet distance and KID of DDIM samples in
a small digits classifier's feature space; (3) real FID, only with --inception_weights.
Model flags that are not given are read from the config.json beside the checkpoint, as
``fastdiff.sample`` does. ``--guidance_scale 1,2,4`` scores the digits samples at each
classifier-free guidance scale (same noise, same labels) under ``digits_by_guidance_scale``;
``digits`` holds the first scale's scores. The JSON goes to stdout and to --out (default:
beside the checkpoint, ``eval_<checkpoint name>.json``); progress goes to stderr.
"""
import dataclasses
import json
import logging
import os
import re
import sys

import torch

from fastdiff import config as C
from fastdiff.data import class_labels, list_image_files
from fastdiff.guidance import parse_guidance_scales, require_null_class
from fastdiff.runtime import logger_restored
from fastdiff.sampling import fill_model_flags_from_run, generate, load_model, respaced_diffusion
from fastdiff.train.checkpoint import atomic_write_text
from fastdiff.train.telemetry import progress_enabled

from .digits_classifier import load_or_train_classifier
from .digits_metrics import (NUM_DIGIT_CLASSES, balanced_labels, held_out_digits,
                             score_digit_samples)
from .fid import check_fid_inputs, fid, load_inception, reference_images_from_folder
from .val_loss import load_validation_set, validation_loss

log = logging.getLogger("fastdiff.evaluate")


@dataclasses.dataclass
class EvalConfig:
    """The evaluation's own flags (the model and diffusion flags come from config.py)."""
    model_path: str = C._f("", "a model*.pt or ema_*.pt file (GD format)")
    data_dir: str = C._f("", "images for the validation loss and FID; '' = the run's (config.json), else the digits")
    class_from: str = C._f("", "class labels from 'filename' or 'folder'; '' = the run's, else filename")
    num_val: int = C._f(256, "validation images (held-out digits, or the first N files of --data_dir)")
    batch_size: int = C._f(64, "images per forward pass (validation and sampling)")
    seed: int = C._f(0, "seed of the validation noise, the samples and the KID subsets")
    num_samples: int = C._f(500, "digits samples to score (classes balanced); 0 = skip part (2)")
    sample_steps: int = C._f(50, "sampling steps (respaced; at most the model's diffusion_steps)")
    use_ddim: bool = C._f(False, "DDIM (eta 0) instead of ancestral sampling (GD's image_sample flag)")
    guidance_scale: str = C._f("1.0", "classifier-free guidance scales to score, comma-separated (e.g. 1,2,4); "
                                      "!= 1 needs a model trained with --class_dropout_prob > 0")
    kid_subsets: int = C._f(100, "KID: number of random subsets")
    kid_subset_size: int = C._f(1000, "KID: subset size (capped at the number of images)")
    inception_weights: str = C._f("", "local Inception-v3 weights file: computes real FID (needs torch-fidelity)")
    fid_num_ref: int = C._f(0, "FID reference images (--data_dir files or held-out digits, in order); 0 = all")
    out: str = C._f("", "JSON output file; '' = eval_<checkpoint name>.json beside the checkpoint")
    device: str = C._f("", "cuda or cpu; '' = cuda when available")
    precision: str = C._f("fp32", "fp32, bf16 or fp16 autocast")
    norm_backend: str = C._f("auto", "fused, torch or auto")
    attention_backend: str = C._f("auto", "triton, sdpa, xformers, math or auto")
    no_progress: bool = C._f(False, "no sampling progress bar (shown only when stderr is a terminal)")


def main(argv=None):
    """Run the evaluation; returns the exit code (2 with a one-line error on bad input)."""
    argv = sys.argv[1:] if argv is None else argv
    with logger_restored():  # messages on stderr: stdout carries the JSON
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        try:
            result = evaluate(argv)
        except ValueError as e:  # includes CheckpointError and DataError: one line, exit 2
            print(f"fastdiff.evaluate: error: {e}", file=sys.stderr)
            return 2
    print(json.dumps(result, indent=1))
    return 0


def evaluate(argv):
    """Parse ``argv``, run the three parts, write the JSON file; returns the result dict."""
    parser = C.build_parser((C.ModelConfig, C.DiffusionConfig, EvalConfig),
                            description=__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    given = C.explicit_flags(argv)
    if not args.model_path:
        raise ValueError("--model_path is required")
    _check_flags(args)
    scales = parse_guidance_scales(args.guidance_scale)
    if args.inception_weights:  # before any slow work: a missing file or package fails now
        check_fid_inputs(args.inception_weights)
    run_cfg = fill_model_flags_from_run(args, given, args.model_path)
    args.timestep_respacing = ""  # the validation loss is the training objective: all T steps
    model_cfg, diff_cfg, ecfg = C.split_args(args, (C.ModelConfig, C.DiffusionConfig, EvalConfig))
    data_dir = ecfg.data_dir or run_cfg.get("data_dir", "")
    class_from = ecfg.class_from or run_cfg.get("class_from", "filename")
    # DDIM cannot take more steps than the model has (the digits preset's 50 on a T=40 model).
    ecfg.sample_steps = min(ecfg.sample_steps, diff_cfg.diffusion_steps)
    device = torch.device(ecfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, diffusion = load_model(ecfg.model_path, model_cfg, diff_cfg, ecfg.norm_backend,
                                  ecfg.attention_backend, device, ecfg.precision)
    if any(scale != 1.0 for scale in scales):
        require_null_class(model)  # before the slow parts

    notes = []
    if not run_cfg and not data_dir:
        notes.append("no config.json beside the checkpoint and no --data_dir: assumed a run on "
                     "the embedded digits")
    log.info("validation loss: up to %d images x 8 timesteps", ecfg.num_val)
    images, labels, val_source = load_validation_set(
        ecfg.num_val, model_cfg.image_size, data_dir=data_dir, class_cond=model_cfg.class_cond,
        class_from=class_from)
    val = validation_loss(model, diffusion, images, labels, seed=ecfg.seed,
                          batch_size=ecfg.batch_size, device=device, precision=ecfg.precision)
    val["source"] = val_source

    samples = sample_labels = None
    digits = digits_by_scale = None
    if data_dir:
        notes.append("digits scores skipped: the run was trained on --data_dir "
                     f"{data_dir}, not the embedded digits")
    elif ecfg.num_samples == 0:
        notes.append("digits scores skipped: --num_samples 0")
    else:
        digits_by_scale = []
        for scale in scales:  # the first scale's samples are kept for FID
            scale_samples, sample_labels = _generate(model, model_cfg, diff_cfg, ecfg, device,
                                                     NUM_DIGIT_CLASSES, scale)
            scores = _digits_scores(scale_samples, sample_labels, model_cfg, ecfg)
            digits_by_scale.append({"guidance_scale": scale, **scores})
            if samples is None:
                samples, digits = scale_samples, scores
        if sample_labels is None:
            notes.append("class-consistency accuracy is null: the model is not class-conditional")

    fid_value = None
    if ecfg.inception_weights:
        if samples is None:
            num_classes = _folder_classes(data_dir, class_from) if data_dir else NUM_DIGIT_CLASSES
            samples, _ = _generate(model, model_cfg, diff_cfg, ecfg, device, num_classes,
                                   scales[0])
        fid_value = _fid(samples, ecfg, model_cfg, data_dir, device)
        if len(scales) > 1:
            notes.append(f"fid is of the samples at the first guidance scale, {scales[0]:g}")
    else:
        notes.append("fid is null: no --inception_weights given")

    result = {
        "checkpoint": os.path.abspath(ecfg.model_path),
        "step": checkpoint_step(ecfg.model_path),
        "val_loss": val,
        "digits": digits,
        "digits_by_guidance_scale": digits_by_scale,
        "fid": fid_value,
        "settings": {**dataclasses.asdict(ecfg), "data_dir": data_dir, "class_from": class_from,
                     "device": device.type, "model": dataclasses.asdict(model_cfg),
                     "diffusion": dataclasses.asdict(diff_cfg)},
        "notes": notes,
    }
    out = ecfg.out or default_output_path(ecfg.model_path)
    atomic_write_text(json.dumps(result, indent=1) + "\n", out)
    log.info("wrote %s", out)
    return result


def _check_flags(args):
    for name in ("num_val", "batch_size", "sample_steps", "kid_subsets"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("num_samples", "fid_num_ref", "seed"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.num_samples == 1:
        raise ValueError("--num_samples must be 0 (skip) or at least 2")
    if args.inception_weights and args.num_samples == 0:
        raise ValueError("--inception_weights needs samples: --num_samples must be at least 2")
    if args.kid_subset_size < 2:
        raise ValueError(f"--kid_subset_size must be at least 2, got {args.kid_subset_size}")
    if args.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--precision must be fp32, bf16 or fp16, got {args.precision!r}")
    if args.class_from not in ("", "filename", "folder"):
        raise ValueError(f"--class_from must be filename or folder, got {args.class_from!r}")


def checkpoint_step(path):
    """The training step in a GD file name (model000800.pt, ema_0.99_000800.pt), else None."""
    match = re.search(r"(\d+)\.pt$", os.path.basename(path))
    return int(match.group(1)) if match else None


def default_output_path(model_path):
    """eval_<checkpoint name without .pt>.json in the checkpoint's folder."""
    folder, name = os.path.split(os.path.abspath(model_path))
    return os.path.join(folder, f"eval_{os.path.splitext(name)[0]}.json")


def _folder_classes(data_dir, class_from):
    """Number of classes in an image folder (what a class-conditional run trained on)."""
    return len(class_labels(list_image_files(data_dir), data_dir, class_from)[1])


def _generate(model, model_cfg, diff_cfg, ecfg, device, num_classes, guidance_scale):
    """num_samples samples (uint8 NHWC; ancestral, or DDIM with --use_ddim) and their labels,
    from seed ``ecfg.seed`` (so every guidance scale starts from the same noise).

    A class-conditional model is asked for each of the data's ``num_classes`` classes equally
    often (±1): its label table has GD's 1000 rows whatever the data had."""
    sampler = respaced_diffusion(diff_cfg, ecfg.sample_steps, ecfg.use_ddim)
    labels = None
    if model_cfg.class_cond:
        labels = balanced_labels(ecfg.num_samples, min(num_classes, model.num_classes))
    log.info("sampling %d images (%s, %d steps, guidance scale %g)", ecfg.num_samples,
             "DDIM" if ecfg.use_ddim else "ancestral", ecfg.sample_steps, guidance_scale)
    # generate() draws from the global RNG: seed it here and give the caller's state back.
    cuda_devices = [device.index or torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(ecfg.seed)
        images, _ = generate(model, sampler, ecfg.num_samples, ecfg.batch_size,
                             model_cfg.image_size, device, class_cond=model_cfg.class_cond,
                             num_classes=num_classes, use_ddim=ecfg.use_ddim, clip_denoised=True,
                             precision=ecfg.precision, labels=labels,
                             guidance_scale=guidance_scale,
                             progress=progress_enabled(ecfg.no_progress, True))
    return images, labels


def _digits_scores(samples, labels, model_cfg, ecfg):
    classifier = load_or_train_classifier()
    scores = score_digit_samples(classifier, samples, labels,
                                 held_out_digits(model_cfg.image_size),
                                 kid_subsets=ecfg.kid_subsets,
                                 kid_subset_size=ecfg.kid_subset_size, seed=ecfg.seed)
    scores["classifier"] = {"path": classifier.cache_path,
                            "held_out_accuracy": classifier.held_out_accuracy}
    return scores


def _fid(samples, ecfg, model_cfg, data_dir, device):
    if data_dir:
        reference = reference_images_from_folder(data_dir, model_cfg.image_size, ecfg.fid_num_ref)
    else:
        reference = held_out_digits(model_cfg.image_size)
        if ecfg.fid_num_ref:
            reference = reference[:ecfg.fid_num_ref]
    log.info("FID: %d samples vs %d reference images", len(samples), len(reference))
    extractor = load_inception(ecfg.inception_weights, device)
    return fid(extractor, samples, reference, device, ecfg.batch_size)


if __name__ == "__main__":
    sys.exit(main())
