"""python -m fastdiff.super_res_sample: every output is conditioned on its own base sample (and
its label), GD's output format, and one-line errors for a --base_samples file it cannot use."""
import json

import numpy as np
import pytest
import torch

from fastdiff import config as C
from fastdiff import super_res_sample
from fastdiff.models.super_res import SuperResModel

SR_MODEL = dict(large_size=16, small_size=8, num_channels=32, num_res_blocks=1,
                channel_mult="1,2", attention_resolutions="8", num_heads=2, class_cond=True,
                diffusion_steps=50)


def make_sr_model(tmp_path, **extra):
    """A super-resolution checkpoint + config.json, every weight moved off GD's init."""
    kw = {**C.sr_model_and_diffusion_defaults(), **SR_MODEL, **extra}
    channel_mult = kw.pop("channel_mult")
    class_dropout_prob = kw.pop("class_dropout_prob", 0.0)
    model, _ = C.sr_create_model_and_diffusion(**kw, channel_mult=channel_mult,
                                               class_dropout_prob=class_dropout_prob)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator), alpha=0.05)
    folder = tmp_path / "sr"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "model000010.pt")
    (folder / "config.json").write_text(json.dumps(
        {**kw, "channel_mult": channel_mult, "class_dropout_prob": class_dropout_prob}))
    return folder / "model000010.pt"


