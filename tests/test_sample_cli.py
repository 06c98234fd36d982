"""python -m fastdiff.sample: GD's flags, GD's npz format, the PNG grid."""
import json

import numpy as np
import torch

from fastdiff import config as C
from fastdiff import sample

MODEL = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
             attention_resolutions="8", num_heads=2, class_cond=True, diffusion_steps=50)


def make_checkpoint(tmp_path, **extra):
    kw = C.model_and_diffusion_defaults()
    kw.update(MODEL, **extra)
    model, _ = C.create_model_and_diffusion(**kw)
    path = tmp_path / "model000010.pt"
    torch.save(model.state_dict(), path)
    return path, kw


def test_samples_npz_is_gd_format_with_labels_and_grid(tmp_path):
    path, kw = make_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**kw, "data_dir": ""}))
    rc = sample.main(["--model_path", str(path), "--num_samples", "5", "--batch_size", "2",
                      "--use_ddim", "--timestep_respacing", "ddim4", "--log_dir", str(tmp_path)])
    assert rc == 0
    data = np.load(tmp_path / "samples_5x16x16x3.npz")
    images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (5, 16, 16, 3)
    assert labels.shape == (5,) and labels.max() < 10  # digits run: 10 classes from config.json
    assert (tmp_path / "samples_grid.png").is_file()


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
