"""Golden sampling references from guided-diffusion: DDIM with eta > 0, cond_fn guidance, and
the order of timesteps a respaced sampling loop feeds the model.

fastdiff's samplers claim GD's numbers for the same model, seed and flags. The fixture this
script writes lets ``tests/test_gd_golden_sampling.py`` check that claim on CI, where GD is
not installed. Rerun it (deterministic: same fixture values every time) with::

    python tools/gd_golden_sampling.py /path/to/guided-diffusion \
        [--out tests/fixtures/gd_sampling.pt]

What it records, with GD's ``script_util`` diffusions (50 linear steps, learned range variance)
and GD's UNet (tiny, class-conditional, every layer non-zero, output conv included):

* ``single_steps``: ``p_sample`` and ``ddim_sample`` (eta 0 and 0.5) at three timesteps of a
  respaced diffusion, with and without a cond_fn (GD's ``condition_mean`` for p_sample,
  ``condition_score`` for DDIM);
* ``loops``: ``p_sample_loop`` / ``ddim_sample_loop`` final samples for respacings "10",
  "ddim5" and "" with ``rescale_timesteps`` on and off, plus the timesteps the model (and
  the cond_fn) were called with, in call order.

Each case stores its own parameters (sampler, respacing, eta, seed, ...), so the test replays
the cases without a copy of this list. GD draws its sampling noise from the global torch RNG
(``th.randn_like``); every case seeds it right before its call.

Model weights are stored compactly and exactly: each tensor is ``offset + scale * q`` with q
an int8 tensor and scale a power of two, so fp32 reconstructs the same values bit for bit on
both sides, and the 326k-parameter UNet takes about 330 kB instead of 1.3 MB.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gd_checkout import gd_commit, import_guided_diffusion  # noqa: E402

DEFAULT_OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                            os.pardir, "tests", "fixtures", "gd_sampling.pt"))

# The smallest GD UNet that still has every block type the sampler's model goes through:
# GroupNorm needs 32 channels, one level at 8x8 with attention, class labels, learned sigma.
MODEL_KWARGS = dict(
    image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1",
    attention_resolutions="8", num_heads=2, num_head_channels=-1, num_heads_upsample=-1,
    dropout=0.0, class_cond=True, use_checkpoint=False, use_scale_shift_norm=True,
    resblock_updown=False, use_fp16=False, use_new_attention_order=False,
    learn_sigma=True, diffusion_steps=50, noise_schedule="linear", use_kl=False,
    predict_xstart=False, rescale_learned_sigmas=False,
)
BATCH = 2
LABELS = [3, 7]
NUM_CLASSIFIER_CLASSES = 10
COND_SCALE = 3.0  # large enough that dropping the guidance shift moves samples by ~1e-1
SINGLE_STEP_DIFFUSION = dict(respacing="10", rescale=True)
SINGLE_STEP_TIMESTEPS = (9, 4, 0)  # first spaced step, a middle one, the noiseless last one


def quantised_weights(model, seed):
    """{name: (int8 q, scale, offset)}: a non-zero, well-scaled value for every weight.

    GroupNorm gains sit around 1, biases within +-0.25, matrices uniform with variance
    ~1/fan_in (activations stay O(1)); the class embedding is wider (+-1) so that the label
    visibly changes the samples.
    """
    generator = torch.Generator().manual_seed(seed)
    norm_params = set()
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.GroupNorm):
            norm_params.update({f"{module_name}.weight", f"{module_name}.bias"})
    weights = {}
    for name, tensor in model.state_dict().items():
        q = torch.randint(-127, 128, tensor.shape, generator=generator, dtype=torch.int8)
        offset, scale = 0.0, 2.0 ** -9
        if name in norm_params and name.endswith("weight"):
            offset = 1.0
        elif name.startswith("label_emb"):
            scale = 2.0 ** -7
        elif tensor.dim() > 1:
            fan_in = tensor[0].numel()
            scale = 2.0 ** round(math.log2(math.sqrt(3.0 / fan_in) / 127))
        weights[name] = (q, scale, offset)
    return weights


def dequantise(weights):
    """{name: fp32 tensor} from quantised_weights' triples (exact: scale is a power of 2)."""
    return {name: q.float() * scale + offset for name, (q, scale, offset) in weights.items()}


