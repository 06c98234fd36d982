"""Guidance sweep on the embedded digits: how class consistency, FD and KID move with the
scale of classifier-free guidance and of classifier guidance, and what each costs per image.

    python benchmarks/guidance_sweep.py --model_path M [--classifier_path K] \\
        --cfg_scales 1,1.5,2,3,5 --classifier_scales 0,1,2,4 --num_samples 100 --out DIR

Why a script and not a loop over ``fastdiff.evaluate``: the evaluator samples classifier-free
guidance only, and each call would retrain nothing but reload and re-score everything. Here
one model (a digits run trained with ``--class_dropout_prob > 0``) is sampled once per
configuration through the library's own pieces — ``fastdiff.sampling.generate`` with
``guidance_scale`` for classifier-free guidance, ``fastdiff.classifier_sample``'s
``classifier_cond_fn`` / ``load_classifier`` for classifier guidance (CFG scale 1) — from the
same seed and the same balanced labels, with the evaluator's sampler (ancestral, respaced to
``--sample_steps``), and scored with the evaluator's functions (the cached digits classifier,
``score_digit_samples`` against the held-out digits, the evaluator's KID settings). So a row
here is the number ``fastdiff.evaluate --guidance_scale s`` prints for the same sampler and
seed. Writes ``DIR/guidance_sweep.json``, ``DIR/guidance_sweep_digits.png`` (accuracy and FD
against scale, both kinds of guidance) and a sample grid per configuration.

Timing is wall clock of the sampling alone (not the scoring), per image, after one untimed
warm-up; on a shared machine it is only as steady as the machine.
"""
import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import sys
import time

import numpy as np
import torch

from fastdiff import config as C
from fastdiff.classifier_sample import (classifier_cond_fn, fill_classifier_flags_from_run,
                                        load_classifier, warn_if_other_diffusion)
from fastdiff.evaluate.cli import EvalConfig
from fastdiff.evaluate.digits_classifier import load_or_train_classifier
from fastdiff.evaluate.digits_metrics import (NUM_DIGIT_CLASSES, balanced_labels,
                                              held_out_digits, score_digit_samples)
from fastdiff.sampling import (fill_model_flags_from_run, generate, load_model,
                               respaced_diffusion, save_grid)
from fastdiff.train.checkpoint import atomic_write_text

log = logging.getLogger("guidance_sweep")

CLASSIFIER_FREE, CLASSIFIER = "classifier-free", "classifier"
PLOT_NAME = "guidance_sweep_digits.png"
JSON_NAME = "guidance_sweep.json"
GRID_IMAGES = 20  # two of each digit per sample grid


def _eval_default(name):
    """fastdiff.evaluate's default for one of its flags: the sweep scores as it does."""
    return next(f.default for f in dataclasses.fields(EvalConfig) if f.name == name)


def parse_scales(text, flag):
    """``"1,2,4"`` → [1.0, 2.0, 4.0] (finite, distinct); ``""`` → [] (that kind is skipped)."""
    if not text.strip():
        return []
    try:
        scales = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(s) for s in scales) or len(set(scales)) != len(scales):
        raise ValueError(f"{flag} values must be finite and distinct, got {text!r}")
    return scales


def build_parser():
    parser = argparse.ArgumentParser(prog="python benchmarks/guidance_sweep.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True,
                        help="digits model trained with --class_dropout_prob > 0 "
                             "(config.json beside it)")
    parser.add_argument("--classifier_path", default="",
                        help="noised classifier of fastdiff.classifier_train; "
                             "'' = no classifier guidance")
    parser.add_argument("--cfg_scales", default="1,1.5,2,3,5",
                        help="classifier-free guidance scales (1 = the conditional model)")
    parser.add_argument("--classifier_scales", default="0,1,2,4",
                        help="classifier guidance scales, at CFG scale 1 (0 = unguided)")
    parser.add_argument("--num_samples", type=int, default=100, help="samples per configuration")
    parser.add_argument("--sample_steps", type=int, default=_eval_default("sample_steps"),
                        help="respaced ancestral steps (fastdiff.evaluate's default)")
    parser.add_argument("--batch_size", type=int, default=_eval_default("batch_size"))
    parser.add_argument("--seed", type=int, default=_eval_default("seed"),
                        help="seed of the noise (the same for every configuration) and of KID")
    parser.add_argument("--device", default="", help="cuda or cpu; '' = cuda when available")
    parser.add_argument("--out", required=True, help="output folder")
    return parser


def load_sweep_model(model_path, device):
    """(model, model config, diffusion config) with the flags of the run beside the file,
    as fastdiff.sample/evaluate load it (fp32, auto backends)."""
    classes = (C.ModelConfig, C.DiffusionConfig)
    args = C.build_parser(classes).parse_args([])
    fill_model_flags_from_run(args, set(), model_path)
    model_cfg, diff_cfg = C.split_args(args, classes)
    model, _ = load_model(model_path, model_cfg, diff_cfg, "auto", "auto", device, "fp32")
    return model, model_cfg, diff_cfg


