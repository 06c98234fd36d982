"""fastdiff's noisy-image classifier and classifier guidance against guided-diffusion's own
numbers (issue 15).

The fixtures (tests/fixtures/gd_classifier_*.pt) were written by
tools/gd_golden_classifier.py from GD commit 22e0df8 on the CPU in fp32; CI has no GD. For
each classifier config, fastdiff's factory (or class) with GD's arguments must have GD's
state_dict keys and shapes (so checkpoints load with strict=True both ways), load the state
GD was given, and reproduce GD's logits, the gradient of a fixed scalar of them w.r.t. every
parameter and the input, and the classifier-guidance gradient d/dx log p(y | x, t) in eval
mode — for GD's modules and every kernel backend that runs on the CPU ('fused' and 'triton'
run the ops' torch fallbacks here). The guided-step fixture pins one p_sample and one
ddim_sample step with GD's cond_fn, through respacing, to GD's.

The helpers here are shared with tests/test_gd_golden_super_res.py. The tolerances, the
backend pairs and the gradient-comparison helpers are the UNet goldens'
(tests/test_gd_golden_unet.py), imported so that one justification covers both.
"""
import os
import sys

import pytest
import torch

import fastdiff
from fastdiff.classifier_sample import classifier_cond_fn
from fastdiff.diffusion import create_gaussian_diffusion
from fastdiff.models.classifier import EncoderUNetModel, create_classifier
from fastdiff.models.super_res import SuperResModel, sr_create_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import gd_golden_classifier as golden  # noqa: E402
import gd_golden_unet as unet_golden  # noqa: E402
# OUTPUT_RTOL 1e-5 and GRAD_RTOL 1e-4 (max|a - b| / max|b|), SYMMETRY_ZERO and the backend
# pairs: see that module's comments (the same kernels, the same fp32 reorderings). Measured
# on these fixtures (classifiers and super-res): torch/math reproduces GD bitwise on outputs
# and guidance (<= 1e-7 on the stored gradient summaries); the kernel backends differ by
# <= 8.9e-7 on outputs, <= 2.1e-6 on input gradients, <= 2.0e-6 on the guidance gradient
# and <= 6.1e-6 on parameter gradients.
from test_gd_golden_unet import (  # noqa: E402
    BACKENDS,
    GRAD_RTOL,
    OUTPUT_RTOL,
    SYMMETRY_ZERO,
    grad_errors,
    largest_grad,
    rel_err,
    zero_by_symmetry,
)

# The sampling goldens' bounds (tests/test_gd_golden_sampling.py): one step of a 50-step
# schedule multiplies fp32 rounding differences of the UNet by up to sqrt(1/abar) ~ 13 here
# (index 6 of 10 maps to t = 33 of 50; "ddim10" maps it to 30) and the guidance shift adds
# the classifier gradient times classifier_scale; measured against GD: 0 for torch/math,
# <= 1.3e-6 on samples and <= 8.3e-6 on pred_xstart (values ~4) for the kernel backends.
# Dropping the guidance moves the samples by ~8e-2, and the classifier at the unmapped
# timestep changes the scaled guidance gradient by ~1.2e-2: the guard test checks that
# they exceed 100x and 10x STEP_ATOL.
STEP_ATOL = 1e-4
STEP_RTOL = 1e-5
VISIBLE = 1e-2