class RecordingModel(torch.nn.Module):
    """The model, recording the timesteps it is called with (after GD's respacing map)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.seen = []

    def forward(self, x, t, **kwargs):
        self.seen.append(t.detach().clone())
        return self.model(x, t, **kwargs)


class LinearClassifierGuidance:
    """cond_fn = scale(t) * d/dx log softmax(W x + b)[y], in closed form.

    The gradient of a linear classifier's log-probability is W[y] - softmax(Wx + b) @ W; the
    scale grows with t (1 + t/1000) so that a wrong timestep map also changes the shift.
    Records the timesteps it is called with.
    """

    def __init__(self, weight, bias, scale):
        self.weight, self.bias, self.scale = weight, bias, scale
        self.seen = []

    def __call__(self, x, t, y=None):
        self.seen.append(t.detach().clone())
        flat = x.float().flatten(1)
        probs = torch.softmax(flat @ self.weight.T + self.bias, dim=1)
        grad = self.weight[y] - probs @ self.weight
        scale = self.scale * (1 + t.float() / 1000.0)
        return (scale[:, None] * grad).reshape(x.shape)


def single_step_cases():
    cases = {}
    for t in SINGLE_STEP_TIMESTEPS:
        for sampler, eta in (("p_sample", None), ("ddim_sample", 0.0), ("ddim_sample", 0.5)):
            for cond in (False, True):
                name = f"{sampler}{'' if eta is None else f'_eta{eta}'}" \
                       f"{'_cond' if cond else ''}_t{t}"
                cases[name] = dict(sampler=sampler, eta=eta, cond=cond, t=t, clip=True,
                                   **SINGLE_STEP_DIFFUSION)
    for i, case in enumerate(cases.values()):
        case["seed"] = 100 + i
    return cases


def loop_cases():
    cases = {}
    for respacing in ("10", "ddim5"):
        for rescale in (False, True):
            for sampler, eta in (("p_sample_loop", None), ("ddim_sample_loop", 0.0),
                                 ("ddim_sample_loop", 0.5)):
                name = f"{sampler}{'' if eta is None else f'_eta{eta}'}_{respacing}" \
                       f"_rescale{rescale}"
                cases[name] = dict(sampler=sampler, eta=eta, respacing=respacing,
                                   rescale=rescale, cond=False, noise="x_T", clip=True)
    guided = dict(respacing="10", rescale=True, cond=True, noise="x_T", clip=True)
    cases["p_sample_loop_cond_10_rescaleTrue"] = dict(sampler="p_sample_loop", eta=None,
                                                      **guided)
    cases["ddim_sample_loop_eta0.5_cond_10_rescaleTrue"] = dict(sampler="ddim_sample_loop",
                                                                eta=0.5, **guided)
    # No starting noise: the loop draws x_T itself, before any step's noise.
    cases["p_sample_loop_drawn_noise_10_rescaleTrue"] = dict(
        sampler="p_sample_loop", eta=None, respacing="10", rescale=True, cond=False, noise=None,
        clip=True)
    # All 50 steps: the unspaced loop also runs T-1 -> 0 and rescales to 0..1000.
    cases["p_sample_loop_all_steps_rescaleTrue"] = dict(
        sampler="p_sample_loop", eta=None, respacing="", rescale=True, cond=False, noise="x_T",
        clip=True)
    # clip_denoised=False: the x_0 prediction is used as is (values grow to ~1e2).
    cases["ddim_sample_loop_eta0.5_noclip_ddim5_rescaleFalse"] = dict(
        sampler="ddim_sample_loop", eta=0.5, respacing="ddim5", rescale=False, cond=False,
        noise="x_T", clip=False)
    for i, case in enumerate(cases.values()):
        case["seed"] = 200 + i
    return cases


def run_case(diffusion, model, case, inputs, cond_fn):
    """One recorded call; every sampling API here has GD's signature (GD's or fastdiff's)."""
    model_kwargs = {"y": inputs["y"]}
    extra = {} if case["eta"] is None else {"eta": case["eta"]}
    guidance = {"cond_fn": cond_fn} if case["cond"] else {}
    torch.manual_seed(case["seed"])
    if case["sampler"] in ("p_sample", "ddim_sample"):
        t = torch.full((BATCH,), case["t"], dtype=torch.long)
        step = getattr(diffusion, case["sampler"])
        out = step(model, inputs["x_t"], t, clip_denoised=case["clip"], model_kwargs=model_kwargs,
                   **guidance, **extra)
        return {"sample": out["sample"], "pred_xstart": out["pred_xstart"]}
    loop = getattr(diffusion, case["sampler"])
    noise = inputs["x_T"] if case["noise"] == "x_T" else None
    shape = (BATCH, 3, MODEL_KWARGS["image_size"], MODEL_KWARGS["image_size"])
    final = loop(model, shape, noise=noise, clip_denoised=case["clip"], model_kwargs=model_kwargs,
                 device=torch.device("cpu"), **guidance, **extra)
    return {"final": final}


