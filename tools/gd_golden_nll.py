"""Golden references of guided-diffusion's ``calc_bpd_loop`` (the bits/dim of image_nll.py).

``python -m fastdiff.image_nll`` claims GD's numbers: the same variational-bound terms per
timestep (``vb``, ``mse``, ``xstart_mse``), prior term and total, in GD's column order (column
j is timestep T-1-j), with the noise drawn from the global torch RNG in GD's order. The
fixture this script writes lets ``tests/test_gd_golden_nll.py`` check that claim on CI,
where GD is not installed. Rerun it (deterministic: same fixture values every time) with::

    python tools/gd_golden_nll.py /path/to/guided-diffusion [--out tests/fixtures/gd_nll.pt]

The model is :class:`ToyModel`, a fixed analytic function of (x, t, y) that the test imports
from here, so both sides call the very same code and the fixture holds no weights (the UNet
has goldens of its own). Cases: a learned-range variance on a linear schedule, a fixed
variance on a respaced cosine schedule with rescaled timesteps, and an x_0-predicting model
without clipping. Each case stores its flags, seed, the images and labels, GD's outputs and
the timesteps the model was called with.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gd_checkout import gd_commit, import_guided_diffusion  # noqa: E402

DEFAULT_OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                            os.pardir, "tests", "fixtures", "gd_nll.pt"))
BATCH, IMAGE_SIZE = 3, 4
# GD's linear schedule scales its betas by 1000/T: at T < 50 they reach 1 (or more) and GD
# refuses the schedule, so the linear cases use T = 50.

CASES = {
    "learned_range_linear": dict(steps=50, learn_sigma=True, noise_schedule="linear",
                                 predict_xstart=False, rescale_timesteps=False,
                                 timestep_respacing="", clip_denoised=True, seed=11),
    "fixed_large_cosine_respaced_rescaled": dict(steps=40, learn_sigma=False,
                                                 noise_schedule="cosine", predict_xstart=False,
                                                 rescale_timesteps=True, timestep_respacing="8",
                                                 clip_denoised=True, seed=12),
    "predict_xstart_unclipped": dict(steps=50, learn_sigma=True, noise_schedule="linear",
                                     predict_xstart=True, rescale_timesteps=False,
                                     timestep_respacing="", clip_denoised=False, seed=13),
}
DIFFUSION_FLAGS = ("steps", "learn_sigma", "noise_schedule", "predict_xstart",
                   "rescale_timesteps", "timestep_respacing")


class ToyModel:
    """A smooth stand-in for a UNet: depends on x (with a spatial shift), t and y, and
    outputs variance channels when ``learn_sigma``. Records the timesteps it is given."""

    def __init__(self, learn_sigma):
        self.learn_sigma = learn_sigma
        self.seen = []

    def __call__(self, x, t, y=None):
        self.seen.append(t.clone())
        tf = t.float().view(-1, 1, 1, 1)
        out = 0.9 * torch.tanh(0.7 * x + 0.01 * tf) + 0.05 * torch.roll(x, 1, dims=-1)
        if y is not None:
            out = out + 0.02 * y.float().view(-1, 1, 1, 1)
        if self.learn_sigma:
            out = torch.cat([out, torch.sin(0.3 * x + 0.003 * tf)], dim=1)
        return out


def inputs(seed):
    """Images on GD's 256-level grid in [-1, 1] (what the decoder NLL discretises) and labels."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator)
    return pixels.float() / 127.5 - 1, torch.randint(0, 10, (BATCH,), generator=generator)


def run_case(create_gaussian_diffusion, case):
    """calc_bpd_loop of ``case`` with the diffusion factory given (GD's or fastdiff's):
    (outputs, timesteps the model saw [calls, BATCH])."""
    diffusion = create_gaussian_diffusion(**{k: case[k] for k in DIFFUSION_FLAGS})
    x_start, y = inputs(case["seed"])
    model = ToyModel(case["learn_sigma"])
    torch.manual_seed(case["seed"])
    out = diffusion.calc_bpd_loop(model, x_start, clip_denoised=case["clip_denoised"],
                                  model_kwargs={"y": y})
    return {k: v.detach() for k, v in out.items()}, torch.stack(model.seen)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", help="path of a guided-diffusion checkout")
    parser.add_argument("--out", default=DEFAULT_OUT, help="fixture to write")
    args = parser.parse_args(argv)
    gd = import_guided_diffusion(args.checkout)
    torch.set_num_threads(1)
    cases = {}
    for name, case in CASES.items():
        outputs, seen = run_case(gd.script_util.create_gaussian_diffusion, case)
        cases[name] = {**case, "outputs": outputs, "model_t": seen}
    fixture = {"gd_commit": gd_commit(args.checkout), "cases": cases}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(fixture, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB, GD {fixture['gd_commit']})")


if __name__ == "__main__":
    main()
