"""Sample from a trained model: ``python -m fastdiff.sample --model_path model000400.pt ...``.

GD's image_sample.py flags (the model flags, --model_path, --num_samples, --batch_size,
--use_ddim, --timestep_respacing, --clip_denoised) → ``samples_{N}x{H}x{W}x3.npz`` (uint8
NHWC, plus the labels when class-conditional: GD's format) and ``samples_grid.png``.
Under torchrun the ranks split the work and rank 0 gathers and writes. Model flags that are
not given are read from the config.json that training leaves beside the checkpoints.
"""
import dataclasses
import json
import logging
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from fastdiff import config as C

log = logging.getLogger("fastdiff")
NUM_CLASSES = 1000


@dataclasses.dataclass
class SampleConfig:
    model_path: str = C._f("", "a model*.pt or ema_*.pt file (GD format)")
    num_samples: int = C._f(10000, "number of images to generate")
    batch_size: int = C._f(16, "images per rank per sampling batch")
    use_ddim: bool = C._f(False, "DDIM (eta 0) instead of ancestral sampling")
    clip_denoised: bool = C._f(True, "clip the predicted x_0 to [-1, 1]")
    num_classes: int = C._f(0, "class labels are drawn from [0, N); 0 = from the run's config.json, else 1000")
    log_dir: str = C._f("", "output folder; '' = $OPENAI_LOGDIR or the model's folder")
    seed: int = C._f(0, "random seed (each rank offsets it)")
    grid_size: int = C._f(64, "images in the PNG grid")
    device: str = C._f("", "cuda or cpu; '' = cuda when available")
    precision: str = C._f("fp32", "fp32, bf16 or fp16 autocast")
    norm_backend: str = C._f("auto", "fused, torch or auto")
    attention_backend: str = C._f("auto", "triton, sdpa, xformers, math or auto")
    no_progress: bool = C._f(False, "no progress bar (it is shown only when stderr is a terminal)")