def record(case, diffusion, model, inputs, classifier):
    recorder = RecordingModel(model)
    cond_fn = LinearClassifierGuidance(**classifier)
    with torch.no_grad():
        out = run_case(diffusion, recorder, case, inputs, cond_fn)
    out["model_t"] = torch.stack(recorder.seen)
    if case["cond"]:
        out["cond_t"] = torch.stack(cond_fn.seen)
    return {**case, **out}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", help="path of a guided-diffusion checkout")
    parser.add_argument("--out", default=DEFAULT_OUT, help="fixture to write")
    args = parser.parse_args(argv)
    gd = import_guided_diffusion(args.checkout)
    script_util = gd.script_util
    # The thread count changes the UNet's rounding (~1e-5 in the samples): fix it, so that
    # reruns reproduce the fixture bit for bit.
    torch.set_num_threads(1)

    torch.manual_seed(0)
    model, _ = script_util.create_model_and_diffusion(
        **MODEL_KWARGS, timestep_respacing="", rescale_timesteps=False)
    weights = quantised_weights(model, seed=1)
    model.load_state_dict(dequantise(weights))
    model.eval()

    inputs_rng = torch.Generator().manual_seed(2)
    shape = (BATCH, 3, MODEL_KWARGS["image_size"], MODEL_KWARGS["image_size"])
    inputs = {
        "x_t": torch.randn(shape, generator=inputs_rng),
        "x_T": torch.randn(shape, generator=inputs_rng),
        "y": torch.tensor(LABELS, dtype=torch.long),
    }
    features = 3 * MODEL_KWARGS["image_size"] ** 2
    classifier = {
        "weight": 0.1 * torch.randn(NUM_CLASSIFIER_CLASSES, features, generator=inputs_rng),
        "bias": 0.1 * torch.randn(NUM_CLASSIFIER_CLASSES, generator=inputs_rng),
        "scale": COND_SCALE,
    }

    def diffusion_for(case):
        return script_util.create_gaussian_diffusion(
            steps=MODEL_KWARGS["diffusion_steps"], learn_sigma=MODEL_KWARGS["learn_sigma"],
            noise_schedule=MODEL_KWARGS["noise_schedule"], timestep_respacing=case["respacing"],
            rescale_timesteps=case["rescale"])

    fixture = {
        "gd_commit": gd_commit(args.checkout),
        "model_kwargs": dict(MODEL_KWARGS),
        "weights": {name: {"q": q, "scale": s, "offset": o}
                    for name, (q, s, o) in weights.items()},
        "inputs": inputs,
        "classifier": classifier,
        "single_steps": {name: record(case, diffusion_for(case), model, inputs, classifier)
                         for name, case in single_step_cases().items()},
        "loops": {name: record(case, diffusion_for(case), model, inputs, classifier)
                  for name, case in loop_cases().items()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(fixture, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB, GD {fixture['gd_commit']})")


if __name__ == "__main__":
    main()
