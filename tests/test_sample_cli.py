"""python -m fastdiff.sample: GD's flags, GD's npz format, the PNG grid, and that the labels
stored beside the images are the ones the images were sampled for."""
import json

import numpy as np
import torch

from fastdiff import config as C
from fastdiff import sample
from fastdiff.guidance import ClassifierFreeGuidance
from fastdiff.models.unet import UNetModel
from fastdiff.sampling import to_uint8_nhwc

MODEL = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
             attention_resolutions="8", num_heads=2, class_cond=True, diffusion_steps=50)


def make_checkpoint(tmp_path, **extra):
    """A checkpoint whose every weight is perturbed: GD zero-initialises the output conv, and
    a model that outputs zeros samples the same images whatever the labels."""
    kw = C.model_and_diffusion_defaults()
    kw.update(MODEL, **extra)
    model, _ = C.create_model_and_diffusion(**kw)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator), alpha=0.05)
    path = tmp_path / "model000010.pt"
    torch.save(model.state_dict(), path)
    return path, kw


def record_unet_calls(monkeypatch):
    """Every UNet forward from here on, as (model, x, timesteps, y), in call order."""
    calls = []
    forward = UNetModel.forward

    def recording_forward(self, x, timesteps, y=None):
        calls.append((self, x.clone(), timesteps.clone(), None if y is None else y.clone()))
        return forward(self, x, timesteps, y)

    monkeypatch.setattr(UNetModel, "forward", recording_forward)
    return calls


def ddim_images(model, diffusion, x_T, labels):
    """DDIM (eta 0) from x_T: deterministic, so it replays a batch of the CLI exactly."""
    with torch.no_grad():
        x = diffusion.ddim_sample_loop(model, tuple(x_T.shape), noise=x_T, clip_denoised=True,
                                       model_kwargs={"y": torch.as_tensor(labels)})
    return to_uint8_nhwc(x).numpy()


def test_samples_npz_is_gd_format_with_labels_and_grid(tmp_path, monkeypatch):
    path, kw = make_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**kw, "data_dir": ""}))
    calls = record_unet_calls(monkeypatch)
    rc = sample.main(["--model_path", str(path), "--num_samples", "5", "--batch_size", "2",
                      "--use_ddim", "--timestep_respacing", "ddim4", "--log_dir", str(tmp_path)])
    assert rc == 0
    data = np.load(tmp_path / "samples_5x16x16x3.npz")
    images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (5, 16, 16, 3)
    assert labels.shape == (5,) and labels.max() < 10  # digits run: 10 classes from config.json
    assert (tmp_path / "samples_grid.png").is_file()

    # Batches of 2, 2, 1, four DDIM steps each; a batch's first call sees its x_T and labels.
    _, diffusion = C.create_model_and_diffusion(**{**kw, "timestep_respacing": "ddim4"})
    assert len(calls) == 3 * 4
    done = 0
    for model, x_T, _, y in calls[::4]:
        batch = slice(done, done + len(x_T))
        assert y.tolist() == labels[batch].tolist()  # stored labels = the labels sampled with
        assert np.array_equal(ddim_images(model, diffusion, x_T, labels[batch]), images[batch])
        other = ddim_images(model, diffusion, x_T, (labels[batch] + 1) % 10)
        # Other labels, other images (by much more than uint8 rounding).
        assert np.abs(other.astype(int) - images[batch]).mean() > 2
        done += len(x_T)
    assert done == 5


def test_flags_override_config_and_ancestral_sampling(tmp_path):
    path, kw = make_checkpoint(tmp_path, class_cond=False)
    rc = sample.main(["--model_path", str(path), "--num_samples", "2", "--batch_size", "2",
                      "--timestep_respacing", "3", "--log_dir", str(tmp_path / "out")]
                     + [f"--{k}={v}" for k, v in MODEL.items() if k != "class_cond"]
                     + ["--class_cond", "False"])
    assert rc == 0
    data = np.load(tmp_path / "out" / "samples_2x16x16x3.npz")
    assert list(data.keys()) == ["arr_0"]


def test_wrong_model_flags_name_the_key(tmp_path, capsys):
    path, _ = make_checkpoint(tmp_path)
    rc = sample.main(["--model_path", str(path), "--num_channels", "64", "--image_size", "16",
                      "--num_res_blocks", "1", "--channel_mult", "1,2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and err.count("\n") == 1


def test_guidance_scale_samples_guided_images_in_gd_format(tmp_path, monkeypatch):
    """A run with label dropout (the null-class row, known from its config.json) sampled
    with --guidance_scale 3: one doubled forward per step whose second half is the null
    label, and the stored images are the guided DDIM images of the stored labels."""
    path, kw = make_checkpoint(tmp_path, class_dropout_prob=0.1)
    (tmp_path / "config.json").write_text(json.dumps({**kw, "data_dir": ""}))
    calls = record_unet_calls(monkeypatch)
    args = ["--model_path", str(path), "--num_samples", "3", "--batch_size", "2", "--use_ddim",
            "--timestep_respacing", "ddim4"]
    rc = sample.main(args + ["--guidance_scale", "3", "--log_dir", str(tmp_path / "guided")])
    assert rc == 0
    data = np.load(tmp_path / "guided" / "samples_3x16x16x3.npz")
    images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (3, 16, 16, 3) and labels.shape == (3,) and labels.max() < 10
    assert (tmp_path / "guided" / "samples_grid.png").is_file()

    assert len(calls) == 2 * 4  # batches of 2 and 1, four steps, one forward per step
    _, diffusion = C.create_model_and_diffusion(**{**kw, "timestep_respacing": "ddim4"})
    done = 0
    for model, x_T, _, y in calls[::4]:
        n = len(x_T) // 2
        assert y.tolist() == labels[done:done + n].tolist() + [model.null_class] * n
        guided = ClassifierFreeGuidance(model, 3.0)
        assert np.array_equal(ddim_images(guided, diffusion, x_T[:n], labels[done:done + n]),
                              images[done:done + n])
        done += n
    assert done == 3

    rc = sample.main(args + ["--log_dir", str(tmp_path / "plain")])  # s = 1, the same seed
    plain = np.load(tmp_path / "plain" / "samples_3x16x16x3.npz")
    assert np.array_equal(plain["arr_1"], labels)
    assert np.abs(plain["arr_0"].astype(int) - images).mean() > 2  # guidance changed them


def test_guidance_scale_without_the_null_row_exits_2_with_one_line(tmp_path, capsys):
    path, kw = make_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**kw, "data_dir": ""}))
    rc = sample.main(["--model_path", str(path), "--num_samples", "2", "--guidance_scale", "2",
                      "--log_dir", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--class_dropout_prob > 0" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