def to_uint8_nhwc(x):
    """Model-space images in [-1, 1] (NCHW) → uint8 NHWC, GD's conversion."""
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def save_grid(images, path, nrow=None):
    """Write uint8 NHWC ``images`` as one PNG grid (1-pixel gaps), atomically."""
    from PIL import Image
    n, h, w, c = images.shape
    zoom = max(1, -(-64 // max(h, w)))  # small images (the 16x16 digits) shown at >= 64 px
    if zoom > 1:
        images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
        n, h, w, c = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    grid = np.full((ncol * (h + 1) + 1, nrow * (w + 1) + 1, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = images[i]
    tmp = path + ".tmp.png"
    Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(tmp)
    os.replace(tmp, path)
    return path


@torch.no_grad()
def generate(model, diffusion, n, batch_size, image_size, device, *, class_cond, num_classes,
             use_ddim, clip_denoised, precision="fp32", labels=None, progress=False):
    """Generate ``n`` images on this rank: (uint8 NHWC array, labels array or None).

    ``progress``: show a tqdm bar over the batches.
    """
    from fastdiff.train.telemetry import ProgressBar
    images, all_labels = [], []
    sample_fn = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    bar = ProgressBar(-(-n // batch_size), enabled=progress, unit="batch")
    done = 0
    try:
        while done < n:
            b = min(batch_size, n - done)
            kwargs = {}
            if class_cond:
                if labels is not None:
                    y = torch.as_tensor(labels[done:done + b], device=device)
                else:
                    y = torch.randint(0, num_classes, (b,), device=device)
                kwargs["y"] = y
                all_labels.append(y.cpu().numpy())
            ctx = torch.autocast(device.type, dtype=dtype) if dtype else _null()
            with ctx:
                x = sample_fn(model, (b, 3, image_size, image_size), clip_denoised=clip_denoised,
                              model_kwargs=kwargs, device=device)
            images.append(to_uint8_nhwc(x.float()).cpu().numpy())
            done += b
            bar.update()
    finally:
        bar.close()
    labels_out = np.concatenate(all_labels) if class_cond else None
    return np.concatenate(images), labels_out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def respaced_diffusion(diff_cfg, steps, use_ddim):
    """The run's diffusion (``diff_cfg``) respaced to ``steps`` steps (at most T), for DDIM
    (eta 0) or for ancestral sampling."""
    from fastdiff.diffusion import create_gaussian_diffusion
    steps = min(steps, diff_cfg.diffusion_steps)
    return create_gaussian_diffusion(
        steps=diff_cfg.diffusion_steps, learn_sigma=diff_cfg.learn_sigma,
        noise_schedule=diff_cfg.noise_schedule, use_kl=diff_cfg.use_kl,
        predict_xstart=diff_cfg.predict_xstart, rescale_timesteps=diff_cfg.rescale_timesteps,
        rescale_learned_sigmas=diff_cfg.rescale_learned_sigmas,
        timestep_respacing=f"ddim{steps}" if use_ddim else str(steps))


def write_label_grid(model, model_cfg, diffusion, device, path, *, precision, use_ddim, n=20,
                     num_classes=10, seed=None):
    """Sample ``n`` images (``diffusion`` from :func:`respaced_diffusion`; DDIM or ancestral
    by ``use_ddim``) and write them as one PNG grid at ``path``; returns the path.

    Class-conditional models get labels 0, 1, ..., num_classes - 1, repeating, one class per
    grid column. With ``seed`` the noise comes from an RNG stream of its own (the same
    images for the same weights, and the caller's RNG state left as it was); None draws from
    the current stream.
    """
    labels = np.arange(n) % num_classes
    was_training = model.training
    model.eval()
    private_rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                        enabled=seed is not None)
    try:
        with private_rng:
            if seed is not None:
                torch.manual_seed(seed)
            images, _ = generate(model, diffusion, n, n, model_cfg.image_size, device,
                                 class_cond=model_cfg.class_cond, num_classes=num_classes,
                                 use_ddim=use_ddim, clip_denoised=True, precision=precision,
                                 labels=labels)
    finally:
        model.train(was_training)
    return save_grid(images, path, nrow=num_classes)


def read_run_config(model_path):
    """The config.json that training leaves beside its checkpoints ({} when absent)."""
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def fill_model_flags_from_run(args, given, model_path):
    """Set the model and diffusion flags not given on the command line (``given``) to the
    values of the run that wrote ``model_path``; returns that run's config ({} if none).
    The respacing is the caller's choice, never the run's."""
    run_cfg = read_run_config(model_path)
    for f in dataclasses.fields(C.ModelConfig) + dataclasses.fields(C.DiffusionConfig):
        if f.name not in given and f.name in run_cfg and f.name != "timestep_respacing":
            setattr(args, f.name, run_cfg[f.name])
    return run_cfg


def load_model(model_path, model_cfg, diff_cfg, norm_backend, attention_backend, device):
    """(model in eval mode on ``device``, diffusion) with the weights of a GD-format file;
    a missing file or one that does not fit the flags fails with CheckpointError."""
    from fastdiff.train.checkpoint import check_state_dict_fits, load_state_dict_file
    state = load_state_dict_file(model_path)  # a missing file fails before the model is built
    norm_b, attn_b = C.resolve_backends(norm_backend, attention_backend, device.type)
    model, diffusion = C.create_model_and_diffusion(
        **dataclasses.asdict(model_cfg), **dataclasses.asdict(diff_cfg),
        norm_backend=norm_b, attention_backend=attn_b)
    check_state_dict_fits(state, model.state_dict(), model_path)
    model.load_state_dict(state)
    return model.to(device).eval(), diffusion


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    from fastdiff.train.checkpoint import CheckpointError
    saved = (list(log.handlers), log.level, log.propagate)
    try:
        return _main(argv)
    except (CheckpointError, ValueError) as e:
        print(f"fastdiff.sample: error: {e}", file=sys.stderr)
        return 2
    finally:
        log.handlers[:], log.level, log.propagate = saved


def _main(argv):
    from fastdiff.train.cli import setup_logging
    from fastdiff.train.parallel import setup_distributed, teardown_distributed
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
        out_dir = scfg.log_dir or os.environ.get("OPENAI_LOGDIR") or \
            os.path.dirname(os.path.abspath(scfg.model_path))
        if dist_info.is_main:
            os.makedirs(out_dir, exist_ok=True)
        setup_logging(None, dist_info.is_main)
        model, diffusion = load_model(scfg.model_path, model_cfg, diff_cfg, scfg.norm_backend,
                                      scfg.attention_backend, dist_info.device)
        num_classes = scfg.num_classes or run_cfg.get("num_classes") or \
            (10 if run_cfg and not run_cfg.get("data_dir") else NUM_CLASSES)
        torch.manual_seed(scfg.seed + dist_info.rank)
        per_rank = -(-scfg.num_samples // dist_info.world_size)
        log.info("sampling %d images (%s, %s steps) on %d rank(s)", scfg.num_samples,
                 "DDIM" if scfg.use_ddim else "ancestral", diffusion.num_timesteps,
                 dist_info.world_size)
        images, labels = generate(model, diffusion, per_rank, scfg.batch_size,
                                  model_cfg.image_size, dist_info.device,
                                  class_cond=model_cfg.class_cond, num_classes=num_classes,
                                  use_ddim=scfg.use_ddim, clip_denoised=scfg.clip_denoised,
                                  precision=scfg.precision,
                                  progress=progress_enabled(scfg.no_progress, dist_info.is_main))
        if dist_info.distributed:
            parts = [None] * dist_info.world_size
            dist.all_gather_object(parts, (images, labels))
            images = np.concatenate([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts]) if model_cfg.class_cond else None
        if dist_info.is_main:
            images = images[:scfg.num_samples]
            shape = "x".join(str(s) for s in images.shape)
            out = os.path.join(out_dir, f"samples_{shape}.npz")
            tmp = out + ".tmp.npz"
            if model_cfg.class_cond:
                np.savez(tmp, images, labels[:scfg.num_samples])
            else:
                np.savez(tmp, images)
            os.replace(tmp, out)
            grid = save_grid(images[:scfg.grid_size], os.path.join(out_dir, "samples_grid.png"))
            log.info("wrote %s and %s", out, grid)
        return 0
    finally:
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
