"""fastdiff's UNet against guided-diffusion's own outputs and gradients (issue 17).

The fixtures (tests/fixtures/gd_unet_*.pt) were written by tools/gd_golden_unet.py from GD's
``create_model_and_diffusion`` on the CPU in fp32; CI has no GD. For each config, fastdiff's
``create_model_and_diffusion`` with the same keywords must have GD's state_dict keys and
shapes, load the state GD was given, and reproduce GD's model output (or every diffusion
loss term) and the gradient of a scalar loss w.r.t. every parameter and the input — for the
default backends and for each kernel backend that runs on the CPU.

The state_dict is rebuilt from key names and shapes by the generator's integer hash (the
fixture keeps fingerprints, see its docstring), so the test imports the generator module;
it needs nothing of GD.
"""
import os
import sys

import pytest
import torch

import fastdiff

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import gd_golden_unet as golden  # noqa: E402

# Relative error = max|a − b| / max|b|, the measure and bounds. The default backends
# reproduce GD bitwise (measured: 0; ≤ 1.2e-7 on the whole-tensor gradient summaries, which
# the fixture stores in fp32). The kernel backends reorder fp32 sums (fused GroupNorm
# statistics, SDPA's softmax): measured ≤ 7.3e-7 on outputs and losses, ≤ 2.5e-6 on grad x,
# and ≤ 2.4e-5 on parameter gradients (the worst: the bias gradients of the 16×16 attention
# block, sums over 512 positions that largely cancel). A wrong factor of 1.001 in one
# backward formula already fails (checked when these tests were written).
OUTPUT_RTOL = 1e-5
GRAD_RTOL = 1e-4

# A parameter that only shifts channels before a GroupNorm with one channel per group (32
# channels, 32 groups) has a gradient that is zero in exact arithmetic (the norm removes any
# per-channel shift): the bias of a conv feeding such a norm and, without
# use_scale_shift_norm, the timestep projection (emb_layers) added there. GD's fp32 gives
# rounding noise there, ≤ 1.5e-7 of the model's largest gradient in these fixtures, while
# every other gradient is ≥ 1e-3 of it. Such a gradient is checked to be noise-sized in
# fastdiff too (an absolute bound) instead of relatively.
SYMMETRY_ZERO = 1e-5

# (norm_backend, attention_backend): GD's modules, then every variant with a CPU path
# (the fused op's torch fallback, SDPA, the Triton attention op's CPU fallback).
# xformers has no CPU path.
BACKENDS = [("torch", "math"), ("fused", "math"), ("torch", "sdpa"), ("torch", "triton"),
            ("fused", "triton")]