FASTDIFF_FACTORIES = {
    "create_classifier": create_classifier,
    "EncoderUNetModel": EncoderUNetModel,
    "sr_create_model": sr_create_model,
    "SuperResModel": SuperResModel,
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The generator ran on one thread; one thread is also the fast setting for models this
    small on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------ helpers (shared with super-res)
def load_fixture(kind, name):
    return torch.load(golden.fixture_path(kind, name), weights_only=False)


def config(fixture):
    configs = golden.CLASSIFIER_CONFIGS if fixture["kind"] == "classifier" \
        else golden.SUPER_RES_CONFIGS
    return configs[fixture["name"]]


def build(fixture, norm_backend="torch", attention_backend="math"):
    factory = FASTDIFF_FACTORIES[fixture["factory"]]
    model = factory(**fixture["kwargs"], norm_backend=norm_backend,
                    attention_backend=attention_backend)
    return model.eval()


def rebuilt_inputs(fixture):
    return golden.inputs_for(fixture["kind"], fixture["name"], config(fixture))


def run_model(fixture, model, inputs):
    """The generator's computation on ``model``: (output, scalar, {leaf name: gradient})."""
    x = inputs["x"].clone().requires_grad_(True)
    leaves = {"x": x}
    if "low_res" in inputs:
        leaves["low_res"] = inputs["low_res"].clone().requires_grad_(True)
    output = golden.forward(fixture["kind"], model, inputs, x, leaves.get("low_res"))
    scalar = (output * inputs["out_weights"]).sum()
    scalar.backward()
    return output, scalar, {name: leaf.grad for name, leaf in leaves.items()}


def gradient_failures(fixture, model, input_grads):
    """{(tensor, check): relative error} for every gradient check beyond GRAD_RTOL."""
    failures = {}
    for name, grad in input_grads.items():
        assert grad is not None, f"no gradient reached {name}"
        for part, err in grad_errors(grad, fixture[f"grad_{name}"]).items():
            if not err <= GRAD_RTOL:
                failures[(name, part)] = err
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(fixture["grads"])
    noise_only = zero_by_symmetry(fixture)
    noise_floor = SYMMETRY_ZERO * largest_grad(fixture)
    for name, stored in fixture["grads"].items():
        grad = params[name].grad
        assert grad is not None, name
        if name in noise_only:
            size = float(grad.abs().max())
            if not size < noise_floor:
                failures[(name, "zero_by_symmetry")] = size / noise_floor
            continue
        for part, err in grad_errors(grad, stored).items():
            if not err <= GRAD_RTOL:
                failures[(name, part)] = err
    return failures


def gd_state(fixture):
    """The synthetic state_dict GD was given, rebuilt (its values are checked against the
    fixture's fingerprints by check_state_dict_is_gds)."""
    return unet_golden.synthetic_state_dict(fixture["state_shapes"])


def check_against_gd(fixture, state, norm_backend, attention_backend):
    """Strict load of GD's state, then outputs and every gradient within the bounds.
    Returns (model, inputs) for further checks."""
    model = build(fixture, norm_backend, attention_backend)
    model.load_state_dict(state, strict=True)
    inputs = rebuilt_inputs(fixture)
    output, scalar, input_grads = run_model(fixture, model, inputs)
    errors = {"output": rel_err(output, fixture["output"]),
              "scalar": rel_err(scalar, fixture["scalar"])}
    bad = {k: e for k, e in errors.items() if not e <= OUTPUT_RTOL}
    assert not bad, f"outputs differ from GD's beyond {OUTPUT_RTOL}: {bad}"
    failures = gradient_failures(fixture, model, input_grads)
    worst = dict(sorted(failures.items(), key=lambda kv: -kv[1])[:8])
    assert not failures, f"{len(failures)} gradient checks differ from GD's: {worst}"
    return model, inputs


def check_fixture_metadata(fixture):
    assert len(fixture["gd_commit"]) == 40, "the generator records GD's commit"
    # The fixture was written from the generator's current config (not a stale one).
    assert fixture["kwargs"] == config(fixture)["kwargs"]
    assert fixture["kwargs"].get("use_fp16", fixture["kwargs"].get("classifier_use_fp16")) \
        in (False, None)


def check_inputs_are_gds(fixture):
    """The hashed inputs rebuilt here are bitwise what GD was given; t and y are stored."""
    inputs = rebuilt_inputs(fixture)
    assert sorted(inputs) == sorted(fixture["inputs"])
    for key, value in inputs.items():
        stored = fixture["inputs"][key]
        if key in golden.HASHED_INPUTS:
            torch.testing.assert_close(unet_golden.fingerprint(value), stored, rtol=1e-12,
                                       atol=0, msg=key)
        else:
            assert value.dtype == stored.dtype and torch.equal(value, stored), key


def check_state_dict_is_gds(fixture, state):
    gd_shapes = {k: tuple(s) for k, s in fixture["state_shapes"].items()}
    for norm_backend, attention_backend in BACKENDS:
        model = build(fixture, norm_backend, attention_backend)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        # Same keys in the same order with the same shapes: load_state_dict(strict=True)
        # succeeds GD → fastdiff and fastdiff → GD.
        assert list(ours) == list(gd_shapes), (norm_backend, attention_backend)
        assert ours == gd_shapes, (norm_backend, attention_backend)
    for key, value in state.items():
        torch.testing.assert_close(unet_golden.fingerprint(value),
                                   fixture["state_fingerprints"][key], rtol=1e-12, atol=0,
                                   msg=key)


def check_zero_gradients_are_shifts(fixture):
    # Guards SYMMETRY_ZERO: it must set aside only the parameters it is meant for (shifts
    # right before a one-channel-per-group GroupNorm).
    names = zero_by_symmetry(fixture)
    shifts = [n for n in names if n.endswith(".bias") or ".emb_layers." in n]
    assert sorted(shifts) == sorted(names), sorted(names)


# ------------------------------------------------------------------------------- models
@pytest.fixture(scope="module", params=sorted(golden.CLASSIFIER_CONFIGS))
def fixture(request):
    return load_fixture("classifier", request.param)


@pytest.fixture(scope="module")
def state(fixture):
    return gd_state(fixture)


@pytest.fixture(scope="module")
def math_guidance(fixture, state):
    """The guidance gradient of GD's own modules (torch/math): the reference every kernel
    backend must reproduce."""
    model = build(fixture)
    model.load_state_dict(state)
    inputs = rebuilt_inputs(fixture)
    return golden.guidance_grad(model, inputs["x"], inputs["t"], inputs["y"])


def test_fixture_records_gd(fixture):
    check_fixture_metadata(fixture)


def test_inputs_are_what_gd_was_given(fixture):
    check_inputs_are_gds(fixture)


def test_state_dict_keys_shapes_and_values_are_gds(fixture, state):
    check_state_dict_is_gds(fixture, state)


def test_only_shifts_before_one_channel_groups_have_zero_gradients(fixture):
    check_zero_gradients_are_shifts(fixture)


@pytest.mark.parametrize("norm_backend,attention_backend", BACKENDS)
def test_logits_gradients_and_guidance_match_gd(fixture, state, math_guidance, norm_backend,
                                                attention_backend):
    model, inputs = check_against_gd(fixture, state, norm_backend, attention_backend)
    # Classifier guidance differentiates log p(y | x, t) w.r.t. x with the classifier in
    # eval mode: the input gradient must flow through every kernel path.
    assert not model.training
    guidance = golden.guidance_grad(model, inputs["x"], inputs["t"], inputs["y"])
    errors = {"vs GD": rel_err(guidance, fixture["guidance_grad"]),
              "vs torch/math": rel_err(guidance, math_guidance)}
    bad = {k: e for k, e in errors.items() if not e <= GRAD_RTOL}
    assert not bad, f"guidance gradient differs beyond {GRAD_RTOL}: {bad}"


def test_attention_pool_runs_the_chosen_kernel_on_an_odd_sequence():
    # AttentionPool2d attends over HW + 1 tokens (65 here): the sdpa and triton backends
    # must take that length, and the pool must really use the backend it was given.
    fixture = load_fixture("classifier", "attention_pool")
    for attention_backend in ("sdpa", "triton"):
        model = build(fixture, attention_backend=attention_backend)
        pool = model.out[2]
        assert type(pool).__name__ == "AttentionPool2d"
        assert pool.attention.backend == attention_backend
        assert pool.positional_embedding.shape[1] % 2 == 1


def test_spatial_v2_norm_is_fused_on_a_2d_tensor():
    # spatial_v2 normalises the [N, 2048] feature vector: with norm_backend='fused' that
    # norm + SiLU is one group_norm_silu op on a 2-D input.
    fixture = load_fixture("classifier", "spatial_v2_scale_shift")
    model = build(fixture, norm_backend="fused")
    norm, silu = model.out[1], model.out[2]
    assert isinstance(norm, fastdiff.models.GroupNormAct) and norm.act
    assert isinstance(silu, torch.nn.Identity)
    features = torch.randn(3, 2048, requires_grad=True)
    reference = torch.nn.functional.silu(
        torch.nn.functional.group_norm(features, 32, norm.weight, norm.bias))
    torch.testing.assert_close(norm(features), reference, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- guided steps
@pytest.fixture(scope="module")
def guided():
    return torch.load(golden.GUIDED_FIXTURE, weights_only=False)


def guided_models(guided, norm_backend="torch", attention_backend="math"):
    """fastdiff's UNet and classifier from their factories, holding GD's weights."""
    spec = guided["guided"]
    model, _ = fastdiff.create_model_and_diffusion(
        **spec["model_kwargs"], norm_backend=norm_backend, attention_backend=attention_backend)
    classifier = create_classifier(**spec["classifier_flags"], norm_backend=norm_backend,
                                   attention_backend=attention_backend)
    for prefix, module in (("model", model), ("classifier", classifier)):
        shapes = guided["state_shapes"][prefix]
        ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert ours == {k: tuple(s) for k, s in shapes.items()} and list(ours) == list(shapes)
        module.load_state_dict(golden.guided_state(prefix + ".", shapes), strict=True)
    return model.eval(), classifier.eval()


def guided_diffusion(guided, step):
    kw = guided["guided"]["model_kwargs"]
    return create_gaussian_diffusion(
        steps=kw["diffusion_steps"], learn_sigma=kw["learn_sigma"],
        noise_schedule=kw["noise_schedule"], use_kl=kw["use_kl"],
        predict_xstart=kw["predict_xstart"], rescale_timesteps=kw["rescale_timesteps"],
        rescale_learned_sigmas=kw["rescale_learned_sigmas"], timestep_respacing=step["respacing"])


def test_guided_fixture_is_the_generators(guided):
    assert len(guided["gd_commit"]) == 40
    assert guided["guided"] == golden.GUIDED
    inputs = golden.guided_inputs()
    assert all(torch.equal(inputs[k], guided["inputs"][k]) for k in inputs)


@pytest.mark.parametrize("norm_backend,attention_backend", BACKENDS)
def test_guided_steps_match_gd(guided, norm_backend, attention_backend):
    model, classifier = guided_models(guided, norm_backend, attention_backend)
    for name, step in guided["guided"]["steps"].items():
        expected = guided["steps"][name]
        diffusion = guided_diffusion(guided, step)
        assert list(diffusion.timestep_map) == expected["timestep_map"].tolist(), name
        # fastdiff.classifier_sample's own cond_fn, the one `python -m` runs.
        got = golden.run_guided_step(diffusion, model, classifier, name, step, guided["inputs"],
                                     cond_fn_factory=classifier_cond_fn)
        # The classifier sees GD's mapped timesteps (same values and dtype).
        assert got["cond_t"].dtype == expected["cond_t"].dtype, name
        assert torch.equal(got["cond_t"], expected["cond_t"]), (name, got["cond_t"])
        for key in ("cond_grad", "pred_xstart", "sample"):
            torch.testing.assert_close(got[key], expected[key], rtol=STEP_RTOL, atol=STEP_ATOL,
                                       msg=lambda m, key=key: f"{name} {key}: {m}")


def test_guided_fixture_separates_guidance_and_timestep_map(guided):
    """Guard: without the guidance, or with the classifier at the unmapped (spaced) index,
    the step (or its guidance gradient) moves by far more than STEP_ATOL, so the test above
    would see either bug even without its exact timestep check."""
    model, classifier = guided_models(guided)
    inputs = guided["inputs"]
    for name, step in guided["guided"]["steps"].items():
        expected = guided["steps"][name]
        diffusion = guided_diffusion(guided, step)
        t = torch.full((len(inputs["y"]),), step["index"], dtype=torch.int64)
        torch.manual_seed(step["seed"])
        with torch.no_grad():
            unguided = getattr(diffusion, name)(
                lambda x, t, y=None: model(x, t, y), inputs["x_t"], t,
                model_kwargs={"y": inputs["y"]}, **({"eta": step["eta"]} if "eta" in step else {}))
        shift = (unguided["sample"] - expected["sample"]).abs().max()
        assert shift > VISIBLE, (name, float(shift))
        unmapped = golden.guidance_grad(classifier, inputs["x_t"], t, inputs["y"])
        unmapped = unmapped * guided["guided"]["classifier_scale"]
        assert (unmapped - expected["cond_grad"][0]).abs().max() > 10 * STEP_ATOL, name
