"""fastdiff's samplers against guided-diffusion's recorded outputs (tests/fixtures/gd_sampling.pt,
written by tools/gd_golden_sampling.py from GD commit 22e0df8).

Pinned: DDIM with eta > 0 (the sigma term and its noise), cond_fn guidance through
``condition_mean`` (p_sample) and ``condition_score`` (DDIM), the respacing map and the
T-1 -> 0 order of the timesteps the model and the cond_fn see, with and without
``rescale_timesteps``, and the final samples of whole loops for fixed seeds (which also pins
the order in which the loops draw from the global RNG). Each fixture case carries its own
parameters, so the cases replayed here are exactly those GD ran.

Tolerances. Both sides run the same fp32 operations in the same order, so on one machine
they agree to the last bit; between machines (or thread counts) the UNet's convolutions may
round differently, ~1e-7 relative. At the first step of a loop x_0 is predicted as
sqrt(1/abar) x - sqrt(1/abar - 1) eps with sqrt(1/abar_49) ~ 360 (50 linear steps), so those
rounding differences reach ~1e-5 in the samples: measured here, 1 vs 2 threads moved final
samples (in [-1, 1]) by up to 1e-5, and a 1e-7 relative change of x_T by up to 3e-5. Hence
ATOL = 1e-4 on values of size ~1 (with RTOL = 1e-5 for the unclipped case, whose values
reach ~1e2); a sampler bug moves samples by ~1e-1 (see the fixture guard test).
"""
import os
import sys

import pytest
import torch

from fastdiff import config as C
from fastdiff.diffusion import create_gaussian_diffusion

# The generator's model recorder and cond_fn, so both sides run the very same code.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from gd_golden_sampling import LinearClassifierGuidance, RecordingModel  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "gd_sampling.pt")
GOLDEN = torch.load(FIXTURE, weights_only=True)
RTOL = 1e-5
ATOL = 1e-4
# A behaviour the fixture pins must move the samples by far more than ATOL.
VISIBLE = 1e-2