def rel_err(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max()
    diff = (actual - expected).abs().max()
    return float(diff / scale) if scale > 0 else float(diff)


@pytest.fixture(scope="module", params=sorted(golden.CONFIGS))
def fixture(request):
    path = golden.fixture_path(request.param)
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def state(fixture):
    """The synthetic state_dict GD was given, rebuilt here."""
    return golden.synthetic_state_dict(fixture["state_shapes"])


def build(fixture, norm_backend, attention_backend):
    model, diffusion = fastdiff.create_model_and_diffusion(
        norm_backend=norm_backend, attention_backend=attention_backend, **fixture["kwargs"])
    return model.eval(), diffusion


def run(fixture, model, diffusion):
    """The fixture's computation on fastdiff: (outputs to compare, scalar, grad of x)."""
    inputs = fixture["inputs"]
    x = inputs["x"].clone().requires_grad_(True)
    model_kwargs = {"y": inputs["y"]} if "y" in inputs else {}
    if fixture["kind"] == "model":
        output = model(x, inputs["t"], **model_kwargs)
        outputs = {"output": output}
        scalar = (output * inputs["out_weights"]).sum()
    else:
        losses = diffusion.training_losses(model, x, inputs["t"], model_kwargs=model_kwargs,
                                           noise=inputs["noise"])
        outputs = {f"losses[{k}]": v for k, v in losses.items()}
        scalar = losses["loss"].mean()
    scalar.backward()
    return outputs, scalar, x.grad


def expected_outputs(fixture):
    if fixture["kind"] == "model":
        return {"output": fixture["output"]}
    return {f"losses[{k}]": v for k, v in fixture["losses"].items()}


def stored_max_abs(stored):
    return float(stored["full"].abs().max() if "full" in stored else stored["max_abs"])


def largest_grad(fixture):
    return max(stored_max_abs(g) for g in fixture["grads"].values())


def zero_by_symmetry(fixture):
    """Names of the parameters whose GD gradient is rounding noise (see SYMMETRY_ZERO)."""
    floor = SYMMETRY_ZERO * largest_grad(fixture)
    return {n for n, g in fixture["grads"].items() if stored_max_abs(g) < floor}


def grad_errors(grad, stored):
    """Relative errors of one gradient against what the fixture kept of GD's."""
    g = grad.detach().double().reshape(-1)
    if "full" in stored:
        return {"full": rel_err(g, stored["full"])}
    scale = float(stored["max_abs"])
    samples = g[golden.sample_index(g.numel())]
    norm = float(stored["norm"])
    return {
        "samples": float((samples - stored["samples"].double()).abs().max()) / scale,
        "max_abs": abs(float(g.abs().max()) - scale) / scale,
        "norm": abs(float(g.norm()) - norm) / norm,
        # r·(a − b) for a fixed ±1 vector r is ~‖a − b‖₂ for errors unrelated to r (rounding),
        # and of the order of n·|error| for a systematic one: relative to ‖b‖₂.
        "proj": abs(float(g @ golden.sign_vector(g.numel()).double()) - float(stored["proj"]))
        / norm,
    }


def test_fixture_records_gd(fixture):
    assert len(fixture["gd_commit"]) == 40, "the generator records GD's commit"
    assert fixture["kwargs"]["use_fp16"] is False


def test_state_dict_keys_and_shapes_are_gds(fixture):
    gd_shapes = {k: tuple(s) for k, s in fixture["state_shapes"].items()}
    for norm_backend, attention_backend in BACKENDS:
        model, _ = build(fixture, norm_backend, attention_backend)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert list(ours) == list(gd_shapes), (norm_backend, attention_backend)
        assert ours == gd_shapes, (norm_backend, attention_backend)


def test_only_shifts_before_one_channel_groups_have_zero_gradients(fixture):
    # Guards SYMMETRY_ZERO: it must set aside only the parameters it is meant for.
    names = zero_by_symmetry(fixture)
    shifts = [n for n in names if n.endswith(".bias") or ".emb_layers." in n]
    assert names and sorted(shifts) == sorted(names), sorted(names)
    if fixture["kwargs"]["use_scale_shift_norm"]:  # FiLM multiplies: the emb path matters
        assert not any(".emb_layers." in n for n in names), sorted(names)


def test_rebuilt_state_is_what_gd_was_given(fixture, state):
    # Hash values are exact; the float64 sums only reorder across machines (≤ 1e-12).
    for key, value in state.items():
        torch.testing.assert_close(golden.fingerprint(value), fixture["state_fingerprints"][key],
                                   rtol=1e-12, atol=0, msg=key)


@pytest.mark.parametrize("norm_backend,attention_backend", BACKENDS)
def test_outputs_and_gradients_match_gd(fixture, state, norm_backend, attention_backend):
    model, diffusion = build(fixture, norm_backend, attention_backend)
    model.load_state_dict(state, strict=True)
    if fixture["kind"] == "losses":
        assert list(diffusion.timestep_map) == fixture["timestep_map"].tolist()

    outputs, scalar, grad_x = run(fixture, model, diffusion)

    expected = expected_outputs(fixture)
    assert sorted(outputs) == sorted(expected)
    errors = {k: rel_err(outputs[k], expected[k]) for k in expected}
    errors["scalar"] = rel_err(scalar, fixture["scalar"])
    bad = {k: e for k, e in errors.items() if not e <= OUTPUT_RTOL}
    assert not bad, f"outputs differ from GD's beyond {OUTPUT_RTOL}: {bad}"

    params = dict(model.named_parameters())
    assert sorted(params) == sorted(fixture["grads"])
    noise_only = zero_by_symmetry(fixture)
    noise_floor = SYMMETRY_ZERO * largest_grad(fixture)
    failures = {}
    err = rel_err(grad_x, fixture["grad_x"])
    if not err <= GRAD_RTOL:
        failures[("x", "full")] = err
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
    worst = dict(sorted(failures.items(), key=lambda kv: -kv[1])[:8])
    assert not failures, f"{len(failures)} gradient checks differ from GD's: {worst}"
