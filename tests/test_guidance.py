"""Classifier-free guidance at sampling time (fastdiff/guidance.py) and the loading of
checkpoints with the null-class row (fastdiff/sampling.py::load_model)."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from fastdiff import config as C
from fastdiff.guidance import (ClassifierFreeGuidance, GuidanceError, find_null_class,
                               guided_output, parse_guidance_scales)
from fastdiff.models.unet import NUM_CLASSES, UNetModel
from fastdiff.sampling import (checkpoint_class_dropout_prob, generate, load_model,
                               respaced_diffusion)
from fastdiff.train.checkpoint import CheckpointError

# The smallest UNet the factory builds (GroupNorm needs 32 channels); T = 50 keeps the linear
# schedule's last beta below 1 (T = 20 would make alpha_cumprod 0).
TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,1",
            attention_resolutions="4", num_heads=2, class_cond=True, diffusion_steps=50)
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_kwargs(**extra):
    kw = C.model_and_diffusion_defaults()
    kw.update(TINY, **extra)
    return kw


def tiny_model(class_dropout_prob=0.1, seed=0, **extra):
    """A tiny UNet with every weight perturbed: GD zero-initialises the output conv, and a
    model that outputs zeros would be guided to the same zeros whatever the labels."""
    kw = tiny_kwargs(**extra)
    model, diffusion = C.create_model_and_diffusion(**kw, class_dropout_prob=class_dropout_prob)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator), alpha=0.05)
    return model.eval(), diffusion, kw


def diffusion_config(kw):
    names = {f.name for f in dataclasses.fields(C.DiffusionConfig)}
    return C.DiffusionConfig(**{k: v for k, v in kw.items() if k in names})


class RecordingStub(nn.Module):
    """A class-conditional "model" with a null row whose output is a known function of
    (x, t, y), recording every call's inputs."""

    def __init__(self, out_channels=3, null_class=10):
        super().__init__()
        self.num_classes = 10
        self.null_class = null_class
        self.out_channels = out_channels
        self.calls = []

    def forward(self, x, t, y=None, **kwargs):
        self.calls.append(dict(x=x, t=t, y=y, kwargs=kwargs))
        return stub_output(x, t, y, self.out_channels)


def stub_output(x, t, y, out_channels):
    """Depends on every input, differently per channel, so a swapped half would show."""
    scale = (y.to(x.dtype) + 1).view(-1, 1, 1, 1)
    channel = torch.arange(1, out_channels + 1, dtype=x.dtype).view(1, -1, 1, 1)
    return x.repeat(1, out_channels // x.shape[1], 1, 1) * scale * channel + t.view(-1, 1, 1, 1)


# -- the combination --------------------------------------------------------------------

def test_guided_output_is_the_cfg_formula_against_a_hand_computed_reference():
    stub = RecordingStub()
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([5, 7, 9])
    y = torch.tensor([0, 4, 9])
    scale = 2.5
    out = ClassifierFreeGuidance(stub, scale)(x, t, y=y)
    # By hand in float64: eps_c = x * (y + 1) * c + t, eps_u = x * (10 + 1) * c + t.
    xd, td = x.double(), t.double().view(-1, 1, 1, 1)
    channel = torch.arange(1, 4, dtype=torch.float64).view(1, -1, 1, 1)
    eps_c = xd * (y.double() + 1).view(-1, 1, 1, 1) * channel + td
    eps_u = xd * 11 * channel + td
    reference = eps_u + scale * (eps_c - eps_u)
    # fp32 rounding of values of size ~100 (11 * 3 * |x| + t): 1e-5 relative is ~100 ulp.
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)


def test_one_batched_forward_whose_second_half_gets_the_null_label():
    stub = RecordingStub(null_class=10)
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([3, 8])
    y = torch.tensor([1, 7])
    low_res = torch.randn(2, 3, 2, 2)
    ClassifierFreeGuidance(stub, 4.0)(x, t, y=y, low_res=low_res, shared=torch.tensor(0.5))
    [call] = stub.calls
    assert call["y"].tolist() == [1, 7, 10, 10]  # conditional half, then the null label
    assert torch.equal(call["x"], torch.cat([x, x])) and torch.equal(call["t"], torch.cat([t, t]))
    # Per-example inputs repeated for the two halves; a shared one passed as it is.
    assert torch.equal(call["kwargs"]["low_res"], torch.cat([low_res, low_res]))
    assert call["kwargs"]["shared"].shape == ()


