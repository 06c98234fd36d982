"""``python -m fastdiff.super_res_train`` on a tiny model: GD's low_res input, checkpoints and
GD exports that load into GD's super-res factory, exact resume, the end-of-run grid, FLOPs,
a 2-rank torchrun, and bad flags as one line."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastdiff import config as C
from fastdiff import super_res_train
from fastdiff.data import ConditionedStream, load_data
from fastdiff.train import telemetry as T
from fastdiff.train.loop import Trainer

# small_size 2: a factor of 4, where bilinear downsampling (the mean of the middle 2x2 of each
# 4x4) differs from GD's area downsampling (at a factor of 2 the two are the same).
TINY = ["--large_size", "8", "--small_size", "2", "--num_channels", "32",
        "--num_res_blocks", "1", "--channel_mult", "1,2", "--attention_resolutions", "",
        "--num_heads", "1", "--batch_size", "4", "--log_interval", "2", "--save_interval", "2",
        "--sample_grid", "False", "--diffusion_steps", "20", "--noise_schedule", "cosine",
        "--seed", "3", "--tensorboard", "False", "--log_format", "line", "--no_progress"]


def run(tmp_path, name, *extra):
    log_dir = tmp_path / name
    return super_res_train.main(TINY + ["--log_dir", str(log_dir)] + list(extra)), log_dir


def load(path):
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("small_size", [4, 6])
def test_low_res_is_gd_area_downsampling_of_the_batch(small_size):
    stream = ConditionedStream(load_data(batch_size=4, image_size=16, seed=1),
                               small_size=small_size)
    for _ in range(2):
        x, cond = next(stream)
        assert cond.keys() == {"low_res"}
        assert cond["low_res"].shape == (4, 3, small_size, small_size)
        # GD's load_superres_data, bit for bit.
        assert torch.equal(cond["low_res"], F.interpolate(x, small_size, mode="area"))


@pytest.fixture
def seen_batches(monkeypatch):
    """(batch, cond) of every Trainer.train_step."""
    seen = []
    original = Trainer.train_step

    def train_step(self, batch, cond):
        seen.append((batch.clone(), {k: v.clone() for k, v in cond.items()}))
        return original(self, batch, cond)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    return seen


def test_trains_writes_gd_exports_and_resumes_exactly(tmp_path, seen_batches):
    rc, full = run(tmp_path, "full", "--max_steps", "4", "--ema_rate", "0.9")
    assert rc == 0
    # The trainer was fed GD's super-res batches.
    assert len(seen_batches) == 4
    for batch, cond in seen_batches:
        assert torch.equal(cond["low_res"], F.interpolate(batch, 2, mode="area"))
    for name in ["model000004.pt", "ema_0.9_000004.pt", "opt000004.pt", "config.json"]:
        assert (full / name).is_file(), name
    assert (full / "checkpoints" / "step_000004" / "trainer.json").is_file()
    cfg = json.load(open(full / "config.json"))
    assert (cfg["large_size"], cfg["small_size"]) == (8, 2)
    kw = {k: cfg[k] for k in C.sr_model_and_diffusion_defaults()}
    model, _ = C.sr_create_model_and_diffusion(**kw, channel_mult=cfg["channel_mult"])
    for name in ["model000004.pt", "ema_0.9_000004.pt"]:
        model.load_state_dict(load(full / name), strict=True)

    rc, part = run(tmp_path, "part", "--max_steps", "2", "--ema_rate", "0.9")
    assert rc == 0
    rc, _ = run(tmp_path, "part", "--max_steps", "4", "--ema_rate", "0.9",
                "--resume_checkpoint", "latest")
    assert rc == 0
    for name in ["model000004.pt", "ema_0.9_000004.pt"]:
        a, b = load(full / name), load(part / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a, b = load(full / "opt000004.pt"), load(part / "opt000004.pt")
    for i in a["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["state"][i][key], b["state"][i][key]), (i, key)


def test_end_of_run_grid_shows_inputs_samples_and_originals(tmp_path, capsys):
    rc, d = run(tmp_path, "grid", "--max_steps", "1", "--sample_grid", "True",
                "--save_interval", "100")
    assert rc == 0
    # Three rows (low-res input, sample, original) of the ten held-out digits 0..9, 8x8
    # images shown at 64x64 with 1-pixel gaps.
    assert Image.open(d / "samples_grid.png").size == (10 * 65 + 1, 3 * 65 + 1)
    log = open(d / "log.txt").read()
    assert "super-res grid: PSNR of the samples" in log
    # A checkpoint of other sizes is not resumed (small_size changes what the input means).
    rc, _ = run(tmp_path, "grid", "--max_steps", "2", "--small_size", "4",
                "--resume_checkpoint", "latest")
    assert rc == 2
    assert "--small_size 2 → 4" in capsys.readouterr().err


def test_grid_references_are_one_held_out_digit_per_class():
    cfg = C.SuperResModelConfig(large_size=16, small_size=8, class_cond=True)
    images, labels = super_res_train.grid_references(cfg, C.TrainConfig())
    assert images.shape == (10, 3, 16, 16) and labels == list(range(10))
    assert float(images.min()) >= -1 and float(images.max()) <= 1


def test_flops_count_the_super_res_unet():
    """The super-res UNet is the image UNet with 3 more input channels, so the two differ by
    the first 3x3 conv's extra input channels: forward 2·3·C·9 per pixel, plus as much again
    for its weight gradient (its input needs no gradient)."""
    sr = C.SuperResModelConfig(large_size=8, small_size=2, num_channels=32, num_res_blocks=1,
                               channel_mult="1,2", attention_resolutions="")
    kw = {k: v for k, v in dataclasses.asdict(sr).items() if k not in ("large_size", "small_size")}
    image = C.ModelConfig(image_size=8, **kw)
    diff = C.DiffusionConfig()
    extra = T.count_flops_per_image(sr, diff) - T.count_flops_per_image(image, diff)
    assert extra == 2 * (2 * 3 * 32 * 9 * 8 * 8)


@pytest.mark.parametrize("argv,needle", [
    (["--small_size", "8"], "--small_size"),
    (["--large_size", "24", "--channel_mult", ""], "large_size"),
    (["--data_dir", "/nonexistent/images"], "/nonexistent/images"),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, capsys, argv, needle):
    rc, d = run(tmp_path, "bad", *argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("fastdiff.super_res_train: error:") and needle in err
    assert err.count("\n") == 1, err
    assert not d.exists()


def test_two_ranks_under_torchrun(tmp_path):
    log_dir = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "fastdiff.super_res_train"] + TINY + ["--max_steps", "2",
                                                          "--log_dir", str(log_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in open(log_dir / "log.txt").read()
    step = log_dir / "checkpoints" / "step_000002"
    assert (step / "rank00000.pt").is_file() and (step / "rank00001.pt").is_file()
    # Each rank's stream position (and its conditioning batch count) is in its rank file.
    data = torch.load(step / "rank00001.pt", weights_only=False)["data"]
    assert data["conditioned_batches"] == 2
    cfg = json.load(open(log_dir / "config.json"))
    kw = {k: cfg[k] for k in C.sr_model_and_diffusion_defaults()}
    model, _ = C.sr_create_model_and_diffusion(**kw, channel_mult=cfg["channel_mult"])
    model.load_state_dict(load(log_dir / "model000002.pt"), strict=True)
