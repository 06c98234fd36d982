"""Sample grids from the EMA weights: every N steps during training (``--sample_interval N``),
rank 0 writes ``<log_dir>/samples/step_{step:06d}.png``; at the end, ``samples_grid.png``.

Every grid uses the same noise and the same labels (an RNG stream of its own seeded from
``--seed``; classes 0..9 repeating), so grids from successive steps differ only by the
weights. Sampling never touches the training RNG streams: a run gives the same losses with
and without previews. A super-resolution run (:class:`SuperResPreviewWriter`) shows fixed
reference images instead: their low-resolution inputs, the model's samples and the originals.
"""
import dataclasses
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

from fastdiff.sampling import (generate, respaced_diffusion, save_grid, to_uint8_nhwc,
                               write_label_grid)

log = logging.getLogger("fastdiff")


class PreviewWriter:
    """Writes the preview grids. The trainer gathers the EMA weights (a collective under
    FSDP2) and calls :meth:`write` on every rank; only the main rank samples and writes."""

    def __init__(self, model_cfg, diff_cfg, *, interval, log_dir, device, precision, seed,
                 steps=25, use_ddim=True, n=20, is_main=True, norm_backend="torch",
                 attention_backend="math", class_dropout_prob=0.0):
        self.model_cfg = model_cfg
        self.diff_cfg = diff_cfg
        self.interval = interval
        self.folder = os.path.join(log_dir, "samples")
        self.device = torch.device(device)
        self.precision = precision
        self.seed = seed
        self.steps = steps
        self.use_ddim = use_ddim
        self.n = n
        self.is_main = is_main
        self.backends = dict(norm_backend=norm_backend, attention_backend=attention_backend)
        self.class_dropout_prob = class_dropout_prob  # > 0: the model has the null-class row
        self._model = None  # built on first use, on the main rank only
        self._diffusion = None

    def due(self, step):
        """Whether a grid is written after ``step``."""
        return self.interval > 0 and step % self.interval == 0

    def _sampling_model(self):
        """A plain (uncompiled, unsharded) UNet of the run's shape, built once.

        Built on the meta device, then given empty storage: its initialisation would draw
        from the training RNG stream, and :meth:`write` overwrites every weight anyway.
        """
        if self._model is None:
            kwargs = dataclasses.asdict(self.model_cfg)
            kwargs.update(learn_sigma=self.diff_cfg.learn_sigma, use_checkpoint=False,
                          use_fp16=False, class_dropout_prob=self.class_dropout_prob,
                          **self.backends)
            with torch.device("meta"):
                model = self._create_model(**kwargs)
            self._model = model.to_empty(device=self.device).eval()
            self._model.requires_grad_(False)
            self._diffusion = respaced_diffusion(self.diff_cfg, self.steps, self.use_ddim)
        return self._model

    @staticmethod
    def _create_model(**kwargs):
        from fastdiff.models import create_model
        return create_model(**kwargs)

    @torch.no_grad()
    def write(self, step, weights, path=None):
        """Sample a grid with ``weights`` ({parameter name: full tensor}) into ``path``
        (default ``samples/step_{step:06d}.png``); returns the PNG's path on the main rank,
        None elsewhere."""
        if not self.is_main:
            return None
        model = self._sampling_model()
        model.load_state_dict(weights, strict=True)
        if path is None:
            os.makedirs(self.folder, exist_ok=True)
            path = os.path.join(self.folder, f"step_{step:06d}.png")
        return self._draw(model, path)

    def _draw(self, model, path):
        return write_label_grid(model, self.model_cfg, self._diffusion, self.device, path,
                                precision=self.precision, use_ddim=self.use_ddim, n=self.n,
                                seed=self.seed)


class SuperResPreviewWriter(PreviewWriter):
    """Grids of a super-resolution model: for fixed ``references`` (float [N, 3, L, L] in
    [-1, 1] at large_size, e.g. held-out digits; with their ``labels`` when class_cond),
    three rows: the low-resolution input (area-downsampled as in training, shown enlarged
    with nearest neighbours), the model's sample from it, and the original."""

    def __init__(self, model_cfg, diff_cfg, *, references, labels=None, **kwargs):
        super().__init__(model_cfg, diff_cfg, n=len(references), **kwargs)
        self.references = references
        self.labels = labels

    @staticmethod
    def _create_model(**kwargs):
        from fastdiff.models.super_res import sr_create_model
        return sr_create_model(**kwargs)

    def _draw(self, model, path):
        originals, low_res = self.references, self.low_res()
        samples = self.super_resolve(model, low_res)
        shown_low = F.interpolate(low_res, originals.shape[-2:], mode="nearest")
        truth = to_uint8_nhwc(originals).numpy()
        rows = np.concatenate([to_uint8_nhwc(shown_low).numpy(), samples, truth])
        bilinear = F.interpolate(low_res, originals.shape[-2:], mode="bilinear")
        log.info("super-res grid: PSNR of the samples %.2f dB, of bilinear upsampling %.2f dB "
                 "(%d images, vs the originals)", psnr(samples, truth),
                 psnr(to_uint8_nhwc(bilinear).numpy(), truth), len(truth))
        return save_grid(rows, path, nrow=len(originals))

    def low_res(self):
        """The references as the model sees them in training (GD's area downsampling)."""
        from fastdiff.data.conditioning import area_downsample
        return area_downsample(self.references, self.model_cfg.small_size)

    def super_resolve(self, model, low_res):
        """uint8 NHWC samples of ``model`` from ``low_res`` (its own seeded noise stream)."""
        cfg = self.model_cfg
        device = self.device
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                images, _ = generate(
                    model, self._diffusion, len(low_res), len(low_res), cfg.large_size, device,
                    class_cond=cfg.class_cond, num_classes=None, labels=self.labels,
                    use_ddim=self.use_ddim, clip_denoised=True, precision=self.precision,
                    model_kwargs_fn=lambda start, stop: {"low_res": low_res[start:stop].to(device)})
        finally:
            model.train(was_training)
        return images


def psnr(images, reference):
    """Peak signal-to-noise ratio (dB) of uint8 ``images`` against uint8 ``reference``, over
    all pixels together."""
    mse = np.mean((images.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))