def test_learned_variance_comes_from_the_conditional_half():
    stub = RecordingStub(out_channels=6)  # learn_sigma: mean (3) + variance (3) channels
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([1, 2])
    y = torch.tensor([3, 5])
    out = ClassifierFreeGuidance(stub, 3.0)(x, t, y=y)
    cond = stub_output(x, t, y, 6)
    uncond = stub_output(x, t, torch.full_like(y, 10), 6)
    assert out.shape == (2, 6, 4, 4)
    assert torch.equal(out[:, 3:], cond[:, 3:])
    # Same expression, same order of operations as the wrapper: equal to the last bit.
    assert torch.equal(out[:, :3], uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(guided_output(cond, uncond, 3.0, 3), out)


# -- s = 1 is plain conditional sampling ------------------------------------------------

@pytest.mark.parametrize("use_ddim", [False, True], ids=["ddpm", "ddim"])
def test_scale_one_is_bitwise_plain_conditional_sampling(use_ddim):
    model, _, kw = tiny_model()
    sampler = respaced_diffusion(diffusion_config(kw), 5, use_ddim)
    loop = sampler.ddim_sample_loop if use_ddim else sampler.p_sample_loop
    y = torch.tensor([0, 3, 7])
    results = []
    for wrapped in (model, ClassifierFreeGuidance(model, 1.0)):
        torch.manual_seed(0)  # the same x_T and the same per-step noise
        with torch.no_grad():
            results.append(loop(wrapped, (3, 3, 8, 8), model_kwargs={"y": y}))
    assert torch.equal(results[0], results[1])
    # generate(): the default and an explicit 1 are the same images and labels.
    runs = []
    for extra in ({}, {"guidance_scale": 1.0}):
        torch.manual_seed(0)
        runs.append(generate(model, sampler, 3, 3, 8, CPU, class_cond=True, num_classes=10,
                             use_ddim=use_ddim, clip_denoised=True, **extra))
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])


