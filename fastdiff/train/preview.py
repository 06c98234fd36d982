"""Sample grids from the EMA weights: every N steps during training (``--sample_interval N``),
rank 0 writes ``<log_dir>/samples/step_{step:06d}.png``; at the end, ``samples_grid.png``.

Every grid uses the same noise and the same labels (an RNG stream of its own seeded from
``--seed``; classes 0..9 repeating), so grids from successive steps differ only by the
weights. Sampling never touches the training RNG streams: a run gives the same losses with
and without previews.
"""
import dataclasses
import os

import torch

from fastdiff.sampling import respaced_diffusion, write_label_grid


class PreviewWriter:
    """Writes the preview grids. The trainer gathers the EMA weights (a collective under
    FSDP2) and calls :meth:`write` on every rank; only the main rank samples and writes."""

    def __init__(self, model_cfg, diff_cfg, *, interval, log_dir, device, precision, seed,
                 steps=25, use_ddim=True, n=20, is_main=True, norm_backend="torch",
                 attention_backend="math"):
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
            from fastdiff.models import create_model
            kwargs = dataclasses.asdict(self.model_cfg)
            kwargs.update(learn_sigma=self.diff_cfg.learn_sigma, use_checkpoint=False,
                          use_fp16=False, **self.backends)
            with torch.device("meta"):
                model = create_model(**kwargs)
            self._model = model.to_empty(device=self.device).eval()
            self._model.requires_grad_(False)
            self._diffusion = respaced_diffusion(self.diff_cfg, self.steps, self.use_ddim)
        return self._model

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
        return write_label_grid(model, self.model_cfg, self._diffusion, self.device, path,
                                precision=self.precision, use_ddim=self.use_ddim, n=self.n,
                                seed=self.seed)
