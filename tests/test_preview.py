"""--sample_interval grids: written at the interval from the EMA weights, deterministic for
the same weights, and invisible to training (same losses and weights with or without)."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff import config as C
from fastdiff.models.unet import UNetModel
from fastdiff.sampling import respaced_diffusion, save_grid, to_uint8_nhwc
from fastdiff.train import cli
from fastdiff.train.preview import PreviewWriter

TINY_RUN = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1",
            "--channel_mult", "1,2", "--attention_resolutions", "4", "--num_heads", "2",
            "--batch_size", "2", "--log_interval", "1", "--save_interval", "100",
            "--sample_grid", "False", "--optimizer", "torch", "--diffusion_steps", "20",
            "--seed", "7", "--log_format", "line", "--tensorboard", "False", "--max_steps", "4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4-step run with grids every 2 steps and without."""
    root = tmp_path_factory.mktemp("preview")
    with_grids, without = root / "with", root / "without"
    assert cli.main(TINY_RUN + ["--log_dir", str(with_grids), "--sample_interval", "2",
                                "--sample_steps", "3"]) == 0
    assert cli.main(TINY_RUN + ["--log_dir", str(without)]) == 0
    return with_grids, without


def test_grids_written_at_the_interval(runs):
    with_grids, without = runs
    names = sorted(p.name for p in (with_grids / "samples").iterdir())
    assert names == ["step_000002.png", "step_000004.png"]
    # 20 images of 8x8 shown at 64x64 (zoomed), 10 per row, 1-pixel gaps.
    assert Image.open(with_grids / "samples" / "step_000002.png").size == (10 * 65 + 1, 2 * 65 + 1)
    assert not (without / "samples").exists()


