"""Sampling as a library: load a model from a checkpoint (+ the run's config.json), respace
its diffusion, generate images, write grids and GD's ``samples_*.npz``.

Used by ``python -m fastdiff.sample``, the training previews and end-of-run grid
(fastdiff/train/preview.py) and ``python -m fastdiff.evaluate``: one code path, so the
images a run previews are the images ``fastdiff.sample`` would give for the same weights.
"""
import dataclasses
import json
import math
import os

import numpy as np
import torch

from fastdiff import config as C
from fastdiff.diffusion import create_gaussian_diffusion
from fastdiff.guidance import ClassifierFreeGuidance
from fastdiff.models.unet import NUM_CLASSES  # GD's ImageNet class count
from fastdiff.runtime import autocast
from fastdiff.train.checkpoint import check_state_dict_fits, load_state_dict_file
from fastdiff.train.telemetry import ProgressBar


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
             use_ddim, clip_denoised, precision="fp32", labels=None, progress=False,
             cond_fn=None, model_kwargs_fn=None, guidance_scale=1.0):
    """Generate ``n`` images on this rank: (uint8 NHWC array, labels array or None).

    ``progress``: show a tqdm bar over the batches. ``cond_fn``: GD's guidance gradient
    ``cond_fn(x, t, **model_kwargs)`` (classifier guidance), passed to the sampler.
    ``model_kwargs_fn(start, stop)``: more model inputs for images ``start:stop`` as a dict
    of device tensors (e.g. the super-resolution model's ``low_res``). ``guidance_scale``:
    classifier-free guidance (fastdiff/guidance.py); 1 samples the model as it is, anything
    else needs a class-conditional model with the null-class row (a GuidanceError
    otherwise).
    """
    if guidance_scale != 1.0:  # at 1 the model runs unwrapped: plain conditional sampling
        model = ClassifierFreeGuidance(model, guidance_scale)
    images, all_labels = [], []
    sample_fn = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
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
            if model_kwargs_fn is not None:
                kwargs.update(model_kwargs_fn(done, done + b))
            with autocast(precision, device.type):
                x = sample_fn(model, (b, 3, image_size, image_size), clip_denoised=clip_denoised,
                              model_kwargs=kwargs, device=device, cond_fn=cond_fn)
            images.append(to_uint8_nhwc(x.float()).cpu().numpy())
            done += b
            bar.update()
    finally:
        bar.close()
    labels_out = np.concatenate(all_labels) if class_cond else None
    return np.concatenate(images), labels_out


def respaced_diffusion(diff_cfg, steps, use_ddim):
    """The run's diffusion (``diff_cfg``) respaced to ``steps`` steps (at most T), for DDIM
    (eta 0) or for ancestral sampling."""
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


def fill_model_flags_from_run(args, given, model_path,
                              classes=(C.ModelConfig, C.DiffusionConfig)):
    """Set the flags of ``classes`` (the model's and the diffusion's) not given on the command
    line (``given``) to the values of the run that wrote ``model_path``; returns that run's
    config ({} if none). The respacing is the caller's choice, never the run's."""
    run_cfg = read_run_config(model_path)
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.name not in given and f.name in run_cfg and f.name != "timestep_respacing":
                setattr(args, f.name, run_cfg[f.name])
    return run_cfg


def load_gd_file(path, create, configs, device, *, null_row=False, **factory_kwargs):
    """(module in eval mode on ``device``, diffusion): ``create`` (a GD factory: image model,
    super-res model or classifier) called with the fields of ``configs`` and
    ``factory_kwargs``, then the GD-format file's weights, strictly. A missing file fails
    before anything is built, one that does not fit the flags after: CheckpointError.
    ``null_row``: a checkpoint of a run with label dropout gets the null-class row of
    classifier-free guidance by itself (:func:`checkpoint_class_dropout_prob`)."""
    state = load_state_dict_file(path)
    if null_row:
        factory_kwargs["class_dropout_prob"] = checkpoint_class_dropout_prob(path, state)
    flags = {k: v for cfg in configs for k, v in dataclasses.asdict(cfg).items()}
    module, diffusion = create(**flags, **factory_kwargs)
    check_state_dict_fits(state, module.state_dict(), path)
    module.load_state_dict(state)
    return module.to(device).eval(), diffusion