def base_samples(tmp_path, count=3, size=8, with_labels=True):
    """A GD sample file as fastdiff.sample writes it (random uint8 images, labels)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, count).astype(np.int64)
    path = tmp_path / f"samples_{count}x{size}x{size}x3.npz"
    np.savez(path, images, labels) if with_labels else np.savez(path, images)
    return path, images, labels


def run(model_path, base_path, out_dir, *flags):
    return super_res_sample.main(["--model_path", str(model_path), "--base_samples",
                                  str(base_path), "--log_dir", str(out_dir), *flags])


def record_sr_calls(monkeypatch):
    calls = []
    forward = SuperResModel.forward

    def recording_forward(self, x, timesteps, low_res=None, **kwargs):
        y = kwargs.get("y")
        calls.append((low_res.clone(), None if y is None else y.clone()))
        return forward(self, x, timesteps, low_res=low_res, **kwargs)

    monkeypatch.setattr(SuperResModel, "forward", recording_forward)
    return calls


@pytest.mark.parametrize("class_cond,sampler", [
    (True, ["--timestep_respacing", "3"]),
    (False, ["--use_ddim", "--timestep_respacing", "ddim3"]),
], ids=["conditional-ancestral", "unconditional-ddim"])
def test_each_output_is_conditioned_on_its_base_sample(tmp_path, monkeypatch, class_cond, sampler):
    model_path = make_sr_model(tmp_path, class_cond=class_cond)
    base_path, base, labels = base_samples(tmp_path, with_labels=class_cond)
    calls = record_sr_calls(monkeypatch)
    # 5 outputs from 3 base samples: output i upsamples base i mod 3; batches of 2, 2, 1.
    assert run(model_path, base_path, tmp_path / "out", "--num_samples", "5",
               "--batch_size", "2", *sampler) == 0
    out = np.load(tmp_path / "out" / "samples_5x16x16x3.npz")
    assert list(out.keys()) == ["arr_0"]  # GD's super_res_sample stores the images only
    assert out["arr_0"].dtype == np.uint8 and out["arr_0"].shape == (5, 16, 16, 3)
    assert (tmp_path / "out" / "samples_grid.png").is_file()

    assert len(calls) == 3 * 3  # three batches of three steps
    for batch, index in enumerate([[0, 1], [2, 0], [1]]):
        # GD's conversion, written out: uint8 / 127.5 - 1, NHWC → NCHW.
        expected = torch.from_numpy(base[index].astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
        for low_res, y in calls[3 * batch:3 * batch + 3]:
            assert torch.equal(low_res, expected)
            assert (y.tolist() == labels[index].tolist()) if class_cond else y is None


def corrupt(tmp_path, kind):
    """A --base_samples file with one defect; the model takes 8×8 class-conditional input."""
    path = tmp_path / "bad.npz"
    good = np.zeros((2, 8, 8, 3), np.uint8)
    if kind == "missing":
        return tmp_path / "nowhere.npz"
    if kind == "not an npz":
        path.write_text("hello")
    elif kind == "single npy array":
        np.save(tmp_path / "bad.npy", good)
        return tmp_path / "bad.npy"
    elif kind == "no arr_0":
        np.savez(path, images=good)
    elif kind == "float images":
        np.savez(path, good.astype(np.float32), np.zeros(2, np.int64))
    elif kind == "no channel axis":
        np.savez(path, good[..., 0], np.zeros(2, np.int64))
    elif kind == "one channel":
        np.savez(path, good[..., :1], np.zeros(2, np.int64))
    elif kind == "wrong height":
        np.savez(path, np.zeros((2, 16, 8, 3), np.uint8), np.zeros(2, np.int64))
    elif kind == "wrong size":
        np.savez(path, np.zeros((2, 16, 16, 3), np.uint8), np.zeros(2, np.int64))
    elif kind == "no labels":
        np.savez(path, good)
    elif kind == "label out of range":
        np.savez(path, good, np.array([3, 1000]))
    elif kind == "too few labels":
        np.savez(path, good, np.zeros(1, np.int64))
    return path


@pytest.mark.parametrize("kind,message", [
    ("missing", "does not exist"), ("not an npz", "not an npz"),
    ("single npy array", "single array"), ("no arr_0", "no arr_0"),
    ("float images", "must be uint8 [N, 8, 8, 3]"), ("no channel axis", "must be uint8"),
    ("one channel", "got uint8 [2, 8, 8, 1]"), ("wrong height", "got uint8 [2, 16, 8, 3]"),
    ("wrong size", "(small_size 8), got uint8 [2, 16, 16, 3]"), ("no labels", "no arr_1"),
    ("too few labels", "2 integer labels"), ("label out of range", "labels must be in [0, 1000)"),
])
def test_bad_base_samples_are_one_line_and_write_nothing(tmp_path, capsys, kind, message):
    model_path = make_sr_model(tmp_path)
    out = tmp_path / "out"
    # A short run, should a check be missing: the rc assertion fails fast, no 10000 samples.
    assert run(model_path, corrupt(tmp_path, kind), out, "--num_samples", "1",
               "--timestep_respacing", "2") == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdiff.super_res_sample: error: --base_samples")
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_checkpoint_that_does_not_fit_is_one_line(tmp_path, capsys):
    model_path = make_sr_model(tmp_path)
    base_path, _, _ = base_samples(tmp_path)
    assert run(model_path, base_path, tmp_path / "out", "--num_channels", "64") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit the model" in err
    assert not (tmp_path / "out").exists()


def test_classifier_free_guidance_checkpoint_loads(tmp_path):
    """A run trained with label dropout has the null-class row; it loads without the flag."""
    model_path = make_sr_model(tmp_path, class_dropout_prob=0.1)
    base_path, _, _ = base_samples(tmp_path)
    assert run(model_path, base_path, tmp_path / "out", "--num_samples", "1",
               "--timestep_respacing", "2") == 0


def test_two_ranks_under_torchrun_write_one_gathered_file(tmp_path):
    """torchrun: rank r upsamples outputs [2r, 2r + 2) of 3; rank 0 writes them once, in
    order (GD's arr_0 only)."""
    import os
    import subprocess
    import sys
    model_path = make_sr_model(tmp_path)
    base_path, _, _ = base_samples(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "fastdiff.super_res_sample", "--model_path", str(model_path), "--base_samples",
         str(base_path), "--log_dir", str(tmp_path / "out"), "--num_samples", "3",
         "--batch_size", "2", "--timestep_respacing", "3", "--no_progress", "True"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = np.load(tmp_path / "out" / "samples_3x16x16x3.npz")
    assert list(out.keys()) == ["arr_0"] and out["arr_0"].shape == (3, 16, 16, 3)