def test_guided_sampling_through_the_respaced_wrapper(monkeypatch):
    """s = 3 on a real UNet, DDIM on 5 of 50 steps: the UNet sees the mapped (base)
    timesteps in both halves, its guided output is the formula over separate conditional and
    unconditional forwards, and the images differ from s = 1."""
    model, _, kw = tiny_model()
    sampler = respaced_diffusion(diffusion_config(kw), 5, True)
    calls = []
    forward = UNetModel.forward

    def recording_forward(self, x, timesteps, y=None):
        out = forward(self, x, timesteps, y)
        calls.append((x.clone(), timesteps.clone(), y.clone(), out.clone()))
        return out

    monkeypatch.setattr(UNetModel, "forward", recording_forward)
    torch.manual_seed(0)
    guided, labels = generate(model, sampler, 2, 2, 8, CPU, class_cond=True, num_classes=10,
                              use_ddim=True, clip_denoised=True, guidance_scale=3.0)
    guided_calls = list(calls)
    assert len(guided_calls) == 5
    for x, t, y, _ in guided_calls:
        assert y.tolist() == labels.tolist() + [NUM_CLASSES] * 2
        assert t[:2].tolist() == t[2:].tolist() and set(t.tolist()) <= set(sampler.timestep_map)
    assert sorted({int(t[0]) for _, t, _, _ in guided_calls}) == sorted(sampler.timestep_map)
    x, t, y, out = guided_calls[0]
    with torch.no_grad():
        eps_c = forward(model, x[:2], t[:2], y[:2])
        eps_u = forward(model, x[2:], t[2:], y[2:])
        batched = ClassifierFreeGuidance(model, 3.0)(x[:2], t[:2], y=y[:2])
    # One batched forward vs two separate ones: the same math, different kernel blocking;
    # 1e-5 is ~100 fp32 ulp of outputs of size ~1.
    torch.testing.assert_close(batched, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    plain, _ = generate(model, sampler, 2, 2, 8, CPU, class_cond=True, num_classes=10,
                        use_ddim=True, clip_denoised=True)
    assert np.abs(plain.astype(int) - guided).mean() > 2  # far beyond uint8 rounding


# -- refusals ---------------------------------------------------------------------------

def test_refuses_a_model_without_the_null_row_or_without_classes():
    without_row, _, _ = tiny_model(class_dropout_prob=0.0)
    with pytest.raises(GuidanceError, match="class_dropout_prob > 0"):
        ClassifierFreeGuidance(without_row, 2.0)
    unconditional, _, _ = tiny_model(class_dropout_prob=0.1, class_cond=False)
    with pytest.raises(GuidanceError, match="class-conditional"):
        ClassifierFreeGuidance(unconditional, 2.0)
    sampler = respaced_diffusion(diffusion_config(tiny_kwargs()), 2, True)
    with pytest.raises(GuidanceError, match="class_dropout_prob > 0"):
        generate(without_row, sampler, 1, 1, 8, CPU, class_cond=True, num_classes=10,
                 use_ddim=True, clip_denoised=True, guidance_scale=2.0)
    with pytest.raises(GuidanceError, match="finite"):
        ClassifierFreeGuidance(tiny_model()[0], float("nan"))


def test_the_null_label_is_found_through_a_compiled_wrapper():
    model, _, _ = tiny_model()
    compiled = torch.compile(model)  # wraps only: nothing compiles until it is called
    assert find_null_class(compiled) == NUM_CLASSES
    assert ClassifierFreeGuidance(compiled, 2.0).null_class == NUM_CLASSES


def test_parse_guidance_scales():
    assert parse_guidance_scales("1,2,4") == [1.0, 2.0, 4.0]
    assert parse_guidance_scales(1.5) == [1.5]
    for bad in ("", "1,x", "1,nan", "2,2"):
        with pytest.raises(ValueError, match="--guidance_scale"):
            parse_guidance_scales(bad)


# -- loading a checkpoint with the null row ---------------------------------------------

def save_checkpoint(folder, class_dropout_prob, config=None):
    model, _, kw = tiny_model(class_dropout_prob=class_dropout_prob)
    folder.mkdir(exist_ok=True)
    path = folder / "ema_0.9999_000010.pt"
    torch.save(model.state_dict(), path)
    if config is not None:
        (folder / "config.json").write_text(json.dumps({**kw, **config}))
    return path, model, kw


def load(path, kw):
    model_names = {f.name for f in dataclasses.fields(C.ModelConfig)}
    model_cfg = C.ModelConfig(**{k: v for k, v in kw.items() if k in model_names})
    return load_model(str(path), model_cfg, diffusion_config(kw), "torch", "math", CPU)[0]


def test_load_model_builds_the_null_row_from_config_json(tmp_path):
    path, saved, kw = save_checkpoint(tmp_path, 0.1, config={"class_dropout_prob": 0.25})
    loaded = load(path, kw)
    assert loaded.null_class == NUM_CLASSES
    assert torch.equal(loaded.label_emb.weight, saved.label_emb.weight)
    # The run's own p, read from config.json (not the stand-in the shape alone would give).
    assert checkpoint_class_dropout_prob(str(path), {}) == 0.25


def test_load_model_builds_the_null_row_from_the_state_dict_shape_alone(tmp_path):
    path, saved, kw = save_checkpoint(tmp_path / "with_row", 0.1)  # no config.json
    assert load(path, kw).null_class == NUM_CLASSES
    # An old run's config.json (before the flag) falls back on the shape too.
    path, _, kw = save_checkpoint(tmp_path / "old_run", 0.1, config={})
    assert load(path, kw).null_class == NUM_CLASSES
    path, _, kw = save_checkpoint(tmp_path / "plain", 0.0)  # GD's 1000 rows: no row
    assert load(path, kw).null_class is None


def test_a_checkpoint_that_fits_neither_is_the_one_line_checkpoint_error(tmp_path):
    path, _, kw = save_checkpoint(tmp_path, 0.1, config={"class_dropout_prob": 0.0})
    with pytest.raises(CheckpointError, match="label_emb.weight") as error:
        load(path, kw)
    assert "\n" not in str(error.value)