def load_sweep_classifier(classifier_path, model_cfg, diff_cfg, device):
    """The noised classifier with the flags of its classifier_train run, as
    fastdiff.classifier_sample loads it (its image size must be the model's)."""
    args = C.build_parser((C.ClassifierConfig,)).parse_args([])
    args.image_size = model_cfg.image_size
    classifier_run = fill_classifier_flags_from_run(args, set(), classifier_path)
    warn_if_other_diffusion(classifier_run, diff_cfg)
    (classifier_cfg,) = C.split_args(args, (C.ClassifierConfig,))
    backends = C.resolve_backends("auto", "auto", device.type, "fp32")
    classifier, _ = load_classifier(classifier_path, classifier_cfg, diff_cfg, backends, device)
    return classifier


@dataclasses.dataclass
class Sampler:
    """What every configuration shares: the model, its diffusion respaced to ``sample_steps``
    ancestral steps, the labels, the seed, the batch size."""
    model: torch.nn.Module
    diff_cfg: C.DiffusionConfig
    sample_steps: int
    image_size: int
    labels: np.ndarray
    seed: int
    batch_size: int
    device: torch.device

    def __post_init__(self):
        self.diffusion = respaced_diffusion(self.diff_cfg, self.sample_steps, use_ddim=False)

    def sample(self, guidance_scale=1.0, cond_fn=None, diffusion=None, n=None):
        """(uint8 NHWC images, seconds): ``n`` (default all) images from seed ``seed``,
        the caller's RNG state left as it was."""
        n = len(self.labels) if n is None else n
        cuda_devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(self.seed)
            start = time.perf_counter()
            images, _ = generate(self.model, diffusion or self.diffusion, n, self.batch_size,
                                 self.image_size, self.device, class_cond=True,
                                 num_classes=NUM_DIGIT_CLASSES, use_ddim=False,
                                 clip_denoised=True, labels=self.labels[:n],
                                 guidance_scale=guidance_scale, cond_fn=cond_fn)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return images, time.perf_counter() - start


def score(images, labels, digits_classifier, reference, seed):
    """fastdiff.evaluate's digits scores of ``images`` (its KID settings)."""
    return score_digit_samples(digits_classifier, images, labels, reference,
                               kid_subsets=_eval_default("kid_subsets"),
                               kid_subset_size=_eval_default("kid_subset_size"), seed=seed)


def configurations(cfg_scales, classifier_scales, classifier):
    """(kind, scale, guidance_scale, cond_fn) for each configuration, classifier-free first.
    Classifier guidance runs at CFG scale 1; its scale 0 still takes the classifier's
    gradient (times 0), as GD's classifier_sample does, so its cost is in the timing."""
    for scale in cfg_scales:
        yield CLASSIFIER_FREE, scale, scale, None
    if classifier is not None:
        for scale in classifier_scales:
            yield CLASSIFIER, scale, 1.0, classifier_cond_fn(classifier, scale)


def warm_up(sampler, classifier):
    """One untimed 2-step pass through both guidance paths (first-call costs stay out of the
    first row's timing)."""
    short = respaced_diffusion(sampler.diff_cfg, 2, use_ddim=False)
    cond_fn = classifier_cond_fn(classifier, 1.0) if classifier is not None else None
    sampler.sample(guidance_scale=2.0, cond_fn=cond_fn, diffusion=short,
                   n=min(2, len(sampler.labels)))


def run_sweep(sampler, cfg_scales, classifier_scales, classifier, digits_classifier, out_dir):
    """One row per configuration: scores, seconds per image; a sample grid per configuration
    in ``out_dir``. Also returns whether classifier scale 0 reproduced CFG scale 1's images
    bit for bit (None when either is missing): both are the unguided model."""
    reference = held_out_digits(sampler.image_size)
    warm_up(sampler, classifier)
    rows, images_of = [], {}
    for kind, scale, guidance_scale, cond_fn in configurations(cfg_scales, classifier_scales,
                                                               classifier):
        log.info("%s guidance, scale %g: sampling %d images", kind, scale, len(sampler.labels))
        images, seconds = sampler.sample(guidance_scale=guidance_scale, cond_fn=cond_fn)
        images_of[kind, scale] = images
        scores = score(images, sampler.labels, digits_classifier, reference, sampler.seed)
        grid = save_grid(images[:GRID_IMAGES],
                         os.path.join(out_dir, f"samples_{kind}_{scale:g}.png"),
                         nrow=NUM_DIGIT_CLASSES)
        rows.append({"guidance": kind, "scale": scale, "accuracy": scores["accuracy"],
                     "fd": scores["fd"], "kid_mean": scores["kid_mean"],
                     "kid_std": scores["kid_std"], "seconds": seconds,
                     "seconds_per_image": seconds / len(images),
                     "predicted_class_counts": scores["predicted_class_counts"],
                     "grid": os.path.basename(grid)})
        log.info("  accuracy %.3f, FD %.2f, KID %.4f, %.3f s/image", scores["accuracy"],
                 scores["fd"], scores["kid_mean"], seconds / len(images))
    baseline_pair = (images_of.get((CLASSIFIER_FREE, 1.0)), images_of.get((CLASSIFIER, 0.0)))
    same = None if any(x is None for x in baseline_pair) else \
        bool(np.array_equal(*baseline_pair))
    return rows, same