def test_grids_do_not_change_training(runs):
    with_grids, without = runs
    losses = [[json.loads(line)["loss"] for line in open(d / "metrics.jsonl")] for d in runs]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    a = torch.load(with_grids / "model000004.pt", weights_only=True)
    b = torch.load(without / "model000004.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def tiny_cfgs():
    model_cfg, diff_cfg, _, _, _ = cli.parse_config(TINY_RUN)
    return model_cfg, diff_cfg


def random_weights(model_cfg, diff_cfg):
    kw = {**C.model_and_diffusion_defaults(), **vars(model_cfg), **vars(diff_cfg)}
    model, _ = C.create_model_and_diffusion(**kw)
    with torch.no_grad():  # GD zero-initialises output convs: give the samples some structure
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    return {k: v.clone() for k, v in model.state_dict().items()}


def writer(tmp_path, seed):
    model_cfg, diff_cfg = tiny_cfgs()
    return PreviewWriter(model_cfg, diff_cfg, interval=2, log_dir=str(tmp_path), device="cpu",
                         precision="fp32", seed=seed, steps=3)


def pixels(path):
    return np.asarray(Image.open(path))


def test_same_weights_give_the_same_grid_and_leave_the_rng_alone(tmp_path):
    weights = random_weights(*tiny_cfgs())
    w = writer(tmp_path, seed=1)
    rng_before = torch.get_rng_state()
    first = w.write(2, weights)
    second = w.write(4, weights)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert np.array_equal(pixels(first), pixels(second))
    other_seed = writer(tmp_path / "other", seed=2).write(2, weights)
    assert not np.array_equal(pixels(first), pixels(other_seed))
    weights["out.2.bias"] += 0.5  # other weights, other grid
    assert not np.array_equal(pixels(first), pixels(w.write(6, weights)))


def test_grid_column_c_is_sampled_for_class_c(tmp_path, monkeypatch):
    """The UNet is asked for classes 0..9 repeating (one class per grid column), and
    replaying DDIM from the grid's starting noise with those labels redraws the grid, while
    other labels draw another one: the labels reach the samples, each at its own place."""
    model_cfg, diff_cfg = tiny_cfgs()
    weights = random_weights(model_cfg, diff_cfg)
    calls = []
    forward = UNetModel.forward

    def recording_forward(self, x, timesteps, y=None):
        calls.append((self, x.clone(), y.clone()))
        return forward(self, x, timesteps, y)

    monkeypatch.setattr(UNetModel, "forward", recording_forward)
    grid = pixels(writer(tmp_path, seed=1).write(2, weights))
    classes = torch.arange(20) % 10
    assert len(calls) == 3 and all(torch.equal(y, classes) for _, _, y in calls)  # 3 DDIM steps
    model, x_T, _ = calls[0]
    diffusion = respaced_diffusion(diff_cfg, 3, use_ddim=True)

    def replayed_grid(labels):
        with torch.no_grad():
            x = diffusion.ddim_sample_loop(model, tuple(x_T.shape), noise=x_T,
                                           clip_denoised=True, model_kwargs={"y": labels})
        return pixels(save_grid(to_uint8_nhwc(x).numpy(), str(tmp_path / "replay.png"), nrow=10))

    assert np.array_equal(grid, replayed_grid(classes))
    assert np.abs(replayed_grid((classes + 1) % 10).astype(int) - grid).mean() > 2


def test_only_the_main_rank_writes(tmp_path):
    model_cfg, diff_cfg = tiny_cfgs()
    w = PreviewWriter(model_cfg, diff_cfg, interval=2, log_dir=str(tmp_path), device="cpu",
                      precision="fp32", seed=0, steps=3, is_main=False)
    assert w.write(2, {}) is None and not (tmp_path / "samples").exists()
    assert w.due(4) and not w.due(3)


@pytest.mark.parametrize("kwargs,needle", [(dict(interval=-1), "sample_interval"),
                                           (dict(steps=0), "sample_steps")])
def test_bad_preview_settings_are_errors(tmp_path, kwargs, needle):
    # One check, in the config (TrainConfig.__post_init__): the writer trusts its settings.
    flag = "--" + needle
    with pytest.raises(cli.UsageError, match=needle):
        cli.parse_config([flag, str(kwargs.get("interval", kwargs.get("steps")))])


def test_grid_into_a_given_path_leaves_the_samples_folder_alone(tmp_path):
    """The end-of-training samples_grid.png goes through the same writer, to its own path."""
    model_cfg, diff_cfg = tiny_cfgs()
    diff_cfg = dataclasses.replace(diff_cfg, diffusion_steps=4)  # DDIM-50 capped at T = 4
    kw = {**C.model_and_diffusion_defaults(), **vars(model_cfg), **vars(diff_cfg)}
    model, _ = C.create_model_and_diffusion(**kw)
    writer = PreviewWriter(model_cfg, diff_cfg, interval=0, log_dir=str(tmp_path), device="cpu",
                           precision="fp32", seed=0, steps=50, n=10)
    target = str(tmp_path / "samples_grid.png")
    path = writer.write(7, model.state_dict(), target)
    assert path == target
    assert Image.open(path).size == (10 * 65 + 1, 65 + 1)
    assert not (tmp_path / "samples").exists()

def test_end_of_training_grid_samples_the_first_ema(tmp_path):
    run = tmp_path / "run"
    assert cli.main(TINY_RUN + ["--log_dir", str(run), "--sample_grid", "True",
                                "--ema_rate", "0.5,0.9"]) == 0
    model_cfg, diff_cfg = tiny_cfgs()
    again = PreviewWriter(model_cfg, diff_cfg, interval=0, log_dir=str(tmp_path), device="cpu",
                          precision="fp32", seed=7, steps=cli.FINAL_GRID_STEPS, use_ddim=False)

    def grid_of(name):
        weights = torch.load(run / name, weights_only=True)
        return pixels(again.write(4, weights, str(tmp_path / f"{name}.png")))

    final = pixels(run / "samples_grid.png")
    assert np.array_equal(final, grid_of("ema_0.5_000004.pt"))
    assert not np.array_equal(final, grid_of("model000004.pt"))
