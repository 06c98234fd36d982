"""python -m fastdiff.classifier_sample: GD's guidance gradient, unguided sampling at scale 0
equal to fastdiff.sample's, the classifier fed the diffusion's original timesteps, the labels
stored beside the images, and one-line errors for a classifier that does not fit."""
import json

import numpy as np
import pytest
import torch

from fastdiff import classifier_sample, sample
from fastdiff import config as C
from fastdiff.diffusion.respace import space_timesteps
from fastdiff.models.classifier import EncoderUNetModel
from fastdiff.models.unet import UNetModel

MODEL = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
             attention_resolutions="8", num_heads=2, class_cond=True, diffusion_steps=50)
# 64 channels at the lowest resolution: GD's attention pool has 64 channels per head.
CLASSIFIER = dict(image_size=16, classifier_width=32, classifier_depth=1,
                  classifier_attention_resolutions="8", classifier_channel_mult="1,2")


def perturb(module, seed):
    """Every weight moved off GD's init: zero-initialised output layers would make the model
    ignore its labels and the classifier's gradient vanish."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator), alpha=0.05)
    return module


def write_run(folder, module, config):
    """A checkpoint and the config.json beside it, as training leaves them."""
    folder.mkdir(exist_ok=True)
    torch.save(module.state_dict(), folder / "model000010.pt")
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "model000010.pt"


def make_model(tmp_path, **extra):
    kw = {**C.model_and_diffusion_defaults(), **MODEL, **extra}
    model, _ = C.create_model_and_diffusion(**kw)
    return write_run(tmp_path / "model", perturb(model, 0), {**kw, "data_dir": ""})


def tiny_classifier(**extra):
    kw = {**C.classifier_and_diffusion_defaults(), **CLASSIFIER, "diffusion_steps": 50, **extra}
    classifier, _ = C.create_classifier_and_diffusion(**kw)
    return perturb(classifier, 1), kw


def make_classifier(tmp_path, **extra):
    classifier, kw = tiny_classifier(**extra)
    return write_run(tmp_path / "classifier", classifier, kw)


def run(model_path, classifier_path, out_dir, *flags):
    return classifier_sample.main(["--model_path", str(model_path), "--classifier_path",
                                   str(classifier_path), "--log_dir", str(out_dir), *flags])


def test_cond_fn_is_the_scaled_gradient_of_the_label_log_probability():
    classifier, _ = tiny_classifier()
    classifier.eval()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, 16, 16, generator=generator)
    t = torch.tensor([3, 20, 49])
    y = torch.tensor([7, 0, 7])
    with torch.no_grad():  # as inside the sampling loop
        got = classifier_sample.classifier_cond_fn(classifier, 2.5)(x, t, y=y)
    assert not got.requires_grad and not x.requires_grad

    # Reference by hand: d log softmax(z)_y / dz = onehot(y) - softmax(z), pulled back
    # through the classifier's Jacobian (a vector-Jacobian product).
    x_ref = x.clone().requires_grad_(True)
    logits = classifier(x_ref, t)
    dlogp_dlogits = (torch.nn.functional.one_hot(y, logits.shape[1]) - logits.softmax(-1)).detach()
    (reference,) = torch.autograd.grad(logits, x_ref, grad_outputs=dlogp_dlogits)
    # fp32: two backward passes of the same function, summed in another order.
    torch.testing.assert_close(got, 2.5 * reference, rtol=1e-4, atol=1e-6)
    assert reference.abs().mean() > 1e-4  # not a vacuous comparison of zeros


def test_scale_zero_samples_are_fastdiff_sample_s_bitwise(tmp_path):
    model_path = make_model(tmp_path)
    classifier_path = make_classifier(tmp_path)
    common = ["--num_samples", "3", "--batch_size", "2", "--timestep_respacing", "5",
              "--seed", "7"]
    assert sample.main(["--model_path", str(model_path), "--log_dir", str(tmp_path / "plain"),
                        *common]) == 0
    assert run(model_path, classifier_path, tmp_path / "zero", "--classifier_scale", "0",
               *common) == 0
    assert run(model_path, classifier_path, tmp_path / "ten", "--classifier_scale", "10",
               *common) == 0
    plain, zero, ten = (np.load(tmp_path / d / "samples_3x16x16x3.npz")
                        for d in ("plain", "zero", "ten"))
    assert np.array_equal(zero["arr_0"], plain["arr_0"])
    assert np.array_equal(zero["arr_1"], plain["arr_1"])
    assert np.array_equal(ten["arr_1"], plain["arr_1"])  # same labels, guided images:
    assert np.abs(ten["arr_0"].astype(int) - plain["arr_0"]).mean() > 1
    assert (tmp_path / "zero" / "samples_grid.png").is_file()


def record_calls(monkeypatch):
    """The timesteps the classifier and the model are called with, the labels the model
    and the guidance get, in call order."""
    calls = {"classifier_t": [], "model_t": [], "model_y": [], "guidance_y": []}
    classifier_forward, model_forward = EncoderUNetModel.forward, UNetModel.forward
    make_cond_fn = classifier_sample.classifier_cond_fn

    def recording_classifier(self, x, timesteps):
        calls["classifier_t"].append(timesteps.tolist())
        return classifier_forward(self, x, timesteps)

    def recording_model(self, x, timesteps, y=None):
        calls["model_t"].append(timesteps.tolist())
        calls["model_y"].append(None if y is None else y.tolist())
        return model_forward(self, x, timesteps, y)

    def recording_cond_fn(classifier, scale):
        cond_fn = make_cond_fn(classifier, scale)

        def wrapped(x, t, y=None):
            calls["guidance_y"].append(y.tolist())
            return cond_fn(x, t, y=y)
        return wrapped

    monkeypatch.setattr(EncoderUNetModel, "forward", recording_classifier)
    monkeypatch.setattr(UNetModel, "forward", recording_model)
    monkeypatch.setattr(classifier_sample, "classifier_cond_fn", recording_cond_fn)
    return calls


@pytest.mark.parametrize("class_cond,sampler", [
    (True, ["--timestep_respacing", "5"]),
    (False, ["--use_ddim", "--timestep_respacing", "ddim5"]),
], ids=["conditional-ancestral", "unconditional-ddim"])
def test_classifier_sees_original_timesteps_and_the_stored_labels(tmp_path, monkeypatch,
                                                                  class_cond, sampler):
    model_path = make_model(tmp_path, class_cond=class_cond)
    classifier_path = make_classifier(tmp_path)
    calls = record_calls(monkeypatch)
    assert run(model_path, classifier_path, tmp_path / "out", "--num_samples", "3",
               "--batch_size", "2", *sampler) == 0
    labels = np.load(tmp_path / "out" / "samples_3x16x16x3.npz")["arr_1"]
    assert labels.shape == (3,) and labels.max() < 10  # a digits run: 10 classes

    # Respaced to 5 of 50 steps, the classifier and the model both see the base indices.
    base_steps = sorted(space_timesteps(50, sampler[-1]), reverse=True)
    expected = [[t] * b for b in (2, 1) for t in base_steps]
    assert calls["classifier_t"] == expected
    assert calls["model_t"] == expected
    per_step_labels = [labels[:2].tolist()] * 5 + [labels[2:].tolist()] * 5
    assert calls["guidance_y"] == per_step_labels
    assert calls["model_y"] == (per_step_labels if class_cond else [None] * 10)


def test_classifier_that_does_not_fit_is_one_line_and_writes_nothing(tmp_path, capsys):
    model_path = make_model(tmp_path)
    classifier_path = make_classifier(tmp_path)
    out = tmp_path / "out"
    rc = run(model_path, classifier_path, out, "--classifier_width", "64", "--num_samples", "2",
             "--timestep_respacing", "2")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("fastdiff.classifier_sample: error:") and "does not fit the model" in err
    assert not out.exists()

    rc = run(model_path, tmp_path / "missing.pt", out)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "not found" in err
    assert not out.exists()


def test_classifier_trained_at_another_size_is_refused(tmp_path, capsys):
    model_path = make_model(tmp_path)
    classifier_path = make_classifier(tmp_path, image_size=32)
    rc = run(model_path, classifier_path, tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "image_size 32" in err


def test_two_ranks_under_torchrun_write_one_gathered_file(tmp_path):
    """torchrun: the ranks split the samples and rank 0 writes all of them once, the labels
    beside their images (3 requested: 2 per rank, the fourth dropped)."""
    import os
    import subprocess
    import sys
    model_path, classifier_path = make_model(tmp_path), make_classifier(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "fastdiff.classifier_sample", "--model_path", str(model_path),
         "--classifier_path", str(classifier_path), "--log_dir", str(tmp_path / "out"),
         "--num_samples", "3", "--batch_size", "2", "--timestep_respacing", "3",
         "--no_progress", "True"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["samples_3x16x16x3.npz", "samples_grid.png"]
    out = np.load(tmp_path / "out" / "samples_3x16x16x3.npz")
    assert out["arr_0"].shape == (3, 16, 16, 3) and out["arr_1"].shape == (3,)
    assert ((0 <= out["arr_1"]) & (out["arr_1"] < 10)).all()  # a digits run: 10 classes
    # rank 1's images come from another seed: the two ranks' first images differ
    assert not np.array_equal(out["arr_0"][0], out["arr_0"][2])