def load_model(model_path, model_cfg, diff_cfg, norm_backend, attention_backend, device,
               precision="fp32"):
    """(model in eval mode on ``device``, diffusion) with the weights of a GD-format file
    (:func:`load_gd_file`; the null-class row comes by itself)."""
    norm_b, attn_b = C.resolve_backends(norm_backend, attention_backend, device.type, precision)
    return load_gd_file(model_path, C.create_model_and_diffusion, (model_cfg, diff_cfg), device,
                        null_row=True, norm_backend=norm_b, attention_backend=attn_b)


# Any p > 0 builds the null-class row, and sampling never drops labels: the stand-in for a
# checkpoint whose row is known only from its shape.
NULL_ROW_STAND_IN_DROPOUT = 0.1


def checkpoint_class_dropout_prob(model_path, state):
    """The ``class_dropout_prob`` to build ``model_path``'s model with (> 0 adds the
    null-class row): the run's, from the config.json beside it; without one (or from a run
    that predates the flag), a stand-in > 0 when the state_dict's label table has
    NUM_CLASSES + 1 rows, else 0. A file that fits neither fails the shape check after."""
    run_cfg = read_run_config(model_path)
    if "class_dropout_prob" in run_cfg:
        return float(run_cfg["class_dropout_prob"])
    label_table = state.get("label_emb.weight") if isinstance(state, dict) else None
    if label_table is not None and label_table.shape[0] == NUM_CLASSES + 1:
        return NULL_ROW_STAND_IN_DROPOUT
    return 0.0


def write_samples_npz(images, labels, out_dir):
    """GD's sample file: ``samples_{N}x{H}x{W}x3.npz`` holding the uint8 NHWC images
    (``arr_0``) and, for class-conditional samples, the labels (``arr_1``); atomic."""
    shape = "x".join(str(s) for s in images.shape)
    out = os.path.join(out_dir, f"samples_{shape}.npz")
    tmp = out + ".tmp.npz"
    if labels is not None:
        np.savez(tmp, images, labels)
    else:
        np.savez(tmp, images)
    os.replace(tmp, out)
    return out


def output_dir(log_dir, model_path):
    """Where a sampling command writes: --log_dir, else $OPENAI_LOGDIR, else the model's folder."""
    return log_dir or os.environ.get("OPENAI_LOGDIR") or os.path.dirname(os.path.abspath(model_path))


def label_count(num_classes, run_cfg):
    """Labels are drawn from [0, N): --num_classes when given, else the run's (config.json),
    10 for a run on the embedded digits, else GD's 1000."""
    return num_classes or run_cfg.get("num_classes") or \
        (10 if run_cfg and not run_cfg.get("data_dir") else NUM_CLASSES)


def gather_and_write(images, labels, dist_info, num_samples, out_dir, grid_size):
    """Collect every rank's samples on rank 0 (in rank order), keep the first ``num_samples``
    and write GD's npz (labels included when not None) and a PNG grid of the first
    ``grid_size``; returns (npz path, grid path) on rank 0, None elsewhere."""
    import torch.distributed as dist
    if dist_info.distributed:
        parts = [None] * dist_info.world_size
        dist.all_gather_object(parts, (images, labels))
        images = np.concatenate([p[0] for p in parts])
        labels = None if labels is None else np.concatenate([p[1] for p in parts])
    if not dist_info.is_main:
        return None
    images = images[:num_samples]
    labels = None if labels is None else labels[:num_samples]
    out = write_samples_npz(images, labels, out_dir)
    grid = save_grid(images[:grid_size], os.path.join(out_dir, "samples_grid.png"))
    return out, grid