def dequantise(weights):
    """The fixture stores every weight as offset + scale * int8 (scale a power of 2: exact)."""
    return {name: w["q"].float() * w["scale"] + w["offset"] for name, w in weights.items()}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The generator ran on one thread, so one thread here reproduces GD's numbers bit for
    bit on the same CPU; it is also the fast setting for a model this small (on a busy
    2-core machine two threads were ~5x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    unet, _ = C.create_model_and_diffusion(**GOLDEN["model_kwargs"], timestep_respacing="",
                                           rescale_timesteps=False)
    unet.load_state_dict(dequantise(GOLDEN["weights"]))
    return unet.eval()


def fastdiff_diffusion(case):
    kw = GOLDEN["model_kwargs"]
    return create_gaussian_diffusion(
        steps=kw["diffusion_steps"], learn_sigma=kw["learn_sigma"],
        noise_schedule=kw["noise_schedule"], timestep_respacing=case["respacing"],
        rescale_timesteps=case["rescale"])


def replay(case, model):
    """Run `case` on fastdiff exactly as the generator ran it on GD."""
    inputs = GOLDEN["inputs"]
    diffusion = fastdiff_diffusion(case)
    recorder = RecordingModel(model)
    cond_fn = LinearClassifierGuidance(**GOLDEN["classifier"])
    kwargs = dict(clip_denoised=case["clip"], model_kwargs={"y": inputs["y"]})
    if case["eta"] is not None:
        kwargs["eta"] = case["eta"]
    if case["cond"]:
        kwargs["cond_fn"] = cond_fn
    torch.manual_seed(case["seed"])
    with torch.no_grad():
        if "t" in case:
            t = torch.full((inputs["y"].shape[0],), case["t"], dtype=torch.long)
            out = getattr(diffusion, case["sampler"])(recorder, inputs["x_t"], t, **kwargs)
        else:
            noise = inputs["x_T"] if case["noise"] == "x_T" else None
            final = getattr(diffusion, case["sampler"])(
                recorder, tuple(inputs["x_T"].shape), noise=noise, device=torch.device("cpu"),
                **kwargs)
            out = {"final": final}
    out["model_t"] = torch.stack(recorder.seen)
    if case["cond"]:
        out["cond_t"] = torch.stack(cond_fn.seen)
    return out


def assert_same_timesteps(got, expected, what):
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != GD's {expected.dtype}"
    assert torch.equal(got, expected), f"{what}: {got[:, 0].tolist()} != GD's " \
                                       f"{expected[:, 0].tolist()}"


def assert_close(got, expected, what):
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", sorted(GOLDEN["single_steps"]))
def test_single_step_matches_gd(model, name):
    golden = GOLDEN["single_steps"][name]
    out = replay(golden, model)
    assert_same_timesteps(out["model_t"], golden["model_t"], "model timesteps")
    if golden["cond"]:
        assert_same_timesteps(out["cond_t"], golden["cond_t"], "cond_fn timesteps")
    assert_close(out["pred_xstart"], golden["pred_xstart"], "pred_xstart")
    assert_close(out["sample"], golden["sample"], "sample")


@pytest.mark.parametrize("name", sorted(GOLDEN["loops"]))
def test_sampling_loop_matches_gd(model, name):
    golden = GOLDEN["loops"][name]
    out = replay(golden, model)
    assert_same_timesteps(out["model_t"], golden["model_t"], "model timesteps")
    if golden["cond"]:
        assert_same_timesteps(out["cond_t"], golden["cond_t"], "cond_fn timesteps")
    assert_close(out["final"], golden["final"], "final samples")


# The base steps GD's respacing keeps, in the order its loops visit them (50 base steps).
SPACED_ORDER = {
    "10": [49, 44, 38, 33, 27, 22, 16, 11, 5, 0],
    "ddim5": [40, 30, 20, 10, 0],
    "": list(range(49, -1, -1)),
}


@pytest.mark.parametrize("name", sorted(GOLDEN["loops"]))
def test_fixture_loop_order_is_the_respacing_map_from_last_to_first(name):
    """What the loop-order fixtures say, spelled out: the kept base steps, last first, as
    integers, or as t * 1000 / 50 floats with rescale_timesteps."""
    golden = GOLDEN["loops"][name]
    order = torch.tensor(SPACED_ORDER[golden["respacing"]])
    expected = order.float() * 20.0 if golden["rescale"] else order
    seen = golden["model_t"]
    assert seen.dtype == expected.dtype
    assert torch.equal(seen, expected[:, None].expand_as(seen))


def test_fixture_separates_the_pinned_behaviours():
    """Guard: eta's noise, the guidance shift, the seed and the label each move GD's samples
    by far more than the tolerance, so the comparisons above can see them go wrong."""
    steps, loops = GOLDEN["single_steps"], GOLDEN["loops"]

    def moved(a, b):
        return (a - b).abs().max().item()

    for t in (9, 4):
        assert moved(steps[f"ddim_sample_eta0.5_t{t}"]["sample"],
                     steps[f"ddim_sample_eta0.0_t{t}"]["sample"]) > VISIBLE
        assert moved(steps[f"p_sample_cond_t{t}"]["sample"],
                     steps[f"p_sample_t{t}"]["sample"]) > VISIBLE
        assert moved(steps[f"ddim_sample_eta0.0_cond_t{t}"]["sample"],
                     steps[f"ddim_sample_eta0.0_t{t}"]["sample"]) > VISIBLE
    assert moved(loops["ddim_sample_loop_eta0.5_10_rescaleTrue"]["final"],
                 loops["ddim_sample_loop_eta0.0_10_rescaleTrue"]["final"]) > VISIBLE
    assert moved(loops["p_sample_loop_10_rescaleTrue"]["final"],
                 loops["p_sample_loop_10_rescaleFalse"]["final"]) > VISIBLE
    assert GOLDEN["gd_commit"].startswith("22e0df8")
    assert os.path.getsize(FIXTURE) < 1_000_000


def test_labels_change_the_fixture_model_output(model):
    """The fixture model's output layer is not zero: the class label reaches the samples."""
    x, t = GOLDEN["inputs"]["x_t"], torch.tensor([10, 10])
    with torch.no_grad():
        a = model(x, t, y=GOLDEN["inputs"]["y"])
        b = model(x, t, y=GOLDEN["inputs"]["y"] + 1)
    assert (a - b).abs().max().item() > VISIBLE