def plot_sweep(rows, path):
    """Two panels (class accuracy, FD) against scale, one line per kind of guidance; written
    atomically. matplotlib as fastdiff/plot.py uses it: a bare Figure (Agg), no pyplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 7))
    accuracy_ax, fd_ax = fig.subplots(2, 1, sharex=True)
    styles = {CLASSIFIER_FREE: ("tab:blue", "o", "classifier-free (ε_u + s·(ε_c − ε_u))"),
              CLASSIFIER: ("tab:orange", "s", "classifier (s·∇log p(y|x_t), CFG scale 1)")}
    for kind, (color, marker, label) in styles.items():
        kind_rows = sorted((r for r in rows if r["guidance"] == kind), key=lambda r: r["scale"])
        if not kind_rows:
            continue
        scales = [r["scale"] for r in kind_rows]
        accuracy_ax.plot(scales, [r["accuracy"] for r in kind_rows], color=color,
                         marker=marker, label=label)
        fd_ax.plot(scales, [r["fd"] for r in kind_rows], color=color, marker=marker, label=label)
    accuracy_ax.set_ylabel("class-consistency accuracy")
    accuracy_ax.set_title("guidance on the digits (digits classifier's judgement)")
    accuracy_ax.grid(True, alpha=0.3)
    accuracy_ax.legend(loc="lower right")
    fd_ax.set_ylabel("FD vs held-out digits (lower is better)")
    fd_ax.set_xlabel("guidance scale")
    fd_ax.grid(True, alpha=0.3)
    fig.tight_layout()
    # Written under a temporary name and renamed, so a reader never sees half a PNG.
    tmp = f"{path}.tmp.{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    cfg_scales = parse_scales(args.cfg_scales, "--cfg_scales")
    classifier_scales = parse_scales(args.classifier_scales, "--classifier_scales")
    if args.num_samples < 2:
        raise ValueError(f"--num_samples must be at least 2, got {args.num_samples}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, model_cfg, diff_cfg = load_sweep_model(args.model_path, device)
    if not model_cfg.class_cond:
        raise ValueError("the sweep needs a class-conditional digits model (class_cond True)")
    classifier = None
    if args.classifier_path and classifier_scales:
        classifier = load_sweep_classifier(args.classifier_path, model_cfg, diff_cfg, device)
    digits_classifier = load_or_train_classifier()
    os.makedirs(args.out, exist_ok=True)

    sampler = Sampler(model=model, diff_cfg=diff_cfg, sample_steps=args.sample_steps,
                      image_size=model_cfg.image_size,
                      labels=balanced_labels(args.num_samples, NUM_DIGIT_CLASSES),
                      seed=args.seed, batch_size=args.batch_size, device=device)
    rows, baseline_identical = run_sweep(sampler, cfg_scales, classifier_scales, classifier,
                                         digits_classifier, args.out)
    result = {
        "model_path": os.path.abspath(args.model_path),
        "classifier_path": os.path.abspath(args.classifier_path) if classifier else None,
        "rows": rows,
        "classifier_scale_0_equals_cfg_scale_1": baseline_identical,
        "settings": {"num_samples": args.num_samples, "seed": args.seed,
                     "sampler": f"ancestral, {min(args.sample_steps, diff_cfg.diffusion_steps)} "
                                f"respaced steps of {diff_cfg.diffusion_steps}",
                     "batch_size": args.batch_size, "labels": "balanced (0..9 repeating)",
                     "kid_subsets": _eval_default("kid_subsets"),
                     "kid_subset_size": _eval_default("kid_subset_size")},
        "digits_classifier": {"path": digits_classifier.cache_path,
                              "held_out_accuracy": digits_classifier.held_out_accuracy},
        "machine": {"device": device.type, "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": argv,
    }
    atomic_write_text(json.dumps(result, indent=1) + "\n", os.path.join(args.out, JSON_NAME))
    plot_sweep(rows, os.path.join(args.out, PLOT_NAME))
    log.info("wrote %s and %s", os.path.join(args.out, JSON_NAME),
             os.path.join(args.out, PLOT_NAME))
    return result


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # bad flags, a checkpoint that does not fit: one line
        print(f"guidance_sweep: error: {e}", file=sys.stderr)
        sys.exit(2)
